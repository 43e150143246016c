"""Shared pytest setup.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, unless CUDA is there:
  Triton kernels then run on CPU tensors through the interpreter when a test forces
  the ``triton`` backend.  ``VLFAST_TEST_DEVICE=cuda`` / ``=cpu`` skips the probe and
  says which it is; an explicit ``TRITON_INTERPRET`` in the environment always wins.
* Fixtures: ``devices`` (the torch devices to test on: ``["cpu"]`` plus ``"cuda"`` when
  available) and ``device`` (a test parametrized over them).
* The ``cuda`` marker (registered in pyproject.toml) is put on every test that runs on
  CUDA tensors, so ``-m cuda`` selects exactly those (``make gpu-check`` runs
  ``tests/kernels -m cuda``): the ``device="cuda"`` cases of the fixture, every test of a
  module whose ``DEV`` is ``"cuda"``, and tests skipped without CUDA ("needs a CUDA device").
"""
from __future__ import annotations

import os
import re

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


_NEEDS_CUDA = re.compile(r"\b(needs?|requires?)\b.*\b(cuda|gpu)\b", re.IGNORECASE)  # a skipif reason


def _runs_on_cuda(item: pytest.Item) -> bool:
    """Whether ``item`` runs on CUDA tensors (see the module docstring)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "device" in params:
        return str(params["device"]).startswith("cuda")
    if getattr(getattr(item, "module", None), "DEV", None) == "cuda":
        return True
    return any(_NEEDS_CUDA.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that runs on CUDA tensors ``cuda``."""
    for item in items:
        if _runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)


def pytest_report_header(config: pytest.Config) -> str:
    return (f"vlfast tests: devices={','.join(DEVICES)} "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
            f"VLFAST_BACKEND={os.environ.get('VLFAST_BACKEND', '')!r}")


# The fault cases (issue 15): the fault-injection file, and the cases of the other
# files that inject a fault too -- 2 DDP ranks logging every step of the UNITER mix,
# feature stores read in forked DataLoader workers, a failing step with stuck workers,
# NaN in masked padding.
FAULT_CASES = ("tests/training/test_faults.py::", "tests/training/test_jobs.py::test_torchrun_two_processes",
               "tests/data/test_readers_workers.py::", "tests/training/test_worker_failure.py::",
               "tests/models/test_padding_inert.py::")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault tally (:data:`FAULT_CASES`): every case is a fault the training stack
    must survive with a clear error or a clean recovery."""
    stats = terminalreporter.stats

    def case(r: object) -> bool:
        nodeid = getattr(r, "nodeid", "").replace("\\", "/")
        return getattr(r, "when", "call") == "call" and any(c in nodeid for c in FAULT_CASES)

    ran = {o: [r for r in stats.get(o, []) if case(r)] for o in ("passed", "failed")}
    total = len(ran["passed"]) + len(ran["failed"])
    if total:
        terminalreporter.write_line(f"faults survived: {len(ran['passed'])}/{total}")
