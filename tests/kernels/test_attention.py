"""vlfast.ops.attention: Triton kernel (interpreted on CPU) vs the reference and an
fp64 oracle, dropout, custom-op checks, compile, dispatch and input errors."""
from __future__ import annotations

import math

import pytest
import torch

import vlfast
from vlfast import _dispatch, ops
from vlfast.kernels.attention import op as aop
from vlfast.kernels.attention import reference as ref
from vlfast.testing import assert_close_to_oracle, eager_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, H, Lq, Lk, D, dtype=torch.float32, mask="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, generator=g)
    km = None
    if mask == "random":
        km = torch.rand(B, Lk, generator=g) > 0.3
        km[:, 0] = True
        if B > 1:
            km[B - 1] = False  # a sample whose every key is masked
    q, k, v, do = (t.to(DEV, dtype) for t in (q, k, v, do))
    return q, k, v, (None if km is None else km.to(DEV)), do


def fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def oracle(q, k, v, km, do, scale=None, keep=None, p=0.0):
    return fwd_bwd(lambda a, b, c: ref.attention_reference(a, b, c, km, scale=scale, dropout_p=p, keep_mask=keep),
                   q.double(), k.double(), v.double(), do.double())


SHAPES = [  # B, H, Lq, Lk, D
    (2, 2, 1, 1, 32),
    (2, 3, 7, 7, 64),
    (2, 2, 37, 37, 32),
    (1, 2, 129, 129, 64),
    (2, 2, 7, 37, 32),
    (2, 1, 37, 129, 128),
    (1, 2, 129, 7, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["random", None])
def test_fp32_forward_and_grads_match_reference_and_oracle(shape, mask):
    q, k, v, km, do = make(*shape, mask=mask)
    with ops.backend("triton"):
        got = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q, k, v, do)
    with ops.backend("reference"):
        want = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q, k, v, do)
    orc = oracle(q, k, v, km, do)
    eager = fwd_bwd(lambda a, b, c: eager_attention(a, b, c, km), q, k, v, do)
    for name, g, w, o, e in zip(("out", "dq", "dk", "dv"), got, want, orc, eager):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert_close_to_oracle(name, g, e, o)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 37, 37, 64), (1, 2, 129, 45, 32), (2, 1, 7, 129, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision_error_at_most_twice_eager(dtype, shape):
    q, k, v, km, do = make(*shape, dtype=dtype, seed=3)
    with ops.backend("triton"):
        got = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q, k, v, do)
    eager = fwd_bwd(lambda a, b, c: eager_attention(a, b, c, km), q, k, v, do)
    orc = oracle(q, k, v, km, do)
    for name, g, e, o in zip(("out", "dq", "dk", "dv"), got, eager, orc):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, o)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    q, k, v, _, do = make(3, 2, 9, 11, 32)
    km = torch.ones(3, 11, dtype=torch.bool, device=DEV)
    km[1] = False
    with ops.backend(backend):
        out, dq, dk, dv = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
        assert (t[1] == 0).all()
    assert out[0].abs().sum() > 0 and dk[0].abs().sum() > 0


