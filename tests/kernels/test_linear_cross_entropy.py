"""vlfast.ops.linear_cross_entropy / linear_soft_cross_entropy: the Triton row kernel
(forced, under the interpreter on CPU) and the chunked custom op against the plain
formula and an fp64 oracle (loss and the gradients of hidden, weight and bias), every
reduction, hard labels with ignore_index, soft targets (CE and KL, rows not summing to
1), argmax ties, frozen weights, no bias, autocast, the chunk rule, bad inputs,
opcheck and torch.compile.

Shapes are small (the interpreter runs each row program in Python); chunking is
forced down to a few rows per chunk with ``MIN_CHUNK_ELEMENTS = 0`` so the loops over
chunks and over column blocks are exercised.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlfast import ops
from vlfast.kernels.linear_cross_entropy import op as lce
from vlfast.testing import assert_close_to_oracle

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton row kernel on CUDA when there is a GPU


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of ceil(N / ceil(V/E)) rows (no GPU-efficiency floor)."""
    monkeypatch.setattr(lce, "MIN_CHUNK_ELEMENTS", 0)


def make(n, e, v, dtype, seed=0, bias=True, device=DEV):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, e, generator=g)
    w = torch.randn(v, e, generator=g) * (1.5 / e ** 0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::5] = -100
    t = torch.softmax(torch.randn(n, v, generator=g) * 2, -1)
    cast = [x.to(device=device, dtype=dtype).requires_grad_() if x is not None else None for x in (h, w, b)]
    return (*cast, lab.to(device), t.to(device))


def eager_hard(h, w, b, lab, reduction="mean"):
    """The plain formula in the inputs' dtype (what the objectives wrote)."""
    z = F.linear(h, w, b).float() if h.dtype != torch.float64 else F.linear(h, w, b)
    return F.cross_entropy(z, lab, reduction=reduction)


def eager_soft(h, w, b, t, reduction="mean", kl=False):
    z = F.linear(h, w, b).float() if h.dtype != torch.float64 else F.linear(h, w, b)
    logp = F.log_softmax(z, -1)
    el = F.kl_div(logp, t.to(z.dtype), reduction="none") if kl else -(t.to(z.dtype) * logp)
    return {"mean": el.sum(-1).mean(), "sum": el.sum(), "none": el.sum(-1)}[reduction]


def grads(loss, leaves, go=None):
    leaves = [x for x in leaves if x is not None]
    return torch.autograd.grad(loss, leaves, go)


def f64(*xs):
    return [x.detach().double().requires_grad_() if x is not None else None for x in xs]


def check_vs_oracle(name, got, eager, oracle, dtype):
    factor = 2.0
    floor = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}[dtype]
    assert_close_to_oracle(name, got.detach().float(), eager.detach().float(), oracle.detach(), factor=factor,
                           floor=floor)


# ----------------------------------------------------------------------------------
# Triton vs the fp64 oracle
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,e,v", [(1, 48, 100), (7, 96, 257), (37, 48, 300), (129, 32, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hard_labels_forward_and_every_gradient_vs_oracle(n, e, v, dtype):
    h, w, b, lab, _ = make(n, e, v, dtype, seed=n)
    with ops.backend("triton"):
        loss, am = ops.linear_cross_entropy(h, w, b, lab, return_argmax=True)
    got = grads(loss, (h, w, b))
    eager = eager_hard(h, w, b, lab)
    eg = grads(eager, (h, w, b))
    h64, w64, b64 = f64(h, w, b)
    oracle = eager_hard(h64, w64, b64, lab)
    og = grads(oracle, (h64, w64, b64))
    check_vs_oracle("loss", loss, eager, oracle, dtype)
    for name, a, e_, o in zip(("grad_hidden", "grad_weight", "grad_bias"), got, eg, og):
        assert a.dtype == dtype
        check_vs_oracle(name, a, e_, o, dtype)
    assert loss.dtype == torch.float32
    assert torch.equal(am, F.linear(h, w, b).argmax(-1))


