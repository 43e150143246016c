"""vlfast.ops.text_embeddings: Triton kernel (interpreted on CPU) vs the reference and an
fp64 oracle, every gradient (three tables, LayerNorm), padding_idx, determinism,
dropout, custom-op checks, compile, dispatch and input errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast import _dispatch, ops
from vlfast.kernels.embeddings import op as eop
from vlfast.kernels.embeddings import reference as ref
from vlfast.testing import assert_close_to_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "d_word", "d_pos", "d_type", "d_ln_weight", "d_ln_bias")


def make(B, L, E, V=50, P=160, T=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    ids[0, : max(1, L // 4)] = 0  # padding tokens
    tt = torch.randint(0, T, (B, L), generator=g)
    pos = torch.arange(L)[None].expand(B, L)
    W, Pw, Tw = (torch.randn(n, E, generator=g) for n in (V, P, T))
    lw, lb = 1 + 0.1 * torch.randn(E, generator=g), 0.1 * torch.randn(E, generator=g)
    do = torch.randn(B, L, E, generator=g)
    ints = [t.to(DEV) for t in (ids, tt, pos)]
    floats = [t.to(DEV, dtype) for t in (W, Pw, Tw, lw, lb)]
    return ints, floats, do.to(DEV, dtype)


def fwd_bwd(fn, ints, floats, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    out = fn(*ints, *leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def public(**kw):
    return lambda ids, tt, pos, W, P, T, g, b: ops.text_embeddings(ids, tt, pos, W, P, T, g, b, **kw)


def reference(**kw):
    return lambda ids, tt, pos, W, P, T, g, b: ref.text_embeddings(ids, tt, pos, W, P, T, g, b, **kw)


SHAPES = [(1, 1, 32), (1, 7, 48), (2, 37, 96), (1, 129, 48), (2, 3, 768)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_grads_match_reference_and_oracle(shape):
    ints, floats, do = make(*shape)
    with ops.backend("triton"):
        got = fwd_bwd(public(padding_idx=0), ints, floats, do)
    want = fwd_bwd(reference(padding_idx=0), ints, floats, do)
    orc = fwd_bwd(reference(padding_idx=0), ints, [t.double() for t in floats], do.double())
    for name, g, w, o in zip(NAMES, got, want, orc):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert_close_to_oracle(name, g, w, o)
    assert (got[1][0] == 0).all(), "the padding_idx row got a gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_at_most_twice_eager(dtype):
    ints, floats, do = make(2, 37, 96, dtype=dtype, seed=3)
    with ops.backend("triton"):
        got = fwd_bwd(public(padding_idx=0), ints, floats, do)
    eager = fwd_bwd(reference(padding_idx=0), ints, floats, do)
    orc = fwd_bwd(reference(padding_idx=0), ints, [t.double() for t in floats], do.double())
    for name, g, e, o in zip(NAMES, got, eager, orc):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, o)


def test_table_gradients_are_deterministic_and_skip_padding():
    ints, floats, do = make(2, 37, 48, V=5, seed=4)  # few words: long runs of equal ids
    with ops.backend("triton"):
        a = fwd_bwd(public(padding_idx=3), ints, floats, do)
        b = fwd_bwd(public(padding_idx=3), ints, floats, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[1][3] == 0).all() and a[1][0].abs().sum() > 0
    want = fwd_bwd(reference(padding_idx=3), ints, floats, do)
    torch.testing.assert_close(a[1], want[1], atol=3e-5, rtol=1e-4)


def test_none_ids_mean_type_zero_and_positions_0_to_L():
    ints, floats, do = make(2, 9, 32)
    ids = ints[0]
    zeros, arange = torch.zeros_like(ids), torch.arange(9, device=DEV)[None].expand(2, 9)
    for backend in ("reference", "triton"):
        with ops.backend(backend):
            got = ops.text_embeddings(ids, None, None, *floats)
            want = ops.text_embeddings(ids, zeros, arange, *floats)
            row = ops.text_embeddings(ids, zeros, torch.arange(9, device=DEV)[None], *floats)  # (1,L) broadcasts
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(row, want)


def test_reference_is_bitwise_the_plain_module_formula():
    """What BertTextEmbeddings computed before switching to the op (CPU, fp32, eval)."""
    ints, floats, _ = make(2, 11, 64)
    ids, tt, pos = ints
    W, P, T, g, b = floats
    want = F.layer_norm(F.embedding(ids, W, 0) + F.embedding(pos, P) + F.embedding(tt, T), (64,), g, b, 1e-12)
    with ops.backend("reference"):
        got = ops.text_embeddings(ids, tt, pos, W, P, T, g, b, padding_idx=0)
    assert torch.equal(got, want)


def test_int32_ids():
    ints, floats, do = make(2, 7, 32)
    with ops.backend("triton"):
        got = fwd_bwd(public(), [t.int() for t in ints], floats, do)
    want = fwd_bwd(reference(), ints, floats, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=3e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------

def test_dropout_equals_reference_given_the_keep_mask():
    ints, floats, do = make(2, 13, 48, seed=7)
    p, seed, offset = 0.3, 987654321, 5
    keep = ops.text_embeddings_keep_mask(2, 13, 48, p, seed, offset, device=DEV)

    def kern(ids, tt, pos, *fl):
        return eop.text_embeddings_fwd(ids, tt, pos, *fl, 0, 1e-12, p, seed, offset, "triton")[0]

    got = fwd_bwd(kern, ints, floats, do)
    want = fwd_bwd(reference(padding_idx=0, dropout_p=p, keep=keep), ints, floats, do)
    assert torch.equal(got[0] == 0, ~keep)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    def refop(ids, tt, pos, *fl):
        return eop.text_embeddings_fwd(ids, tt, pos, *fl, 0, 1e-12, p, seed, offset, "reference")[0]

    for a, b in zip(got, fwd_bwd(refop, ints, floats, do)):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_dropout_rate_and_manual_seed(backend):
    ints, floats, _ = make(2, 16, 64, seed=2)
    with ops.backend(backend):
        torch.manual_seed(123)
        a = ops.text_embeddings(*ints, *floats, dropout_p=0.1)
        torch.manual_seed(123)
        b = ops.text_embeddings(*ints, *floats, dropout_p=0.1)
        c = ops.text_embeddings(*ints, *floats, dropout_p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rate = (a == 0).float().mean().item()
    n = a.numel()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)


def test_backward_runs_on_the_forward_backend(monkeypatch):
    ints, floats, do = make(1, 5, 32)
    seen = []
    real = _dispatch.select

    def spy(op, device_type, requested=None, **facts):
        b = real(op, device_type, requested, **facts)
        seen.append(b)
        return b

    monkeypatch.setattr(_dispatch, "select", spy)
    W = floats[0].requires_grad_(True)
    with ops.backend("triton"):
        out = ops.text_embeddings(*ints, W, *floats[1:])
    out.backward(do)
    assert seen == ["triton", "triton", "triton"]  # public resolve, forward, backward


# ----------------------------------------------------------------------------------
# Custom-op contract and compile
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    ints, floats, _ = make(2, 5, 16, V=9, P=8, seed=4)
    floats = [t.requires_grad_(True) for t in floats]
    torch.library.opcheck(torch.ops.vlfast.text_embeddings_fwd.default,
                          (*ints, *floats, 0, 1e-12, 0.25, 1234, 0, backend))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_aot_eager(backend):
    ints, floats, do = make(2, 7, 32, seed=8)
    fn = public(padding_idx=0)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend(backend):
        got = fwd_bwd(compiled, ints, floats, do)
        want = fwd_bwd(fn, ints, floats, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dispatch_and_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    assert _dispatch.select("text_embeddings", "cpu", dtype=torch.float32, hidden=768) == "reference"
    assert _dispatch.select("text_embeddings", "cuda", dtype=torch.bfloat16, hidden=768) == "triton"
    assert _dispatch.select("text_embeddings", "cuda", dtype=torch.float64, hidden=768) == "reference"
    ints, floats, _ = make(1, 3, 16)
    with ops.backend("triton"), pytest.raises(_dispatch.BackendError, match="takes fp16/bf16/fp32"):
        ops.text_embeddings(*ints, *[t.double() for t in floats])
    with ops.backend("cpp"), pytest.raises(_dispatch.BackendError, match="text_embeddings has no cpp"):
        ops.text_embeddings(*ints, *floats)


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

def test_bad_input_names_argument_expected_and_actual():
    (ids, tt, pos), (W, P, T, g, b), _ = make(2, 5, 16, V=9, P=8)
    good = dict(input_ids=ids, token_type_ids=tt, position_ids=pos, word_weight=W, position_weight=P,
                type_weight=T, ln_weight=g, ln_bias=b)
    bad_ids = ids.clone()
    bad_ids[1, 3] = 9
    cases = [
        (dict(input_ids=bad_ids), r"input_ids: expected values in \[0, 9\), got 9 at index \(1, 3\)"),
        (dict(token_type_ids=tt - 1), r"token_type_ids: expected values in \[0, 2\), got -1"),
        (dict(position_ids=pos + 4), r"position_ids: expected values in \[0, 8\), got 8"),
        (dict(input_ids=ids.float()), r"input_ids: expected dtype int64 or int32, got float32"),
        (dict(input_ids=ids[0]), r"input_ids: expected a 2-d tensor \(B,L\), got shape \(5,\)"),
        (dict(token_type_ids=tt[:, :4]), r"token_type_ids: expected shape \(2, 5\), got shape \(2, 4\)"),
        (dict(position_weight=P[:, :8]), r"position_weight: expected shape \(rows >= 1, E=16\), got shape \(8, 8\)"),
        (dict(type_weight=T.half()), r"type_weight: expected dtype float32 \(like the other float inputs\)"),
        (dict(ln_weight=g[:3]), r"ln_weight: expected shape \(16,\), got shape \(3,\)"),
        (dict(word_weight="x"), r"word_weight: expected a torch.Tensor, got str"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ops.text_embeddings(**{**good, **override})
    for kw, pattern in [(dict(dropout_p=1.0), r"dropout_p: expected a float in \[0, 1\), got 1.0"),
                        (dict(eps=0.0), r"eps: expected a float > 0, got 0.0"),
                        (dict(padding_idx=9), r"padding_idx: expected None or an int in \[0, 9\), got 9")]:
        with pytest.raises(ValueError, match=pattern):
            ops.text_embeddings(**good, **kw)
