"""The BERT layers on the fused LayerNorm / bias-GELU ops: BertIntermediate,
BertSelfOutput, BertOutput (layers.py) and ViLBERT's BertBiOutput equal the plain-torch
formulas they replaced -- bitwise on CPU fp32 in eval -- and, with the Triton backend
forced (interpreter), match the reference path with dropout on."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlfast import ops
from vlfast.models import layers
from vlfast.models.vilbert import BertBiOutput, ViLBertConfig


def _plain_layer(layer: layers.BertLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BertLayer.forward as it was: dense -> dropout -> LayerNorm(+ residual), gelu(dense)."""
    ctx, _ = layer.attention.self(x, mask)
    so = layer.attention.output
    a = so.LayerNorm(so.dropout(so.dense(ctx)) + x)
    h = F.gelu(layer.intermediate.dense(a))
    o = layer.output
    return o.LayerNorm(o.dropout(o.dense(h)) + a)


def _layer(seed: int = 0, hidden: int = 48, heads: int = 2, inter: int = 96) -> layers.BertLayer:
    torch.manual_seed(seed)
    layer = layers.BertLayer(hidden, heads, inter, attn_dropout=0.0, dropout=0.1)
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for m in layer.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return layer


def _inputs(B=2, L=7, E=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    return x, mask


def test_bert_layer_eval_is_bitwise_the_plain_torch_code():
    layer = _layer().eval()
    x, mask = _inputs()
    xs = x.clone().requires_grad_(True)
    got = layer(xs, mask)[0]
    xw = x.clone().requires_grad_(True)
    want = _plain_layer(layer, xw, mask)
    assert torch.equal(got, want)
    do = torch.randn_like(got)
    params = list(layer.parameters())
    g1 = torch.autograd.grad(got, [xs] + params, do)
    g2 = torch.autograd.grad(want, [xw] + params, do)
    for (name, _), a, b in zip([("x", None)] + list(layer.named_parameters()), g1, g2):
        # the split bias of the intermediate dense layer is summed in another order
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_intermediate_is_bitwise_gelu_of_dense():
    torch.manual_seed(0)
    inter = layers.BertIntermediate(32, 80)
    x = torch.randn(3, 9, 32)
    assert torch.equal(inter(x), F.gelu(inter.dense(x)))
    packed = x.view(-1, 32)  # the packed (total, E) layout
    assert torch.equal(inter(packed), F.gelu(inter.dense(packed)))


def test_state_dict_names_unchanged():
    names = set(_layer().state_dict())
    for n in ("attention.output.dense.weight", "attention.output.LayerNorm.weight", "intermediate.dense.bias",
              "output.dense.weight", "output.LayerNorm.bias"):
        assert n in names


def test_vilbert_bi_output_eval_is_bitwise_the_plain_torch_code():
    c = ViLBertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, v_hidden_size=48,
                      v_num_attention_heads=2, v_intermediate_size=64, bi_hidden_size=40, bi_num_attention_heads=2)
    torch.manual_seed(0)
    m = BertBiOutput(c).eval()
    ctx_v, x_v, ctx_t, x_t = torch.randn(2, 5, 40), torch.randn(2, 5, 48), torch.randn(2, 6, 40), torch.randn(2, 6, 32)
    out_v, out_t = m(ctx_v, x_v, ctx_t, x_t)
    assert torch.equal(out_v, m.LayerNorm1(m.dropout1(m.dense1(ctx_v)) + x_v))
    assert torch.equal(out_t, m.LayerNorm2(m.dropout2(m.dense2(ctx_t)) + x_t))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_triton_backend_matches_the_reference_in_a_layer(training):
    """Forced Triton (interpreter) vs the reference path, dropout on in training: the same
    torch seed gives the same Philox masks on both."""
    layer = _layer(seed=2).train(training)
    x, mask = _inputs(seed=3)
    do = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ("triton", "reference"):
        xs = x.clone().requires_grad_(True)
        with ops.backend(backend):
            torch.manual_seed(11)
            out = layer(xs, mask)[0]
        grads = torch.autograd.grad(out, [xs] + list(layer.parameters()), do)
        results[backend] = (out,) + grads
    names = ["out", "x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if training:  # dropout really happened: differs from eval
        with torch.no_grad():
            assert not torch.allclose(results["reference"][0], layer.eval()(x, mask)[0])