def test_whole_blocks_of_padding_keys():
    """Key blocks with no real key are skipped by the kernels (forward, dK/dV, dQ);
    results must not change.  Real keys sit in two islands with masked blocks between
    and after them."""
    q, k, v, _, do = make(2, 2, 40, 161, 32, seed=9)
    km = torch.zeros(2, 161, dtype=torch.bool, device=DEV)
    km[0, 3:12] = True
    km[0, 100:105] = True
    km[1, 64:70] = True
    with ops.backend("triton"):
        got = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q, k, v, do)
    want = oracle(q, k, v, km, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert (got[2][0, :, 12:100] == 0).all() and (got[3][0, :, 105:] == 0).all()


def test_custom_scale_and_noncontiguous_inputs():
    B, L, H, D = 2, 21, 3, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(DEV)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B,H,L,D) strided views
    assert not q.is_contiguous()
    km = torch.rand(B, L, generator=g).to(DEV) > 0.2
    do = torch.randn(B, H, L, D, generator=g).to(DEV)
    with ops.backend("triton"):
        got = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km, scale=0.37), q, k, v, do)
    want = oracle(q, k, v, km, do, scale=0.37)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_applies_exactly_the_helper_keep_mask(p):
    """q = 0 gives uniform probabilities 1/Lk; with v = I the output row i is
    keep[i, :] / ((1-p) Lk), so the kernel's mask is read back exactly."""
    B, H, Lq, Lk = 2, 2, 19, 32
    q = torch.zeros(B, H, Lq, Lk, device=DEV)
    v = torch.eye(Lk, device=DEV).expand(B, H, Lk, Lk).contiguous()
    k = torch.randn(B, H, Lk, Lk, device=DEV)
    seed, offset = 2**40 + 12345, 77
    with ops.backend("triton"):
        out, _ = aop.attention_fwd(q, k, v, None, p, 1.0, seed, offset, "triton")
    seen = (out * (1 - p) * Lk).round() == 1
    keep = ops.attention_keep_mask(B, H, Lq, Lk, p, seed, offset, device=DEV)
    assert torch.equal(seen, keep)
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("shape", [(2, 2, 37, 45, 32), (1, 3, 7, 129, 64)], ids=lambda s: "x".join(map(str, s)))
def test_dropout_equals_reference_given_the_keep_mask(shape):
    B, H, Lq, Lk, D = shape
    q, k, v, km, do = make(*shape, seed=7)
    p, seed, offset = 0.3, 987654321, 5
    keep = ops.attention_keep_mask(B, H, Lq, Lk, p, seed, offset, device=DEV)

    def kern(a, b, c):
        return aop.attention_fwd(a, b, c, km, p, 1 / math.sqrt(D), seed, offset, "triton")[0]

    got = fwd_bwd(kern, q, k, v, do)
    want = oracle(q, k, v, km, do, keep=keep, p=p)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the reference backend of the same custom op agrees too
    ref_path = fwd_bwd(lambda a, b, c: aop.attention_fwd(a, b, c, km, p, 1 / math.sqrt(D), seed, offset,
                                                         "reference")[0], q, k, v, do)
    for a, b in zip(got, ref_path):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_dropout_follows_torch_manual_seed(backend):
    q, k, v, km, _ = make(2, 2, 9, 13, 32, seed=2)
    with ops.backend(backend):
        torch.manual_seed(123)
        a = ops.attention(q, k, v, km, dropout_p=0.4)
        torch.manual_seed(123)
        b = ops.attention(q, k, v, km, dropout_p=0.4)
        c = ops.attention(q, k, v, km, dropout_p=0.4)
        d = ops.attention(q, k, v, km, dropout_p=0.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_backward_runs_on_the_forward_backend(monkeypatch):
    q, k, v, km, do = make(1, 2, 7, 9, 32)
    seen = []
    real = _dispatch.select

    def spy(op, device_type, requested=None, **facts):
        b = real(op, device_type, requested, **facts)
        seen.append(b)
        return b

    monkeypatch.setattr(_dispatch, "select", spy)
    q.requires_grad_(True)
    with ops.backend("triton"):
        out = ops.attention(q, k, v, km)
    out.backward(do)  # outside the block
    assert seen == ["triton", "triton"]


# ----------------------------------------------------------------------------------
# Custom-op contract and compile
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(backend, dropout_p):
    q, k, v, km, _ = make(2, 2, 7, 5, 16, seed=4)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.vlfast.attention_fwd.default,
                          (q, k, v, km, dropout_p, 0.25, 1234, 0, backend))


