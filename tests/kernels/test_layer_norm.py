"""vlfast.ops.layer_norm and dropout_add_layer_norm: the Triton kernels (interpreted
on CPU) vs the reference and an fp64 oracle, every gradient, dropout read back
exactly, mixed (autocast-like) dtypes, custom-op checks, compile, dispatch and input
errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast import _dispatch, ops
from vlfast.kernels import _common as C
from vlfast.kernels.layer_norm import op as lop
from vlfast.kernels.layer_norm import reference as ref
from vlfast.testing import assert_close_to_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (leading shape, E): rows 1, 7, 37, 129; E not a power of two; 768 at few rows
SHAPES = [((1,), 48), ((7,), 96), ((37,), 48), ((129,), 40), ((3,), 768), ((2, 3, 5), 100)]


def make(lead, E, dtype=torch.float32, seed=0, wdtype=None):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (E,)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    r = torch.randn(shape, generator=g)
    w = 1 + 0.5 * torch.randn(E, generator=g)
    b = 0.3 * torch.randn(E, generator=g)
    do = torch.randn(shape, generator=g)
    dpre = torch.randn(shape, generator=g)
    wd = wdtype or dtype
    return (x.to(DEV, dtype), r.to(DEV, dtype), w.to(DEV, wd), b.to(DEV, wd), do.to(DEV, dtype),
            dpre.to(DEV, dtype))


def grads(outs, leaves, douts):
    leaves = [t for t in leaves]
    return tuple(torch.autograd.grad(outs, leaves, douts))


def run_ln(fn, x, w, b, do):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b)
    return (out.detach(),) + grads((out,), (x, w, b), (do,))


def run_dal(fn, x, r, w, b, do, dpre):
    x, r, w, b = (t.detach().clone().requires_grad_(True) for t in (x, r, w, b))
    out, pre = fn(x, r, w, b)
    return (out.detach(), pre.detach()) + grads((out, pre), (x, r, w, b), (do, dpre))


def oracle_ln(x, w, b, do, eps=1e-12):
    return run_ln(lambda a, c, d: ref.layer_norm(a, c, d, eps), x.double(), w.double(), b.double(), do.double())


def oracle_dal(x, r, w, b, do, dpre, p=0.0, keep=None, eps=1e-12):
    return run_dal(lambda a, s, c, d: ref.dropout_add_layer_norm(a, s, c, d, eps, p, keep),
                   x.double(), r.double(), w.double(), b.double(), do.double(), dpre.double())


LN_NAMES = ("out", "dx", "dweight", "dbias")
DAL_NAMES = ("out", "prenorm", "dx", "dresidual", "dweight", "dbias")


def _ids(s):
    return "x".join(map(str, s[0])) + f"-E{s[1]}"


# ----------------------------------------------------------------------------------
# Forward and gradients
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_layer_norm_fp32_matches_reference_and_oracle(shape):
    x, _, w, b, do, _ = make(*shape)
    with ops.backend("triton"):
        got = run_ln(lambda a, c, d: ops.layer_norm(a, c, d), x, w, b, do)
    with ops.backend("reference"):
        want = run_ln(lambda a, c, d: ops.layer_norm(a, c, d), x, w, b, do)
    orc = oracle_ln(x, w, b, do)
    for name, g, e, o in zip(LN_NAMES, got, want, orc):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert_close_to_oracle(name, g, e, o)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_dropout_add_layer_norm_fp32_matches_reference_and_oracle(shape):
    x, r, w, b, do, dpre = make(*shape, seed=1)
    fn = lambda a, s, c, d: ops.dropout_add_layer_norm(a, s, c, d, eps=1e-5)  # noqa: E731
    with ops.backend("triton"):
        got = run_dal(fn, x, r, w, b, do, dpre)
    with ops.backend("reference"):
        want = run_dal(fn, x, r, w, b, do, dpre)
    orc = oracle_dal(x, r, w, b, do, dpre, eps=1e-5)
    for name, g, e, o in zip(DAL_NAMES, got, want, orc):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert_close_to_oracle(name, g, e, o)
    assert torch.equal(got[1], x + r)  # the pre-norm sum, exactly (fp32, no dropout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [((37,), 96), ((2, 5), 768)], ids=_ids)
def test_half_precision_error_at_most_twice_eager(dtype, shape):
    x, r, w, b, do, dpre = make(*shape, dtype=dtype, seed=3)
    with ops.backend("triton"):
        got_ln = run_ln(lambda a, c, d: ops.layer_norm(a, c, d), x, w, b, do)
        got_dal = run_dal(lambda a, s, c, d: ops.dropout_add_layer_norm(a, s, c, d), x, r, w, b, do, dpre)
    eager_ln = run_ln(lambda a, c, d: ref.layer_norm(a, c, d), x, w, b, do)
    eager_dal = run_dal(lambda a, s, c, d: ref.dropout_add_layer_norm(a, s, c, d), x, r, w, b, do, dpre)
    for name, g, e, o in zip(LN_NAMES, got_ln, eager_ln, oracle_ln(x, w, b, do)):
        assert g.dtype == dtype, name
        assert_close_to_oracle("layer_norm " + name, g, e, o)
    for name, g, e, o in zip(DAL_NAMES, got_dal, eager_dal, oracle_dal(x, r, w, b, do, dpre)):
        assert g.dtype == dtype, name
        assert_close_to_oracle("dropout_add_layer_norm " + name, g, e, o)


def test_mixed_dtypes_as_autocast_makes_them():
    """x bf16 (a dense output under autocast), residual/weight/bias fp32: prenorm and out
    fp32 on CPU, every gradient in its input's dtype, as the plain-torch code gives."""
    x, r, w, b, do, dpre = make((19,), 96, seed=4)
    xb = x.bfloat16()
    fn = lambda a, s, c, d: ops.dropout_add_layer_norm(a, s, c, d)  # noqa: E731
    with ops.backend("triton"):
        got = run_dal(fn, xb, r, w, b, do, dpre)
    want = run_dal(lambda a, s, c, d: ref.dropout_add_layer_norm(a, s, c, d), xb, r, w, b, do, dpre)
    for name, g, e in zip(DAL_NAMES, got, want):
        assert g.dtype == e.dtype, (name, g.dtype, e.dtype)
        torch.testing.assert_close(g, e, atol=1e-2 if name == "dx" else 3e-5, rtol=1e-2 if name == "dx" else 1e-5)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_under_autocast_the_inputs_are_cast_and_the_output_is_the_autocast_dtype(backend):
    """The ops' autocast rule: fp32 parameters (and an fp32 residual) are cast to the
    autocast dtype, the op computes in it with fp32 statistics; gradients come back in
    each input's own dtype."""
    x, r, w, b, do, dpre = make((19,), 96, seed=4)
    xb = x.bfloat16()
    for dt in (torch.bfloat16, torch.float16):
        xs, rs, ws, bs = (t.clone().requires_grad_(True) for t in (xb, r, w, b))
        with ops.backend(backend), torch.autocast("cpu", dtype=dt):
            out, pre = ops.dropout_add_layer_norm(xs, rs, ws, bs)
            ln = ops.layer_norm(xs, ws, bs)
        assert out.dtype == pre.dtype == ln.dtype == dt
        want_pre = xb.to(dt) + r.to(dt)
        want = torch.nn.functional.layer_norm(want_pre.float(), (96,), w.to(dt).float(), b.to(dt).float(), eps=1e-12)
        torch.testing.assert_close(pre, want_pre, rtol=0, atol=0)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ln.float(), torch.nn.functional.layer_norm(
            xb.to(dt).float(), (96,), w.to(dt).float(), b.to(dt).float(), eps=1e-12), atol=2e-2, rtol=1e-2)
        gs = torch.autograd.grad((out.float() * do).sum() + (ln.float() * do).sum(), (xs, rs, ws, bs))
        assert [g.dtype for g in gs] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
        assert all(torch.isfinite(g).all() for g in gs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unused_outputs_and_zero_rows(backend):
    x, r, w, b, do, _ = make((2, 9), 48, seed=5)
    with ops.backend(backend):
        xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        out, pre = ops.dropout_add_layer_norm(xs, rs, w, b)
        (dx,) = torch.autograd.grad(pre, (xs,), do)  # only the pre-norm sum used
        assert torch.equal(dx, do)
        (dr,) = torch.autograd.grad(ops.dropout_add_layer_norm(xs, rs, w, b)[0].sum(), (rs,))  # only out
        rr = r.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(ref.dropout_add_layer_norm(x, rr, w, b)[0].sum(), (rr,))
        torch.testing.assert_close(dr, want, atol=2e-5, rtol=1e-5)
        e = torch.zeros(0, 3, 48, device=DEV, requires_grad=True)
        wl = w.clone().requires_grad_(True)
        o, p = ops.dropout_add_layer_norm(e, torch.zeros_like(e), wl, b)
        assert o.shape == (0, 3, 48) and p.shape == (0, 3, 48)
        (dw,) = torch.autograd.grad(ops.layer_norm(e, wl, b).sum(), (wl,))
        assert torch.equal(dw, torch.zeros_like(w))


def test_backward_is_deterministic_and_noncontiguous_inputs_work():
    xx, r, w, b, do, dpre = make((40,), 2 * 96, seed=6)
    x = xx[:, ::2]  # (40, 96) strided view
    r, do, dpre = r[:, :96], do[:, :96], dpre[:, :96]
    w, b = w[:96], b[:96]
    with ops.backend("triton"):
        a = run_dal(lambda p, s, c, d: ops.dropout_add_layer_norm(p, s, c, d), x, r, w, b, do, dpre)
        c_ = run_dal(lambda p, s, c, d: ops.dropout_add_layer_norm(p, s, c, d), x, r, w, b, do, dpre)
    for u, v in zip(a, c_):
        assert torch.equal(u, v)
    want = oracle_dal(x, r, w, b, do, dpre)
    for name, u, v in zip(DAL_NAMES, a, want):
        torch.testing.assert_close(u.double(), v, atol=3e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_equals_reference_given_the_keep_mask(dtype):
    x, r, w, b, do, dpre = make((3, 13), 96, dtype=dtype, seed=7)
    p, seed, offset = 0.3, 2**40 + 987654321, 11
    keep = ops.dropout_add_layer_norm_keep_mask(x.shape, p, seed, offset, device=DEV)

    def kern(backend):
        def fn(a, s, c, d):
            out, pre, _, _ = lop.dropout_add_layer_norm_fwd(a.view(-1, 96), s.view(-1, 96), c, d, p, 1e-12, seed,
                                                            offset, dtype, backend)
            return out.view(a.shape), pre.view(a.shape)
        return fn

    got = run_dal(kern("triton"), x, r, w, b, do, dpre)
    # the kernel's mask read back: dx is zero exactly where x was dropped (and nowhere
    # else: the gradient of the sum is never exactly 0 here), and prenorm is the residual there
    assert torch.equal(got[2] != 0, keep)
    assert torch.equal(got[1][~keep], r[~keep])
    orc = oracle_dal(x, r, w, b, do, dpre, p=p, keep=keep)
    eager = run_dal(lambda a, s, c, d: ref.dropout_add_layer_norm(a, s, c, d, 1e-12, p, keep), x, r, w, b, do, dpre)
    for name, g, e, o in zip(DAL_NAMES, got, eager, orc):
        assert_close_to_oracle(name, g, e, o)
    if dtype == torch.float32:  # the custom op's reference backend agrees too
        for name, g, e in zip(DAL_NAMES, got, run_dal(kern("reference"), x, r, w, b, do, dpre)):
            torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_dropout_rate_is_p():
    p = 0.1
    keep = ops.dropout_add_layer_norm_keep_mask((64, 768), p, 1234, 0)
    n = keep.numel()
    assert abs((1 - keep.float().mean().item()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    x, r, w, b, _, _ = make((16,), 768, seed=8)
    with ops.backend("triton"):
        torch.manual_seed(0)
        _, pre = ops.dropout_add_layer_norm(x, r, w, b, dropout_p=p)
    rate = (pre == r).float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / pre.numel())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_dropout_follows_torch_manual_seed(backend):
    x, r, w, b, _, _ = make((2, 7), 48, seed=9)
    with ops.backend(backend):
        torch.manual_seed(123)
        a = ops.dropout_add_layer_norm(x, r, w, b, dropout_p=0.4)
        torch.manual_seed(123)
        seed = C.draw_seed()
        torch.manual_seed(123)
        a2 = ops.dropout_add_layer_norm(x, r, w, b, dropout_p=0.4)
        c = ops.dropout_add_layer_norm(x, r, w, b, dropout_p=0.4)
    keep = ops.dropout_add_layer_norm_keep_mask(x.shape, 0.4, seed, 0, device=DEV)
    assert torch.equal(a[0], a2[0]) and torch.equal(a[1], a2[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(a[1] != r, keep)


def test_backends_agree_on_the_public_dropout():
    x, r, w, b, do, dpre = make((2, 11), 96, seed=10)
    outs = {}
    for backend in ("triton", "reference"):
        with ops.backend(backend):
            torch.manual_seed(7)
            outs[backend] = run_dal(lambda a, s, c, d: ops.dropout_add_layer_norm(a, s, c, d, dropout_p=0.25),
                                    x, r, w, b, do, dpre)
    for name, g, e in zip(DAL_NAMES, outs["triton"], outs["reference"]):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------
# The plain-torch code it replaces
# ----------------------------------------------------------------------------------

def test_reference_path_is_bitwise_the_plain_torch_code():
    x, r, w, b, do, dpre = make((4, 9), 96, seed=11)
    ln = torch.nn.LayerNorm(96, eps=1e-12)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    drop = torch.nn.Dropout(0.1).eval()
    want = ln(drop(x) + r)
    out, pre = ops.dropout_add_layer_norm(x, r, ln.weight, ln.bias, dropout_p=0.0, eps=ln.eps)
    assert torch.equal(out, want) and torch.equal(pre, x + r)
    assert torch.equal(ops.layer_norm(x, ln.weight, ln.bias, eps=ln.eps), ln(x))
    # gradients too: the reference path is torch's own autograd
    xs = x.clone().requires_grad_(True)
    g1 = torch.autograd.grad(ops.dropout_add_layer_norm(xs, r, ln.weight, ln.bias)[0], (xs, ln.weight), do)
    g2 = torch.autograd.grad(ln(xs + r), (xs, ln.weight), do)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


# ----------------------------------------------------------------------------------
# Custom-op contract and compile
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_layer_norm(backend):
    x, _, w, b, do, _ = make((6,), 40, seed=12)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    torch.library.opcheck(torch.ops.vlfast.layer_norm_fwd.default, (x, w, b, 1e-5, torch.float32, backend))
    _, mean, rstd = lop.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5, torch.float32, backend)
    torch.library.opcheck(torch.ops.vlfast.layer_norm_bwd.default,
                          (do, x.detach(), w.detach(), b.detach(), mean, rstd, backend))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck_dropout_add_layer_norm(backend, dropout_p):
    x, r, w, b, do, dpre = make((6,), 40, seed=13)
    x, r, w, b = (t.requires_grad_(True) for t in (x, r, w, b))
    torch.library.opcheck(torch.ops.vlfast.dropout_add_layer_norm_fwd.default,
                          (x, r, w, b, dropout_p, 1e-12, 99, 3, torch.float32, backend))
    _, pre, mean, rstd = lop.dropout_add_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b.detach(), dropout_p,
                                                         1e-12, 99, 3, torch.float32, backend)
    for dp in (dpre, None):
        torch.library.opcheck(torch.ops.vlfast.dropout_add_layer_norm_bwd.default,
                              (do, dp, pre, w.detach(), b.detach(), mean, rstd, dropout_p, 99, 3, torch.float32,
                               backend))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_aot_eager(backend):
    x, r, w, b, do, dpre = make((2, 5), 48, seed=14)

    def fn(a, s, c, d):
        out, pre = ops.dropout_add_layer_norm(a, s, c, d, eps=1e-6)
        return ops.layer_norm(out, c, d, eps=1e-6), pre

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend(backend):
        got = run_dal(compiled, x, r, w, b, do, dpre)
        want = run_dal(fn, x, r, w, b, do, dpre)
    for name, g, e in zip(DAL_NAMES, got, want):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------

def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    for op in ("layer_norm", "dropout_add_layer_norm"):
        assert _dispatch.select(op, "cpu", hidden=768, dtypes=(torch.float32,)) == "reference"
        assert _dispatch.select(op, "cuda", hidden=768, dtypes=(torch.bfloat16, torch.float32)) == "triton"
        assert _dispatch.select(op, "cuda", hidden=768, dtypes=(torch.float64,)) == "reference"
        assert _dispatch.select(op, "cuda", hidden=32768, dtypes=(torch.float16,)) == "reference"


def test_backward_runs_on_the_forward_backend(monkeypatch):
    x, r, w, b, do, _ = make((7,), 48)
    seen = []
    real = _dispatch.select

    def spy(op, device_type, requested=None, **facts):
        got = real(op, device_type, requested, **facts)
        seen.append((op, got))
        return got

    monkeypatch.setattr(_dispatch, "select", spy)
    x.requires_grad_(True)
    with ops.backend("triton"):
        out, _ = ops.dropout_add_layer_norm(x, r, w, b)
        y = ops.layer_norm(x, w, b)
    seen.clear()
    (out + y).backward(do)  # outside the block
    assert sorted(seen) == [("dropout_add_layer_norm", "triton"), ("layer_norm", "triton")]


def test_fp64_runs_on_the_reference_and_forcing_triton_says_why():
    x, r, w, b, do, _ = make((5,), 48)
    got = run_ln(lambda a, c, d: ops.layer_norm(a, c, d), x.double(), w.double(), b.double(), do.double())
    for g, o in zip(got, oracle_ln(x, w, b, do)):
        torch.testing.assert_close(g, o)
    with ops.backend("triton"), pytest.raises(_dispatch.BackendError, match="takes fp16/bf16/fp32, inputs include float64"):
        ops.layer_norm(x.double(), w, b)
    with ops.backend("cuda"), pytest.raises(_dispatch.BackendError, match="dropout_add_layer_norm has no cpp"):
        ops.dropout_add_layer_norm(x, r, w, b)


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

def test_bad_input_names_argument_expected_and_actual():
    x, r, w, b, _, _ = make((2, 3), 16)
    cases = [
        (dict(x="x"), r"x: expected a torch.Tensor, got str"),
        (dict(x=x.int()), r"x: expected dtype float16 or bfloat16 or float32 or float64, got int32"),
        (dict(x=x[..., :0]), r"x: expected a tensor \(\.\.\., E\) with E >= 1, got shape \(2, 3, 0\)"),
        (dict(weight=w[:8]), r"weight: expected shape \(E=16,\) to match x \(2, 3, 16\), got shape \(8,\)"),
        (dict(bias=b[None]), r"bias: expected shape \(E=16,\) to match x \(2, 3, 16\), got shape \(1, 16\)"),
        (dict(bias=b.to("meta")), r"bias: expected the device of x \(cpu\), got meta"),
        (dict(residual=r[:1]), r"residual: expected the shape of x \(2, 3, 16\), got shape \(1, 3, 16\)"),
        (dict(residual=r.long()), r"residual: expected dtype float16 or bfloat16 or float32 or float64, got int64"),
        (dict(dropout_p=1.0), r"dropout_p: expected a float in \[0, 1\), got 1.0"),
        (dict(eps=-1.0), r"eps: expected a finite float >= 0, got -1.0"),
        (dict(eps=float("nan")), r"eps: expected a finite float >= 0, got nan"),
    ]
    if DEV != "cpu":
        cases = [c for c in cases if "meta" not in c[1]]
    for override, pattern in cases:
        args = dict(x=x, residual=r, weight=w, bias=b)
        kw = {}
        for name, val in override.items():
            (kw if name in ("dropout_p", "eps") else args)[name] = val
        with pytest.raises(ValueError, match=r"vlfast.ops.dropout_add_layer_norm: " + pattern):
            ops.dropout_add_layer_norm(args["x"], args["residual"], args["weight"], args["bias"], **kw)
        if "residual" not in override and "dropout_p" not in override:
            with pytest.raises(ValueError, match=r"vlfast.ops.layer_norm: " + pattern):
                ops.layer_norm(args["x"], args["weight"], args["bias"], **kw)


def test_reference_backward_formula_matches_autograd():
    """The written-out backward (the kernel's formula) equals autograd of F.layer_norm."""
    x, _, w, b, do, dpre = make((9,), 40, dtype=torch.float64)
    got = ref.layer_norm_backward(do, x, w, *ref.layer_norm_stats(x, 1e-5), dprenorm=dpre)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    want = torch.autograd.grad(F.layer_norm(xs, (40,), ws, bs, 1e-5), (xs, ws, bs), do)
    torch.testing.assert_close(got[0], want[0] + dpre)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
