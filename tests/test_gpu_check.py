"""``make gpu-check`` (benchmarks/gpu_check.py) on a machine without a GPU.

* ``DRY_RUN=1`` (the script, ``make gpu-check`` and ``make gpu-check DRY_RUN=1``) prints
  the plan: the exact install line, the CUDA kernel tests, memcheck and racecheck on
  IPOT and attention, the three benchmarks at full shapes, ncu on the attention
  forward and IPOT -- in that order, each with its cap and its output under
  ``benchmarks/results/gpu_check_DEVICE/`` -- and the caps fit in 8 minutes.
* Without DRY_RUN and without a GPU it says so and exits 0 at once.
* A run against fake ``nvidia-smi`` / ``python3`` / ``compute-sanitizer`` / ``ncu``
  records passed, failed, timed-out and not-supported steps in its summary, runs every
  step after a failure, and exits 1.
* The ``cuda`` marker of tests/conftest.py selects the CUDA cases of tests/kernels, and
  the sanitizer/ncu driver (benchmarks/gpu_check_calls.py) runs on CPU tensors.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
OUT = "benchmarks/results/gpu_check_DEVICE"
INSTALL = "python3 -m pip install --no-deps --no-build-isolation ."
STEPS = ["install", "kernel_tests", "memcheck_ipot", "memcheck_attention", "racecheck_ipot", "racecheck_attention",
         "bench_attention", "bench_co_attention", "bench_ot", "ncu_attention_fwd", "ncu_ipot"]
HEADER = re.compile(r"^\[(\d\d)\] (\S+)  cap (\d+) s  log: (\S+)")


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    return _load("vlfast_gpu_check", SCRIPT)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k not in ("DRY_RUN", "MAKEFLAGS", "MFLAGS")}
    env["GPU_CHECK_TEST_WORKERS"] = "0"  # the same plan whether or not this interpreter has xdist
    env.update(extra)
    return env


def _run(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _results_snapshot() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "benchmarks" / "results").rglob("*"))


def parse_plan(text: str) -> list[dict]:
    """The steps of a printed plan: name, cap, log and command line, in order."""
    lines = text.splitlines()
    steps = []
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if m:
            steps.append({"n": int(m.group(1)), "name": m.group(2), "cap": int(m.group(3)), "log": m.group(4),
                          "header": line, "cmd": lines[i + 1].strip()})
    return steps


def command_of(step: dict) -> str:
    """The command after its environment and ``timeout -k 2 <cap>``; asserts the cap is the step's."""
    m = re.match(r"^(?:\S+=\S+ )*timeout -k 2 (\d+) (.*)$", step["cmd"])
    assert m, step["cmd"]
    assert int(m.group(1)) == step["cap"], step
    return m.group(2)


