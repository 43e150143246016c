"""The pretraining objectives on the fused loss ops (``ops.linear_cross_entropy``,
``ops.linear_soft_cross_entropy``, ``ops.layer_norm``) against the plain-torch formulas
they replaced: MLM (four models), UNITER's MRC, MRC-kl (both reductions) and MRFR,
ViLBERT's masked multimodal KL and VL-BERT's masked RoI classification.

* CPU fp32 (the ops' reference path): loss, every logged metric and every gradient
  (heads, tied word embeddings, backbone) bitwise equal to the old formula.
* Triton forced (interpreter): the same within 1e-5, the same accuracy, and the MLM
  loss never builds the (Nm, vocab) logits (chunks of rows only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlfast import ops
from vlfast.data.batch import VLBatch
from vlfast.kernels.linear_cross_entropy import op as lce
from vlfast.models import UniterConfig, ViLBertConfig, VisualBertConfig, VLBertConfig
from vlfast.training import objectives as O
from vlfast.training.pretrain import PretrainModel, build_pretrain_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

C = 7
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODELS = ["uniter", "visualbert", "vilbert", "vlbert"]


def small_config(name: str):
    if name == "uniter":
        return UniterConfig.small(**NO_DROP)
    if name == "visualbert":
        return VisualBertConfig.small(**NO_DROP)
    if name == "vilbert":
        return ViLBertConfig.small(**NO_DROP, v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0,
                                   v_feature_size=40)
    return VLBertConfig.small().replace(**NO_DROP, visual_dropout_prob=0.0)


def make_batch(cfg, seed: int = 0) -> VLBatch:
    """B=2 ragged: 4 masked words, 3 masked regions with soft labels and features."""
    g = torch.Generator().manual_seed(seed)
    B, Lt, Lv = 2, 6, 4
    F_ = O.feature_dim(cfg)
    tmask = torch.arange(Lt)[None] < torch.tensor([6, 4])[:, None]
    vmask = torch.arange(Lv)[None] < torch.tensor([4, 3])[:, None]
    ids = torch.randint(5, cfg.vocab_size, (B, Lt), generator=g) * tmask
    labels = torch.full((B, Lt), -100)
    for b, t in [(0, 1), (0, 4), (1, 2), (1, 3)]:
        labels[b, t] = ids[b, t]
        ids[b, t] = 3
    img_masks = torch.zeros(B, Lv, dtype=torch.bool)
    for b, v in [(0, 0), (0, 3), (1, 1)]:
        img_masks[b, v] = True
    feats = torch.randn(B, Lv, F_, generator=g)
    masked_feats = feats[img_masks].clone()
    feats[img_masks] = 0.0
    xy = torch.rand(B, Lv, 2, generator=g) * 0.5
    wh = torch.rand(B, Lv, 2, generator=g) * 0.4 + 0.05
    soft = torch.softmax(torch.randn(3, C, generator=g) * 2, -1)
    return VLBatch(input_ids=ids, attention_mask=tmask, token_type_ids=torch.zeros(B, Lt, dtype=torch.long),
                   visual_feats=feats, boxes=torch.cat([xy, xy + wh], -1), visual_mask=vmask,
                   image_size=torch.tensor([[640.0, 480.0], [320.0, 240.0]]),
                   targets=dict(mlm_labels=labels, img_masks=img_masks, masked_feats=masked_feats,
                                masked_soft_labels=soft, itm_labels=torch.tensor([1, 0])))


def build(name: str, task: str, **kw) -> PretrainModel:
    torch.manual_seed(0)
    return build_pretrain_model(name, small_config(name), [task], num_region_classes=C, **kw).eval()


# -- the formulas as the objectives wrote them before the fused ops --------------------

def _transform(dense, ln, h):
    return ln(F.gelu(dense(h)))


def old_result(obj: O.Objective, model, batch: VLBatch, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(obj, O.MaskedLanguageModeling):
        labels = batch.targets["mlm_labels"]
        sel = labels != -100
        h = O.text_states(model, batch, out)[sel]
        x = _transform(obj.transform.dense, obj.transform.LayerNorm, h)
        logits = F.linear(x, O.word_embeddings(model).weight, obj.bias).float()
        target = labels[sel]
        loss = F.cross_entropy(logits, target)
        return loss, {"loss": loss, "acc": (logits.argmax(-1) == target).float().mean()}
    m = batch.targets["img_masks"]
    h = O.visual_states(model, batch, out)[m]
    soft = batch.targets["masked_soft_labels"].float()
    if isinstance(obj, O.MaskedRegionFeatureRegression):
        net = obj.head.net
        w = obj.head.weight if obj.head.weight is not None else O.region_projection(model)
        pred = F.linear(net[2](F.gelu(net[0](h))), w.t(), obj.head.bias).float()
        loss = F.mse_loss(pred, batch.targets["masked_feats"].float())
        return loss, {"loss": loss}
    if isinstance(obj, O.MaskedRegionClassification):            # MRC and MRC-kl
        net = obj.head.net
        logits = net[3](net[2](F.gelu(net[0](h)))).float()
        if isinstance(obj, O.MaskedRegionClassificationKL):
            kl = F.kl_div(F.log_softmax(logits, -1), soft, reduction="none")
            loss = kl.mean() if obj.reduction == "elements" else kl.sum() / h.shape[0]
            return loss, {"loss": loss, "acc": (logits.argmax(-1) == soft.argmax(-1)).float().mean()}
        target = obj.targets(soft)
        loss = F.cross_entropy(logits, target)
        return loss, {"loss": loss, "acc": (logits.argmax(-1) == target).float().mean()}
    if isinstance(obj, O.MaskedMultimodalModeling):
        tr = obj.head.transform
        logits = obj.head.decoder(_transform(tr.dense, tr.LayerNorm, h)).float()
        loss = F.kl_div(F.log_softmax(logits, -1), soft, reduction="none").sum() / h.shape[0]
        return loss, {"loss": loss, "acc": (logits.argmax(-1) == soft.argmax(-1)).float().mean()}
    if isinstance(obj, O.MaskedRoIClassification):
        logits = obj.head.region_cls_pred(F.gelu(obj.head.transform.dense(h))).float()
        loss = -(soft * F.log_softmax(logits, -1)).sum(-1).mean()
        return loss, {"loss": loss, "acc": (logits.argmax(-1) == soft.argmax(-1)).float().mean()}
    raise AssertionError(type(obj))


CASES = [(name, "mlm", {}) for name in MODELS] + [
    ("uniter", "mrc", {}), ("uniter", "mrc-kl", {}), ("uniter", "mrc-kl", {"mrc_kl_reduction": "regions"}),
    ("uniter", "mrfr", {}), ("vilbert", "masked_multimodal", {}), ("vlbert", "masked_roi", {})]


def _params(pm: PretrainModel) -> list[torch.nn.Parameter]:
    return [p for p in pm.parameters() if p.requires_grad]


def _run(pm, obj, batch, fn):
    """(loss, metrics, gradients of every parameter) of ``fn(obj, backbone, batch, out)``."""
    out = pm.encode(batch)
    loss, metrics = fn(obj, pm.backbone, batch, out)
    grads = torch.autograd.grad(loss, _params(pm), allow_unused=True)
    return loss.detach(), metrics, grads


def _new(obj, model, batch, out):
    r = obj(model, batch, out)
    return r.loss, r.metrics


@pytest.mark.parametrize("name,task,kw", CASES, ids=[f"{n}-{t}{'-' + '-'.join(k.values()) if k else ''}"
                                                     for n, t, k in CASES])
def test_switched_objective_is_bitwise_the_old_formula_on_cpu(name, task, kw):
    pm = build(name, task, **kw)
    obj = pm.objectives[pm.tasks[task][0]]
    batch = make_batch(pm.backbone.config)
    with ops.backend("auto"):
        new_loss, new_metrics, new_grads = _run(pm, obj, batch, _new)
    old_loss, old_metrics, old_grads = _run(pm, obj, batch, old_result)
    assert torch.equal(new_loss, old_loss), (float(new_loss), float(old_loss))
    assert new_metrics == {k: float(v.detach()) for k, v in old_metrics.items()}
    assert new_metrics["loss"] == float(old_loss)
    for p, a, b in zip(_params(pm), new_grads, old_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), [n for n, q in pm.named_parameters() if q is p]


@pytest.mark.parametrize("name,task", [("uniter", "mlm"), ("vlbert", "mlm"), ("uniter", "mrc"), ("uniter", "mrc-kl"),
                                       ("vilbert", "masked_multimodal"), ("vlbert", "masked_roi")])
def test_switched_objective_matches_with_the_triton_backend(name, task, monkeypatch):
    monkeypatch.setattr(lce, "MIN_CHUNK_ELEMENTS", 0)      # several chunks even at this size
    pm = build(name, task)
    obj = pm.objectives[pm.tasks[task][0]]
    batch = make_batch(pm.backbone.config)
    old_loss, old_metrics, old_grads = _run(pm, obj, batch, old_result)

    def fused(obj, model, batch, out):
        with ops.backend("triton"):
            return _new(obj, model, batch, out)

    new_loss, new_metrics, new_grads = _run(pm, obj, batch, fused)
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-5)
    assert new_metrics["acc"] == float(old_metrics["acc"])
    for a, b in zip(new_grads, old_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_mlm_never_builds_the_masked_words_by_vocab_logits(monkeypatch):
    """Under Triton the MLM loss sees the (Nm, vocab) logits neither outside the fused op
    nor inside it (the chunks hold fewer rows), and still logs the same accuracy."""
    monkeypatch.setattr(lce, "MIN_CHUNK_ELEMENTS", 0)
    pm = build("uniter", "mlm")
    obj = pm.objectives["mlm"]
    batch = make_batch(pm.backbone.config)
    V = pm.backbone.config.vocab_size
    nm = int((batch.targets["mlm_labels"] != -100).sum())
    assert lce.chunk_rows(nm, V, pm.backbone.config.hidden_size) < nm
    chunks: list[tuple[int, ...]] = []
    tk = lce._triton()
    real = tk.chunk_loss_and_grad
    monkeypatch.setattr(tk, "chunk_loss_and_grad", lambda z, *a: chunks.append(tuple(z.shape)) or real(z, *a))
    out = pm.encode(batch)
    with ops.backend("triton"), _Shapes() as mode:
        r = obj(pm.backbone, batch, out)
        r.loss.backward()
    assert (nm, V) not in mode.shapes
    assert chunks and all(rows < nm and v == V for rows, v in chunks)
    _, old_metrics = old_result(obj, pm.backbone, batch, pm.encode(batch))
    assert r.metrics["acc"] == float(old_metrics["acc"])
