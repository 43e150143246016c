"""``make gpu-check``: the one command a person with a CUDA GPU runs to check vlfast there.

    python3 benchmarks/gpu_check.py            # or: make gpu-check
    DRY_RUN=1 python3 benchmarks/gpu_check.py  # print every command, run none

It uses the machine's own ``python3`` and torch (no virtualenv, no torch reinstall)
and runs, from the repository root, in this order, each step under its own time cap
(``timeout -k 2 <cap>``; a step that fails or runs out of time is recorded and the
next one runs):

====  =======================  =====  ==================================================================
 #    step                     cap s  what
====  =======================  =====  ==================================================================
 1    install                     90  ``python3 -m pip install --no-deps --no-build-isolation .``
 2    kernel_tests               135  ``pytest tests/kernels -m cuda`` with ``VLFAST_TEST_DEVICE=cuda``:
                                      every Triton kernel and the CUDA IPOT / Sinkhorn / keep-mask
                                      kernels on CUDA tensors against their references (the ``cuda``
                                      marker is set in tests/conftest.py); pytest-xdist workers when
                                      the interpreter has xdist
 3-6  memcheck_ipot, ...          20  ``compute-sanitizer --tool memcheck`` / ``--tool racecheck`` on
                                      ``benchmarks/gpu_check_calls.py ipot`` and ``... attention``
 7    bench_attention             40  ``benchmarks/bench_attention.py``, full shapes (the default; no
                                      ``--quick``), every provider but ``compile``
 8    bench_co_attention          20  ``benchmarks/bench_co_attention.py``, likewise
 9    bench_ot                    20  ``benchmarks/bench_ot.py``, full shapes, every provider
 10   ncu_attention_fwd           20  ``ncu`` on two launches of the Triton attention forward kernel
 11   ncu_ipot                    20  ``ncu`` on two launches of the CUDA IPOT kernel
====  =======================  =====  ==================================================================

Before them, a probe (10 s for ``nvidia-smi``, 20 s for ``python3 -c 'import torch ...'``)
finds the GPU.  The caps and the probe add up to 455 s, plus 2 s of kill grace per
step: at most 477 s, inside the 8 minutes the check must take on an H100-class GPU.
The caps are estimates made without a GPU at hand: the GPU-run issue checks them.
``GPU_CHECK_CAP_SCALE=2`` doubles every cap (a slower GPU, a cold Triton cache).

Everything goes to ``benchmarks/results/gpu_check_<device-slug>/`` (the slug of
``torch.cuda.get_device_name()``, e.g. ``gpu_check_nvidia-h100-80gb-hbm3``): ``device.txt``
(nvidia-smi and torch's view), one ``NN_<step>.log`` per step (its command line first),
``kernel_tests.xml`` (JUnit), the benchmarks' CSVs, and ``summary.md`` / ``summary.json``
listing each step with its command, cap, status and seconds.

A step's status is ``passed``, ``failed (...)``, ``timed out (cap N s)`` or, for the
compute-sanitizer and ncu steps, ``not supported (...)`` when the tool is missing or
refuses the device (e.g. "Device not supported", ncu's ``LibraryNotLoaded`` or
``ERR_NVGPUCTRPERM``).  The exit code is 0 when every step passed or was not
supported, 1 otherwise.  On a machine without a GPU (no ``nvidia-smi``, or
``torch.cuda.is_available()`` is False) it says so and exits 0; ``DRY_RUN=1`` always
prints the plan (with ``DEVICE`` for the slug) and exits 0.

Environment: ``DRY_RUN``, ``GPU_CHECK_CAP_SCALE``, ``GPU_CHECK_PYTHON`` (the
interpreter of the steps, default ``python3``), ``GPU_CHECK_TEST_WORKERS`` (pytest-xdist
workers of step 2; 0 = none), ``GPU_CHECK_RESULTS`` (the folder instead of
``benchmarks/results``; the tests point it elsewhere).

Standard library only: it runs before vlfast (or anything else) is installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"  # relative to REPO, where every command runs

BUDGET_S = 480           # the whole check, on an H100-class GPU
KILL_GRACE_S = 2         # timeout -k: SIGKILL this long after the SIGTERM at the cap
PROBE_SMI_CAP_S = 10
PROBE_TORCH_CAP_S = 20   # a cold `import torch` on a fresh machine
INSTALL_CMD = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", ".")

# Nominal caps in seconds (scaled by GPU_CHECK_CAP_SCALE), in step order.
CAPS: dict[str, int] = {
    "install": 90,
    "kernel_tests": 135,
    "memcheck_ipot": 20,
    "memcheck_attention": 20,
    "racecheck_ipot": 20,
    "racecheck_attention": 20,
    "bench_attention": 40,
    "bench_co_attention": 20,
    "bench_ot": 20,
    "ncu_attention_fwd": 20,
    "ncu_ipot": 20,
}

# torch.compile recompiles for every shape (minutes at full shapes): left out here.
BENCH_PROVIDERS = {
    "attention": "eager,sdpa,vlfast,vlfast_varlen,flash_varlen",
    "co_attention": "eager,sdpa_x2,vlfast,vlfast_x2",
    "ot": "",  # all
}

# A tool's own lines ("========= ..." for compute-sanitizer, "==ERROR==" / "==PROF==" for ncu)
# that mean it cannot work on this device or machine.
REFUSAL = re.compile(r"not supported|unsupported (device|gpu|architecture)|LibraryNotLoaded|ERR_NVGPUCTRPERM"
                     r"|Failed to initialize the profiler|permission to access NVIDIA GPU Performance Counters"
                     r"|could not be loaded|Failed to (find|load) .*(driver|library)", re.IGNORECASE)
TOOL_LINE = re.compile(r"^\s*==")

# Three lines: is_available, the device name, "torch-version cuda-version (major, minor)".
PROBE_CODE = ("import torch; ok = torch.cuda.is_available(); print(ok); "
              "print(torch.cuda.get_device_name(0) if ok else None); "
              "print(torch.__version__, torch.version.cuda, torch.cuda.get_device_capability(0) if ok else None)")


@dataclass(frozen=True)
class Step:
    """One command of the check."""

    name: str
    argv: tuple[str, ...]
    cap_s: int
    env: tuple[tuple[str, str], ...] = ()
    outputs: tuple[str, ...] = ()   # files it writes besides its log (relative to REPO)
    tool: Optional[str] = None      # compute-sanitizer / ncu: missing or refused = not supported
    log: str = ""

    def command_line(self) -> str:
        """The shell line that runs it (environment, ``timeout -k 2 <cap>``, command)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        cmd = shlex.join(["timeout", "-k", str(KILL_GRACE_S), str(self.cap_s), *self.argv])
        return f"{env} {cmd}" if env else cmd


