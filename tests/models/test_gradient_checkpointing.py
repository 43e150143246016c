"""Gradient checkpointing: the same gradients as without it, for the four models,
padded and padding-free, through the task heads and pretraining wrappers too."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vlfast.data.batch import VLBatch
from vlfast.models import (Uniter, UniterConfig, ViLBert, ViLBertConfig, VisualBert, VisualBertConfig, VLBert,
                           VLBertConfig)

MODELS = {"uniter": (Uniter, UniterConfig), "vilbert": (ViLBert, ViLBertConfig),
          "vlbert": (VLBert, VLBertConfig), "visualbert": (VisualBert, VisualBertConfig)}
FEAT = 24


def _config(name: str, dropout: float):
    cls, ccls = MODELS[name]
    c = ccls.small()
    feat_field = {"uniter": "img_dim", "vilbert": "v_feature_size", "vlbert": "visual_feat_dim",
                  "visualbert": "visual_embedding_dim"}[name]
    drop = {f.name: dropout for f in dataclasses.fields(c) if f.name.endswith("dropout_prob")}
    return cls, c.replace(**drop, **{feat_field: FEAT})


def _batch(vocab: int, seed: int = 0) -> VLBatch:
    g = torch.Generator().manual_seed(seed)
    B, Lt, Lv = 3, 7, 5
    ids = torch.randint(5, min(vocab, 60), (B, Lt), generator=g)
    am = torch.ones(B, Lt, dtype=torch.bool)
    am[0, 5:] = False
    am[2, 3:] = False
    ids[~am] = 0
    vm = torch.ones(B, Lv, dtype=torch.bool)
    vm[1, 2:] = False
    xy = torch.rand(B, Lv, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(B, Lv, 2, generator=g) * 0.4], -1)
    return VLBatch(input_ids=ids, attention_mask=am, token_type_ids=torch.zeros_like(ids),
                   visual_feats=torch.randn(B, Lv, FEAT, generator=g), boxes=boxes, visual_mask=vm,
                   image_size=torch.tensor([[640.0, 480.0]]).expand(B, 2).contiguous())


def _loss(model, out) -> torch.Tensor:
    if hasattr(out, "seq_t"):
        return out.seq_t.pow(2).sum() + out.seq_v.pow(2).mean() * 3 + out.pooled_t.sum()
    return out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()


def _grads(model, batch, padding_free: bool, checkpointing: bool, seed: int = 0):
    (model.gradient_checkpointing_enable if checkpointing else model.gradient_checkpointing_disable)()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch.model_inputs(model, padding_free=padding_free))
    loss = _loss(model, out)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_with_checkpointing(name, padding_free):
    torch.manual_seed(0)
    cls, cfg = _config(name, 0.0)
    model = cls(cfg).train()
    assert not model.is_gradient_checkpointing
    batch = _batch(cfg.vocab_size)
    l0, g0 = _grads(model, batch, padding_free, False)
    l1, g1 = _grads(model, batch, padding_free, True)
    assert model.is_gradient_checkpointing
    assert torch.equal(l0, l1) or abs(float(l0 - l1)) <= 1e-6 * max(1.0, abs(float(l0)))
    assert sorted(g0) == sorted(g1) and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=1e-6, msg=k)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("name", ["uniter", "vilbert"])
def test_dropout_masks_replayed(name):
    """With dropout on, the recomputation replays the RNG: the same gradients."""
    torch.manual_seed(0)
    cls, cfg = _config(name, 0.2)
    model = cls(cfg).train()
    batch = _batch(cfg.vocab_size, 1)
    l0, g0 = _grads(model, batch, False, False, seed=3)
    l1, g1 = _grads(model, batch, False, True, seed=3)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=1e-6, msg=k)


def test_checkpointing_only_in_training():
    """In eval mode, or without gradients, the layers run plainly (same outputs)."""
    from torch.utils import checkpoint as ck_mod

    cls, cfg = _config("uniter", 0.0)
    model = cls(cfg)
    model.gradient_checkpointing_enable()
    batch = _batch(cfg.vocab_size)
    calls = []
    orig = ck_mod.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    ck_mod.checkpoint = spy
    try:
        model.eval()
        model(**batch.model_inputs(model))
        assert calls == []
        model.train()
        with torch.no_grad():
            model(**batch.model_inputs(model))
        assert calls == []
        model(**batch.model_inputs(model))
        assert len(calls) == cfg.num_hidden_layers
    finally:
        ck_mod.checkpoint = orig


def test_heads_and_pretrain_wrappers_delegate():
    from vlfast.training import tasks as T
    from vlfast.training.pretrain import build_pretrain_model

    _, cfg = _config("uniter", 0.0)
    head = T.head_for("vqa", cfg, num_answers=5)
    assert not head.is_gradient_checkpointing
    head.gradient_checkpointing_enable()
    assert head.is_gradient_checkpointing and head.backbone.encoder.gradient_checkpointing
    head.gradient_checkpointing_disable()
    assert not head.backbone.is_gradient_checkpointing
    pm = build_pretrain_model("uniter", cfg, ["mlm"], num_region_classes=7)
    pm.gradient_checkpointing_enable()
    assert pm.is_gradient_checkpointing and pm.backbone.encoder.gradient_checkpointing
    pm.gradient_checkpointing_disable()
    assert not pm.is_gradient_checkpointing