def test_compile_fullgraph_aot_eager():
    q, k, v, km, do = make(2, 2, 11, 13, 32, seed=8)

    def fn(a, b, c, m):
        return ops.attention(a, b, c, m)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend("triton"):
        got = fwd_bwd(lambda a, b, c: compiled(a, b, c, km), q, k, v, do)
        want = fwd_bwd(lambda a, b, c: fn(a, b, c, km), q, k, v, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compile_inductor_in_a_model_block():
    """The one Inductor compile of the suite: projections around the custom op."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 192).to(DEV)
    x = torch.randn(2, 13, 64, device=DEV)
    km = torch.rand(2, 13, device=DEV) > 0.2

    def block(x, km):
        q, k, v = lin(x).view(2, 13, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return ops.attention(q, k, v, km).transpose(1, 2).reshape(2, 13, 64).sum()

    compiled = torch.compile(block, fullgraph=True)
    got = compiled(x, km)
    want = block(x, km)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------

def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    assert _dispatch.select("attention", "cpu", head_dim=64, dtype=torch.float32) == "reference"
    assert _dispatch.select("attention", "cuda", head_dim=64, dtype=torch.float16) == "triton"
    assert _dispatch.select("attention", "cuda", head_dim=64, dtype=torch.float64) == "reference"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "triton")
    assert _dispatch.requested_backend() == "triton"
    with ops.backend("reference"):
        assert _dispatch.requested_backend() == "reference"
    monkeypatch.setenv("VLFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VLFAST_BACKEND: expected one of auto, reference"):
        _dispatch.requested_backend()


def test_forcing_an_unavailable_backend_lists_every_backend():
    q, k, v, km, _ = make(1, 1, 3, 3, 16)
    with ops.backend("cuda"), pytest.raises(_dispatch.BackendError) as e:
        ops.attention(q, k, v, km)
    msg = str(e.value)
    for b in ("reference", "triton", "cuda", "cpp"):
        assert f"  {b}" in msg
    assert "attention has no cpp implementation" in msg
    with ops.backend("triton"), pytest.raises(_dispatch.BackendError, match="takes fp16/bf16/fp32"):
        ops.attention(q.double(), k.double(), v.double(), km)


def test_fp64_runs_on_the_reference_under_auto():
    q, k, v, km, do = make(2, 2, 5, 6, 16)
    got = fwd_bwd(lambda a, b, c: ops.attention(a, b, c, km), q.double(), k.double(), v.double(), do.double())
    want = oracle(q, k, v, km, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

def _bad_cases():
    q, k, v, km, _ = make(2, 2, 5, 6, 16)
    return [
        (dict(q=q[0]), r"q: expected a 4-d tensor \(B,H,Lq,D\), got shape \(2, 5, 16\)"),
        (dict(k=k[:, :1]), r"k: expected shape \(B=2, H=2, Lk, D=16\) to match q"),
        (dict(k=torch.randn(2, 2, 6, 8)), r"k: expected shape \(B=2, H=2, Lk, D=16\)"),
        (dict(v=v[:, :, :5]), r"v: expected the shape of k \(2, 2, 6, 16\), got shape \(2, 2, 5, 16\)"),
        (dict(key_mask=km.int()), r"key_mask: expected dtype bool, got int32"),
        (dict(key_mask=km[:, :5]), r"key_mask: expected shape \(B=2, Lk=6\), got shape \(2, 5\)"),
        (dict(v=v.half()), r"v: expected the dtype of q \(float32\), got float16"),
        (dict(q=q.int()), r"q: expected dtype float16 or bfloat16 or float32 or float64, got int32"),
        (dict(dropout_p=1.0), r"dropout_p: expected a float in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), r"dropout_p: expected a float in \[0, 1\), got -0.1"),
        (dict(scale=float("nan")), r"scale: expected a finite float or None, got nan"),
        (dict(q="x"), r"q: expected a torch.Tensor, got str"),
    ], (q, k, v, km)


def test_bad_input_names_argument_expected_and_actual():
    cases, (q, k, v, km) = _bad_cases()
    for override, pattern in cases:
        args = dict(q=q, k=k, v=v, key_mask=km)
        kw = {}
        for name, val in override.items():
            (kw if name in ("dropout_p", "scale") else args)[name] = val
        with pytest.raises(ValueError, match=pattern):
            ops.attention(args["q"], args["k"], args["v"], args["key_mask"], **kw)


def test_device_mismatch_message_on_meta():
    q, k, v, km, _ = make(1, 1, 3, 3, 16)
    with pytest.raises(ValueError, match=r"key_mask: expected the device of q \(cpu\), got meta"):
        ops.attention(q.cpu(), k.cpu(), v.cpu(), km.to("meta"))