@dataclass
class Result:
    """What happened to one step."""

    step: Step
    status: str
    seconds: float = 0.0
    rc: Optional[int] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "passed" or self.status.startswith("not supported")


@dataclass
class Device:
    """The GPU as nvidia-smi and torch see it."""

    name: str
    smi: str = ""
    torch_info: str = ""
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------

def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def cap_scale(env: Mapping[str, str]) -> float:
    raw = env.get("GPU_CHECK_CAP_SCALE", "").strip() or "1"
    try:
        x = float(raw)
    except ValueError:
        raise SystemExit(f"gpu_check: GPU_CHECK_CAP_SCALE: expected a positive number, got {raw!r}") from None
    if not x > 0:
        raise SystemExit(f"gpu_check: GPU_CHECK_CAP_SCALE: expected a positive number, got {raw!r}")
    return x


def test_workers(env: Mapping[str, str]) -> int:
    """pytest-xdist workers for the kernel tests: ``GPU_CHECK_TEST_WORKERS``, else up to 8
    (half the cores) when this interpreter -- the ``python3`` of ``make gpu-check`` -- has xdist."""
    raw = env.get("GPU_CHECK_TEST_WORKERS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise SystemExit(f"gpu_check: GPU_CHECK_TEST_WORKERS: expected an int >= 0, got {raw!r}") from None
        if n < 0:
            raise SystemExit(f"gpu_check: GPU_CHECK_TEST_WORKERS: expected an int >= 0, got {raw!r}")
        return n
    if importlib.util.find_spec("xdist") is None:
        return 0
    n = min(8, (os.cpu_count() or 2) // 2)
    return n if n >= 2 else 0


def build_plan(out_dir: str, *, python: str = "python3", scale: float = 1.0, workers: int = 0) -> list[Step]:
    """Every step, in order; ``out_dir`` is relative to the repository root."""
    def cap(name: str) -> int:
        return max(1, int(round(CAPS[name] * scale)))

    def log(i: int, name: str) -> str:
        return f"{out_dir}/{i:02d}_{name}.log"

    steps: list[Step] = []

    def add(name: str, argv: Sequence[str], env: Sequence[tuple[str, str]] = (), outputs: Sequence[str] = (),
            tool: Optional[str] = None) -> None:
        steps.append(Step(name, tuple(argv), cap(name), tuple(env), tuple(outputs), tool, log(len(steps) + 1, name)))

    add("install", [python, *INSTALL_CMD])

    # PYTHONSAFEPATH: the installed vlfast (with its compiled _C), not the source tree's.
    # VLFAST_REQUIRE_BACKENDS: a kernel that did not build is an error, never the reference in its place.
    junit = f"{out_dir}/kernel_tests.xml"
    xdist = ["-n", str(workers)] if workers > 0 else []
    add("kernel_tests",
        [python, "-m", "pytest", "tests/kernels", "-m", "cuda", *xdist, "-p", "no:cacheprovider", "-rfE",
         "--durations=15", "--continue-on-collection-errors", f"--junitxml={junit}"],
        env=[("VLFAST_TEST_DEVICE", "cuda"), ("VLFAST_REQUIRE_BACKENDS", "cpp,cuda,triton"), ("PYTHONSAFEPATH", "1")],
        outputs=[junit])

    # No caching allocator under the sanitizers: an out-of-bounds access then leaves its allocation.
    san_env = [("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")]
    calls = {"ipot": [python, "benchmarks/gpu_check_calls.py", "ipot"],
             "attention": [python, "benchmarks/gpu_check_calls.py", "attention"]}
    for tool in ("memcheck", "racecheck"):
        for call in ("ipot", "attention"):
            add(f"{tool}_{call}",
                ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", "--report-api-errors", "no",
                 "--print-limit", "50", *calls[call]],
                env=san_env, tool="compute-sanitizer")

    for bench in ("attention", "co_attention", "ot"):
        csv_path = f"{out_dir}/{bench}.csv"
        provs = ["--providers", BENCH_PROVIDERS[bench]] if BENCH_PROVIDERS[bench] else []
        add(f"bench_{bench}", [python, f"benchmarks/bench_{bench}.py", "--device", "cuda", *provs, "--out", csv_path],
            outputs=[csv_path])

    ncu = ["ncu", "--target-processes", "all", "--clock-control", "none", "--launch-skip", "1", "--launch-count", "2",
           "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy"]
    add("ncu_attention_fwd",
        [*ncu, "--kernel-name", "regex:_attn_fwd_kernel", *calls["attention"], "--forward-only", "--iters", "3",
         "--no-check"], tool="ncu")
    add("ncu_ipot", [*ncu, "--kernel-name", "regex:ipot_kernel", *calls["ipot"], "--iters", "2", "--no-check"],
        tool="ncu")
    assert [s.name for s in steps] == list(CAPS), "CAPS and the plan must list the same steps in order"
    return steps


def probe_commands(python: str = "python3") -> list[str]:
    """The probe's command lines, for the plan."""
    return [shlex.join(["timeout", str(PROBE_SMI_CAP_S), "nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"]),
            shlex.join(["timeout", str(PROBE_TORCH_CAP_S), python, "-c", PROBE_CODE])]


def print_plan(steps: Sequence[Step], out_dir: str, python: str, *, dry_run: bool) -> None:
    total = PROBE_SMI_CAP_S + PROBE_TORCH_CAP_S + sum(s.cap_s + KILL_GRACE_S for s in steps)
    head = "DRY_RUN=1: the commands gpu-check would run (none is run)" if dry_run else "gpu-check plan"
    print(f"# {head}, from {REPO}")
    print(f"# results: {out_dir}/ (DEVICE = slug of torch.cuda.get_device_name(0))" if dry_run else
          f"# results: {out_dir}/")
    print(f"# caps: {total} s at most in all (budget {BUDGET_S} s)")
    print("[probe] find the GPU")
    for line in probe_commands(python):
        print(f"    {line}")
    for i, s in enumerate(steps, 1):
        extra = f"  outputs: {', '.join(s.outputs)}" if s.outputs else ""
        print(f"[{i:02d}] {s.name}  cap {s.cap_s} s  log: {s.log}{extra}")
        print(f"    {s.command_line()}")
    print(f"[summary] {out_dir}/summary.md, {out_dir}/summary.json")


# ----------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------

def _capture(argv: Sequence[str], cap_s: float) -> tuple[Optional[int], str]:
    try:
        p = subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=cap_s)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"
    return p.returncode, (p.stdout + p.stderr).strip()


