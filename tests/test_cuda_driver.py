"""The CUDA runtime inside vlfast._C against the NVIDIA driver (issue 16, item 4).

vlfast._C links a static CUDA runtime; CUDA 13 needs driver >= 580.  With an older
driver the ``cuda`` backend must say why it cannot run (``check_cuda``, ``vlfast.info``),
``auto`` must fall back to Triton or the reference with one warning, and
``VLFAST_REQUIRE_BACKENDS=cuda`` must fail.  The driver is faked through the lookup
functions of ``vlfast._dispatch``; the real lookups are checked against this machine.
"""
from __future__ import annotations

import ctypes
import os
import re
import types
import warnings
from typing import Callable, Iterator, Optional

import pytest

from vlfast import _dispatch, info, ops

OLD_535 = ("driver 535 < 580 needed by the CUDA 13 runtime (the driver supports CUDA 12.2, vlfast._C was built "
           "with CUDA 13.0): update the NVIDIA driver to 580 or newer, or rebuild vlfast._C with a CUDA 12.x toolkit")
NO_DRIVER_13 = "no NVIDIA driver: cudaDriverGetVersion reports 0 (vlfast._C was built with CUDA 13.0, which needs driver >= 580)"

FakeDriver = Callable[..., None]


@pytest.fixture(autouse=True)
def _fresh_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test asks the (possibly faked) lookups afresh and may warn again."""
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv("VLFAST_REQUIRE_BACKENDS", raising=False)
    monkeypatch.delenv("VLFAST_BACKEND", raising=False)
    _dispatch.cuda_driver_check.cache_clear()
    yield
    _dispatch.cuda_driver_check.cache_clear()


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    """``fake_driver(runtime, driver, release)``: vlfast._C built with CUDA ``runtime``
    (CUDART_VERSION), on a driver reporting CUDA ``driver`` (cudaDriverGetVersion) with
    kernel-module release ``release``."""

    def install(runtime: Optional[int] = 13000, driver: Optional[int] = 12020,
                release: Optional[str] = "535.104.05", source: str = "/proc/driver/nvidia/version") -> None:
        monkeypatch.setattr(_dispatch, "cuda_built", lambda: (True, None))
        monkeypatch.setattr(_dispatch, "cuda_runtime_version", lambda: runtime)
        monkeypatch.setattr(_dispatch, "cuda_driver_version", lambda: driver)
        monkeypatch.setattr(_dispatch, "nvidia_driver_release",
                            lambda: (release, source) if release is not None else (None, None))
        _dispatch.cuda_driver_check.cache_clear()

    return install


def _ops_with_cuda() -> str:
    return ", ".join(o for o in _dispatch.ops() if "cuda" in _dispatch._REGISTRY[o])


def _triton_or_reference() -> str:
    return "triton" if _dispatch.triton_module()[0] is not None else "reference"


# ----------------------------------------------------------------------------------
# The verdict and its words
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime, driver, release, reason", [
    (13000, 12020, "535.104.05", OLD_535),
    (13020, 12080, "570.86.10",
     "driver 570 < 580 needed by the CUDA 13 runtime (the driver supports CUDA 12.8, vlfast._C was built with "
     "CUDA 13.2): update the NVIDIA driver to 580 or newer, or rebuild vlfast._C with a CUDA 12.x toolkit"),
    (12040, 11080, "520.61.05",
     "driver 520 < 525 needed by the CUDA 12 runtime (the driver supports CUDA 11.8, vlfast._C was built with "
     "CUDA 12.4): update the NVIDIA driver to 525 or newer, or rebuild vlfast._C with a CUDA 11.x toolkit"),
    # release unknown (no /proc entry, no NVML): the CUDA versions speak
    (13000, 12090, None,
     "the driver supports CUDA 12.9 < 13.0, driver >= 580 needed by the CUDA 13 runtime (vlfast._C was built with "
     "CUDA 13.0): update the NVIDIA driver to 580 or newer, or rebuild vlfast._C with a CUDA 12.x toolkit"),
    # an extension too old to ask the driver: the release is compared with the table
    (13000, None, "535.104.05",
     "driver 535 < 580 needed by the CUDA 13 runtime (vlfast._C was built with CUDA 13.0): update the NVIDIA "
     "driver to 580 or newer, or rebuild vlfast._C with an older CUDA toolkit"),
    (13000, 0, None, NO_DRIVER_13),
    (13000, 0, "580.65.06",
     "the NVIDIA kernel driver 580.65.06 is loaded but its CUDA library (libcuda.so.1) was not found: "
     "cudaDriverGetVersion reports 0 (vlfast._C was built with CUDA 13.0, which needs driver >= 580)"),
])
def test_reason_for_a_driver_too_old(runtime: int, driver: Optional[int], release: Optional[str],
                                     reason: str) -> None:
    assert _dispatch.cuda_driver_problem(runtime, driver, release) == reason


@pytest.mark.parametrize("runtime, driver, release", [
    (13000, 13000, "580.65.06"),
    (13010, 13000, "580.65.06"),   # minor-version compatibility within CUDA 13
    (12040, 12020, "535.104.05"),  # ... and within CUDA 12
    (12040, 13000, "580.65.06"),   # an older runtime on a newer driver
    (13000, 13000, "535.104.05"),  # a CUDA 13 forward-compatibility libcuda on a 535 kernel module
    (13000, None, "580.65.06"),    # an old extension, judged by the release
    (13000, None, None),           # nothing known: no verdict (CUDA raises its own error, as before)
    (0, 12020, "535.104.05"),      # built without CUDA: cuda_built() gives that reason
    (None, 12020, "535.104.05"),
])
def test_no_reason_when_the_driver_is_new_enough_or_unknown(runtime: Optional[int], driver: Optional[int],
                                                            release: Optional[str]) -> None:
    assert _dispatch.cuda_driver_problem(runtime, driver, release) is None


def test_the_table_is_the_documented_one() -> None:
    assert _dispatch.MIN_DRIVER_FOR_CUDA_RUNTIME == {13: 580, 12: 525, 11: 450}


# ----------------------------------------------------------------------------------
# An old driver: check_cuda, dispatch, the import check, vlfast.info
# ----------------------------------------------------------------------------------

def test_check_cuda_gives_the_reason(fake_driver: FakeDriver) -> None:
    fake_driver()
    check = _dispatch.cuda_driver_check()
    assert (check.runtime_version, check.driver_version, check.driver_release) == (13000, 12020, "535.104.05")
    assert check.problem == OLD_535 and check.driver_present
    assert _dispatch.check_cuda("cuda") == OLD_535
    assert _dispatch.check_cuda("cpu") == "the CUDA kernel runs on CUDA tensors, these are on cpu"
    for op in ("ipot", "sinkhorn", "keep_mask"):
        assert dict(_dispatch.explain(op, "cuda"))["cuda"] == OLD_535


def test_auto_falls_back_with_one_warning(fake_driver: FakeDriver) -> None:
    fake_driver()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.select("keep_mask", "cuda") == _triton_or_reference()
        assert _dispatch.select("ipot", "cuda") == "reference"
        assert _dispatch.select("sinkhorn", "cuda") == "reference"
        assert _dispatch.select("keep_mask", "cuda") == _triton_or_reference()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [str(w.message) for w in runtime] == [
        f"vlfast: the CUDA kernels of vlfast._C cannot run: {OLD_535}. On CUDA tensors {_ops_with_cuda()} fall "
        f"back to Triton or the reference (vlfast.ops.keep_mask -> {_triton_or_reference()}); this is warned "
        "once, and `python -m vlfast.info` lists every op's backend."]
    assert {"ipot", "keep_mask", "sinkhorn"} <= set(_ops_with_cuda().split(", "))


def test_forcing_cuda_on_an_old_driver_names_the_driver(fake_driver: FakeDriver) -> None:
    fake_driver()
    with ops.backend("cuda"), pytest.raises(_dispatch.BackendError) as ei:
        _dispatch.select("ipot", "cuda")
    assert f"  cuda     : {OLD_535}" in str(ei.value).splitlines()


def test_require_backends_cuda_fails_at_import_on_an_old_driver(fake_driver: FakeDriver,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_driver()
    stub = types.SimpleNamespace(has_cuda=lambda: True)
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (stub, None))
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "cpp,cuda")
    with pytest.raises(ImportError) as ei:
        _dispatch.health_check()
    assert str(ei.value) == f"VLFAST_REQUIRE_BACKENDS=cpp,cuda but: cuda: {OLD_535}"
    # Not required: nothing is said at import (the warning comes at first use).
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dispatch.health_check()
    # A new enough driver passes the required check.
    fake_driver(runtime=13000, driver=13000, release="580.65.06")
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dispatch.health_check()


def test_info_reports_the_old_driver_in_plain_words(fake_driver: FakeDriver, capsys: pytest.CaptureFixture) -> None:
    if _dispatch.cpp_extension()[0] is None:
        pytest.skip("vlfast._C is not built")
    fake_driver()
    with pytest.warns(RuntimeWarning, match="the CUDA kernels of vlfast._C cannot run: driver 535 < 580"):
        data = info.collect()
    assert data["build"]["cuda_driver"] == {
        "runtime_version": 13000, "driver_version": 12020, "driver_release": "535.104.05",
        "driver_release_source": "/proc/driver/nvidia/version", "problem": OLD_535}
    assert data["ops"]["ipot"]["cuda"]["backend"] == "reference"
    assert data["ops"]["ipot"]["cuda"]["reasons"]["cuda"] == OLD_535
    assert data["ops"]["keep_mask"]["cuda"]["backend"] == _triton_or_reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert info.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    for want in ("  CUDA runtime of vlfast._C: 13.0 (CUDART_VERSION 13000, static)",
                 "  NVIDIA driver: 535.104.05 (from /proc/driver/nvidia/version); supports CUDA 12.2 "
                 "(cudaDriverGetVersion 12020)",
                 f"  CUDA kernels of vlfast._C: cannot run -- {OLD_535}",
                 f"           cuda      no: {OLD_535}",
                 "    cuda -> reference   (for CUDA tensors; no CUDA device here)"
                 if not data["cuda_available"] else "    cuda -> reference"):
        assert want in lines, (want, lines)


# ----------------------------------------------------------------------------------
# A new enough driver, and no driver
# ----------------------------------------------------------------------------------

def test_a_new_enough_driver_passes(fake_driver: FakeDriver) -> None:
    fake_driver(runtime=13000, driver=13000, release="580.65.06", source="nvml")
    check = _dispatch.cuda_driver_check()
    assert check.problem is None and check.driver_present
    assert _dispatch.check_cuda("cuda") is None
    mod = _dispatch.cpp_extension()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = "cuda" if mod is not None and hasattr(mod, "keep_mask_cuda") else _triton_or_reference()
        assert _dispatch.select("keep_mask", "cuda") == want
    if mod is not None:
        lines = info.render(info.collect()).splitlines()
        assert "  NVIDIA driver: 580.65.06 (from nvml); supports CUDA 13.0 (cudaDriverGetVersion 13000)" in lines
        assert "  CUDA kernels of vlfast._C: can run" in lines


def test_no_driver_falls_back_without_a_warning(fake_driver: FakeDriver) -> None:
    """No driver means no CUDA tensors: the reason is given, nothing is warned."""
    fake_driver(runtime=13000, driver=0, release=None)
    assert _dispatch.check_cuda("cuda") == NO_DRIVER_13
    assert not _dispatch.cuda_driver_check().driver_present
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("keep_mask", "cuda") == _triton_or_reference()
        assert _dispatch.select("ipot", "cuda") == "reference"


# ----------------------------------------------------------------------------------
# An extension built before these lookups: unknown, never a crash
# ----------------------------------------------------------------------------------

def test_an_old_extension_is_read_from_build_info_and_proc(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    old = types.SimpleNamespace(has_cuda=lambda: True, build_info=lambda: {"cuda_version": "13.0"})
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (old, None))
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    monkeypatch.setattr(_dispatch, "_PROC_DRIVER_VERSION", str(proc))
    assert _dispatch.cuda_runtime_version() == 13000
    assert _dispatch.cuda_driver_version() is None
    assert _dispatch.nvidia_driver_release() == ("535.104.05", str(proc))
    assert _dispatch.cuda_driver_check().problem == (
        "driver 535 < 580 needed by the CUDA 13 runtime (vlfast._C was built with CUDA 13.0): update the NVIDIA "
        "driver to 580 or newer, or rebuild vlfast._C with an older CUDA toolkit")
    proc.unlink()
    _dispatch.cuda_driver_check.cache_clear()
    assert _dispatch.nvidia_driver_release() == (None, None)
    assert _dispatch.cuda_driver_check().problem is None  # nothing known: no verdict
    assert "  CUDA kernels of vlfast._C: not checked (the driver's CUDA version is unknown)" in \
        info._cuda_driver_lines(info._cuda_driver(_dispatch))


def test_a_failing_lookup_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> int:
        raise RuntimeError("cudaDriverGetVersion failed: cudaErrorUnknown")

    broken = types.SimpleNamespace(has_cuda=lambda: True, cuda_runtime_version=lambda: 13000,
                                   cuda_driver_version=boom, nvidia_driver_release=lambda: None)
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (broken, None))
    assert (_dispatch.cuda_runtime_version(), _dispatch.cuda_driver_version()) == (13000, None)
    assert _dispatch.nvidia_driver_release() == (None, None)
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (None, "vlfast._C could not be imported (test)"))
    assert (_dispatch.cuda_runtime_version(), _dispatch.cuda_driver_version()) == (None, None)
    assert _dispatch.cuda_driver_check().problem is None


@pytest.mark.parametrize("line, release", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)  Sun Jul "
     "27 07:09:35 UTC 2025", "580.65.06"),
    ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.54.14  Thu Feb 22 01:25:25 UTC 2024", "550.54.14"),
    ("garbage", None),
])
def test_release_parsed_from_proc(tmp_path, line: str, release: Optional[str]) -> None:
    p = tmp_path / "version"
    p.write_text(line + "\n")
    assert _dispatch._release_from_proc(str(p)) == release
    assert _dispatch._release_from_proc(str(tmp_path / "missing")) is None


# ----------------------------------------------------------------------------------
# The real lookups on this machine
# ----------------------------------------------------------------------------------

def _driver_on_this_machine() -> bool:
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _built_cuda_version(mod: object) -> int:
    major, minor = str(dict(mod.build_info())["cuda_version"]).split(".")[:2]
    return 1000 * int(major) + 10 * int(minor)


def test_real_runtime_version_is_the_built_one() -> None:
    mod, why = _dispatch.cpp_extension()
    if mod is None:
        pytest.skip(why)
    if mod.has_cuda():
        v = _dispatch.cuda_runtime_version()
        assert v == _built_cuda_version(mod) and v >= 11000 and v % 10 == 0
    else:
        assert _dispatch.cuda_runtime_version() == 0
        assert _dispatch.cuda_built() == (False, "vlfast._C was built without CUDA (no nvcc at build time, or "
                                                 "VLFAST_SKIP_CUDA_BUILD=1)")
        assert _dispatch.cuda_driver_check().problem is None
        assert info._cuda_driver_lines(info._cuda_driver(_dispatch)) == [
            "  CUDA runtime of vlfast._C: none (built without CUDA)"]


def test_real_extension_functions() -> None:
    """The C++ lookups of vlfast._C (skipped for an extension built before them)."""
    mod, why = _dispatch.cpp_extension()
    if mod is None:
        pytest.skip(why)
    if not hasattr(mod, "cuda_driver_version"):
        assert _dispatch.cuda_driver_version() is None  # an old build: unknown, no crash
        pytest.skip("this vlfast._C predates cuda_runtime_version / cuda_driver_version / nvidia_driver_release")
    built = _built_cuda_version(mod) if mod.has_cuda() else 0
    assert mod.cuda_runtime_version() == built == dict(mod.build_info())["cuda_runtime_version"]
    assert _dispatch.cuda_runtime_version() == built
    driver, release = mod.cuda_driver_version(), mod.nvidia_driver_release()
    assert isinstance(driver, int)
    if _driver_on_this_machine():
        assert driver >= 11000 and driver % 10 == 0
        if release is not None:
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?", release[0]) and release[1] in (
                "/proc/driver/nvidia/version", "nvml")
    else:
        assert driver == 0 and release is None
        assert _dispatch.cuda_driver_version() == 0
        assert _dispatch.nvidia_driver_release() == (None, None)
        check = _dispatch.cuda_driver_check()
        assert not check.driver_present
        if built:
            assert check.problem == _dispatch.cuda_driver_problem(built, 0, None)
            assert check.problem.startswith("no NVIDIA driver: cudaDriverGetVersion reports 0 (vlfast._C was "
                                            f"built with CUDA {built // 1000}.{(built % 1000) // 10}")
            assert _dispatch.check_cuda("cuda") == check.problem
            assert "  NVIDIA driver: none found (cudaDriverGetVersion reports 0)" in \
                info._cuda_driver_lines(info._cuda_driver(_dispatch))
