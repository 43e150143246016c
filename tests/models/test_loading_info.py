"""from_official (all four models) follows HF's from_pretrained convention: it returns
the model; the loading report comes with output_loading_info=True; missing keys are
logged as a warning by the model module's logger; a source that is not a checkpoint of
the model raises.  Small random configs, official-layout state_dicts from each module's
``to_official``."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from vlfast.models.base import ConversionReport

NAMES = ("uniter", "vilbert", "visualbert", "vlbert")
# a checkpoint of another model, for the "not a checkpoint of this model" error
OTHER = {"uniter": "vlbert", "vilbert": "visualbert", "visualbert": "uniter", "vlbert": "vilbert"}


def _module(name: str):
    return importlib.import_module(f"vlfast.models.{name}")


def _official(name: str, seed: int = 0):
    """(a small random model, its state_dict in the official layout)."""
    mod = _module(name)
    torch.manual_seed(seed)
    model = mod.MODEL_CLASS(mod.CONFIG_CLASS.small()).eval()
    return model, mod.to_official(model.state_dict())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _warnings(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == f"vlfast.models.{name}"]


@pytest.mark.parametrize("name", NAMES)
def test_default_returns_the_model(name, caplog):
    src, off = _official(name)
    cls = type(src)
    with caplog.at_level(logging.INFO, logger="vlfast"):
        model = cls.from_official(off, src.config).eval()  # chains, as HF's from_pretrained(...).eval()
        inferred = cls.from_official(off)  # config inferred from the shapes
    assert type(model) is cls and type(inferred) is cls and not model.training
    _same_weights(model, src)
    assert _warnings(caplog, name) == []  # nothing missing: no warning


@pytest.mark.parametrize("name", NAMES)
def test_output_loading_info_returns_model_and_report(name):
    src, off = _official(name)
    cls = type(src)
    out = cls.from_official(off, src.config, output_loading_info=True)
    assert isinstance(out, tuple) and len(out) == 2
    model, report = out
    assert type(model) is cls and isinstance(report, ConversionReport)
    assert report.missing == [] and report.unexpected == []
    _same_weights(model, src)
    with pytest.raises(TypeError):  # keyword-only, as HF's
        cls.from_official(off, src.config, True)


@pytest.mark.parametrize("name", NAMES)
def test_missing_key_logs_a_warning(name, caplog):
    src, off = _official(name)
    cls = type(src)
    drop = next(k for k in off if k.endswith("pooler.dense.weight"))
    partial = {k: v for k, v in off.items() if k != drop}
    with caplog.at_level(logging.WARNING, logger="vlfast"):
        model, report = cls.from_official(partial, src.config, output_loading_info=True)
    assert len(report.missing) == 1 and report.missing[0].endswith("pooler.dense.weight")
    (rec,) = _warnings(caplog, name)
    msg = rec.getMessage()
    assert f"{cls.__name__}.from_official" in msg and report.missing[0] in msg and "1 parameter" in msg
    # the default (no report) warns too; a long list is cut
    caplog.clear()
    few = {k: v for k, v in off.items() if "encoder." not in k}
    with caplog.at_level(logging.WARNING, logger="vlfast"):
        model = cls.from_official(few, src.config)
    assert isinstance(model, cls)
    (rec,) = _warnings(caplog, name)
    n = len([k for k in src.state_dict() if k.startswith("encoder.")])
    assert n > 10 and f"{n} parameter" in rec.getMessage() and f"({n - 10} more)" in rec.getMessage()


@pytest.mark.parametrize("name", NAMES)
def test_not_a_checkpoint_of_the_model(name):
    src, _ = _official(name)
    _, other = _official(OTHER[name])
    cls = type(src)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.from_official: src: expected a {cls.__name__} "
                                         r"checkpoint .*got \d+ keys, none of them one of its parameters"):
        cls.from_official(other, src.config)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.from_official: src: .*got no keys"):
        cls.from_official({}, src.config)