@pytest.mark.parametrize("n,e,v", [(7, 96, 257), (37, 48, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl", [False, True])
def test_soft_targets_forward_and_every_gradient_vs_oracle(n, e, v, dtype, kl):
    h, w, b, _, t = make(n, e, v, dtype, seed=n + 1)
    with ops.backend("triton"):
        loss = ops.linear_soft_cross_entropy(h, w, b, t, kl=kl)
    got = grads(loss, (h, w, b))
    eager = eager_soft(h, w, b, t, kl=kl)
    eg = grads(eager, (h, w, b))
    h64, w64, b64 = f64(h, w, b)
    oracle = eager_soft(h64, w64, b64, t.double(), kl=kl)
    og = grads(oracle, (h64, w64, b64))
    check_vs_oracle("loss", loss, eager, oracle, dtype)
    for name, a, e_, o in zip(("grad_hidden", "grad_weight", "grad_bias"), got, eg, og):
        check_vs_oracle(name, a, e_, o, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["hard", "soft", "kl"])
def test_every_reduction_matches_the_formula(reduction, kind):
    """Triton (precomputed gradients for mean/sum, the recomputing backward for none)
    and the chunked custom op on the reference step, against the plain formula."""
    h, w, b, lab, t = make(23, 40, 150, torch.float32, seed=3)
    if kind == "hard":
        want = eager_hard(h, w, b, lab, reduction)
    else:
        want = eager_soft(h, w, b, t, reduction, kl=kind == "kl")
    go = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    wg = grads(want, (h, w, b), go)
    for backend in ("triton", "reference"):
        with ops.backend(backend):
            if kind == "hard":
                got = ops.linear_cross_entropy(h, w, b, lab, reduction=reduction)
            else:
                got = ops.linear_soft_cross_entropy(h, w, b, t, reduction=reduction, kl=kind == "kl")
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, c in zip(grads(got, (h, w, b), go), wg):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # the custom op's own reference branch: the same chunk loop with the torch row step
    needs = (True, True, True)
    out = lce.linear_cross_entropy_fwd(h, w, b, lab if kind == "hard" else None, None if kind == "hard" else t,
                                       -100, reduction, kind == "kl", *needs, "reference")
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# Exactness of the reference path (the CPU path of the objectives)
# ----------------------------------------------------------------------------------

def test_reference_path_is_bitwise_the_plain_formula():
    h, w, b, lab, t = make(37, 48, 300, torch.float32, seed=5)
    z = F.linear(h, w, b).float()
    for red in ("mean", "sum", "none"):
        assert torch.equal(ops.linear_cross_entropy(h, w, b, lab, reduction=red),
                           F.cross_entropy(z, lab, reduction=red))
    lp = F.log_softmax(z, -1)
    assert torch.equal(ops.linear_soft_cross_entropy(h, w, b, t), -(t * lp).sum(-1).mean())
    kl = F.kl_div(lp, t, reduction="none")
    assert torch.equal(ops.linear_soft_cross_entropy(h, w, b, t, kl=True, reduction="sum"), kl.sum())
    assert torch.equal(ops.linear_soft_cross_entropy(h, w, b, t, kl=True, reduction="sum") / kl.numel(),
                       kl.mean())
    g1 = grads(ops.linear_cross_entropy(h, w, b, lab), (h, w, b))
    g2 = grads(F.cross_entropy(F.linear(h, w, b).float(), lab), (h, w, b))
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_kl_is_cross_entropy_minus_the_targets_entropy():
    h, w, b, _, t = make(9, 16, 40, torch.float32, seed=6)
    ent = -torch.xlogy(t, t).sum(-1)
    for backend in ("triton", "reference"):
        with ops.backend(backend):
            ce = ops.linear_soft_cross_entropy(h, w, b, t, reduction="none")
            kl = ops.linear_soft_cross_entropy(h, w, b, t, reduction="none", kl=True)
        torch.testing.assert_close(kl, ce - ent, rtol=1e-5, atol=1e-5)
        g_ce, g_kl = grads(ce.sum(), (h, w, b)), grads(kl.sum(), (h, w, b))
        for a, c in zip(g_ce, g_kl):
            torch.testing.assert_close(a, c)


def test_soft_targets_need_not_sum_to_one():
    """Row loss S*lse - sum t z, logits' gradient softmax*S - t (S = sum t)."""
    h, w, b, _, t = make(11, 24, 70, torch.float32, seed=7)
    t = t * torch.linspace(0.0, 3.0, 11)[:, None]       # row sums 0 .. 3
    want = eager_soft(h, w, b, t, "none")
    wg = grads(want.sum(), (h, w, b))
    with ops.backend("triton"):
        got = ops.linear_soft_cross_entropy(h, w, b, t, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(grads(got.sum(), (h, w, b)), wg):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# ignore_index, empty inputs, argmax, frozen weight, no bias, autocast
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ignored_rows_have_zero_loss_and_gradient(backend):
    h, w, b, lab, _ = make(10, 16, 50, torch.float32, seed=8)
    lab = lab.masked_fill(lab == -100, 0)
    lab[2] = 7
    lab[3] = lab[6] = -1                 # a custom ignore_index
    with ops.backend(backend):
        rows = ops.linear_cross_entropy(h, w, b, lab, ignore_index=-1, reduction="none")
        gh, = torch.autograd.grad(rows.sum(), h)
        mean = ops.linear_cross_entropy(h, w, b, lab, ignore_index=-1)
    assert rows[3] == 0 and rows[6] == 0 and rows[2] > 0
    assert gh[3].abs().sum() == 0 and gh[2].abs().sum() > 0
    keep = lab != -1
    torch.testing.assert_close(mean, F.cross_entropy(F.linear(h, w, b)[keep], lab[keep]))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("n", [0, 6])
def test_all_ignored_mean_is_a_connected_zero(backend, n):
    """F.cross_entropy gives NaN here; the op gives 0.0 with zero gradients."""
    h, w, b, lab, t = make(n, 16, 50, torch.float32, seed=9)
    lab = torch.full_like(lab, -100)
    with ops.backend(backend):
        loss = ops.linear_cross_entropy(h, w, b, lab)
        soft = ops.linear_soft_cross_entropy(h, w, b, t)
    for x in (loss, soft) if n == 0 else (loss,):
        assert x.shape == () and float(x) == 0.0
        gs = grads(x, (h, w, b))
        assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in gs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_argmax_takes_the_first_maximum(backend):
    g = torch.Generator().manual_seed(10)
    w = torch.randint(-2, 3, (300, 8), generator=g).float()   # small integers: exact logits
    w[150] = w[3] = w[200] = 3.0         # exact ties between columns 3, 150, 200 (and across blocks)
    w = w.to(DEV)
    h = torch.ones(5, 8, device=DEV)     # logits 24 there, at most 16 elsewhere
    lab = torch.zeros(5, dtype=torch.long, device=DEV)
    with ops.backend(backend):
        _, am = ops.linear_cross_entropy(h, w, None, lab, return_argmax=True)
        _, am_soft = ops.linear_soft_cross_entropy(h, w, None, torch.ones(5, 300, device=DEV) / 300,
                                                   return_argmax=True)
    assert am.tolist() == [3] * 5 and am_soft.tolist() == [3] * 5
    assert torch.equal(am, F.linear(h, w).argmax(-1))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_frozen_weight_and_no_bias(backend):
    """Tied embeddings frozen: only hidden gets a gradient; bias None."""
    h, w, _, lab, _ = make(13, 24, 90, torch.float32, seed=11, bias=False)
    w.requires_grad_(False)
    with ops.backend(backend):
        loss = ops.linear_cross_entropy(h, w, None, lab)
    loss.backward()
    assert w.grad is None
    want, = torch.autograd.grad(eager_hard(h, w, None, lab), h)
    torch.testing.assert_close(h.grad, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), ops.backend(backend):          # no gradient wanted: loss only
        torch.testing.assert_close(ops.linear_cross_entropy(h, w, None, lab), loss.detach())


def test_autocast_computes_the_logits_as_f_linear_does():
    h, w, b, lab, _ = make(9, 32, 60, torch.float32, seed=12)
    with ops.backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(h, w, b, lab)
    with ops.backend("triton"):
        want = ops.linear_cross_entropy(h.bfloat16(), w.bfloat16(), b.bfloat16(), lab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32


def test_backward_runs_on_the_forwards_backend(monkeypatch):
    tk = lce._triton()
    calls = []
    real = tk.chunk_loss_and_grad
    monkeypatch.setattr(tk, "chunk_loss_and_grad", lambda *a: calls.append(a[-1]) or real(*a))
    h, w, b, lab, _ = make(8, 16, 40, torch.float32, seed=13)
    with ops.backend("triton"):
        rows = ops.linear_cross_entropy(h, w, b, lab, reduction="none")
    assert calls == [False] * len(calls) and calls
    n = len(calls)
    rows.sum().backward()                # outside the block: the recomputing backward on Triton
    assert len(calls) > n and all(calls[n:])


def test_chunk_rule(monkeypatch):
    monkeypatch.setattr(lce, "MIN_CHUNK_ELEMENTS", 1 << 23)
    assert lce.chunk_rows(32768, 30522, 768) == 820          # 40 chunks of ~ hidden's size
    assert lce.chunk_rows(32768, 30522, 1024) == 1093
    assert lce.chunk_rows(100, 30522, 768) == 100            # never more than N
    assert lce.chunk_rows(65536, 1601, 768) == 21846         # MRC: ceil(1601/768) = 3 chunks
    assert lce.chunk_rows(8192, 1601, 768) == 5240           # the GEMM floor: 2**23 / V rows
    assert lce.chunk_rows(0, 10, 10) == 1


# ----------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_labels_out_of_range_name_the_value(backend):
    h, w, b, lab, _ = make(6, 8, 20, torch.float32)
    lab[4] = 20
    with ops.backend(backend), pytest.raises(ValueError, match=r"labels.*\[0, 20\).*labels\[4\] = 20"):
        ops.linear_cross_entropy(h, w, b, lab)
    lab[4] = -3
    with ops.backend(backend), pytest.raises(ValueError, match=r"labels\[4\] = -3"):
        ops.linear_cross_entropy(h, w, b, lab)


def test_bad_arguments_name_the_argument():
    h, w, b, lab, t = make(6, 8, 20, torch.float32)
    f, s = ops.linear_cross_entropy, ops.linear_soft_cross_entropy
    cases = [
        (lambda: f(h[0], w, b, lab), "hidden"),
        (lambda: f(h.long(), w, b, lab), "hidden"),
        (lambda: f(h, w[:, :5], b, lab), "weight"),
        (lambda: f(h, w.double(), b, lab), "weight"),
        (lambda: f(h, w, b[:5], lab), "bias"),
        (lambda: f(h, w, b, lab.int()), "labels"),
        (lambda: f(h, w, b, lab[:3]), "labels"),
        (lambda: f(h, w, b, lab, reduction="avg"), "reduction"),
        (lambda: f(h, w, b, lab, ignore_index=1.5), "ignore_index"),
        (lambda: f(h, w, b, lab, return_argmax=1), "return_argmax"),
        (lambda: s(h, w, b, t[:, :5]), "targets"),
        (lambda: s(h, w, b, lab), "targets"),
        (lambda: s(h, w, b, t, kl="yes"), "kl"),
        (lambda: s(h, w, b, t, reduction=None), "reduction"),
    ]
    for fn, arg in cases:
        with pytest.raises(ValueError, match=rf"vlfast.ops.linear_(soft_)?cross_entropy: {arg}: expected"):
            fn()


def test_forcing_triton_on_fp64_says_why():
    h, w, b, lab, _ = make(4, 8, 10, torch.float64)
    with ops.backend("triton"), pytest.raises(ops.BackendError, match="fp16/bf16/fp32"):
        ops.linear_cross_entropy(h, w, b, lab)


# ----------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    h, w, b, lab, t = make(5, 8, 20, torch.float32, seed=14)
    for labels, targets, red, kl in [(lab, None, "mean", False), (lab, None, "none", False),
                                     (None, t, "sum", True), (None, t, "none", False)]:
        torch.library.opcheck(lce.linear_cross_entropy_fwd,
                              (h, w, b, labels, targets, -100, red, kl, True, True, True, backend))
    go = torch.randn(5, device=DEV)
    torch.library.opcheck(lce.linear_cross_entropy_bwd,
                          (go, h.detach(), w.detach(), None, lab, None, -100, "none", False, True, True, False,
                           backend))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    h, w, b, lab, t = make(12, 16, 40, torch.float32, seed=15)

    def fn(h, w, b, lab, t):
        loss, am = ops.linear_cross_entropy(h, w, b, lab, return_argmax=True)
        return loss + ops.linear_soft_cross_entropy(h, w, b, t, kl=True), am

    with ops.backend(backend):
        want, am = fn(h, w, b, lab, t)
        wg = grads(want, (h, w, b))
        got, am2 = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, w, b, lab, t)
        gg = grads(got, (h, w, b))
    torch.testing.assert_close(got, want)
    assert torch.equal(am, am2)
    for a, c in zip(gg, wg):
        torch.testing.assert_close(a, c)