def probe(python: str) -> tuple[Optional[Device], str]:
    """(the device, "") when a CUDA GPU is usable, else (None, why not)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi not found"
    rc, smi_out = _capture([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           PROBE_SMI_CAP_S)
    if rc != 0:
        return None, f"nvidia-smi failed (rc {rc}): {smi_out.splitlines()[-1] if smi_out else 'no output'}"
    rc, out = _capture([python, "-c", PROBE_CODE], PROBE_TORCH_CAP_S)
    lines = out.splitlines()
    if rc != 0 or not lines:
        return None, f"{python} -c 'import torch ...' failed (rc {rc}): {lines[-1] if lines else 'no output'}"
    # torch may print warnings first: the last three lines are the probe's.
    tail = lines[-3:] if len(lines) >= 3 else lines
    if tail[0].strip() != "True":
        return None, f"torch.cuda.is_available() is False ({python}: {' '.join(lines[-2:]).strip()})"
    return Device(name=tail[1].strip(), smi=smi_out, torch_info=tail[2].strip() if len(tail) > 2 else ""), ""


def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, else in $CUDA_HOME/bin, /usr/local/cuda/bin or Nsight Compute's folders."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs += ["/usr/local/cuda/bin"]
    dirs += sorted((str(p) for p in Path("/opt/nvidia").glob("nsight-compute/*")), reverse=True)
    dirs += sorted((str(p) for p in Path("/usr/local/cuda/").glob("nsight-compute*")), reverse=True)
    for d in dirs:
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def classify(step: Step, rc: Optional[int], log_text: str, timed_out: bool) -> tuple[str, str]:
    """(status, detail) of a finished step from its exit code and log."""
    no_kernels = step.tool == "ncu" and re.search(r"No kernels were profiled", log_text) is not None
    if step.tool:
        refusals = [ln.strip() for ln in log_text.splitlines() if TOOL_LINE.match(ln) and REFUSAL.search(ln)]
        if refusals and (rc != 0 or timed_out or no_kernels):
            return f"not supported ({step.tool} refused: {refusals[0][:160]})", refusals[0]
    if timed_out:
        return f"timed out (cap {step.cap_s} s)", ""
    if rc != 0:
        why = "sanitizer found errors" if (step.tool == "compute-sanitizer" and rc == 99) else f"rc {rc}"
        return f"failed ({why})", ""
    if no_kernels:
        return "failed (ncu: no kernels were profiled)", ""
    return "passed", ""


def run_step(step: Step, base_env: Mapping[str, str]) -> Result:
    """Run one step under its cap, its output in its log; never raises."""
    log_path = REPO / step.log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for out in step.outputs:
        (REPO / out).unlink(missing_ok=True)  # this run's results only
    argv = list(step.argv)
    if step.tool:
        tool = find_tool(step.tool)
        if tool is None:
            msg = f"{step.tool} not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
            log_path.write_text(f"$ {step.command_line()}\n\nnot supported: {msg}\n")
            return Result(step, f"not supported ({msg})")
        argv[0] = tool
    timeout_bin = shutil.which("timeout")
    full = ([timeout_bin, "-k", str(KILL_GRACE_S), str(step.cap_s)] if timeout_bin else []) + argv
    env = {**base_env, **dict(step.env)}
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        log.write(f"$ {step.command_line()}\n\n")
        log.flush()
        try:
            proc = subprocess.Popen(full, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            return Result(step, f"failed (cannot start: {e})")
        try:  # backstop for a machine without coreutils' timeout
            rc = proc.wait(timeout=step.cap_s + KILL_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    seconds = time.monotonic() - t0
    if timeout_bin and rc in (124, 137) and seconds >= step.cap_s - 1:
        timed_out = True
    text = log_path.read_text(errors="replace")
    status, detail = classify(step, rc, text, timed_out)
    with open(log_path, "a") as log:
        log.write(f"\n# {step.name}: {status}, {seconds:.1f} s (cap {step.cap_s} s), rc {rc}\n")
    return Result(step, status, seconds, rc, detail)


def write_summary(out_dir: Path, device: Device, results: Sequence[Result], total_s: float) -> None:
    passed = all(r.ok for r in results)
    rows = [f"# gpu-check on {device.name}", "",
            f"nvidia-smi: {device.smi}", f"torch, CUDA, capability: {device.torch_info}",
            f"result: {'PASSED' if passed else 'FAILED'} in {total_s:.1f} s (budget {BUDGET_S} s)", "",
            "| # | step | status | seconds | cap s | log | command |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        cmd = r.step.command_line().replace("|", "\\|")
        rows.append(f"| {i} | {r.step.name} | {r.status} | {r.seconds:.1f} | {r.step.cap_s} | "
                    f"{Path(r.step.log).name} | `{cmd}` |")
    (out_dir / "summary.md").write_text("\n".join(rows) + "\n")
    data = {"device": device.name, "nvidia_smi": device.smi, "torch": device.torch_info, "passed": passed,
            "seconds": round(total_s, 1), "budget_s": BUDGET_S,
            "steps": [{"step": r.step.name, "command": r.step.command_line(), "cap_s": r.step.cap_s,
                       "status": r.status, "seconds": round(r.seconds, 1), "rc": r.rc, "log": r.step.log,
                       "outputs": list(r.step.outputs)} for r in results]}
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")


def _truthy(raw: Optional[str]) -> bool:
    return (raw or "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv:
        print(__doc__)
        return 0 if list(argv) in (["-h"], ["--help"]) else 2
    env = dict(os.environ)
    python = env.get("GPU_CHECK_PYTHON", "").strip() or "python3"
    results = env.get("GPU_CHECK_RESULTS", "").strip().rstrip("/") or RESULTS
    scale = cap_scale(env)
    workers = test_workers(env)
    if _truthy(env.get("DRY_RUN")):
        out_rel = f"{results}/gpu_check_DEVICE"
        print_plan(build_plan(out_rel, python=python, scale=scale, workers=workers), out_rel, python, dry_run=True)
        return 0

    device, why = probe(python)
    if device is None:
        print(f"gpu-check: no GPU on this machine ({why}); nothing to check (it needs a CUDA GPU). "
              "DRY_RUN=1 prints the plan.")
        return 0
    out_rel = f"{results}/gpu_check_{slug(device.name)}"
    out_dir = REPO / out_rel
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "device.txt").write_text(f"name: {device.name}\nnvidia-smi: {device.smi}\n"
                                        f"torch, CUDA, capability: {device.torch_info}\n")
    steps = build_plan(out_rel, python=python, scale=scale, workers=workers)
    print(f"gpu-check on {device.name} ({device.torch_info}; {device.smi})")
    print_plan(steps, out_rel, python, dry_run=False)
    base_env = {**env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    results = []
    for i, step in enumerate(steps, 1):
        print(f"[{i:02d}/{len(steps)}] {step.name} (cap {step.cap_s} s) ...", flush=True)
        r = run_step(step, base_env)
        results.append(r)
        print(f"[{i:02d}/{len(steps)}] {step.name}: {r.status}, {r.seconds:.1f} s  ({step.log})", flush=True)
    total = time.monotonic() - t0
    write_summary(out_dir, device, results, total)
    ok = all(r.ok for r in results)
    print(f"gpu-check: {'PASSED' if ok else 'FAILED'} ({sum(r.status == 'passed' for r in results)} passed, "
          f"{sum(r.status.startswith('not supported') for r in results)} not supported, "
          f"{sum(not r.ok for r in results)} failed or timed out) in {total:.1f} s; "
          f"summary: {out_rel}/summary.md")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
