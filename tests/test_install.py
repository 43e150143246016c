"""The tests run against the installed package, and the installed package carries its
compiled extension (with the CUDA kernels whenever nvcc was there at build time)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import vlfast

REPO = Path(__file__).resolve().parents[1]
_TRUE = ("1", "true", "yes", "on")


def _nvcc_present() -> bool:
    """The same search as setup.py: $CUDACXX, $CUDA_HOME/bin/nvcc, /usr/local/cuda, PATH."""
    cands = [os.environ.get("CUDACXX", "")]
    cands += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or ""]
    return any(c and os.path.isfile(c) and os.access(c, os.X_OK) for c in cands)


def test_imports_the_installed_package_not_the_source_tree():
    pkg = Path(vlfast.__file__).resolve().parent
    assert pkg != REPO / "vlfast", (
        f"vlfast was imported from the source tree ({pkg}); run the installed package's tests with "
        "`make test` or `.venv/bin/pytest`, not `python -m pytest` from the repository root")
    assert "site-packages" in pkg.parts or "dist-packages" in pkg.parts, pkg
    import vlfast.kernels.dropout_mask as dm  # kernels/ is installed as vlfast.kernels
    import vlfast.training as tr

    assert Path(dm.__file__).resolve().parent == pkg / "kernels" / "dropout_mask"
    assert Path(tr.__file__).resolve().parent == pkg / "training"


def test_extension_imports():
    import vlfast._C as C

    assert Path(C.__file__).resolve().parent == Path(vlfast.__file__).resolve().parent
    assert isinstance(C.has_cuda(), bool)


def test_has_cuda_iff_nvcc_at_build_time():
    import vlfast._C as C

    skipped = os.environ.get("VLFAST_SKIP_CUDA_BUILD", "").strip().lower() in _TRUE
    expected = _nvcc_present() and not skipped
    assert C.has_cuda() == expected, (
        f"has_cuda()={C.has_cuda()} but nvcc present={_nvcc_present()}, VLFAST_SKIP_CUDA_BUILD={skipped}: "
        f"was vlfast installed in another environment? build_info={C.build_info()}")
    assert hasattr(C, "keep_mask_cuda") == C.has_cuda()


def test_build_info_keys():
    import vlfast._C as C

    info = C.build_info()
    for key in ("compiler", "cxx_standard", "openmp", "build_type", "pybind11", "cuda", "cuda_version",
                "cuda_compiler_version", "cuda_archs", "cuda_runtime"):
        assert key in info, key
    assert info["cxx_standard"] in ("C++17", "C++20", "C++23")
    assert isinstance(info["openmp"], bool)
    assert info["cuda"] == C.has_cuda()
    if C.has_cuda():
        assert info["cuda_version"] and info["cuda_archs"]
        if info["cuda_archs"] not in ("native", "all", "all-major"):
            assert all(a.rstrip("af").isdigit() for a in info["cuda_archs"].split(","))
        assert info["cuda_runtime"] == "static"


def test_extension_is_torch_free():
    # csrc/ includes no torch header: the module links no torch library
    import vlfast._C as C

    data = Path(C.__file__).read_bytes()
    assert b"libtorch" not in data and b"libc10" not in data