def check_plan(text: str) -> None:
    steps = parse_plan(text)
    assert [s["name"] for s in steps] == STEPS
    assert [s["n"] for s in steps] == list(range(1, len(STEPS) + 1))
    by = {s["name"]: s for s in steps}
    for s in steps:
        assert s["log"] == f"{OUT}/{s['n']:02d}_{s['name']}.log"
        command_of(s)
    # 1. the install, exactly, into the machine's python3 (no venv, no torch)
    assert command_of(by["install"]) == INSTALL
    assert not re.search(r"venv|torch==|pip install(?!.*--no-deps)", text)
    # 2. the kernel tests on CUDA tensors
    kt = by["kernel_tests"]
    assert command_of(kt).startswith("python3 -m pytest tests/kernels -m cuda ")
    assert "VLFAST_TEST_DEVICE=cuda" in kt["cmd"] and "PYTHONSAFEPATH=1" in kt["cmd"]
    assert f"--junitxml={OUT}/kernel_tests.xml" in kt["cmd"] and f"outputs: {OUT}/kernel_tests.xml" in kt["header"]
    # 3. the sanitizers on IPOT and one attention call
    for tool in ("memcheck", "racecheck"):
        for call in ("ipot", "attention"):
            cmd = command_of(by[f"{tool}_{call}"])
            assert cmd.startswith(f"compute-sanitizer --tool {tool} ")
            assert cmd.endswith(f"python3 benchmarks/gpu_check_calls.py {call}")
    # 4. the three benchmarks at full shapes
    for bench in ("attention", "co_attention", "ot"):
        s = by[f"bench_{bench}"]
        cmd = command_of(s)
        assert cmd.startswith(f"python3 benchmarks/bench_{bench}.py --device cuda ")
        assert "--quick" not in cmd and "--tiny" not in cmd and "--batch" not in cmd
        assert cmd.endswith(f"--out {OUT}/{bench}.csv") and f"outputs: {OUT}/{bench}.csv" in s["header"]
    # 5. ncu on the attention forward and on IPOT, a few launches
    for name, kernel, call in (("ncu_attention_fwd", "_attn_fwd_kernel", "attention --forward-only"),
                               ("ncu_ipot", "ipot_kernel", "ipot")):
        cmd = command_of(by[name])
        assert cmd.startswith("ncu ") and "--launch-count 2 " in cmd and f"--kernel-name regex:{kernel} " in cmd
        assert f"python3 benchmarks/gpu_check_calls.py {call}" in cmd
    # the probe, the caps and the summary
    assert "nvidia-smi --query-gpu" in text and "torch.cuda.is_available()" in text
    total = int(re.search(r"# caps: (\d+) s at most in all \(budget 480 s\)", text).group(1))
    assert total <= 480
    assert f"[summary] {OUT}/summary.md, {OUT}/summary.json" in text


def test_dry_run_prints_every_step_in_order_and_runs_nothing(gc):
    before = _results_snapshot()
    p = _run([sys.executable, str(SCRIPT)], _env(DRY_RUN="1"))
    assert p.returncode == 0, p.stderr
    check_plan(p.stdout)
    assert "no GPU" not in p.stdout  # the plan, even here
    assert _results_snapshot() == before
    # the caps in the plan are the script's, and add up to what it prints
    steps = parse_plan(p.stdout)
    assert [s["cap"] for s in steps] == list(gc.CAPS.values())
    total = gc.PROBE_SMI_CAP_S + gc.PROBE_TORCH_CAP_S + sum(c + gc.KILL_GRACE_S for c in gc.CAPS.values())
    assert f"# caps: {total} s at most" in p.stdout and total <= gc.BUDGET_S == 480


def test_dry_run_scales_caps_and_adds_xdist_workers():
    p = _run([sys.executable, str(SCRIPT)], _env(DRY_RUN="1", GPU_CHECK_CAP_SCALE="2", GPU_CHECK_TEST_WORKERS="4"))
    assert p.returncode == 0, p.stderr
    steps = {s["name"]: s for s in parse_plan(p.stdout)}
    assert steps["install"]["cap"] == 180 and steps["kernel_tests"]["cap"] == 270
    assert "python3 -m pytest tests/kernels -m cuda -n 4 " in steps["kernel_tests"]["cmd"]
    bad = _run([sys.executable, str(SCRIPT)], _env(DRY_RUN="1", GPU_CHECK_CAP_SCALE="zero"))
    assert bad.returncode != 0 and "GPU_CHECK_CAP_SCALE" in bad.stderr


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3") is None, reason="needs make and python3")
def test_make_gpu_check_dry_run_and_no_install_prerequisite():
    n = _run(["make", "--no-print-directory", "-n", "gpu-check"], _env())
    assert n.returncode == 0, n.stderr
    assert n.stdout.strip().splitlines() == ["python3 benchmarks/gpu_check.py"]  # no venv, no pip install
    for how in ({"env": _env(DRY_RUN="1"), "args": []}, {"env": _env(), "args": ["DRY_RUN=1"]}):
        p = _run(["make", "--no-print-directory", "gpu-check", *how["args"]], how["env"])
        assert p.returncode == 0, p.stderr
        check_plan(p.stdout)


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = d / name
        f.write_text("#!/bin/sh\n" + body + "\n")
        f.chmod(0o755)
    return d


