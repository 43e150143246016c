"""Shared pytest setup.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, unless CUDA is there:
  Triton kernels then run on CPU tensors through the interpreter when a test forces
  the ``triton`` backend.  ``VLFAST_TEST_DEVICE=cuda`` / ``=cpu`` skips the probe and
  says which it is; an explicit ``TRITON_INTERPRET`` in the environment always wins.
* Fixtures: ``devices`` (the torch devices to test on: ``["cpu"]`` plus ``"cuda"`` when
  available) and ``device`` (a test parametrized over them).
"""
from __future__ import annotations

import os

_want = os.environ.get("VLFAST_TEST_DEVICE", "").strip().lower()
if _want == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif _want != "cuda":
    import torch as _torch  # importing torch does not import triton

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def available_devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is usable (and not hidden by VLFAST_TEST_DEVICE=cpu)."""
    devs = ["cpu"]
    if _want != "cpu" and torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = available_devices()


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """The devices to run on: ``["cpu"]`` or ``["cpu", "cuda"]``."""
    return list(DEVICES)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over every available device ("cpu", and "cuda" with a GPU)."""
    return request.param


def pytest_report_header(config: pytest.Config) -> str:
    return (f"vlfast tests: devices={','.join(DEVICES)} "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
            f"VLFAST_BACKEND={os.environ.get('VLFAST_BACKEND', '')!r}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-injection file's tally (tests/training/test_faults.py): every case is
    a fault the training stack must survive with a clear error or a clean recovery."""
    stats = terminalreporter.stats
    ran = {o: [r for r in stats.get(o, []) if getattr(r, "when", "call") == "call"
               and "test_faults.py::" in getattr(r, "nodeid", "")] for o in ("passed", "failed")}
    total = len(ran["passed"]) + len(ran["failed"])
    if total:
        terminalreporter.write_line(f"faults survived: {len(ran['passed'])}/{total}")
