"""``python -m vlfast.train``: the main job.

Until the training stack (pretraining objectives and fine-tuning tasks) lands, this
runs a short real training demo on vlfast's attention ops: see
``vlfast.training.demo``.
"""
from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from vlfast.training import demo

    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main())