def _path_with(d: Path) -> str:
    keep = [x for x in ("/usr/bin", "/bin") if Path(x).is_dir()]
    return os.pathsep.join([str(d), *keep])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0_quickly(tmp_path):
    results = tmp_path / "results"
    env = _env(GPU_CHECK_RESULTS=str(results))
    t0 = time.monotonic()
    p = _run([sys.executable, str(SCRIPT)], env)  # this machine, as it is
    assert p.returncode == 0, p.stderr
    assert "no GPU on this machine" in p.stdout and "[01]" not in p.stdout
    # no nvidia-smi at all
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _run([sys.executable, str(SCRIPT)], {**env, "PATH": str(empty)})
    assert p.returncode == 0 and "no GPU on this machine (nvidia-smi not found)" in p.stdout
    # nvidia-smi answers but torch sees no GPU (this machine's CPU torch)
    d = _fake_bin(tmp_path, {"nvidia-smi": "echo 'Fake GPU, 999.99, 1 MiB'"})
    p = _run([sys.executable, str(SCRIPT)], {**env, "PATH": _path_with(d), "GPU_CHECK_PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    assert "no GPU on this machine (torch.cuda.is_available() is False" in p.stdout
    assert time.monotonic() - t0 < 45
    assert not results.exists()


FAKE_PYTHON = r"""
case "$*" in
  *"import torch"*) echo True; echo "Fake GPU 80GB"; echo "9.9.9 13.0 (9, 0)";;
  *bench_co_attention.py*) exec sleep 30;;
  *bench_ot.py*) echo "bench broke" >&2; exit 3;;
  *) echo "fake python3 $*";;
esac
"""


def test_fake_gpu_run_records_every_step_and_keeps_going(tmp_path):
    d = _fake_bin(tmp_path, {
        "nvidia-smi": "echo 'Fake GPU 80GB, 999.99, 81559 MiB'",
        "python3": FAKE_PYTHON,
        "compute-sanitizer": 'echo "========= COMPUTE-SANITIZER"; echo "========= Error: Device not supported"; exit 1',
        "ncu": 'echo "==PROF== Connected to process"; "$@" >/dev/null; '
               'echo "==ERROR== Failed to initialize the profiler: LibraryNotLoaded"; '
               'echo "==WARNING== No kernels were profiled."; exit 0',
    })
    results = tmp_path / "results"
    env = _env(PATH=_path_with(d), GPU_CHECK_RESULTS=str(results), GPU_CHECK_CAP_SCALE="0.05")
    t0 = time.monotonic()
    p = _run([sys.executable, str(SCRIPT)], env, timeout=120)
    assert time.monotonic() - t0 < 60
    assert p.returncode == 1, p.stdout + p.stderr
    out = results / "gpu_check_fake-gpu-80gb"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "Fake GPU 80GB" and summary["passed"] is False
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(status) == STEPS
    for name in ("install", "kernel_tests", "bench_attention"):
        assert status[name] == "passed", (name, status)
    for name in STEPS[2:6] + ["ncu_attention_fwd", "ncu_ipot"]:
        assert status[name].startswith("not supported"), (name, status)
    assert "Device not supported" in status["memcheck_ipot"] and "LibraryNotLoaded" in status["ncu_ipot"]
    assert status["bench_co_attention"] == "timed out (cap 1 s)"
    assert status["bench_ot"] == "failed (rc 3)"
    for s in summary["steps"]:
        log = (REPO / s["log"]).read_text()
        assert log.startswith(f"$ {s['command']}\n"), s["log"]
        assert Path(s["log"]).parent == out and s["seconds"] >= 0
    assert "bench broke" in (out / "09_bench_ot.log").read_text()
    assert "fake python3 -m pip install --no-deps --no-build-isolation ." in (out / "01_install.log").read_text()
    md = (out / "summary.md").read_text()
    assert "# gpu-check on Fake GPU 80GB" in md and "FAILED" in md
    for name in STEPS:
        assert f"| {name} |" in md
    assert (out / "device.txt").read_text().startswith("name: Fake GPU 80GB")
    assert "gpu-check: FAILED (3 passed, 6 not supported, 2 failed or timed out)" in p.stdout


def test_classify(gc):
    san = gc.Step("memcheck_ipot", ("compute-sanitizer",), 20, tool="compute-sanitizer")
    ncu = gc.Step("ncu_ipot", ("ncu",), 20, tool="ncu")
    plain = gc.Step("bench_ot", ("python3",), 20)
    assert gc.classify(san, 0, "========= ERROR SUMMARY: 0 errors\n", False)[0] == "passed"
    assert gc.classify(san, 99, "========= Invalid __global__ write of size 4\n", False)[0] == \
        "failed (sanitizer found errors)"
    assert gc.classify(san, 1, "========= Error: Device not supported\n", False)[0].startswith("not supported")
    # a refusal the tool itself did not print is the program's business
    assert gc.classify(san, 1, "RuntimeError: not supported\n", False)[0] == "failed (rc 1)"
    assert gc.classify(ncu, 0, "==WARNING== No kernels were profiled.\n", False)[0] == \
        "failed (ncu: no kernels were profiled)"
    assert gc.classify(ncu, 0, "==ERROR== ERR_NVGPUCTRPERM - no permission\n==WARNING== No kernels were profiled.\n",
                       False)[0].startswith("not supported")
    assert gc.classify(ncu, 0, "==PROF== Disconnected\n", False)[0] == "passed"
    assert gc.classify(plain, 124, "", True)[0] == "timed out (cap 20 s)"
    assert gc.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3" and gc.slug("!!") == "unknown-gpu"


def test_cuda_marker_selects_the_cuda_cases_of_the_kernel_tests(tmp_path):
    """With CUDA faked for collection, ``-m cuda`` keeps each kernel file's CUDA cases
    (module DEV, device="cuda" params, skipped-without-CUDA tests) and no cpu case."""
    (tmp_path / "fake_cuda_for_collection.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("VLFAST_TEST_DEVICE", None)
    p = _run([sys.executable, "-m", "pytest", "-p", "fake_cuda_for_collection", "-o", "addopts=",
              "--import-mode=importlib", "-p", "no:cacheprovider", "--collect-only", "-q", "-m", "cuda",
              "tests/kernels"], env, timeout=300)
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    files = {i.split("::")[0] for i in ids}
    for f in ("attention", "attention_varlen", "bias_gelu", "co_attention", "dropout_mask", "embeddings_text",
              "embeddings_visual", "layer_norm"):
        assert f"tests/kernels/test_{f}.py" in files, (f, p.stdout[-3000:])
    assert "tests/kernels/test_ot.py::test_cuda_kernel_matches_reference_including_global_memory_path" in ids
    assert "tests/kernels/test_dropout_mask.py::test_p_zero_keeps_all[cuda]" in ids
    assert not [i for i in ids if "[cpu" in i or "-cpu]" in i or "-cpu-" in i]
    assert not [i for i in ids if i.startswith("tests/kernels/test_triton_globals.py")]  # CPU-only compile check


def test_driver_runs_on_cpu_tensors(capsys):
    calls = _load("vlfast_gpu_check_calls", REPO / "benchmarks" / "gpu_check_calls.py")
    assert calls.main(["ipot", "--device", "cpu"]) == 0
    assert calls.main(["attention", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok   ipot") == 2 and "ok   sinkhorn" in out
    assert all(f"ok   attention {t} bf16" in out for t in ("out", "dq", "dk", "dv"))
    assert calls.main(["attention", "--device", "cpu", "--forward-only", "--iters", "2", "--no-check"]) == 0
