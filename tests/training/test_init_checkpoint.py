"""``--init-checkpoint`` takes every form of weights a user has, for all four models:
an official checkpoint file (UNITER ``.pt``, ViLBERT ``.bin``, VL-BERT ``.model`` with its
``state_dict``/``module.`` wrapping, HF VisualBERT ``pytorch_model.bin`` or its
directory), a ``vlfast.convert`` / ``save_pretrained`` directory, and a vlfast training
checkpoint -- mapped onto the fine-tuning (or pretraining) model's backbone and onto the
heads the official code shares; loading less is an error unless
``init.allow_partial=true``."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from vlfast.training.checkpoint import FORMAT, VERSION, InitCheckpointError, load_model_weights
from vlfast.training.config import load_config
from vlfast.training.jobs import SyntheticSource, VLJob

TINY = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"
SIZES = {"uniter": TINY, "visualbert": TINY, "vlbert": TINY,
         "vilbert": "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
                    "v_hidden_size: 32, v_num_hidden_layers: 1, v_num_attention_heads: 2, v_intermediate_size: 64, "
                    "bi_hidden_size: 32, bi_num_attention_heads: 2, t_biattention_id: [0], v_biattention_id: [0]}"}
SMALL = ["data.options.n_images=40", "data.batch_size=4", "data.eval_batch_size=8", "logging.progress=off",
         "device=cpu", "logging.tensorboard=null", "optim.lr_multipliers={}"]
MODELS = list(SIZES)


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(load_config("default_vqa", SMALL).data.options)


def _cfg(model: str, seed: int, *extra: str, base: str = "default_vqa"):
    return load_config(base, SMALL + [f"model.name={model}", f"model.config={SIZES[model]}", f"seed={seed}", *extra])


def _official_file(model: str, backbone, tmp_path):
    """The backbone in its official layout and file wrapping: UNITER ``.pt`` (uniter.*),
    ViLBERT ``.bin`` (bert.*), VL-BERT ``.model`` ({"state_dict": module.vlbert.*},
    without the pooler, as the released pretraining configs), VisualBERT HF
    ``pytorch_model.bin`` (visual_bert.* of VisualBertForPreTraining)."""
    mod = importlib.import_module(f"vlfast.models.{model}")
    sd = mod.to_official(backbone.state_dict())
    if model == "uniter":
        path = tmp_path / "uniter-base.pt"
        torch.save(sd, path)
    elif model == "vilbert":
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    elif model == "vlbert":
        path = tmp_path / "vl-bert_base_res101_pretrain_multitask-0000.model"
        sd = {f"module.{k}": v for k, v in sd.items() if not k.startswith("vlbert.pooler.")}
        torch.save({"state_dict": sd, "optimizer": {}}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save({f"visual_bert.{k}": v for k, v in sd.items()}, path)
    return path


def _backbone_equal(model, backbone, skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    for k, v in backbone.state_dict().items():
        if k.startswith(skip):
            continue
        assert torch.equal(got[f"backbone.{k}"], v), k


@pytest.mark.parametrize("model", MODELS)
def test_official_file_and_converted_dir_load_the_whole_backbone(source, model, tmp_path):
    """The Why of the issue: a converted (or raw official) checkpoint used to load 0
    tensors into fine-tuning.  Now every backbone tensor loads, the new task head is
    listed as initialised fresh, and nothing of the file is left unused."""
    donor = VLJob(_cfg(model, 1), source).model.backbone
    path = _official_file(model, donor, tmp_path)
    fresh = VLJob(_cfg(model, 2), source).model
    rep = load_model_weights(fresh, path, allow_partial=False)
    skip = ("pooler.",) if model == "vlbert" else ()
    _backbone_equal(fresh, donor, skip)
    n = len(donor.state_dict()) - (2 if model == "vlbert" else 0)
    assert len(rep.backbone_loaded) == n and rep.unexpected == []
    assert rep.backbone_missing == []
    assert rep.fresh and all(not k.startswith("backbone.") for k in rep.fresh)
    assert rep.expected_missing == (["backbone.pooler.dense.weight", "backbone.pooler.dense.bias"]
                                    if model == "vlbert" else [])
    text = str(rep)
    assert f"loaded {n} tensors ({n} of the backbone's {len(donor.state_dict())}, 0 of the heads)" in text
    assert "initialised fresh" in text
    # the same file through python -m vlfast.convert, then its directory
    from vlfast.convert import main as convert

    out = tmp_path / "converted"
    cfg_json = tmp_path / "config.json"  # tiny sizes: num_attention_heads cannot be inferred
    cfg_json.write_text(json.dumps(donor.config.to_dict()))
    assert convert(["--model", model, "--src", str(path), "--out", str(out), "--config", str(cfg_json)]) == 0
    again = VLJob(_cfg(model, 3), source).model
    rep = load_model_weights(again, out, allow_partial=False)
    _backbone_equal(again, donor, skip)
    assert rep.unexpected == [] and rep.backbone_missing == []


def test_hf_visualbert_directory(source, tmp_path):
    """A VisualBERT save_pretrained directory is an HF directory (model.safetensors under
    HF's names); HF's own save_pretrained of it loads as well."""
    transformers = pytest.importorskip("transformers")
    donor = VLJob(_cfg("visualbert", 1), source).model.backbone
    donor.save_pretrained(tmp_path / "ours")
    hf = transformers.VisualBertModel.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    for d in ("ours", "hf"):
        m = VLJob(_cfg("visualbert", 2), source).model
        rep = load_model_weights(m, tmp_path / d, allow_partial=False)
        _backbone_equal(m, donor)
        assert rep.backbone_missing == []


def test_training_checkpoint_pretraining_to_finetuning(source, tmp_path):
    pre = VLJob(_cfg("uniter", 1, "tasks={mlm: 1.0, itm: 1.0}", base="default_pretrain"), source).model
    path = tmp_path / "step_00000010.pt"
    torch.save({"format": FORMAT, "version": VERSION, "model": pre.state_dict()}, path)
    ft = VLJob(_cfg("uniter", 2), source).model
    rep = load_model_weights(ft, path, allow_partial=False)
    _backbone_equal(ft, pre.backbone)
    assert rep.kind.startswith("vlfast training checkpoint") and rep.backbone_missing == []
    assert all(k.startswith("objectives.") for k in rep.unexpected)  # the pretraining heads


def test_official_pretraining_heads_load_into_the_objectives(source, tmp_path):
    """UNITER's released pretraining checkpoint: uniter.* into the backbone, its
    itm_output / cls.predictions heads into the ITM and MLM objectives; and its ITM
    head into the retrieval head (UNITER's own init for retrieval fine-tuning)."""
    donor = VLJob(_cfg("uniter", 1, "tasks={mlm: 1.0, itm: 1.0}", base="default_pretrain"), source).model
    from vlfast.models.uniter import to_official

    sd = {**to_official(donor.backbone.state_dict()), **donor.official_head_state_dict()}
    path = tmp_path / "uniter-base.pt"
    torch.save(sd, path)
    pre = VLJob(_cfg("uniter", 2, "tasks={mlm: 1.0, itm: 1.0}", base="default_pretrain"), source).model
    rep = load_model_weights(pre, path, allow_partial=False)
    assert rep.unexpected == [] and rep.fresh == []
    for k, v in donor.state_dict().items():
        assert torch.equal(pre.state_dict()[k], v), k
    ret = VLJob(_cfg("uniter", 3, "tasks={retrieval: 1.0}"), source).model
    rep = load_model_weights(ret, path, allow_partial=False)
    itm = sd["itm_output.weight"]
    assert torch.equal(ret.rank_output.weight, itm[1:]) and torch.equal(ret.rank_output.bias, sd["itm_output.bias"][1:])
    assert "rank_output.weight" in rep.loaded and rep.fresh == []


def test_loading_less_is_an_error_unless_allow_partial(source, tmp_path):
    donor = VLJob(_cfg("uniter", 1), source).model.backbone
    from vlfast.models.uniter import to_official

    sd = {k: v for k, v in to_official(donor.state_dict()).items() if ".encoder.layer.0.output." not in k}
    torch.save(sd, tmp_path / "partial.pt")
    m = VLJob(_cfg("uniter", 2), source).model
    with pytest.raises(InitCheckpointError, match=r"provides 30 of the 34 Uniter backbone tensors; missing 4: "
                                                  r"backbone\.encoder\.layer\.0\.output\.dense\.weight"):
        load_model_weights(m, tmp_path / "partial.pt", allow_partial=False)
    rep = load_model_weights(m, tmp_path / "partial.pt", allow_partial=True)
    assert len(rep.backbone_loaded) == 30 and len(rep.backbone_missing) == 4
    # another model's checkpoint loads nothing: an error naming what it is
    vil = VLJob(_cfg("vilbert", 1), source).model.backbone
    from vlfast.models.vilbert import to_official as vil_official

    torch.save(vil_official(vil.state_dict()), tmp_path / "vilbert.bin")
    with pytest.raises(InitCheckpointError, match=r"provides 0 of the 34 Uniter backbone tensors.*another model"):
        load_model_weights(m, tmp_path / "vilbert.bin", allow_partial=False)
    # a checkpoint of another size: the shapes are named
    big = VLJob(_cfg("uniter", 1, "model.config.intermediate_size=96"), source).model.backbone
    torch.save(to_official(big.state_dict()), tmp_path / "big.pt")
    with pytest.raises(InitCheckpointError, match=r"of another shape.*\(96, 32\) vs model \(64, 32\)"):
        load_model_weights(m, tmp_path / "big.pt", allow_partial=False)


def test_cli_init_checkpoint_from_a_converted_dir(source, tmp_path, capsys):
    """As the user types it: convert an official UNITER, fine-tune from the directory;
    the run header says what loaded and what is fresh; a wrong checkpoint is one line,
    exit 2."""
    from vlfast.convert import main as convert
    from vlfast.train import main

    over = ["data.options.n_images=40", "data.batch_size=4", "data.eval_batch_size=8", "optim.total_steps=1",
            "eval.every=0", "eval.at_end=false", "checkpoint.every=0", "checkpoint.best_metric=null",
            "logging.every=1", "logging.progress=off", "logging.tensorboard=null", "device=cpu",
            "optim.lr_multipliers={}", f"model.config={SIZES['uniter']}"]
    job = VLJob(_cfg("uniter", 1), source)
    path = _official_file("uniter", job.model.backbone, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(job.model.backbone.config.to_dict()))
    assert convert(["--model", "uniter", "--src", str(path), "--out", str(tmp_path / "conv"), "--config",
                    str(tmp_path / "config.json")]) == 0
    capsys.readouterr()
    code = main(["--config", "default_vqa", "--run-dir", str(tmp_path / "run"), "--init-checkpoint",
                 str(tmp_path / "conv"), *over])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "loaded 34 tensors (34 of the backbone's 34, 0 of the heads)" in out + err
    import re

    assert re.search(r"initialised fresh \(\d+, heads the checkpoint does not have\): vqa_output\.\*\n", out + err)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite([r for r in recs if r["kind"] == "train"][-1]["loss"])
    vil = VLJob(_cfg("vilbert", 1), source).model.backbone
    from vlfast.models.vilbert import to_official as vil_official

    torch.save(vil_official(vil.state_dict()), tmp_path / "vilbert.bin")
    code = main(["--config", "default_vqa", "--run-dir", str(tmp_path / "run2"), "--init-checkpoint",
                 str(tmp_path / "vilbert.bin"), *over])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlfast.train: init checkpoint ") and \
        "provides 0 of the 34 Uniter backbone tensors" in lines[0]


def test_a_saved_task_head_directory_loads_backbone_and_head(source, tmp_path):
    """TaskHead.save_pretrained (what vlfast.export writes for a fine-tuned run):
    model.safetensors + head.safetensors -> every tensor of the fine-tuning model."""
    donor = VLJob(_cfg("uniter", 1), source).model
    donor.save_pretrained(tmp_path / "exported")
    m = VLJob(_cfg("uniter", 2), source).model
    rep = load_model_weights(m, tmp_path / "exported", allow_partial=False)
    assert rep.fresh == [] and rep.unexpected == [] and rep.missing == []
    assert rep.kind.startswith("task-head directory")
    for k, v in donor.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_an_exported_pretraining_directory_loads_backbone_and_heads(source, tmp_path):
    """vlfast.export of a pretraining run: model.safetensors + heads.safetensors
    (objectives.* names) -> every tensor of a pretraining model of the same tasks."""
    from safetensors.torch import save_file

    pre = lambda seed: VLJob(_cfg("uniter", seed, "tasks={mlm: 1.0, itm: 1.0}", base="default_pretrain"),  # noqa
                             source).model
    donor = pre(1)
    donor.backbone.save_pretrained(tmp_path / "exp")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items() if k.startswith("objectives.")
               and not k.endswith("decoder.weight")}, str(tmp_path / "exp" / "heads.safetensors"))
    m = pre(2)
    rep = load_model_weights(m, tmp_path / "exp", allow_partial=False)
    assert rep.kind.startswith("pretraining-model directory") and rep.unexpected == []
    for k, v in donor.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
