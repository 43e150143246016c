"""vlfast: fused-kernel pretraining and fine-tuning for vision-language BERTs."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _dispatch

_dispatch.health_check()

from . import ops  # noqa: E402  (after the health check, so a required backend fails first)

__all__ = ["ops", "__version__"]
