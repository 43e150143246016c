"""Pretraining objectives and the pretraining model: every loss on a tiny hand-built
VLBatch (B=2, Lt=5, Lv=3, ragged) against a hand computation (head weights applied by
hand, GELU / LayerNorm / cross-entropy / KL / MSE by formula, masked rows picked by
explicit (row, slot) lists), heads applied to exactly the masked rows, gradients,
UNITER's WRA term, padded = padding-free, official head names (and HF
VisualBertForPreTraining's loss on its own weights), the builder, and the task mixer
(ratios, resume, and the same tasks on two gloo ranks)."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from vlfast import ops
from vlfast.data.batch import VLBatch
from vlfast.kernels.ot.reference import wra_distance_reference
from vlfast.models import UniterConfig, ViLBertConfig, VisualBertConfig, VLBertConfig
from vlfast.training import objectives as O
from vlfast.training.pretrain import (MODEL_TASKS, PretrainModel, TaskMixer, build_pretrain_model, make_config)

C = 7                                   # region classes
TXT_LENS, IMG_LENS = (5, 3), (3, 2)
MLM_POS = [(0, 1), (0, 3), (1, 2)]      # (row, text slot) of the masked words, in nonzero order
IMG_POS = [(0, 0), (0, 2), (1, 1)]      # (row, visual slot) of the masked regions
MASK_ID = 3
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def small_config(name: str):
    if name == "uniter":
        return UniterConfig.small(**NO_DROP)
    if name == "visualbert":
        return VisualBertConfig.small(**NO_DROP)
    if name == "vilbert":
        return ViLBertConfig.small(**NO_DROP, v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0,
                                   v_feature_size=40)
    return VLBertConfig.small().replace(**NO_DROP, visual_dropout_prob=0.0)


def make_batch(cfg, itm=(1, 0), seed: int = 0) -> VLBatch:
    """A ragged batch with every pretraining target: 3 masked words, 3 masked regions
    (features zeroed, originals in masked_feats), soft labels and ITM labels."""
    g = torch.Generator().manual_seed(seed)
    B, Lt, Lv = 2, max(TXT_LENS), max(IMG_LENS)
    F_ = O.feature_dim(cfg)
    tmask = torch.arange(Lt)[None] < torch.tensor(TXT_LENS)[:, None]
    vmask = torch.arange(Lv)[None] < torch.tensor(IMG_LENS)[:, None]
    ids = torch.randint(5, cfg.vocab_size, (B, Lt), generator=g) * tmask
    labels = torch.full((B, Lt), -100)
    for b, t in MLM_POS:
        labels[b, t] = ids[b, t]
        ids[b, t] = MASK_ID
    feats = torch.randn(B, Lv, F_, generator=g)
    xy = torch.rand(B, Lv, 2, generator=g) * 0.5
    wh = torch.rand(B, Lv, 2, generator=g) * 0.4 + 0.05
    img_masks = torch.zeros(B, Lv, dtype=torch.bool)
    for b, v in IMG_POS:
        img_masks[b, v] = True
    masked_feats = torch.stack([feats[b, v].clone() for b, v in IMG_POS])
    feats[img_masks] = 0.0
    soft = torch.softmax(torch.randn(len(IMG_POS), C, generator=g) * 2, -1)
    soft[0] = torch.softmax(torch.tensor([9.0] + [0.0] * (C - 1)), -1)    # background (class 0) most likely
    return VLBatch(input_ids=ids, attention_mask=tmask, token_type_ids=torch.zeros(B, Lt, dtype=torch.long),
                   visual_feats=feats, boxes=torch.cat([xy, xy + wh], -1), visual_mask=vmask,
                   image_size=torch.tensor([[640.0, 480.0], [320.0, 240.0]]),
                   targets=dict(mlm_labels=labels, img_masks=img_masks, masked_feats=masked_feats,
                                masked_soft_labels=soft, itm_labels=torch.tensor(itm)))


def build(name: str, tasks, seed: int = 0, **kw) -> PretrainModel:
    torch.manual_seed(seed)
    return build_pretrain_model(name, small_config(name), tasks, num_region_classes=C, **kw).eval()


# -- hand computations --------------------------------------------------------------

def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def log_softmax(z):
    return z - torch.logsumexp(z, -1, keepdim=True)


def cross_entropy(z, target):
    return -(log_softmax(z)[torch.arange(len(target)), target]).mean()


def kl_terms(z, p):
    """Elementwise p * (log p - log q), q = softmax(z)."""
    return p * (torch.log(p) - log_softmax(z))


def states(pm: PretrainModel, batch: VLBatch):
    """(text (B,Lt,E), visual (B,Lv,Ev), out) from a separate backbone call."""
    with torch.no_grad():
        out = pm.backbone(**batch.model_inputs(pm.backbone))
    Lt = batch.input_ids.shape[1]
    if pm.backbone.config.model_type == "vilbert":
        return out.seq_t, out.seq_v, out
    return out.last_hidden_state[:, :Lt], out.last_hidden_state[:, Lt:], out


def rows(h, positions):
    return torch.stack([h[b, i] for b, i in positions])


def count_rows(module):
    """A forward hook recording how many rows ``module`` was applied to."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen, handle


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               rtol=tol, atol=tol)


