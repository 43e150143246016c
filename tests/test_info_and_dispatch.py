"""python -m vlfast.info, the dispatcher's health check and backend context."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlfast import _dispatch, info, ops


def test_info_lists_every_op_with_backend_and_reasons():
    data = info.collect()
    assert {"attention", "varlen_attention", "co_attention", "keep_mask"} <= set(data["ops"])
    assert data["ops"]["attention"]["cpu"]["backend"] == "reference"
    assert data["ops"]["attention"]["cuda"]["backend"] == "triton"
    assert data["ops"]["keep_mask"]["cpu"]["backend"] == "cpp"
    assert data["build"]["cpp_extension"] is True
    reasons = data["ops"]["attention"]["cpu"]["reasons"]
    assert reasons["cpp"] == "attention has no cpp implementation"
    text = info.render(data)
    assert "attention" in text and "cpu  -> reference" in text and "vlfast._C: built" in text


def test_info_module_runs_as_a_program():
    out = subprocess.run([sys.executable, "-P", "-m", "vlfast.info", "--json"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    data = json.loads(out)
    assert data["versions"]["torch"] == torch.__version__
    assert "co_attention" in data["ops"]


def test_missing_required_backend_fails_at_import(monkeypatch):
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (None, "vlfast._C could not be imported (test)"))
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "cpp,triton")
    with pytest.raises(ImportError, match=r"VLFAST_REQUIRE_BACKENDS=cpp,triton but: cpp: vlfast._C could not"):
        _dispatch.health_check()
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "")
    with pytest.warns(RuntimeWarning, match="ops fall back to the reference"):
        _dispatch.health_check()
    monkeypatch.setenv("VLFAST_REQUIRE_BACKENDS", "cpp,bogus")
    with pytest.raises(ValueError, match="VLFAST_REQUIRE_BACKENDS: expected a comma list"):
        _dispatch.health_check()


def test_auto_falls_back_with_one_warning_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_dispatch, "cpp_extension", lambda: (None, "vlfast._C could not be imported (test)"))
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="keep_mask falls back to the reference on cpu"):
        assert _dispatch.select("keep_mask", "cpu") == "reference"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("keep_mask", "cpu") == "reference"  # only once


def test_backend_context_nests_and_restores():
    assert ops.requested_backend() == "auto"
    with ops.backend("triton"):
        with ops.backend("reference"):
            assert ops.requested_backend() == "reference"
        assert ops.requested_backend() == "triton"
    assert ops.requested_backend() == "auto"
    with pytest.raises(ValueError, match=r"backend\(name\): expected one of auto, reference, triton, cuda, cpp"):
        with ops.backend("tpu"):
            pass
