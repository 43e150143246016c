"""vlfast: fused-kernel pretraining and fine-tuning for vision-language BERTs."""
from __future__ import annotations

__version__ = "0.1.0"

import sys as _sys

from . import _source_tree

_source_tree.mount(_sys.modules[__name__])  # a checkout's vlfast/: mount kernels/, training/ and the built _C

from . import _dispatch  # noqa: E402

_dispatch.health_check()

from . import ops  # noqa: E402  (after the health check, so a required backend fails first)

__all__ = ["ops", "__version__"]