MODELS = ["uniter", "visualbert", "vilbert", "vlbert"]


# -- MLM -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_mlm_loss_by_hand_and_only_masked_rows(name, device):
    pm = build(name, ["mlm"]).to(device)
    batch = make_batch(pm.backbone.config).to(device)
    obj = pm.objectives["mlm"]
    seen, handle = count_rows(obj.transform.dense)
    with torch.no_grad():
        r = pm(batch, "mlm")
    handle.remove()
    assert seen == [len(MLM_POS)]                       # the head ran on the 3 masked words only
    text, _, _ = states(pm, batch)
    h = rows(text, MLM_POS)
    t = layer_norm(gelu(linear(h, obj.transform.dense)), obj.transform.LayerNorm)
    logits = t @ O.word_embeddings(pm.backbone).weight.T + obj.bias
    target = torch.tensor([int(batch.targets["mlm_labels"][b, i]) for b, i in MLM_POS], device=device)
    want = cross_entropy(logits, target)
    close(r.loss, want)
    assert r.count == 3
    close(r.metrics["mlm/loss"], want.cpu())
    close(r.metrics["mlm/acc"], (logits.argmax(-1) == target).float().mean().cpu())


def test_mlm_decoder_is_tied_and_gradients_reach_heads_and_backbone():
    pm = build("uniter", ["mlm"])
    batch = make_batch(pm.backbone.config)
    pm(batch, "mlm").loss.backward()
    obj = pm.objectives["mlm"]
    for p in (obj.transform.dense.weight, obj.transform.LayerNorm.weight, obj.bias,
              pm.backbone.encoder.layer[0].attention.self.query.weight,
              pm.backbone.encoder.layer[-1].output.dense.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # a word that appears nowhere in the input gets gradient only through the tied decoder
    unused = sorted(set(range(pm.backbone.config.vocab_size)) - set(batch.input_ids.flatten().tolist()))[0]
    assert pm.backbone.embeddings.word_embeddings.weight.grad[unused].abs().sum() > 0
    assert not any(k.endswith("decoder.weight") for k in pm.state_dict())


def test_no_masked_word_gives_a_connected_zero():
    pm = build("uniter", ["mlm"])
    batch = make_batch(pm.backbone.config)
    batch.targets["mlm_labels"] = torch.full_like(batch.input_ids, -100)
    r = pm(batch, "mlm")
    assert r.count == 0 and float(r.loss.detach()) == 0.0
    r.loss.backward()
    assert pm.objectives["mlm"].transform.dense.weight.grad is not None
    assert pm.objectives["mlm"].transform.dense.weight.grad.abs().sum() == 0


# -- pair heads and WRA --------------------------------------------------------------

@pytest.mark.parametrize("name,task", [("uniter", "itm"), ("visualbert", "sip"), ("vilbert", "alignment"),
                                       ("vlbert", "itm")])
def test_pair_head_loss_by_hand(name, task):
    pm = build(name, [task], wra=False)
    batch = make_batch(pm.backbone.config, itm=(1, 0))
    with torch.no_grad():
        r = pm(batch, task)
    _, _, out = states(pm, batch)
    pooled = out.pooled_t * out.pooled_v if name == "vilbert" else out.pooler_output
    obj = pm.objectives[task]
    want = cross_entropy(linear(pooled, obj.classifier), torch.tensor([1, 0]))
    close(r.loss, want)
    assert r.count == 2 and set(r.metrics) == {f"{task}/loss", f"{task}/acc"}


def test_alignment_dropout_is_the_official_heads():
    pm = build("vilbert", ["alignment"])
    assert pm.objectives["alignment"].dropout.p == 0.1
    pm.train()
    batch = make_batch(pm.backbone.config)
    torch.manual_seed(1)
    a = pm(batch, "alignment").loss
    torch.manual_seed(2)
    b = pm(batch, "alignment").loss
    assert float(a.detach()) != float(b.detach())


@pytest.mark.parametrize("itm", [(1, 0), (1, 1), (0, 0)])
def test_uniter_itm_task_is_itm_plus_lambda_wra(itm, device):
    pm = build("uniter", ["itm"]).to(device)
    assert pm.tasks["itm"] == ("itm", "wra")
    batch = make_batch(pm.backbone.config, itm=itm).to(device)
    with torch.no_grad():
        r = pm(batch, "itm")
    text, vis, out = states(pm, batch)
    labels = torch.tensor(itm, device=device)
    itm_loss = cross_entropy(linear(out.pooler_output, pm.objectives["itm"].classifier), labels)
    d = ops.wra_distance(text, vis, batch.attention_mask, batch.visual_mask)
    close(d, wra_distance_reference(text, vis, batch.attention_mask, batch.visual_mask))
    pos, neg = d[labels == 1], d[labels == 0]
    ot = (pos.sum() - neg.sum()) / (len(pos) + len(neg))     # UNITER's train script
    close(r.loss, itm_loss + 0.1 * ot)
    close(r.metrics["wra/loss"], 0.1 * ot.cpu())
    close(r.metrics["wra/ot"], ot.cpu())
    assert ("wra/ot_pos" in r.metrics) == bool(len(pos)) and ("wra/ot_neg" in r.metrics) == bool(len(neg))
    if len(pos):
        close(r.metrics["wra/ot_pos"], pos.mean().cpu())
    assert r.count == 2


def test_wra_gradient_reaches_the_backbone_and_lambda_scales_it():
    grads = []
    for lam in (0.1, 0.2):
        pm = build("uniter", ["itm"], itm_ot_lambda=lam)
        batch = make_batch(pm.backbone.config)
        pm.objectives["wra"](pm.backbone, batch, pm.encode(batch)).loss.backward()
        g = pm.backbone.encoder.layer[0].output.dense.weight.grad
        assert g.abs().sum() > 0
        grads.append(g)
    close(grads[1], 2 * grads[0])


# -- regions -------------------------------------------------------------------------

def test_uniter_mrfr_by_hand_tied_to_img_linear():
    pm = build("uniter", ["mrfr"])
    batch = make_batch(pm.backbone.config)
    head = pm.objectives["mrfr"].head
    assert head.weight is None
    seen, handle = count_rows(head.net[0])
    r = pm(batch, "mrfr")
    handle.remove()
    assert seen == [3] and r.count == 3
    _, vis, _ = states(pm, batch)
    h = layer_norm(gelu(linear(rows(vis, IMG_POS), head.net[0])), head.net[2])
    pred = h @ pm.backbone.img_embeddings.img_linear.weight + head.bias
    want = ((pred - batch.targets["masked_feats"]) ** 2).mean()
    close(r.loss, want)
    r.loss.backward()
    assert head.bias.grad.abs().sum() > 0 and head.net[0].weight.grad.abs().sum() > 0
    assert pm.backbone.encoder.layer[0].attention.self.key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vilbert", "vlbert"])
def test_mrfr_on_other_backbones(name):
    """ViLBERT ties to its image_embeddings; VL-BERT (no plain projection) owns a weight."""
    torch.manual_seed(0)
    cfg = small_config(name)
    from vlfast.models import ViLBert, VLBert
    backbone = (ViLBert if name == "vilbert" else VLBert)(cfg)
    obj = O.MaskedRegionFeatureRegression(O.visual_width(cfg), O.feature_dim(cfg), tied=name == "vilbert")
    pm = PretrainModel(backbone, {"mrfr": obj}).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        r = pm(batch, "mrfr")
    _, vis, _ = states(pm, batch)
    h = layer_norm(gelu(linear(rows(vis, IMG_POS), obj.head.net[0])), obj.head.net[2])
    w = backbone.v_embeddings.image_embeddings.weight if name == "vilbert" else obj.head.weight
    close(r.loss, ((h @ w + obj.head.bias - batch.targets["masked_feats"]) ** 2).mean())


def test_uniter_mrc_argmax_skips_background():
    pm = build("uniter", ["mrc", "mrc-kl"])
    assert pm.objectives["mrc"].head is pm.objectives["mrc-kl"].head      # one region_classifier, as UNITER
    batch = make_batch(pm.backbone.config)
    head = pm.objectives["mrc"].head
    seen, handle = count_rows(head.net[0])
    with torch.no_grad():
        r = pm(batch, "mrc")
    handle.remove()
    assert seen == [3]
    _, vis, _ = states(pm, batch)
    logits = linear(layer_norm(gelu(linear(rows(vis, IMG_POS), head.net[0])), head.net[2]), head.net[3])
    soft = batch.targets["masked_soft_labels"]
    target = torch.tensor([1 + max(range(C - 1), key=lambda c: float(s[1 + c])) for s in soft])
    assert int(soft[0].argmax()) == 0 and int(target[0]) != 0
    close(r.loss, cross_entropy(logits, target))
    # without skipping the background the first target is class 0
    pm.objectives["mrc"].skip_background = False
    with torch.no_grad():
        r0 = pm(batch, "mrc")
    close(r0.loss, cross_entropy(logits, soft.argmax(-1)))


@pytest.mark.parametrize("reduction", ["elements", "regions"])
def test_uniter_mrc_kl_by_hand(reduction):
    pm = build("uniter", ["mrc-kl"], mrc_kl_reduction=reduction)
    batch = make_batch(pm.backbone.config)
    head = pm.objectives["mrc-kl"].head
    with torch.no_grad():
        r = pm(batch, "mrc-kl")
    _, vis, _ = states(pm, batch)
    logits = linear(layer_norm(gelu(linear(rows(vis, IMG_POS), head.net[0])), head.net[2]), head.net[3])
    terms = kl_terms(logits, batch.targets["masked_soft_labels"])
    close(r.loss, terms.sum() / (3 * C) if reduction == "elements" else terms.sum() / 3)
    assert r.count == 3


def test_vilbert_masked_multimodal_kl_by_hand():
    pm = build("vilbert", ["masked_multimodal"])
    batch = make_batch(pm.backbone.config)
    head = pm.objectives["masked_multimodal"].head
    seen, handle = count_rows(head.transform.dense)
    with torch.no_grad():
        r = pm(batch, "masked_multimodal")
    handle.remove()
    assert seen == [3]
    _, vis, _ = states(pm, batch)
    assert vis.shape[-1] == pm.backbone.config.v_hidden_size
    h = layer_norm(gelu(linear(rows(vis, IMG_POS), head.transform.dense)), head.transform.LayerNorm)
    logits = linear(h, head.decoder)
    close(r.loss, kl_terms(logits, batch.targets["masked_soft_labels"]).sum() / 3)


def test_vlbert_masked_roi_soft_cross_entropy_by_hand():
    pm = build("vlbert", ["masked_roi"])
    batch = make_batch(pm.backbone.config)
    head = pm.objectives["masked_roi"].head
    seen, handle = count_rows(head.transform.dense)
    r = pm(batch, "masked_roi")
    handle.remove()
    assert seen == [3]
    _, vis, _ = states(pm, batch)
    logits = linear(gelu(linear(rows(vis, IMG_POS), head.transform.dense)), head.region_cls_pred)
    soft = batch.targets["masked_soft_labels"]
    close(r.loss, -(soft * log_softmax(logits)).sum(-1).mean())
    r.loss.backward()
    assert head.region_cls_pred.weight.grad.abs().sum() > 0
    assert pm.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_joint_tasks_sum_their_objectives():
    pm = build("vilbert", ["mlm+masked_multimodal+alignment"])
    batch = make_batch(pm.backbone.config)
    with torch.no_grad():
        r = pm(batch, "mlm+masked_multimodal+alignment")
        out = pm.encode(batch)
        parts = [pm.objectives[n](pm.backbone, batch, out).loss for n in ("mlm", "masked_multimodal", "alignment")]
    close(r.loss, sum(parts))
    assert r.count == 3 and {"mlm/loss", "masked_multimodal/loss", "alignment/acc"} <= set(r.metrics)


@pytest.mark.parametrize("name,task", [("uniter", "itm"), ("uniter", "mrfr"), ("visualbert", "mlm+sip"),
                                       ("vilbert", "mlm+masked_multimodal"), ("vlbert", "mlm+masked_roi")])
def test_padding_free_gives_the_padded_loss(name, task):
    pm = build(name, [task])
    batch = make_batch(pm.backbone.config)
    with torch.no_grad():
        a = pm(batch, task)
        pm.padding_free = True
        b = pm(batch, task)
    close(a.loss, b.loss, 1e-5)


# -- errors --------------------------------------------------------------------------

def test_errors_name_the_target_and_the_task():
    pm = build("uniter", ["mlm", "mrfr", "itm"])
    batch = make_batch(pm.backbone.config)
    with pytest.raises(ValueError, match="task: expected one of .*'mrc'"):
        pm(batch, "mrc")
    del batch.targets["mlm_labels"]
    with pytest.raises(ValueError, match=r"batch.targets\['mlm_labels'\]"):
        pm(batch, "mlm")
    batch = make_batch(pm.backbone.config)
    batch.targets["masked_feats"] = batch.targets["masked_feats"][:2]
    with pytest.raises(ValueError, match=r"masked_feats.*Nm=3"):
        pm(batch, "mrfr")
    batch = make_batch(pm.backbone.config)
    batch.targets["itm_labels"] = torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match=r"itm_labels.*\(B=2,\)"):
        pm(batch, "itm")
    batch = make_batch(pm.backbone.config)
    batch.targets["img_masks"] = batch.targets["img_masks"].long()
    with pytest.raises(ValueError, match="img_masks"):
        pm(batch, "mrfr")
    with pytest.raises(ValueError, match="ViLBert"):
        vpm = build("vilbert", ["mlm"])
        O.WordRegionAlignment()(vpm.backbone, make_batch(vpm.backbone.config), vpm.encode(
            make_batch(vpm.backbone.config)))


