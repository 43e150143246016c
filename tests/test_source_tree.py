"""The README's commands typed in the repository root, where ``./vlfast`` (the checkout)
comes before the installed package on ``sys.path``: the checkout's ``vlfast`` mounts
``kernels/``, ``training/`` and the ``_C`` built from this checkout, so it behaves as the
installed package does (vlfast/_source_tree.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _in_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_python_m_vlfast_train_help_in_the_repo_root():
    p = _in_root("-m", "vlfast.train", "--help")
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout and "--config" in p.stdout


def test_the_checkout_package_is_the_installed_one_in_shape():
    code = (
        "import json, vlfast, vlfast.kernels, vlfast.training, vlfast._C, torch\n"
        "from vlfast import _source_tree, _dispatch, ops\n"
        "from vlfast.kernels.attention import op\n"
        "from vlfast.training import loop\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "out = ops.attention(q, q, q)\n"
        "ref = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1) @ q\n"
        "print(json.dumps({'vlfast': vlfast.__file__, 'kernels': list(vlfast.kernels.__path__),\n"
        "  'training': list(vlfast.training.__path__), 'C': vlfast._C.__file__,\n"
        "  'source_tree': _source_tree.is_source_tree(), 'describe': _source_tree.describe(),\n"
        "  'ipot': _dispatch.select('ipot', 'cpu'), 'err': float((out - ref).abs().max())}))\n")
    p = _in_root("-c", code)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(info["vlfast"]).resolve() == REPO / "vlfast" / "__init__.py"
    assert [Path(x).resolve() for x in info["kernels"]] == [REPO / "kernels"]
    assert [Path(x).resolve() for x in info["training"]] == [REPO / "training"]
    assert info["source_tree"] is True and str(REPO) in info["describe"]
    assert info["ipot"] == "cpp"  # the compiled extension was found, not the reference fallback
    assert Path(info["C"]).is_file()
    assert info["err"] < 1e-5


@pytest.mark.parametrize("module", ["vlfast.info", "vlfast.evaluate", "vlfast.convert"])
def test_other_entry_points_in_the_repo_root(module):
    p = _in_root("-m", module, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout


def test_installed_package_does_not_mount():
    """In the installed package (what the other tests import) nothing is mounted."""
    import vlfast
    from vlfast import _source_tree

    assert not _source_tree.is_source_tree() or Path(vlfast.__file__).resolve().parent == REPO / "vlfast"
    if Path(vlfast.__file__).resolve().parent != REPO / "vlfast":
        assert _source_tree.describe().startswith("installed package at ")


def test_the_newest_built_extension_wins(tmp_path, monkeypatch):
    """A stale in-place _C (from an earlier pip install -e .) does not shadow a newer
    pip install . build of the checkout."""
    import importlib.machinery
    import sys as _sys

    from vlfast import _source_tree as st

    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    tag = f"cp{_sys.version_info.major}{_sys.version_info.minor}"
    pkg, build = tmp_path / "vlfast", tmp_path / "build" / f"cmake-{tag}" / "lib"
    pkg.mkdir()
    build.mkdir(parents=True)
    stale, fresh = pkg / f"_C{suffix}", build / f"_C{suffix}"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    os.utime(stale, (1_000_000, 1_000_000))
    monkeypatch.setattr(st, "_PKG_DIR", pkg)
    monkeypatch.setattr(st, "_ROOT", tmp_path)
    got = [p for p in st._extension_candidates() if tmp_path in p.parents]
    assert got == [fresh, stale]
    os.utime(fresh, (500_000, 500_000))
    assert [p for p in st._extension_candidates() if tmp_path in p.parents] == [stale, fresh]
