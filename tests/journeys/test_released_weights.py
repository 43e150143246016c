"""From released weights to an exported model, one journey per model, as a user types it.

For each of UNITER, ViLBERT, VL-BERT and VisualBERT: a random checkpoint in the model's
*official* layout and file wrapping (``official_layouts.py``, transcribed from the
official code), at the sizes of a tiny ``default_vqa`` fine-tuning run, then -- every step
through the command-line entry points, in-process --

1. ``vlfast.convert --model M --src FILE --out CONV --config OURS.json``: every backbone
   tensor of the file is used, only the official heads are left over;
2. ``vlfast.train --config default_vqa --init-checkpoint CONV amp=bf16 ...`` (3 steps);
3. ``vlfast.export --checkpoint RUN/checkpoints/step_00000003.pt --out EXPORT``; a fresh
   process (``python -P -c``) reloads EXPORT alone (``TaskHead.from_pretrained``) and its
   fp32 predictions on a fixed batch are bitwise the in-process model's (the process
   starts right after the export and is waited for at the end);
4. ``vlfast.evaluate --run-dir RUN``: a VQA score; ``vlfast.evaluate --run-dir EXPORT``
   scores the exported directory the same;
5. the start of fine-tuning, end to end: a 1-step run with the backbone's learning rate
   at 0 (``optim.lr_multipliers={backbone: 0.0}``) from CONV, and again from the official
   FILE given directly to ``--init-checkpoint``: every backbone tensor of the saved step
   checkpoint equals the official file's tensor under the official name (the official
   key -> our key relation below, ``_our_key``), and every backbone tensor comes from the
   file except what the release lacks (VL-BERT's pooler: the released pretraining configs
   have ``with_pooler: false``).
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from vlfast.convert import main as convert_main
from vlfast.evaluate import main as evaluate_main
from vlfast.export import main as export_main
from vlfast.train import main as train_main

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


L = _load("vlfast_journeys_official_layouts", HERE / "official_layouts.py")

MODELS = ["uniter", "vilbert", "vlbert", "visualbert"]
FEAT_DIM = 2048          # the released models' region features (VL-BERT hard-codes 2048)
E, LAYERS, HEADS, INTER, POS = 32, 1, 2, 64, 64
DATA = ["data.options.n_images=40", f"data.options.feat_dim={FEAT_DIM}", "data.batch_size=4",
        "data.eval_batch_size=32"]
QUIET = ["amp=bf16", "device=cpu", "optim.warmup_steps=0", "eval.every=0", "eval.at_end=false",
         "checkpoint.every=0", "checkpoint.best_metric=null", "logging.every=1", "logging.progress=off",
         "logging.tensorboard=null"]
# backbone tensors a release does not carry (left as initialised; vlfast's release_missing)
ABSENT = {"uniter": [], "vilbert": [], "visualbert": [], "vlbert": ["pooler.dense.bias", "pooler.dense.weight"]}
HEADS_OF = {"uniter": L.UNITER_HEADS, "vilbert": L.VILBERT_HEADS, "vlbert": L.VLBERT_HEADS,
            "visualbert": L.VISUALBERT_HEADS}


# HF's VisualBertForPreTraining + save_pretrained in a process of its own (importing
# transformers' modeling code takes seconds): started with the first journey, waited for
# by the VisualBERT one
HF_RELEASE = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import official_layouts as L
L.write_visualbert(sys.argv[2], json.loads(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world's sizes that fix the model's: vocabulary and pad id of its
    tokenizer, region feature width (as VLJob sets vocab_size / pad_token_id / the
    feature field from the source); and the HF VisualBERT release being written."""
    from vlfast.training.config import load_config
    from vlfast.training.jobs import SyntheticSource

    src = SyntheticSource(load_config("default_vqa", DATA).data.options)
    assert src.feat_dim == FEAT_DIM
    w: dict[str, Any] = {"vocab": src.tokenizer.vocab_size, "pad": src.tokenizer.pad_id}
    hf_dir = tmp_path_factory.mktemp("visualbert-release") / "visualbert-hf"
    config = L.visualbert_config(**_text_sizes(w), pad_token_id=w["pad"])
    proc = subprocess.Popen([sys.executable, "-P", "-c", HF_RELEASE, str(HERE), str(hf_dir), json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    w["visualbert"] = (proc, hf_dir)
    yield w
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _text_sizes(w: dict[str, Any]) -> dict[str, int]:
    return dict(vocab_size=w["vocab"], hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTER, max_position_embeddings=POS)


# ----------------------------------------------------------------------------------
# The release of each model, and our config of the same sizes
# ----------------------------------------------------------------------------------

def _release(model: str, w: dict[str, Any], d: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(the file for ``vlfast.convert --src``, what a user gives ``--init-checkpoint``,
    our config of the same sizes -- the convert --config JSON and model.config)."""
    pad, text = w["pad"], _text_sizes(w)
    if model == "uniter":
        path = L.write_uniter(d, L.uniter_config(**text, IMG_DIM=FEAT_DIM))
        ours = dict(text, type_vocab_size=2, img_dim=FEAT_DIM, pos_dim=7, pad_token_id=pad)
        return path, path, ours
    if model == "vilbert":
        vis = dict(v_feature_size=FEAT_DIM, v_hidden_size=24, v_num_hidden_layers=1, v_num_attention_heads=2,
                   v_intermediate_size=48, bi_hidden_size=16, bi_num_attention_heads=2, v_biattention_id=[0],
                   t_biattention_id=[0])
        path = L.write_vilbert(d, L.vilbert_config(**text, **vis, bi_intermediate_size=16))
        return path, path, dict(text, **vis, type_vocab_size=2, pad_token_id=pad)
    if model == "vlbert":
        path = L.write_vlbert(d, L.vlbert_config(**text, visual_size=E))
        ours = dict(text, type_vocab_size=3, visual_feat_dim=FEAT_DIM, visual_size=E, visual_ln=True,
                    box_embed_dim=256, pad_token_id=pad)
        return path, path, ours
    proc, hf_dir = w["visualbert"]  # L.write_visualbert(hf_dir, L.visualbert_config(**text, pad_token_id=pad))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    ours = dict(text, type_vocab_size=2, visual_embedding_dim=FEAT_DIM, pad_token_id=pad)
    return hf_dir / "model.safetensors", hf_dir, ours


def _official_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under their official names, unwrapped by hand (VL-BERT's
    {"state_dict": module.*}), independently of vlfast's readers."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj and "optimizer" in obj else obj


def _our_key(model: str, key: str) -> Optional[str]:
    """Official key -> vlfast's backbone parameter name; None for the official heads.

    UNITER ``uniter.X`` -> ``X``; ViLBERT ``bert.X`` -> ``X``; VisualBERT
    ``visual_bert.X`` -> ``X``; VL-BERT (``module.`` dropped) ``vlbert.X`` -> ``X``,
    ``image_feature_extractor.obj_downsample.1.P`` -> ``obj_downsample.P``, the four
    rows of the outer module (``object_linguistic_embeddings``,
    ``aux_text_visual_embedding``, ``object_mask_visual_embedding``,
    ``object_mask_word_embedding``) keep their names."""
    k = key[len("module."):] if key.startswith("module.") else key
    if k.startswith(HEADS_OF[model]):
        return None
    prefix = {"uniter": "uniter.", "vilbert": "bert.", "visualbert": "visual_bert.", "vlbert": "vlbert."}[model]
    if k.startswith(prefix):
        return k[len(prefix):]
    if model == "vlbert":
        if k.startswith("image_feature_extractor.obj_downsample.1."):
            return "obj_downsample." + k[len("image_feature_extractor.obj_downsample.1."):]
        if k.split(".")[0] in ("object_linguistic_embeddings", "aux_text_visual_embedding",
                               "object_mask_visual_embedding", "object_mask_word_embedding"):
            return k
    raise AssertionError(f"{model}: official key {key} is neither a head nor part of the backbone")


def _assert_backbone_is_the_release(model: str, step_ckpt: Path, release: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor of a saved step checkpoint equals the release's tensor of
    the same parameter; the backbone tensors the release has no key for are exactly
    ABSENT[model]."""
    sd = torch.load(step_ckpt, map_location="cpu", weights_only=True)["model"]
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    mapped: dict[str, str] = {}
    for k in release:
        ours = _our_key(model, k)
        if ours is not None:
            assert ours in bb, f"{model}: official {k} -> {ours}: not a backbone tensor of the fine-tuning model"
            mapped[ours] = k
    assert sorted(set(bb) - set(mapped)) == ABSENT[model]
    differ = [f"{mapped[k]} -> backbone.{k}" for k in mapped
              if bb[k].dtype != release[mapped[k]].dtype or not torch.equal(bb[k], release[mapped[k]])]
    assert differ == [], f"{model}: {len(differ)} backbone tensor(s) differ from the release: {differ[:8]}"


def _init_line(text: str) -> tuple[int, int, int]:
    m = re.search(r"loaded (\d+) tensors \((\d+) of the backbone's (\d+), (\d+) of the heads\)", text)
    assert m, text[-3000:]
    return int(m.group(2)), int(m.group(3)), int(m.group(4))


def _convert_report(text: str) -> tuple[list[str], list[str]]:
    """(missing, unused) key lists printed by vlfast.convert."""
    missing: list[str] = []
    unused: list[str] = []
    cur = None
    for line in text.splitlines():
        if line.startswith("missing in the source"):
            cur = missing
        elif line.startswith("unused source keys"):
            cur = unused
        elif line.startswith("  ") and cur is not None:
            cur.append(line.strip())
    return missing, unused


# the fresh process: the exported directory alone -> predictions on the saved batch
CHILD = r"""
import sys
import torch
exported, batch_file, out_file, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
from vlfast.data.batch import VLBatch
from vlfast.training.tasks import TaskHead
model = TaskHead.from_pretrained(exported).eval()
batch = VLBatch(**torch.load(batch_file, weights_only=True))
with torch.no_grad():
    out = model(batch)
torch.save({"logits": out.logits, "answers": model.answer_strings(out.predictions)}, out_file)
"""


def _run(main, argv: list[str], capsys) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, (out + err)[-4000:]
    return out + err


@pytest.mark.parametrize("model", MODELS)
def test_released_weights_to_exported_model(model, world, tmp_path, capsys):
    src, init_src, ours = _release(model, world, tmp_path / "release")
    release = _official_tensors(src)
    n_backbone_keys = sum(_our_key(model, k) is not None for k in release)
    heads = sorted(k[len("module."):] if k.startswith("module.") else k
                   for k in release if _our_key(model, k) is None)
    cfg = [f"model.name={model}", f"model.config={json.dumps(ours)}", *DATA, *QUIET]
    if model != "uniter":  # default_vqa's {vqa_output: 10.0} names UNITER's head
        cfg.append("optim.lr_multipliers={}")

    # 1. convert (our config: the head count cannot be inferred below 64-wide)
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    conv = tmp_path / "converted"
    out = _run(convert_main, ["--model", model, "--src", src, "--out", conv, "--config", tmp_path / "ours.json"],
               capsys)
    missing, unused = _convert_report(out)
    assert missing == ABSENT[model]
    assert sorted(k[len("module."):] if k.startswith("module.") else k for k in unused) == heads

    # 2. fine-tune from the converted directory
    run = tmp_path / "run"
    out = _run(train_main, ["--config", "default_vqa", "--run-dir", run, "--init-checkpoint", conv,
                            "optim.total_steps=3", *cfg], capsys)
    loaded, total, from_heads = _init_line(out)
    # the converted directory holds the whole backbone (what the release lacks at its init)
    assert (loaded, total - len(ABSENT[model]), from_heads) == (total, n_backbone_keys, 0)
    ckpt = run / "checkpoints" / "step_00000003.pt"
    assert ckpt.is_file()

    # 3. export; the in-process model's fp32 predictions on a fixed batch; the fresh process
    exported = tmp_path / "exported"
    _run(export_main, ["--checkpoint", ckpt, "--out", exported], capsys)
    from vlfast.evaluate import prepare

    job, _ = prepare(run, str(ckpt))
    _, batch = next(job._eval_batches("vqa", "val"))
    net = job.model.eval()
    with torch.no_grad():
        mine = net(batch)
    fields = {f: getattr(batch, f) for f in ("input_ids", "attention_mask", "token_type_ids", "visual_feats",
                                             "boxes", "visual_mask", "image_size", "soft_labels", "targets")}
    torch.save(fields, tmp_path / "batch.pt")
    child = subprocess.Popen(
        [sys.executable, "-P", "-c", CHILD, str(exported), str(tmp_path / "batch.pt"), str(tmp_path / "child.pt"),
         str(torch.get_num_threads())], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 4. evaluate the run, then the exported directory: the same scores
        _run(evaluate_main, ["--run-dir", run], capsys)
        metrics = json.loads((run / "predictions" / "metrics_val.json").read_text())
        metrics = metrics.get("metrics", metrics)
        assert 0.0 <= metrics["vqa_score"] <= 1.0
        _run(evaluate_main, ["--run-dir", exported, "--out", tmp_path / "exported-eval"], capsys)
        again = json.loads((tmp_path / "exported-eval" / "metrics_val.json").read_text())
        assert again.get("metrics", again) == metrics

        # 5. the start of fine-tuning: backbone LR 0, one step, from CONV and from the official file
        for i, init in enumerate((conv, init_src)):
            r = tmp_path / f"init-{i}"
            out = _run(train_main, ["--config", "default_vqa", "--run-dir", r, "--init-checkpoint", init,
                                    "optim.total_steps=1", *cfg, "optim.lr_multipliers={backbone: 0.0}"], capsys)
            loaded, total, from_heads = _init_line(out)
            want = total if init == conv else n_backbone_keys
            assert (loaded, total - len(ABSENT[model]), from_heads) == (want, n_backbone_keys, 0)
            _assert_backbone_is_the_release(model, r / "checkpoints" / "step_00000001.pt", release)
        log, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, log[-4000:]
    theirs = torch.load(tmp_path / "child.pt", weights_only=True)
    assert mine.logits.dtype == theirs["logits"].dtype == torch.float32
    assert torch.equal(mine.logits, theirs["logits"])
    assert theirs["answers"] == net.answer_strings(mine.predictions)


# ----------------------------------------------------------------------------------
# The transcriptions, cross-checked
# ----------------------------------------------------------------------------------

def test_layouts_agree_with_the_model_tests_transcriptions():
    """tests/models/test_uniter.py and test_vlbert.py hold their own transcriptions of the
    official keys: the same names and shapes as official_layouts.py's."""
    from vlfast.models.uniter import UniterConfig
    from vlfast.models.vlbert import VLBertConfig

    tu = _load("vlfast_journeys_test_uniter", HERE.parent / "models" / "test_uniter.py")
    c = UniterConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=40, img_dim=24)
    mine = L.uniter_state_dict(L.uniter_config(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=40, IMG_DIM=24, IMG_LABEL_DIM=5))
    theirs = {**tu.official_keys(c), **tu.official_heads(c, label_dim=5)}
    assert {k: tuple(v.shape) for k, v in mine.items()} == theirs

    tv = _load("vlfast_journeys_test_vlbert", HERE.parent / "models" / "test_vlbert.py")
    for visual_ln in (True, False):
        c = VLBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, visual_feat_dim=2048, visual_size=32,
                         visual_ln=visual_ln)
        mine = L.vlbert_state_dict(L.vlbert_config(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   max_position_embeddings=40, visual_size=32, visual_ln=visual_ln))
        shapes = {k: tuple(v.shape) for k, v in mine.items() if not k.startswith(L.VLBERT_HEADS)}
        assert shapes == tv.official_keys(c, pooler=False)


def test_official_variants_load_every_backbone_tensor(tmp_path):
    """Variants of the official configs the journeys do not run: ViLBERT's multi-task
    model (task_specific_tokens: bert.embeddings.task_embeddings), VL-BERT without the
    visual LayerNorms (visual_scale_text / visual_scale_object) and with a pooler."""
    from vlfast.models.vilbert import ViLBert, ViLBertConfig
    from vlfast.models.vlbert import VLBert, VLBertConfig

    text = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=40)
    vc = L.vilbert_config(**text, v_feature_size=16, v_hidden_size=24, v_num_hidden_layers=1,
                          v_num_attention_heads=2, v_intermediate_size=48, bi_hidden_size=16,
                          bi_num_attention_heads=2, v_biattention_id=[0], t_biattention_id=[1],
                          task_specific_tokens=True)
    path = L.write_vilbert(tmp_path / "vil", vc)
    ours = ViLBertConfig(**{k: vc[k] for k in (*text, "v_feature_size", "v_hidden_size", "v_num_hidden_layers",
                                              "v_num_attention_heads", "v_intermediate_size", "bi_hidden_size",
                                              "bi_num_attention_heads", "v_biattention_id", "t_biattention_id",
                                              "task_specific_tokens")})
    net, rep = ViLBert.from_official(str(path), ours, output_loading_info=True)
    release = _official_tensors(path)
    assert rep.missing == [] and all(k.startswith("cls.") for k in rep.unexpected)
    own = net.state_dict()
    for k, v in release.items():
        if not k.startswith("cls."):
            assert torch.equal(own[k[len("bert."):]], v), k

    lc = L.vlbert_config(**text, visual_size=32, visual_ln=False, with_pooler=True)
    path = L.write_vlbert(tmp_path / "vl", lc)
    ours = VLBertConfig(**text, visual_feat_dim=2048, visual_size=32, visual_ln=False)
    net, rep = VLBert.from_official(str(path), ours, output_loading_info=True)
    assert rep.missing == [] and all(k.startswith("module.vlbert.m") for k in rep.unexpected)
    own = net.state_dict()
    for k, v in _official_tensors(path).items():
        ck = _our_key("vlbert", k)
        if ck is not None:
            assert torch.equal(own[ck], v), k


@pytest.mark.parametrize("model", ["uniter", "vilbert", "vlbert"])
def test_init_report_of_a_release_with_tied_tensors(model, world, tmp_path):
    """--init-checkpoint with an official file whose tied tensors are shared (torch.save
    of a state_dict on the CPU / of ViLBERT's and VL-BERT's models): the report's unused
    keys are exactly the official heads."""
    from vlfast.training.checkpoint import load_model_weights
    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob

    if model == "uniter":
        _, _, ours = _release(model, world, tmp_path / "release")
        path = tmp_path / L.UNITER_FILE
        torch.save(L.uniter_state_dict(L.uniter_config(**_text_sizes(world), IMG_DIM=FEAT_DIM)), path)
    else:
        path, _, ours = _release(model, world, tmp_path / "release")
    release = _official_tensors(path)
    heads = sorted(k[len("module."):] if k.startswith("module.") else k
                   for k in release if _our_key(model, k) is None)
    job = VLJob(load_config("default_vqa", [f"model.name={model}", f"model.config={json.dumps(ours)}", *DATA,
                                            "optim.lr_multipliers={}"]))
    rep = load_model_weights(job.model, path, allow_partial=False)
    assert sorted(rep.unexpected) == heads
