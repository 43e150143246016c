"""Masked padding is inert (issue 15, item 7): whatever sits in the masked slots of a
batch -- NaN, +inf and -inf in padding regions' features and boxes, arbitrary in-range
ids (word, token type, VisualBERT's alignment) at padding positions -- never reaches
the real outputs.

For each model, a ragged batch (different text lengths and region counts, padding
text slots and padding regions in every sample) runs once with zeros in every padded
slot and once with garbage there; the real text slots, the real region slots and the
pooled output(s) must be finite and equal (within 1e-6), the padded slots of the
sequence outputs zero, and every parameter gradient of a loss on the real outputs
finite and equal to the clean batch's.  Padded and padding-free, on the reference
backend, the default ``auto`` and ``triton`` (run by the interpreter on CPU:
tests/conftest.py sets ``TRITON_INTERPRET=1``; the triton leg uses tiny models:
hidden 32, one layer per stack, one head).

Before the models zeroed padded features at their input (``layers.zero_padding``)
every case failed: NaN in all real slots on the padded path (p @ v with p = 0 at a
masked key whose value is NaN), NaN parameter gradients on the padding-free path
(the Linear / LayerNorm backward of the padded rows, 0 * NaN).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from vlfast import ops
from vlfast.models import Uniter, UniterConfig, ViLBert, VisualBert, VLBert
from vlfast.models.vilbert import ViLBertConfig
from vlfast.models.visualbert import VisualBertConfig
from vlfast.models.vlbert import VLBertConfig

TXT = [4, 2]             # real text tokens per sample (left-aligned)
REG = [3, 1]             # real regions per sample
B, LT, LV = len(TXT), 5, 4   # every sample has padding text slots and padding regions
ATOL = 1e-6


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(LT)[None] < torch.tensor(TXT)[:, None]
    v = torch.arange(LV)[None] < torch.tensor(REG)[:, None]
    return t, v


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial biases and LayerNorms (init leaves them at 0 / (1, 0)); VL-BERT's
    visual LayerNorms start at weight 0, which would hide the regions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ----------------------------------------------------------------------------------
# Per model: config (small or tiny), inputs, real outputs
# ----------------------------------------------------------------------------------

def _config(name: str, tiny: bool):
    # tiny (the Triton interpreter leg): hidden 32, one layer (per stack), one head
    t = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64) if tiny else {}
    if name == "uniter":
        return UniterConfig.small(img_dim=24, **t)
    if name == "visualbert":
        return VisualBertConfig.small(visual_embedding_dim=24, **t)
    if name == "vlbert":
        return VLBertConfig.small().replace(visual_feat_dim=24, **(dict(t, visual_size=24) if tiny else {}))
    kw: dict[str, Any] = dict(v_feature_size=24)
    if tiny:
        kw.update(t, v_hidden_size=32, v_num_hidden_layers=1, v_num_attention_heads=1, v_intermediate_size=64,
                  bi_hidden_size=32, bi_num_attention_heads=1, v_biattention_id=[0], t_biattention_id=[0])
    return ViLBertConfig.small(**kw)


MODELS: dict[str, Callable] = {"uniter": Uniter, "visualbert": VisualBert, "vlbert": VLBert, "vilbert": ViLBert}


def _model(name: str, tiny: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturb(MODELS[name](_config(name, tiny)), 1).eval()


def _garbage(shape: tuple[int, ...], shift: int) -> torch.Tensor:
    """NaN, +inf and -inf in turn, element by element (every padded row holds all three)."""
    vals = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return vals[(torch.arange(torch.Size(shape).numel()) + shift) % 3].view(shape)


def _inputs(name: str, cfg, dirty: bool) -> dict[str, Any]:
    """The ragged batch: zeros in every padded slot, or (dirty) NaN / +inf / -inf in
    padding regions' features and boxes and random in-range ids at padding positions."""
    g = torch.Generator().manual_seed(2)
    t_mask, v_mask = _masks()
    F = getattr(cfg, {"uniter": "img_dim", "visualbert": "visual_embedding_dim", "vlbert": "visual_feat_dim",
                      "vilbert": "v_feature_size"}[name])
    ids = torch.randint(1, cfg.vocab_size, (B, LT), generator=g)
    types = torch.randint(0, 2, (B, LT), generator=g)
    feats = torch.randn(B, LV, F, generator=g)
    xy = torch.rand(B, LV, 2, generator=g) * 0.5
    wh = torch.rand(B, LV, 2, generator=g) * 0.4 + 0.1
    if name == "uniter":
        boxes = torch.cat([xy, xy + wh, wh, wh.prod(-1, keepdim=True)], -1)
    elif name == "vilbert":
        boxes = torch.cat([xy, xy + wh, wh.prod(-1, keepdim=True)], -1)
    elif name == "vlbert":
        boxes = torch.cat([xy, xy + wh], -1) * 200.0
    else:
        boxes = None
    pad_t, pad_v = ~t_mask, ~v_mask
    if dirty:
        ids = torch.where(pad_t, torch.randint(0, cfg.vocab_size, (B, LT), generator=g), ids)
        types = torch.where(pad_t, torch.randint(0, 2, (B, LT), generator=g), types)
        feats = torch.where(pad_v[..., None], _garbage(feats.shape, 0), feats)
        if boxes is not None:
            boxes = torch.where(pad_v[..., None], _garbage(boxes.shape, 1), boxes)
    else:
        ids, types = ids.masked_fill(pad_t, 0), types.masked_fill(pad_t, 0)
        feats = feats.masked_fill(pad_v[..., None], 0.0)
        boxes = None if boxes is None else boxes.masked_fill(pad_v[..., None], 0.0)
    x: dict[str, Any] = dict(input_ids=ids, attention_mask=t_mask, token_type_ids=types, visual_feats=feats,
                             visual_mask=v_mask)
    if boxes is not None:
        x["visual_boxes"] = boxes
    if name == "vlbert":
        x["image_size"] = torch.full((B, 2), 200.0)
    if name == "visualbert":
        # each real region aligned to real words; padding regions' rows arbitrary (dirty)
        a = torch.full((B, LV, 2), -1, dtype=torch.long)
        for i, (t, n) in enumerate(zip(TXT, REG)):
            for r in range(n):
                a[i, r, 0] = r % t
        if dirty:
            a = torch.where(pad_v[..., None], torch.randint(-1, LT, a.shape, generator=g), a)
        x["image_text_alignment"] = a
    return x