# -- official head names -------------------------------------------------------------

UNITER_HEADS = {f"cls.predictions.{k}" for k in ("bias", "transform.dense.weight", "transform.dense.bias",
                                                  "transform.LayerNorm.weight", "transform.LayerNorm.bias")} | {
    "itm_output.weight", "itm_output.bias", "feat_regress.bias",
    *(f"feat_regress.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    *(f"region_classifier.net.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias"))}


def test_uniter_official_head_names_and_loading():
    pm = build("uniter", list(MODEL_TASKS["uniter"]))
    assert set(pm.official_head_keys().values()) == UNITER_HEADS
    src = {"module." + k: v.clone() + 1.0 for k, v in pm.official_head_state_dict().items()}
    src["module.cls.predictions.decoder.weight"] = torch.zeros(1)        # tied: not ours, not unexpected
    src["module.feat_regress.weight"] = torch.zeros(1)
    src["module.uniter.embeddings.word_embeddings.weight"] = torch.zeros(1)  # backbone: not a head key
    src["module.itm_output.extra"] = torch.zeros(1)
    other = build("uniter", list(MODEL_TASKS["uniter"]), seed=1)
    rep = other.load_official_heads(src)
    assert set(rep.loaded) == UNITER_HEADS and rep.missing == [] and rep.unexpected == ["itm_output.extra"]
    got = other.official_head_state_dict()
    for k in UNITER_HEADS:
        close(got[k], src["module." + k])
    bad = dict(src)
    bad["module.itm_output.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"itm_output.weight: expected shape \(2, 64\)"):
        other.load_official_heads(bad)
    rep = other.load_official_heads({"itm_output.weight": src["module.itm_output.weight"]})
    assert rep.loaded == ["itm_output.weight"] and "cls.predictions.bias" in rep.missing
    with pytest.raises(ValueError, match="missing"):
        other.load_official_heads({}, strict=True)


def test_official_head_names_of_the_other_models():
    names = {m: set(build(m, list(MODEL_TASKS[m])).official_head_keys().values()) for m in
             ("visualbert", "vilbert", "vlbert")}
    assert {"cls.seq_relationship.weight", "cls.predictions.transform.dense.weight"} <= names["visualbert"]
    assert {"cls.bi_seq_relationship.weight", "cls.imagePredictions.decoder.weight",
            "cls.imagePredictions.transform.LayerNorm.bias", "cls.predictions.bias"} <= names["vilbert"]
    assert {"vlbert.mlm_head.predictions.bias", "vlbert.mvrc_head.transform.dense.weight",
            "vlbert.mvrc_head.region_cls_pred.weight",
            "vlbert.relationsip_head.caption_image_relationship.weight"} <= names["vlbert"]


def test_visualbert_mlm_sip_is_hf_visualbert_for_pretraining_loss():
    """Our VisualBERT + heads loaded by their official (HF) names give HF
    VisualBertForPreTraining's loss (MLM logits everywhere, labels -100 elsewhere)."""
    transformers = pytest.importorskip("transformers")
    from vlfast.models import VisualBert
    from vlfast.models.visualbert import config_to_hf

    torch.manual_seed(0)
    cfg = small_config("visualbert")
    hf = transformers.VisualBertForPreTraining(transformers.VisualBertConfig(**config_to_hf(cfg))).eval()
    net = VisualBert.from_hf(hf)
    pm = PretrainModel(net, {"mlm": O.MaskedLanguageModeling(cfg.hidden_size, cfg.vocab_size),
                             "sip": O.SentenceImagePrediction(cfg.hidden_size)}, {"mlm+sip": ("mlm", "sip")}).eval()
    rep = pm.load_official_heads(hf.state_dict(), strict=True)
    assert rep.unexpected == [] and len(rep.loaded) == 7
    batch = make_batch(cfg)
    B, Lv = batch.visual_mask.shape
    labels = torch.cat([batch.targets["mlm_labels"], torch.full((B, Lv), -100)], 1)
    with torch.no_grad():
        want = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                  token_type_ids=batch.token_type_ids, visual_embeds=batch.visual_feats,
                  visual_attention_mask=batch.visual_mask.long(),
                  visual_token_type_ids=torch.ones(B, Lv, dtype=torch.long), labels=labels,
                  sentence_image_labels=batch.targets["itm_labels"]).loss
        for packed in (False, True):
            pm.padding_free = packed
            close(pm(batch, "mlm+sip").loss, want)


# -- builder -------------------------------------------------------------------------

def test_build_pretrain_model_configs_and_tasks():
    assert make_config("uniter", "small") == UniterConfig.small()
    assert make_config("vlbert", {"size": "small", "hidden_dropout_prob": 0.0}) == \
        VLBertConfig.small().replace(hidden_dropout_prob=0.0)
    assert make_config("visualbert", None) == VisualBertConfig.base()
    with pytest.raises(ValueError, match="model_type"):
        make_config("uniter", {"model_type": "vilbert"})
    with pytest.raises(ValueError, match="unknown UniterConfig fields"):
        make_config("uniter", {"size": "small", "not_a_field": 1})
    with pytest.raises(ValueError, match="model_name"):
        build_pretrain_model("lxmert", "small")
    with pytest.raises(ValueError, match=r"'itm', 'mlm', 'mrc', 'mrc-kl', 'mrfr'"):
        build_pretrain_model("uniter", "small", ["mvrc"])
    with pytest.raises(ValueError, match="expected a UniterConfig"):
        build_pretrain_model("uniter", VLBertConfig.small(), ["mlm"])
    pm = build_pretrain_model("uniter", "small", ["itm"], wra=False)
    assert pm.tasks == {"itm": ("itm",)}
    pm = build_pretrain_model("visualbert", "small", ["mlm", "mlm+sip"])
    assert pm.tasks == {"mlm": ("mlm",), "mlm+sip": ("mlm", "sip")} and set(pm.objectives) == {"mlm", "sip"}
    backbone = pm.backbone
    pm2 = build_pretrain_model("visualbert", None, ["sip"], backbone=backbone)
    assert pm2.backbone is backbone
    with pytest.raises(ValueError, match="backbone"):
        build_pretrain_model("uniter", None, ["mlm"], backbone=backbone)


# -- task mixing ---------------------------------------------------------------------

RATIOS = {"mlm": 2.0, "itm": 1.0, "mrfr": 1.0, "mrc-kl": 0.0}


def test_task_mixer_follows_the_ratios():
    m = TaskMixer(RATIOS, seed=3)
    n = 20000
    tasks = [next(m) for _ in range(n)]
    for t, p in m.probabilities.items():
        assert abs(tasks.count(t) / n - p) < 0.015, (t, tasks.count(t) / n, p)
    assert "mrc-kl" not in tasks
    assert [m.task_at(g) for g in range(n)] == tasks


def test_task_mixer_is_a_function_of_seed_and_group():
    a = TaskMixer(RATIOS, seed=7)
    b = TaskMixer(dict(reversed(list(RATIOS.items()))), seed=7)     # another rank, keys in another order
    seq = [next(a) for _ in range(300)]
    assert [next(b) for _ in range(300)] == seq
    c = TaskMixer(RATIOS, seed=8)
    assert [next(c) for _ in range(300)] != seq
    # resume: continue at the saved group
    r = TaskMixer(RATIOS, seed=7)
    for _ in range(37):
        next(r)
    state = r.state_dict()
    r2 = TaskMixer(RATIOS, seed=7)
    r2.load_state_dict(state)
    assert [next(r2) for _ in range(50)] == seq[37:87]
    with pytest.raises(ValueError, match="seed 7"):
        TaskMixer(RATIOS, seed=9).load_state_dict(state)


def test_task_mixer_errors():
    for bad in ({}, {"mlm": -1.0}, {"mlm": 0.0}, {"mlm": float("nan")}, {"mlm": "2"}):
        with pytest.raises(ValueError, match="ratios"):
            TaskMixer(bad)
    with pytest.raises(ValueError, match="seed"):
        TaskMixer({"mlm": 1.0}, seed=1.5)
    with pytest.raises(ValueError, match="group"):
        TaskMixer({"mlm": 1.0}).task_at(-1)


_RANK_SCRIPT = textwrap.dedent("""
    import datetime, sys, time, torch, torch.distributed as dist
    from vlfast.training.pretrain import TaskMixer
    t0 = time.time()
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=90))
    print(f"rank {rank}: joined after {time.time() - t0:.1f}s", flush=True)
    ratios = {"mlm": 2.0, "itm": 1.0, "mrfr": 1.0, "mrc-kl": 1.0}
    if rank == 1:
        ratios = dict(reversed(list(ratios.items())))
    mixer = TaskMixer(ratios, seed=42)
    names = sorted(ratios)
    mine = torch.tensor([names.index(next(mixer)) for _ in range(500)])
    both = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    assert torch.equal(both[0], both[1]), "ranks drew different tasks"
    assert len(set(mine.tolist())) == 4
    dist.destroy_process_group()
    print(f"rank {rank}: same tasks on both ranks ({time.time() - t0:.1f}s)", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_task_mixer_gives_every_rank_the_same_tasks(tmp_path):
    """Two gloo processes, each with its own TaskMixer (same seed, ratios given in
    another order), draw the same 500 tasks: all_gather of their sequences agrees."""
    env = dict(os.environ, PYTHONSAFEPATH="1", GLOO_SOCKET_IFNAME="lo")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), port], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "same tasks on both ranks" in out
