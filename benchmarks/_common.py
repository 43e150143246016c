"""Shared helpers of vlfast's benchmark scripts (not installed; run the scripts directly,
e.g. ``.venv/bin/python benchmarks/bench_dropout_mask.py --quick``).

* :func:`device_name` -- the GPU's name, or the CPU model and core count, for the CSV.
* :func:`measure` -- median and 20/80 % quantiles of a function's run time in ms
  (CUDA events on GPU, ``time.perf_counter`` on CPU).
* :func:`peak_memory` -- peak device memory of one call (NaN on CPU, see there).
* :func:`append_rows` -- append result rows to ``benchmarks/results/<name>.csv`` with
  timestamp, device, torch/triton/vlfast versions and git commit.
* :func:`make_parser` -- argparse with ``--quick``, ``--out``, ``--providers``, ``--device``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

DeviceLike = Union[str, torch.device]

# Columns every row gets, first in the CSV, in this order.
META_COLUMNS = ("timestamp", "device", "device_type", "torch", "triton", "vlfast", "git_commit")


# ----------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------

def _as_device(device: DeviceLike) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: DeviceLike) -> str:
    """Human-readable device for result rows: ``"NVIDIA H100 80GB HBM3"`` or
    ``"AMD EPYC 7B13 (2 cores)"`` (cores usable by this process)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"{_cpu_model()} ({cores} cores)"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of the checkout the benchmarks run from (``+dirty`` with local changes),
    or ``"unknown"``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """torch, triton and vlfast versions ("" when not importable)."""
    out = {"torch": torch.__version__, "triton": "", "vlfast": ""}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import vlfast

        out["vlfast"] = vlfast.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def synchronize(device: DeviceLike) -> None:
    if _as_device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------

def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (q in [0, 1])."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(fn: Callable[[], Any], *, warmup: int = 3, rep: int = 10,
            device: DeviceLike = "cpu") -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``rep`` timed ones.

    On CUDA each call is bracketed by ``torch.cuda.Event``s (and the device synchronized
    before reading them); on CPU by ``time.perf_counter``.  Returns
    ``{"median_ms", "p20_ms", "p80_ms", "min_ms", "rep"}``.
    """
    if rep < 1:
        raise ValueError(f"measure: rep: expected >= 1, got {rep}")
    dev = _as_device(device)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(dev)
    times: list[float] = []
    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2),
            "p80_ms": _quantile(times, 0.8), "min_ms": min(times), "rep": float(rep)}


def peak_memory(fn: Callable[[], Any], device: DeviceLike = "cpu") -> float:
    """Peak bytes allocated by torch on ``device`` during one call of ``fn()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the
    number includes tensors that were alive before the call (inputs), as is usual in
    kernel benchmarks.  CPU: torch's CPU allocator keeps no peak statistics (and
    tracemalloc does not see it), so this returns NaN -- CPU rows leave memory empty
    rather than report a guess.
    """
    dev = _as_device(device)
    if dev.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return float(torch.cuda.max_memory_allocated(dev))


# ----------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------

def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def append_rows(csv_path: Union[str, Path], rows: Iterable[dict[str, Any]], *,
                device: Optional[DeviceLike] = None) -> Path:
    """Append ``rows`` to ``csv_path`` (created with a header when new).

    Every row gets the :data:`META_COLUMNS` (timestamp; device name and type from
    ``device`` -- else the rows should carry ``"device"`` themselves; torch/triton/vlfast
    versions; git commit) unless it sets them itself.  A row with a column the file lacks rewrites the file with the wider header
    (old rows get empty cells), so scripts can add columns over time.  NaN floats are
    written as empty cells.  Returns the path.
    """
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), **versions()}
    if device is not None:
        meta["device"] = device_name(device)
        meta["device_type"] = _as_device(device).type
    new_rows = []
    for r in rows:
        row = {**meta, **r}
        new_rows.append({k: _fmt(v) for k, v in row.items()})
    if not new_rows:
        return path

    old_header: list[str] = []
    old_rows: list[dict[str, str]] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_header = list(reader.fieldnames or [])
            needs_rewrite = any(k not in old_header for r in new_rows for k in r)
            if needs_rewrite:
                old_rows = list(reader)
    else:
        needs_rewrite = True

    header = list(old_header)
    for k in list(META_COLUMNS) + [k for r in new_rows for k in r]:
        if k not in header:
            header.append(k)
    if needs_rewrite:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(old_rows)
            w.writerows(new_rows)
        os.replace(tmp, path)
    else:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerows(new_rows)
    return path


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def make_parser(name: str, providers: Sequence[str], description: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark shares.

    ``--quick`` (small sizes, few reps: seconds on a 2-core CPU), ``--out`` (default
    ``benchmarks/results/<name>.csv``), ``--providers`` (comma list out of
    ``providers``; default: all that can run), ``--device`` (default ``cuda`` when
    available, else ``cpu``), ``--no-save`` (print only).  After ``parse_args``,
    ``args.providers`` is a list (empty = all).
    """
    known = list(providers)

    def _providers(text: str) -> list[str]:
        out = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in out if p not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown provider(s) {', '.join(bad)}; choose from {', '.join(known)}")
        return out

    p = argparse.ArgumentParser(prog=f"bench_{name}", description=description or f"Benchmark {name}.")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.csv",
                   help="CSV to append rows to (default: %(default)s)")
    p.add_argument("--providers", type=_providers, default=[],
                   help=f"comma-separated subset of {','.join(known)} (default: all that can run here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--no-save", action="store_true", help="print the rows, do not append them to --out")
    return p


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table of ``columns`` of ``rows`` on stdout."""
    cells = [[str(_fmt(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