def _real_outputs(name: str, out) -> list[torch.Tensor]:
    """Real text slots, real region slots and pooled output(s), flattened."""
    t_mask, v_mask = _masks()
    if name == "vilbert":
        return [out.seq_t[t_mask], out.seq_v[v_mask], out.pooled_t, out.pooled_v, out.pooler_output]
    seq = out.last_hidden_state
    return [seq[:, :LT][t_mask], seq[:, LT:LT + LV][v_mask], out.pooler_output]


def _padding_slots(name: str, out) -> list[torch.Tensor]:
    t_mask, v_mask = _masks()
    if name == "vilbert":
        return [out.seq_t[~t_mask], out.seq_v[~v_mask]]
    seq = out.last_hidden_state
    return [seq[:, :LT][~t_mask], seq[:, LT:LT + LV][~v_mask]]


def _run(model: torch.nn.Module, name: str, x: dict[str, Any], padding_free: bool):
    """Forward, then the gradients of a fixed random projection of the real outputs."""
    out = model(**x, padding_free=padding_free)
    real = _real_outputs(name, out)
    g = torch.Generator().manual_seed(3)
    loss = sum((r * torch.randn(r.shape, generator=g)).sum() for r in real)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out, [r.detach() for r in real], dict(zip(names, grads))


# ----------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------

BACKENDS = ["reference", "auto", "triton"]


def _backend(which: str):
    """Forced even for ``auto`` (the default), so VLFAST_BACKEND in the environment does
    not change the leg."""
    if which == "triton":
        pytest.importorskip("triton")
    return ops.backend(which)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_masked_padding_is_inert(name: str, backend: str, padding_free: bool):
    model = _model(name, tiny=backend == "triton")
    clean, dirty = _inputs(name, model.config, False), _inputs(name, model.config, True)
    assert not torch.isfinite(dirty["visual_feats"]).all()   # the garbage is there
    with _backend(backend):
        out_c, real_c, grad_c = _run(model, name, clean, padding_free)
        out_d, real_d, grad_d = _run(model, name, dirty, padding_free)
    for i, (c, d) in enumerate(zip(real_c, real_d)):
        assert torch.isfinite(c).all()
        assert torch.isfinite(d).all(), f"real output {i}: non-finite values leaked from the padding"
        torch.testing.assert_close(d, c, rtol=0, atol=ATOL, msg=lambda m: f"real output {i}: {m}")
    # padding slots of the sequence outputs come back zeroed, whatever was there
    for p in _padding_slots(name, out_d):
        assert p.numel() and bool((p == 0).all())
    # the comparison is not vacuous: the regions reach the outputs
    assert any(g is not None and g.abs().max() > 0 for n, g in grad_c.items()
               if any(k in n for k in ("img_linear", "visual_projection", "obj_downsample", "image_embeddings")))
    for n in grad_c:
        gc, gd = grad_c[n], grad_d[n]
        if gc is None:
            assert gd is None, n
            continue
        assert torch.isfinite(gd).all(), f"{n}: non-finite gradient from the padding"
        torch.testing.assert_close(gd, gc, rtol=0, atol=ATOL, msg=lambda m: f"grad {n}: {m}")
