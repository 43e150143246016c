"""Running vlfast from a checkout: ``python -m vlfast.train`` typed in the repository root.

An installed vlfast is one package: ``vlfast/`` with ``kernels/`` installed as
``vlfast.kernels``, ``training/`` as ``vlfast.training`` and the compiled ``vlfast._C``
beside them (setup.py's ``package_dir``).  In the checkout those are sibling folders,
and Python puts the current directory first on ``sys.path`` for ``python -m`` and
``python -c`` -- so in the repository root ``import vlfast`` finds ``./vlfast``, which
has no ``kernels`` or ``training`` subpackage and no ``_C``.

:func:`mount` makes the checkout's ``vlfast`` the same package an install gives:

* ``vlfast.kernels`` and ``vlfast.training`` are the checkout's ``kernels/`` and
  ``training/`` (so what runs is the source you are looking at);
* ``vlfast._C`` is the newest extension built for this interpreter: the one
  ``pip install -e .`` put in ``vlfast/``, the one ``pip install .`` built in
  ``build/cmake-<python tag>/lib/``, or the ``_C`` of an installed vlfast distribution
  (the last one built wins, so a stale in-place copy never shadows a newer install).
  With none, import still works and dispatch falls back to the reference with a warning
  (``python -m vlfast.info`` says so), as for any install without the extension.

An installed package has ``kernels/`` inside ``vlfast/``; there :func:`mount` does
nothing.  :func:`describe` says which case applies (``python -m vlfast.info`` prints it).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

_PKG_DIR = Path(__file__).resolve().parent
_ROOT = _PKG_DIR.parent
_SUBPACKAGES = (("kernels", "kernels"), ("training", "training"))

# Where this import's vlfast._C came from (None: not mounted / not found).
extension_origin: Optional[str] = None


def is_source_tree() -> bool:
    """Whether ``vlfast`` was imported from a checkout (``vlfast/`` beside ``kernels/``,
    ``training/`` and ``setup.py``) rather than an installed package."""
    return (not (_PKG_DIR / "kernels").is_dir() and (_ROOT / "setup.py").is_file()
            and (_ROOT / "kernels" / "__init__.py").is_file() and (_ROOT / "training" / "__init__.py").is_file())


def _load_package(name: str, folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _extension_candidates() -> list[Path]:
    """The compiled ``_C`` files for this interpreter, newest first: one built in place
    (``pip install -e .``), the checkout's CMake build (``pip install .``), and the
    ``_C`` of an installed vlfast distribution.  The newest is the last one built, so a
    stale in-place copy from an earlier editable install does not shadow a newer build."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = [_PKG_DIR / f"_C{s}" for s in suffixes]
    found += [_ROOT / "build" / f"cmake-{tag}" / "lib" / f"_C{s}" for s in suffixes]
    try:
        from importlib import metadata

        dist = metadata.distribution("vlfast")
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if len(parts) == 2 and parts[0] == "vlfast" and any(parts[1] == f"_C{s}" for s in suffixes):
                found.append(Path(str(dist.locate_file(f))))
    except Exception:  # noqa: BLE001 -- no distribution (or an unreadable one): nothing to add
        pass
    unique = {p.resolve(): p for p in found if p.is_file()}
    return sorted(unique.values(), key=lambda p: p.stat().st_mtime, reverse=True)


def _mount_extension(pkg: ModuleType) -> None:
    global extension_origin
    if "vlfast._C" in sys.modules:
        return
    for path in _extension_candidates():
        spec = importlib.util.spec_from_file_location("vlfast._C", path)
        if spec is None or spec.loader is None:
            continue
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception:  # noqa: BLE001 -- built for another torch/python: try the next, else none
            continue
        sys.modules["vlfast._C"] = mod
        pkg._C = mod  # type: ignore[attr-defined]
        extension_origin = str(path)
        return


def mount(pkg: ModuleType) -> None:
    """Mount ``kernels/``, ``training/`` and the built ``_C`` into the checkout's
    ``vlfast`` package ``pkg`` (no-op for an installed package)."""
    if not is_source_tree():
        return
    for sub, folder in _SUBPACKAGES:
        name = f"vlfast.{sub}"
        mod = sys.modules.get(name)
        if mod is None:
            mod = _load_package(name, _ROOT / folder)
        setattr(pkg, sub, mod)
    _mount_extension(pkg)


def describe() -> str:
    """One line: where ``vlfast`` and its extension were imported from."""
    if not is_source_tree():
        return f"installed package at {_PKG_DIR}"
    c = sys.modules.get("vlfast._C")
    where = extension_origin or getattr(c, "__file__", None)
    ext = f"_C from {where}" if c is not None and where else "no built _C (pip install -e . builds it)"
    return f"source tree {_ROOT} (kernels/ and training/ mounted as vlfast.kernels / vlfast.training; {ext})"
