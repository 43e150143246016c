"""vlfast.ops.ipot / sinkhorn / wra_distance against independent oracles.

The chain of trust:

* IPOT: a plain per-problem numpy (fp64) re-implementation of UNITER's ``model/ot.py``
  written here -- UNITER's layout (T, A, Q are regions x text), no padding (the real
  rows and columns are sliced out, holes in the masks included), no shift of the
  cost -- transposed back to text x regions.  The reference and the C++ driver are
  compared with it problem by problem.
* Sinkhorn: POT's ``ot.sinkhorn(a, b, M, reg=eps, numItermax=n_iters, stopThr=0)`` on
  each problem (and ``method="sinkhorn_log"`` where the scaling domain overflows).
* wra_distance: the reference, a direct fp64 formula (cosine cost x UNITER plan), and
  autograd through the reference with the plan held fixed for the gradient.

A CUDA test (skipped without a GPU) compares the CUDA kernel with the reference,
including a problem too large for shared memory.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import ot  # POT
import pytest
import torch
from torch import Tensor

import vlfast.ops as ops
from vlfast import _dispatch
from vlfast.kernels.ot import reference as ref

CPU_BACKENDS = ("reference", "cpp")
F32_TINY = 1e-30


# ----------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------

def uniter_ipot(C: np.ndarray, beta: float, iteration: int, k: int) -> np.ndarray:
    """UNITER's ``ipot`` on ONE problem without padding, in fp64.

    ``C`` is (m text, n regions).  As in UNITER, sigma (text side, m) starts at 1/m,
    T (n x m) at ones, A = exp(-C^T / beta) (no shift of the cost); each iteration
    Q = A * T, then k times delta = 1 / (n Q sigma), sigma = 1 / (m delta Q); then
    T = diag(delta) Q diag(sigma).  Returns T^T, (m, n).

    UNITER's own code keeps sigma as a row after the first inner step and so only
    runs with k = 1; here sigma is a column again for every inner step (the obvious
    intent, and the issue's semantics).  A problem without a real token or region
    has an all-zero plan (UNITER divides by zero there).
    """
    m, n = C.shape
    if m == 0 or n == 0:
        return np.zeros((m, n))
    sigma = np.full((m, 1), 1.0 / m)
    T = np.ones((n, m))
    A = np.exp(-C.T / beta)
    delta = np.zeros((1, n))
    for _ in range(iteration):
        Q = A * T  # n x m
        for _ in range(k):
            delta = 1.0 / (n * (Q @ sigma).reshape(1, n))
            sigma = (1.0 / (m * (delta @ Q))).reshape(m, 1)
        T = delta.reshape(n, 1) * Q * sigma.reshape(1, m)
    return T.T


def pot_sinkhorn(M: np.ndarray, eps: float, n_iters: int, log: bool = False) -> np.ndarray:
    """POT's Sinkhorn on ONE problem (fp64), uniform marginals, exactly ``n_iters``
    iterations (``stopThr=0``); ``log`` selects POT's log-domain solver."""
    nx, ny = M.shape
    if nx == 0 or ny == 0:
        return np.zeros((nx, ny))
    a = np.full(nx, 1.0 / nx)
    b = np.full(ny, 1.0 / ny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge": expected with few iterations
        return ot.sinkhorn(a, b, M, reg=eps, numItermax=n_iters, stopThr=0,
                           method="sinkhorn_log" if log else "sinkhorn")


# ----------------------------------------------------------------------------------
# Ragged batches
# ----------------------------------------------------------------------------------

# (n_x, n_y, holes): real text tokens, real regions, and whether the real entries are
# scattered (holes in the masks) rather than a prefix.  1-token, 1-region, empty ones.
SPECS = [(13, 17, False), (5, 9, False), (7, 3, True), (1, 17, False), (13, 1, True), (1, 1, True),
         (0, 5, False), (4, 0, True), (0, 0, False), (10, 11, True)]
LX, LY = 13, 17


@dataclass
class Batch:
    cost: Tensor  # (B,Lx,Ly) fp32, garbage on padding
    x_mask: Tensor  # (B,Lx) bool
    y_mask: Tensor  # (B,Ly) bool

    @property
    def joint(self) -> Tensor:
        return self.x_mask[:, :, None] & self.y_mask[:, None, :]

    def real(self, b: int, cost: Optional[Tensor] = None) -> np.ndarray:
        """Problem b's real block (n_x, n_y) in fp64."""
        c = (self.cost if cost is None else cost)[b].double()
        return c[self.x_mask[b]][:, self.y_mask[b]].numpy()

    def embed(self, b: int, block: np.ndarray) -> np.ndarray:
        """A real block back into a zero (Lx, Ly) array."""
        out = np.zeros(tuple(self.cost.shape[1:]))
        out[np.ix_(self.x_mask[b].numpy(), self.y_mask[b].numpy())] = block
        return out


def _mask(n_real: int, length: int, holes: bool, g: torch.Generator) -> Tensor:
    m = torch.zeros(length, dtype=torch.bool)
    if holes:
        m[torch.randperm(length, generator=g)[:n_real]] = True
    else:
        m[:n_real] = True
    return m


def make_batch(specs=SPECS, Lx: int = LX, Ly: int = LY, *, seed: int = 0, lo: float = 0.0, hi: float = 2.0,
               pad: str = "garbage") -> Batch:
    """Uniform real costs in [lo, hi]; padding holds large garbage (``pad="garbage"``),
    NaN/inf (``"nonfinite"``) or zeros."""
    g = torch.Generator().manual_seed(seed)
    xm = torch.stack([_mask(nx, Lx, h, g) for nx, _, h in specs])
    ym = torch.stack([_mask(ny, Ly, h, g) for _, ny, h in specs])
    cost = lo + (hi - lo) * torch.rand(len(specs), Lx, Ly, generator=g)
    joint = xm[:, :, None] & ym[:, None, :]
    if pad == "garbage":
        junk = 1e4 * torch.randn(cost.shape, generator=g)
    elif pad == "nonfinite":
        choice = torch.randint(0, 3, cost.shape, generator=g)
        junk = torch.tensor([float("nan"), float("inf"), float("-inf")])[choice]
    else:
        junk = torch.zeros_like(cost)
    return Batch(torch.where(joint, cost, junk), xm, ym)


def _run(backend: str, fn: Callable, *args, **kw):
    with ops.backend(backend):
        return fn(*args, **kw)


def assert_plans_close(got: Tensor, batch: Batch, oracle: Callable[[np.ndarray], np.ndarray], *, rtol: float,
                       atol_rel: float, what: str = "") -> None:
    """Per problem: |got - oracle| <= atol_rel * max(oracle) + rtol * |oracle|; exactly 0
    on padding and for empty problems."""
    assert got.dtype == torch.float32 and got.shape == batch.cost.shape, (got.dtype, got.shape)
    assert bool((got[~batch.joint] == 0).all()), f"{what}: the plan is not exactly 0 on padding"
    for b in range(got.shape[0]):
        exp = batch.embed(b, oracle(batch.real(b)))
        scale = max(float(np.abs(exp).max()), F32_TINY)
        nx, ny = int(batch.x_mask[b].sum()), int(batch.y_mask[b].sum())
        np.testing.assert_allclose(got[b].double().numpy(), exp, rtol=rtol, atol=atol_rel * scale,
                                   err_msg=f"{what}: problem {b} (n_x={nx}, n_y={ny})")
        if nx == 0 or ny == 0:
            assert bool((got[b] == 0).all()), f"{what}: problem {b} without a real pair has a nonzero plan"


# fp32 kernels vs fp64 oracles: measured errors are ~1e-6 of the plan's largest entry.
IPOT_TOL = dict(rtol=1e-4, atol_rel=2e-5)
SINKHORN_TOL = dict(rtol=1e-4, atol_rel=1e-5)


# ----------------------------------------------------------------------------------
# IPOT vs UNITER
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_iters", [1, 10, 50])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_ipot_matches_uniter(backend, beta, k, n_iters):
    batch = make_batch(seed=n_iters + 10 * k)
    plan = _run(backend, ops.ipot, batch.cost, batch.x_mask, batch.y_mask, beta=beta, n_iters=n_iters, k=k)
    assert_plans_close(plan, batch, lambda C: uniter_ipot(C, beta, n_iters, k), **IPOT_TOL,
                       what=f"{backend} beta={beta} k={k} n_iters={n_iters}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ipot_zero_iterations_is_uniters_initial_plan(backend):
    batch = make_batch(seed=3)
    plan = _run(backend, ops.ipot, batch.cost, batch.x_mask, batch.y_mask, n_iters=0)
    assert torch.equal(plan, batch.joint.float())  # UNITER's T starts at ones (masked)
    assert_plans_close(plan, batch, lambda C: uniter_ipot(C, 0.5, 0, 1), rtol=0, atol_rel=0)


def test_reference_fp64_is_uniter_to_rounding():
    """In fp64 the reference is UNITER's IPOT up to rounding (its cost shift cancels)."""
    batch = make_batch(seed=4)
    c64 = batch.cost.double()
    plan64 = ref.ipot_reference(c64, batch.x_mask, batch.y_mask, beta=0.5, n_iters=50, k=2)
    assert plan64.dtype == torch.float64
    for b in range(len(SPECS)):
        exp = batch.embed(b, uniter_ipot(batch.real(b), 0.5, 50, 2))
        np.testing.assert_allclose(plan64[b].numpy(), exp, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ipot_marginals(backend):
    """The text side (updated last) is exact after any iteration: row sums = 1/n_x.
    The region side converges: column sums ~ 1/n_y after 100 iterations."""
    batch = make_batch([(13, 17, False), (6, 15, True), (13, 8, True), (3, 3, False)], seed=5)
    for n_iters, col_tol in ((1, None), (100, 1e-2)):
        plan = _run(backend, ops.ipot, batch.cost, batch.x_mask, batch.y_mask, beta=0.5, n_iters=n_iters)
        for b in range(plan.shape[0]):
            nx, ny = batch.x_mask[b].sum().item(), batch.y_mask[b].sum().item()
            rows = plan[b].double().sum(1)[batch.x_mask[b]]
            torch.testing.assert_close(rows, torch.full_like(rows, 1 / nx), rtol=2e-5, atol=0)
            assert plan[b].double().sum().item() == pytest.approx(1.0, rel=2e-5)
            if col_tol is not None:
                cols = plan[b].double().sum(0)[batch.y_mask[b]]
                torch.testing.assert_close(cols * ny, torch.ones_like(cols), rtol=0, atol=col_tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ipot_is_invariant_to_a_cost_shift(backend):
    """Large costs do not underflow exp(-cost/beta): the plan of cost + 60 is the plan
    of cost (UNITER's exp(-cost/0.5) underflows fp32 there, exp(-120) < 1e-45).  The
    tolerance covers the fp32 rounding of cost + 60 (~4e-6, /beta)."""
    batch = make_batch(seed=6)
    a = _run(backend, ops.ipot, batch.cost, batch.x_mask, batch.y_mask, beta=0.5, n_iters=20)
    b = _run(backend, ops.ipot, batch.cost + 60.0, batch.x_mask, batch.y_mask, beta=0.5, n_iters=20)
    assert bool(torch.isfinite(b).all())
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ipot_underflow_of_a_whole_row_raises(backend):
    """A text token 30 above every other cost at beta 0.1: exp(-300) is 0 in fp32 for
    its whole row, the plan would be NaN -- reported, not returned."""
    cost = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(0))
    cost[0, 1] += 30.0
    m = (torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(FloatingPointError, match=r"ipot: the plan has non-finite entries.*beta=0.1"):
        _run(backend, ops.ipot, cost, *m, beta=0.1, n_iters=3)
    assert bool(torch.isfinite(_run(backend, ops.ipot, cost, *m, beta=10.0, n_iters=3)).all())


def test_cpp_matches_reference_at_uniter_size():
    """B=16 ragged problems padded to 60 x 100 (zero padding, as UNITER's masked_fill)."""
    specs = [(int(n), int(r), i % 3 == 0) for i, (n, r) in enumerate(zip(
        torch.randint(1, 61, (16,), generator=torch.Generator().manual_seed(1)),
        torch.randint(1, 101, (16,), generator=torch.Generator().manual_seed(2))))]
    batch = make_batch(specs, Lx=60, Ly=100, seed=19, pad="zeros")
    args = (batch.cost, batch.x_mask, batch.y_mask)
    for fn, kw in ((ops.ipot, dict(beta=0.5, n_iters=50)), (ops.ipot, dict(beta=0.1, n_iters=50, k=2)),
                   (ops.sinkhorn, dict(eps=0.1, n_iters=50)), (ops.sinkhorn, dict(eps=0.02, n_iters=50))):
        exp = _run("reference", fn, *args, **kw)
        got = _run("cpp", fn, *args, **kw)
        assert bool((got[~batch.joint] == 0).all())
        for b in range(len(specs)):
            scale = max(exp[b].abs().max().item(), F32_TINY)
            torch.testing.assert_close(got[b], exp[b], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{fn.__name__} {kw} problem {b}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_padding_is_ignored(backend):
    batch = make_batch(seed=7, pad="nonfinite")
    clean = torch.where(batch.joint, batch.cost, torch.zeros_like(batch.cost))
    assert not bool(torch.isfinite(batch.cost).all())
    for fn, kw in ((ops.ipot, dict(n_iters=10)), (ops.sinkhorn, dict(n_iters=10, log_domain=False)),
                   (ops.sinkhorn, dict(n_iters=10, log_domain=True))):
        got = _run(backend, fn, batch.cost, batch.x_mask, batch.y_mask, **kw)
        assert torch.equal(got, _run(backend, fn, clean, batch.x_mask, batch.y_mask, **kw)), (fn.__name__, kw)
        assert bool(torch.isfinite(got).all())
    t = torch.randn(2, 5, 8)
    v = torch.randn(2, 6, 8)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    vm = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    t_bad = t.masked_fill(~tm[:, :, None], float("nan"))
    d = _run(backend, ops.wra_distance, t_bad, v, tm, vm)
    torch.testing.assert_close(d, _run(backend, ops.wra_distance, t, v, tm, vm))


# ----------------------------------------------------------------------------------
# Sinkhorn vs POT
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("log_domain", [None, False, True])
@pytest.mark.parametrize("n_iters", [1, 20])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_sinkhorn_matches_pot(backend, eps, n_iters, log_domain):
    # costs in [0, 2]: range / eps <= 40, both domains representable in fp32
    batch = make_batch(seed=11 + n_iters)
    plan = _run(backend, ops.sinkhorn, batch.cost, batch.x_mask, batch.y_mask, eps=eps, n_iters=n_iters,
                log_domain=log_domain)
    assert_plans_close(plan, batch, lambda M: pot_sinkhorn(M, eps, n_iters), **SINKHORN_TOL,
                       what=f"{backend} eps={eps} n_iters={n_iters} log_domain={log_domain}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_marginals(backend, log_domain):
    """u is updated last: row sums equal a = 1/n_x exactly (up to fp32 rounding) after
    any number of iterations; column sums reach b = 1/n_y once converged."""
    batch = make_batch([(13, 17, False), (6, 15, True), (13, 8, True), (1, 4, False)], seed=12)
    for n_iters, col_tol in ((1, None), (200, 1e-4)):
        plan = _run(backend, ops.sinkhorn, batch.cost, batch.x_mask, batch.y_mask, eps=0.5, n_iters=n_iters,
                    log_domain=log_domain)
        for b in range(plan.shape[0]):
            nx, ny = batch.x_mask[b].sum().item(), batch.y_mask[b].sum().item()
            rows = plan[b].double().sum(1)[batch.x_mask[b]]
            torch.testing.assert_close(rows * nx, torch.ones_like(rows), rtol=0, atol=1e-5)
            if col_tol is not None:
                cols = plan[b].double().sum(0)[batch.y_mask[b]]
                torch.testing.assert_close(cols * ny, torch.ones_like(cols), rtol=0, atol=col_tol)


SMALL_EPS = 0.01  # costs in [0, 5]: range / eps ~ 500, exp(-500) is 0 in fp32 (and fp64's exp(-745))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_iters", [1, 10, 60])
def test_sinkhorn_small_eps_log_domain_matches_pot_log(backend, n_iters):
    batch = make_batch(seed=13, hi=5.0)
    for log_domain in (None, True):
        plan = _run(backend, ops.sinkhorn, batch.cost, batch.x_mask, batch.y_mask, eps=SMALL_EPS, n_iters=n_iters,
                    log_domain=log_domain)
        assert bool(torch.isfinite(plan).all())
        # exp((f + g - C) / eps) turns fp32 rounding of the potentials into ~1e-5 relative errors
        assert_plans_close(plan, batch, lambda M: pot_sinkhorn(M, SMALL_EPS, n_iters, log=True), rtol=1e-3,
                           atol_rel=1e-4, what=f"{backend} eps={SMALL_EPS} log_domain={log_domain}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sinkhorn_small_eps_scaling_domain_raises(backend):
    """Forcing the scaling domain where it overflows fp32 is reported, not returned."""
    batch = make_batch(seed=13, hi=5.0)
    with pytest.raises(FloatingPointError, match=r"sinkhorn: the plan has non-finite entries.*log_domain=True"):
        _run(backend, ops.sinkhorn, batch.cost, batch.x_mask, batch.y_mask, eps=SMALL_EPS, n_iters=10,
             log_domain=False)
    # deterministic: one text token 3 away from everything else (exp(-300) = 0 in fp32)
    cost = torch.rand(1, 4, 5, generator=torch.Generator().manual_seed(1))
    cost[0, 2] += 3.0
    m = (torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(backend, ops.sinkhorn, cost, *m, eps=SMALL_EPS, n_iters=1, log_domain=False)
    assert bool(torch.isfinite(_run(backend, ops.sinkhorn, cost, *m, eps=SMALL_EPS, n_iters=1)).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sinkhorn_auto_domain_is_per_problem(backend):
    """log_domain=None picks the domain per problem by its cost range / eps (> 50: log)."""
    eps = 0.05
    batch = make_batch([(9, 12, False), (7, 10, True), (5, 5, False)], Lx=9, Ly=12, seed=14)
    # problem 1 gets a range of 4 (4 / 0.05 = 80 > 50: log domain); the others stay < 2
    cost = batch.cost.clone()
    cost[1] = cost[1] * 2.0
    real1 = cost[1][batch.joint[1]]
    assert (real1.max() - real1.min()) / eps > ref.LOG_DOMAIN_RANGE
    auto = _run(backend, ops.sinkhorn, cost, batch.x_mask, batch.y_mask, eps=eps, n_iters=15)
    scal = _run(backend, ops.sinkhorn, cost, batch.x_mask, batch.y_mask, eps=eps, n_iters=15, log_domain=False)
    logd = _run(backend, ops.sinkhorn, cost, batch.x_mask, batch.y_mask, eps=eps, n_iters=15, log_domain=True)
    assert torch.equal(auto[0], scal[0]) and torch.equal(auto[2], scal[2])
    assert torch.equal(auto[1], logd[1])


# ----------------------------------------------------------------------------------
# Input dtypes
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cost_dtypes_give_fp32_plans(backend, dtype):
    batch = make_batch(seed=15)
    low = batch.cost.to(dtype)
    as32 = low.float()  # the same values in fp32
    for fn, kw in ((ops.ipot, dict(beta=0.5, n_iters=30)), (ops.sinkhorn, dict(eps=0.1, n_iters=30))):
        got = _run(backend, fn, low, batch.x_mask, batch.y_mask, **kw)
        assert got.dtype == torch.float32 and got.shape == low.shape
        if dtype == torch.float64:  # an fp64 cost may keep fp64 math inside: compare with the oracle
            oracle = (lambda C: uniter_ipot(C, 0.5, 30, 1)) if fn is ops.ipot else (lambda M: pot_sinkhorn(M, 0.1, 30))
            assert_plans_close(got, batch, oracle, **IPOT_TOL, what=f"{fn.__name__} {dtype}")
        else:
            assert torch.equal(got, _run(backend, fn, as32, batch.x_mask, batch.y_mask, **kw)), fn.__name__


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_and_no_gradient(backend):
    """Views (a transposed cost, strided masks) give the plan of their contiguous copies;
    the plan carries no gradient even when the cost requires one."""
    batch = make_batch(seed=20)
    cost_t = batch.cost.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)  # (B,Lx,Ly) view
    xm2 = torch.stack([batch.x_mask, batch.x_mask], dim=2)[:, :, 0]  # stride 2
    assert not cost_t.is_contiguous() and not xm2.is_contiguous()
    for fn, kw in ((ops.ipot, dict(n_iters=10)), (ops.sinkhorn, dict(n_iters=10))):
        got = _run(backend, fn, cost_t, xm2, batch.y_mask, **kw)
        assert not got.requires_grad and got.grad_fn is None
        assert torch.equal(got, _run(backend, fn, batch.cost, batch.x_mask, batch.y_mask, **kw)), fn.__name__


# ----------------------------------------------------------------------------------
# wra_distance
# ----------------------------------------------------------------------------------

E = 16


def make_wra(seed: int = 0, dtype: torch.dtype = torch.float32):
    """5 samples (Lx 9, Ly 12): full, holes, a 1-word one, one without a real word,
    one without a real region."""
    g = torch.Generator().manual_seed(seed)
    specs = [(9, 12, False), (6, 7, True), (1, 5, True), (0, 8, False), (4, 0, False)]
    tm = torch.stack([_mask(n, 9, h, g) for n, _, h in specs])
    vm = torch.stack([_mask(n, 12, h, g) for _, n, h in specs])
    t = torch.randn(len(specs), 9, E, generator=g).to(dtype)
    v = torch.randn(len(specs), 12, E, generator=g).to(dtype)
    return t, v, tm, vm


def _direct_wra(t: Tensor, v: Tensor, tm: Tensor, vm: Tensor, beta: float, n_iters: int, k: int) -> np.ndarray:
    """fp64, per sample: 1 - cos on the real words x real regions, UNITER's plan."""
    out = np.zeros(t.shape[0])
    for b in range(t.shape[0]):
        x = t[b][tm[b]].double().numpy()
        y = v[b][vm[b]].double().numpy()
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-5)
        y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-5)
        C = 1.0 - x @ y.T
        out[b] = float((C * uniter_ipot(C, beta, n_iters, k)).sum())
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("beta,n_iters,k", [(0.5, 50, 1), (0.1, 10, 2)])
def test_wra_distance_matches_reference_and_formula(backend, beta, n_iters, k):
    t, v, tm, vm = make_wra(1)
    d = _run(backend, ops.wra_distance, t, v, tm, vm, beta=beta, n_iters=n_iters, k=k)
    assert d.dtype == torch.float32 and d.shape == (5,)
    r = ref.wra_distance_reference(t, v, tm, vm, beta=beta, n_iters=n_iters, k=k)
    torch.testing.assert_close(d, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.double().numpy(), _direct_wra(t, v, tm, vm, beta, n_iters, k), rtol=1e-5,
                               atol=1e-6)
    assert d[3].item() == 0.0 and d[4].item() == 0.0  # no real word / no real region


def _fixed_plan_grads(t: Tensor, v: Tensor, tm: Tensor, vm: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """d/d(emb) of sum_b w_b * sum(cost(emb) * plan) with the reference plan held fixed."""
    t = t.detach().float().requires_grad_(True)
    v = v.detach().float().requires_grad_(True)
    joint = tm[:, :, None] & vm[:, None, :]
    with torch.no_grad():
        c0 = ref.cosine_cost(t, v).masked_fill(~joint, 0.0)
        plan = ref.ipot_reference(c0, tm, vm, beta=0.5, n_iters=50, k=1)
    cost = ref.cosine_cost(t, v).masked_fill(~joint, 0.0)
    ((cost * plan).sum(dim=(1, 2)) * w).sum().backward()
    return t.grad, v.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wra_distance_gradient_flows_through_the_cost_only(backend):
    t, v, tm, vm = make_wra(2)
    w = torch.randn(5, generator=torch.Generator().manual_seed(9))
    tt, vv = t.clone().requires_grad_(True), v.clone().requires_grad_(True)
    d = _run(backend, ops.wra_distance, tt, vv, tm, vm)
    (d * w).sum().backward()
    gt, gv = _fixed_plan_grads(t, v, tm, vm, w)
    torch.testing.assert_close(tt.grad, gt, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vv.grad, gv, rtol=1e-4, atol=1e-6)
    # samples without a real word / region: distance 0, zero gradient, nothing NaN
    for b in (3, 4):
        assert d[b].item() == 0.0
        assert bool((tt.grad[b] == 0).all()) and bool((vv.grad[b] == 0).all())
    # padded words and regions get no gradient either
    assert bool((tt.grad[~tm] == 0).all()) and bool((vv.grad[~vm] == 0).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wra_distance_low_precision_embeddings(backend, dtype):
    t, v, tm, vm = make_wra(3, dtype)
    tt, vv = t.clone().requires_grad_(True), v.clone().requires_grad_(True)
    d = _run(backend, ops.wra_distance, tt, vv, tm, vm)
    assert d.dtype == torch.float32
    d.sum().backward()
    assert tt.grad.dtype == dtype and vv.grad.dtype == dtype
    # the transport runs in fp32 on the upcast embeddings: the same as fp32 inputs
    t32, v32 = t.float().requires_grad_(True), v.float().requires_grad_(True)
    d32 = _run(backend, ops.wra_distance, t32, v32, tm, vm)
    d32.sum().backward()
    torch.testing.assert_close(d, d32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tt.grad, t32.grad.to(dtype))
    torch.testing.assert_close(vv.grad, v32.grad.to(dtype))


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

def _good():
    b = make_batch([(3, 4, False), (2, 5, True)], Lx=3, Ly=5, seed=16)
    return b.cost, b.x_mask, b.y_mask


BAD_PROBLEMS = [
    ("x_mask shape", lambda c, x, y: (c, x[:, :2], y), r"x_mask: expected shape \(2, 3\), got shape \(2, 2\)"),
    ("y_mask shape", lambda c, x, y: (c, x, y[:1]), r"y_mask: expected shape \(2, 5\), got shape \(1, 5\)"),
    ("y_mask ndim", lambda c, x, y: (c, x, y[:, :, None]), r"y_mask: expected a 2-d tensor"),
    ("x_mask int64", lambda c, x, y: (c, x.long(), y), r"x_mask: expected dtype bool, got int64"),
    ("x_mask uint8", lambda c, x, y: (c, x.to(torch.uint8), y), r"x_mask: expected dtype bool, got uint8"),
    ("y_mask int32", lambda c, x, y: (c, x, y.int()), r"y_mask: expected dtype bool, got int32"),
    ("cost 2-d", lambda c, x, y: (c[0], x, y), r"cost: expected a 3-d tensor \(B,Lx,Ly\), got shape \(3, 5\)"),
    ("cost 4-d", lambda c, x, y: (c[None], x, y), r"cost: expected a 3-d tensor"),
    ("cost int", lambda c, x, y: (c.long(), x, y), r"cost: expected dtype .*float32.*, got int64"),
    ("cost list", lambda c, x, y: (c.tolist(), x, y), r"cost: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("fn", [ops.ipot, ops.sinkhorn], ids=["ipot", "sinkhorn"])
@pytest.mark.parametrize("name,mutate,msg", BAD_PROBLEMS, ids=[b[0] for b in BAD_PROBLEMS])
def test_bad_problem_raises(fn, name, mutate, msg):
    with pytest.raises(ValueError, match=msg):
        fn(*mutate(*_good()))


@pytest.mark.parametrize("kw,msg", [
    (dict(beta=0.0), r"ipot: beta: expected a finite float > 0, got 0.0"),
    (dict(beta=-1.0), r"beta: expected a finite float > 0, got -1.0"),
    (dict(beta=float("nan")), r"beta: expected a finite float > 0, got nan"),
    (dict(beta=float("inf")), r"beta: expected a finite float > 0, got inf"),
    (dict(beta=True), r"beta: expected a finite float > 0, got True"),
    (dict(beta="0.5"), r"beta: expected a finite float > 0, got '0.5'"),
    (dict(n_iters=-1), r"ipot: n_iters: expected an int >= 0, got -1"),
    (dict(n_iters=2.0), r"n_iters: expected an int >= 0, got 2.0"),
    (dict(k=0), r"ipot: k: expected an int >= 1, got 0"),
    (dict(k=1.5), r"k: expected an int >= 1, got 1.5"),
])
def test_bad_ipot_arguments_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ops.ipot(*_good(), **kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(eps=0.0), r"sinkhorn: eps: expected a finite float > 0, got 0.0"),
    (dict(eps=-0.1), r"eps: expected a finite float > 0, got -0.1"),
    (dict(eps=float("nan")), r"eps: expected a finite float > 0, got nan"),
    (dict(n_iters=-3), r"sinkhorn: n_iters: expected an int >= 1, got -3"),
    (dict(n_iters=0), r"sinkhorn: n_iters: expected an int >= 1, got 0"),
    (dict(log_domain=1), r"sinkhorn: log_domain: expected None, True or False, got 1"),
    (dict(log_domain="auto"), r"log_domain: expected None, True or False, got 'auto'"),
    (dict(log_domain=torch.tensor(True)), r"log_domain: expected None, True or False"),
])
def test_bad_sinkhorn_arguments_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ops.sinkhorn(*_good(), **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_cost_on_a_real_pair_raises(bad):
    c, x, y = _good()
    c = c.clone()
    i = int(x[1].nonzero()[0])  # a real pair of problem 1 (its masks have holes)
    j = int(y[1].nonzero()[0])
    c[1, i, j] = bad
    for fn in (ops.ipot, ops.sinkhorn):
        with pytest.raises(ValueError, match=rf"cost: expected finite values on real \(text, region\) pairs, "
                                             rf"got {bad} at \[1, "):
            fn(c, x, y)
    t, v, tm, vm = make_wra(4)
    t = t.clone()
    t[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"wra_distance: txt_emb/img_emb \(their cosine cost\): expected finite"):
        ops.wra_distance(t, v, tm, vm)


def test_bad_wra_inputs_raise():
    t, v, tm, vm = make_wra(5)
    cases = [
        ((t[0], v, tm, vm), r"wra_distance: txt_emb: expected a 3-d tensor \(B,Lx,E\)"),
        ((t, v[..., :-1], tm, vm), r"wra_distance: img_emb: expected shape \(B=5, Ly, E=16\), got shape"),
        ((t, v[:4], tm, vm), r"img_emb: expected shape \(B=5, Ly, E=16\)"),
        ((t.long(), v, tm, vm), r"txt_emb: expected dtype"),
        ((t, v, tm[:, :-1], vm), r"wra_distance: txt_mask: expected shape \(5, 9\), got shape \(5, 8\)"),
        ((t, v, tm, vm.to(torch.uint8)), r"wra_distance: img_mask: expected dtype bool, got uint8"),
        ((t, v, tm.long(), vm), r"txt_mask: expected dtype bool, got int64"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ops.wra_distance(*args)
    with pytest.raises(ValueError, match=r"wra_distance: beta: expected a finite float > 0"):
        ops.wra_distance(t, v, tm, vm, beta=0)
    with pytest.raises(ValueError, match=r"wra_distance: k: expected an int >= 1"):
        ops.wra_distance(t, v, tm, vm, k=0)
    with pytest.raises(ValueError, match=r"wra_distance: n_iters: expected an int >= 0"):
        ops.wra_distance(t, v, tm, vm, n_iters=-1)


# ----------------------------------------------------------------------------------
# Custom ops, torch.compile, dispatch
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    batch = make_batch(seed=17, pad="zeros")
    args = (batch.cost, batch.x_mask, batch.y_mask)
    torch.library.opcheck(torch.ops.vlfast.ipot.default, (*args, 0.5, 5, 2, backend))
    for log_mode in (-1, 0, 1):
        torch.library.opcheck(torch.ops.vlfast.sinkhorn.default, (*args, 0.1, 5, log_mode, backend))


def test_compile_fullgraph_aot_eager():
    t, v, tm, vm = make_wra(6)
    w = torch.randn(5, generator=torch.Generator().manual_seed(1))

    def fn(t: Tensor, v: Tensor) -> Tensor:
        return (ops.wra_distance(t, v, tm, vm, beta=0.5, n_iters=20) * w).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")

    def run(f):
        tt, vv = t.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = f(tt, vv)
        out.backward()
        return out.detach(), tt.grad, vv.grad

    for got, exp in zip(run(compiled), run(fn)):
        torch.testing.assert_close(got, exp)


def test_auto_on_cpu_picks_cpp():
    mod, why = _dispatch.cpp_extension()
    assert mod is not None, f"vlfast._C is part of the install: {why}"
    for op in ("ipot", "sinkhorn"):
        assert _dispatch.select(op, "cpu", "auto") == "cpp", dict(_dispatch.explain(op, "cpu"))


def test_forcing_cuda_on_cpu_lists_every_backend():
    c, x, y = _good()
    for fn in (ops.ipot, ops.sinkhorn):
        with ops.backend("cuda"), pytest.raises(_dispatch.BackendError) as ei:
            fn(c, x, y)
        msg = str(ei.value)
        assert f"vlfast.ops.{fn.__name__}: backend 'cuda' cannot run on cpu tensors" in msg
        for b in _dispatch.BACKENDS:
            assert f"  {b}" in msg, (b, msg)


def test_empty_batch_and_zero_length():
    for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        c = torch.rand(shape)
        x = torch.ones(shape[:2], dtype=torch.bool)
        y = torch.ones(shape[0], shape[2], dtype=torch.bool)
        for fn in (ops.ipot, ops.sinkhorn):
            p = fn(c, x, y)
            assert p.shape == shape and p.dtype == torch.float32


# ----------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_reference_including_global_memory_path():
    # problem 0 (300 x 400 fp32: 480 KB per tile) cannot live in shared memory
    specs = [(300, 400, False), (57, 91, True), (1, 100, False), (60, 1, True), (0, 10, False), (20, 0, True),
             (33, 77, False)]
    batch = make_batch(specs, Lx=300, Ly=400, seed=18, pad="nonfinite")
    args = (batch.cost, batch.x_mask, batch.y_mask)
    cuda_args = tuple(a.cuda() for a in args)
    assert _dispatch.select("ipot", "cuda", "auto") == "cuda"
    cases = [(ops.ipot, dict(beta=0.5, n_iters=50, k=1)), (ops.ipot, dict(beta=0.1, n_iters=10, k=2)),
             (ops.sinkhorn, dict(eps=0.1, n_iters=50, log_domain=False)),
             (ops.sinkhorn, dict(eps=0.1, n_iters=50, log_domain=True)),
             (ops.sinkhorn, dict(eps=0.1, n_iters=50))]
    for fn, kw in cases:
        exp = _run("reference", fn, *args, **kw)
        got = _run("cuda", fn, *cuda_args, **kw)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        got = got.cpu()
        assert bool((got[~batch.joint] == 0).all()), (fn.__name__, kw)
        for b in range(len(specs)):
            scale = max(exp[b].abs().max().item(), F32_TINY)
            torch.testing.assert_close(got[b], exp[b], rtol=1e-4, atol=2e-5 * scale, msg=f"{fn.__name__} {kw} {b}")
    t, v, tm, vm = make_wra(7)
    d = _run("cuda", ops.wra_distance, t.cuda(), v.cuda(), tm.cuda(), vm.cuda())
    torch.testing.assert_close(d.cpu(), ref.wra_distance_reference(t, v, tm, vm), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nonfinite_check_only_with_vlfast_check(monkeypatch):
    c, x, y = (a.cuda() for a in _good())
    c = c.clone()
    c[0, 0, 0] = float("nan")
    monkeypatch.delenv("VLFAST_CHECK", raising=False)
    ops.ipot(c, x, y)  # no host sync, no check
    torch.cuda.synchronize()
    monkeypatch.setenv("VLFAST_CHECK", "1")
    with pytest.raises(ValueError, match=r"cost: expected finite values on real"):
        ops.ipot(c, x, y)
    with pytest.raises(ValueError, match=r"cost: expected finite values on real"):
        ops.sinkhorn(c, x, y)
    batch = make_batch(seed=13, hi=5.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        ops.sinkhorn(batch.cost.cuda(), batch.x_mask.cuda(), batch.y_mask.cuda(), eps=SMALL_EPS, n_iters=10,
                     log_domain=False)
