"""Optimal-transport ops for word-region alignment: custom ops, dispatch and the
public functions ``ipot``, ``sinkhorn`` and ``wra_distance``.

Custom ops (no autograd: plans are computed without gradient, as in UNITER):

* ``vlfast::ipot(cost, x_mask, y_mask, beta, n_iters, k, backend) -> plan``
* ``vlfast::sinkhorn(cost, x_mask, y_mask, eps, n_iters, log_mode, backend) -> plan``
  (``log_mode``: -1 = per problem by cost range, 0 = scaling domain, 1 = log domain)

Backends: ``cuda`` (one launch for the whole batch: a thread block per problem,
``csrc/ot``), ``cpp`` (the C++ driver calling the same ``__host__ __device__`` row and
column updates, OpenMP over the batch) and ``reference`` (eager PyTorch).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.ot import reference as ref

_FLOATS = C.FLOAT_DTYPES


def _has(name: str) -> Optional[str]:
    mod, why = _dispatch.cpp_extension()
    if mod is None:
        return why
    if not hasattr(mod, name):
        return f"vlfast._C has no {name} (an old build? reinstall with `pip install .`)"
    return None


def _check_cpp(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_cpp(device_type) or _has("ipot_cpu")


def _check_cuda(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_cuda(device_type) or _has("ipot_cuda")


for _op in ("ipot", "sinkhorn"):
    _dispatch.register_op(_op, cuda_order=("cuda",), cpu_order=("cpp",),
                          checks={"reference": _dispatch.check_reference, "cpp": _check_cpp, "cuda": _check_cuda})


def _ext():
    return _dispatch.cpp_extension()[0]


def _c_inputs(cost: Tensor, x_mask: Tensor, y_mask: Tensor):
    """fp32 contiguous cost, uint8 contiguous masks, and a zeroed fp32 plan."""
    c = cost.to(torch.float32).contiguous()
    xm = x_mask.contiguous().view(torch.uint8)
    ym = y_mask.contiguous().view(torch.uint8)
    plan = torch.empty(c.shape, dtype=torch.float32, device=c.device)
    return c, xm, ym, plan


def _workspace(solver: str, cost: Tensor) -> tuple[Optional[Tensor], int]:
    """Global-memory tiles for problems whose tiles do not fit in shared memory."""
    B, Lx, Ly = cost.shape
    n = int(_ext().ot_workspace_floats(solver, B, Lx, Ly, cost.device.index or 0))
    if n == 0:
        return None, 0
    ws = torch.empty(n, dtype=torch.float32, device=cost.device)
    return ws, ws.data_ptr()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_plan(op: str, plan: Tensor, what: str) -> None:
    if C.value_checks_enabled(plan) and not bool(torch.isfinite(plan).all()):
        raise FloatingPointError(
            f"vlfast.ops.{op}: the plan has non-finite entries: {what}")


# ----------------------------------------------------------------------------------
# IPOT
# ----------------------------------------------------------------------------------

@torch.library.custom_op("vlfast::ipot", mutates_args=())
def ipot_op(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float, n_iters: int, k: int,
            backend: str) -> Tensor:
    b = _dispatch.select("ipot", cost.device.type, requested=backend)
    _check_finite_cost("ipot", cost, x_mask, y_mask)
    if cost.numel() == 0:
        return torch.zeros(cost.shape, dtype=torch.float32, device=cost.device)
    if b == "reference":
        plan = ref.ipot_reference(cost, x_mask, y_mask, beta=beta, n_iters=n_iters, k=k).to(torch.float32)
    else:
        c, xm, ym, plan = _c_inputs(cost, x_mask, y_mask)
        B, Lx, Ly = c.shape
        if b == "cpp":
            _ext().ipot_cpu(c.data_ptr(), xm.data_ptr(), ym.data_ptr(), plan.data_ptr(), B, Lx, Ly, float(beta),
                            int(n_iters), int(k))
        else:
            ws, ws_ptr = _workspace("ipot", c)
            _ext().ipot_cuda(c.data_ptr(), xm.data_ptr(), ym.data_ptr(), plan.data_ptr(), ws_ptr, B, Lx, Ly,
                             float(beta), int(n_iters), int(k), _stream(c))
    _check_plan("ipot", plan, f"exp(-(cost - min cost)/beta) underflowed for a whole row or column of a problem "
                              f"(beta={beta}); increase beta or rescale the cost")
    return plan


@ipot_op.register_fake
def _(cost, x_mask, y_mask, beta, n_iters, k, backend):
    return cost.new_empty(cost.shape, dtype=torch.float32)


@torch.library.custom_op("vlfast::sinkhorn", mutates_args=())
def sinkhorn_op(cost: Tensor, x_mask: Tensor, y_mask: Tensor, eps: float, n_iters: int, log_mode: int,
                backend: str) -> Tensor:
    b = _dispatch.select("sinkhorn", cost.device.type, requested=backend)
    _check_finite_cost("sinkhorn", cost, x_mask, y_mask)
    if cost.numel() == 0:
        return torch.zeros(cost.shape, dtype=torch.float32, device=cost.device)
    if b == "reference":
        ld = None if log_mode < 0 else bool(log_mode)
        plan = ref.sinkhorn_reference(cost, x_mask, y_mask, eps=eps, n_iters=n_iters, log_domain=ld)
        plan = plan.to(torch.float32)
    else:
        c, xm, ym, plan = _c_inputs(cost, x_mask, y_mask)
        B, Lx, Ly = c.shape
        if b == "cpp":
            _ext().sinkhorn_cpu(c.data_ptr(), xm.data_ptr(), ym.data_ptr(), plan.data_ptr(), B, Lx, Ly, float(eps),
                                int(n_iters), int(log_mode))
        else:
            ws, ws_ptr = _workspace("sinkhorn", c)
            _ext().sinkhorn_cuda(c.data_ptr(), xm.data_ptr(), ym.data_ptr(), plan.data_ptr(), ws_ptr, B, Lx, Ly,
                                 float(eps), int(n_iters), int(log_mode), _stream(c))
    _check_plan("sinkhorn", plan, f"the scaling vectors over- or underflowed (eps={eps}); use log_domain=True")
    return plan


@sinkhorn_op.register_fake
def _(cost, x_mask, y_mask, eps, n_iters, log_mode, backend):
    return cost.new_empty(cost.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------

def _check_problem(op: str, cost: Tensor, x_mask: Tensor, y_mask: Tensor, cost_name: str = "cost",
                   xn: str = "x_mask", yn: str = "y_mask") -> None:
    C.check_tensor(op, cost_name, cost, ndim=3, shape_doc="(B,Lx,Ly)", dtypes=_FLOATS)
    B, Lx, Ly = cost.shape
    for name, m, want in ((xn, x_mask, (B, Lx)), (yn, y_mask, (B, Ly))):
        C.check_tensor(op, name, m, ndim=2, shape_doc=f"(B={want[0]}, {want[1]})", dtypes=(torch.bool,))
        if tuple(m.shape) != want:
            C.fail(op, name, f"shape {want}", f"shape {tuple(m.shape)}")
        if m.device != cost.device:
            C.fail(op, name, f"the device of {cost_name} ({cost.device})", m.device)


def _check_finite_cost(op: str, cost: Tensor, x_mask: Tensor, y_mask: Tensor, name: str = "cost") -> None:
    """Non-finite costs on real pairs are an error (always on CPU, on CUDA with
    VLFAST_CHECK=1: the check costs a host sync).  Padding may hold anything.  Runs
    inside the custom ops, so it also guards compiled graphs."""
    if not C.value_checks_enabled(cost):
        return
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    bad = joint & ~torch.isfinite(cost)
    if bool(bad.any()):
        b, i, j = (int(t) for t in bad.nonzero()[0])
        C.fail(op, name, "finite values on real (text, region) pairs",
               f"{float(cost[b, i, j])} at [{b}, {i}, {j}] ({int(bad.sum())} non-finite entries)")


def _check_pos(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or float(value) <= 0:
        C.fail(op, name, "a finite float > 0", repr(value))
    return float(value)


def _check_int(op: str, name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        C.fail(op, name, f"an int >= {lo}", repr(value))
    return int(value)


@C.autocast_op("fp32")
def ipot(cost: Tensor, x_mask: Tensor, y_mask: Tensor, *, beta: float = 0.5, n_iters: int = 50,
         k: int = 1) -> Tensor:
    """Inexact proximal-point optimal transport (IPOT) with UNITER's semantics.

    Args:
        cost: (B,Lx,Ly) transport cost, x = text, y = regions; any float dtype.
        x_mask: (B,Lx) bool, True = real token.  y_mask: (B,Ly) bool, True = real region.
        beta: proximal step (> 0); A = exp(-cost/beta).
        n_iters: outer iterations (>= 0); k: inner scaling iterations (>= 1).
    Returns:
        plan (B,Lx,Ly) fp32, exactly 0 on padding; all 0 for a problem without a real
        token or region.  (UNITER's own ``ipot`` takes padding masks and returns the
        transpose.)  The plan carries no gradient.
    """
    op = "ipot"
    _check_problem(op, cost, x_mask, y_mask)
    beta = _check_pos(op, "beta", beta)
    n_iters = _check_int(op, "n_iters", n_iters, 0)
    k = _check_int(op, "k", k, 1)
    return ipot_op(cost.detach(), x_mask, y_mask, beta, n_iters, k, _dispatch.requested_backend())


@C.autocast_op("fp32")
def sinkhorn(cost: Tensor, x_mask: Tensor, y_mask: Tensor, *, eps: float = 0.1, n_iters: int = 100,
             log_domain: Optional[bool] = None) -> Tensor:
    """Entropic OT (Sinkhorn-Knopp) with uniform marginals over the real entries.

    K = exp(-cost/eps) (the cost is not normalised), exactly ``n_iters`` (>= 1) iterations in
    POT's order (v then u), like ``ot.sinkhorn(a, b, M, reg=eps, numItermax=n_iters,
    stopThr=0)`` on each problem.  ``log_domain``: True / False forces the variant;
    None uses the log domain for each problem whose cost range / eps exceeds 50.

    Shapes as :func:`ipot`; returns the plan (B,Lx,Ly) fp32, without gradient.
    """
    op = "sinkhorn"
    _check_problem(op, cost, x_mask, y_mask)
    eps = _check_pos(op, "eps", eps)
    n_iters = _check_int(op, "n_iters", n_iters, 1)
    if log_domain is not None and not isinstance(log_domain, bool):
        C.fail(op, "log_domain", "None, True or False", repr(log_domain))
    mode = -1 if log_domain is None else int(log_domain)
    return sinkhorn_op(cost.detach(), x_mask, y_mask, eps, n_iters, mode, _dispatch.requested_backend())


@C.autocast_op("fp32")
def wra_distance(txt_emb: Tensor, img_emb: Tensor, txt_mask: Tensor, img_mask: Tensor, *, beta: float = 0.5,
                 n_iters: int = 50, k: int = 1) -> Tensor:
    """UNITER's word-region alignment distance.

    Args:
        txt_emb: (B,Lx,E) word states; img_emb: (B,Ly,E) region states (fp32/fp16/bf16).
        txt_mask: (B,Lx) bool; img_mask: (B,Ly) bool; True = real.
    Returns:
        (B,) fp32: sum(cost * plan) with cost = 1 - cosine similarity (0 on padding)
        and plan = IPOT(cost) computed without gradient, so the gradient flows through
        the cost only (as in UNITER).  0 for a sample with no real word or region.
    """
    op = "wra_distance"
    C.check_tensor(op, "txt_emb", txt_emb, ndim=3, shape_doc="(B,Lx,E)", dtypes=_FLOATS)
    C.check_tensor(op, "img_emb", img_emb, ndim=3, shape_doc="(B,Ly,E)", dtypes=_FLOATS)
    if img_emb.device != txt_emb.device:
        C.fail(op, "img_emb", f"the device of txt_emb ({txt_emb.device})", img_emb.device)
    B, Lx, E = txt_emb.shape
    if img_emb.shape[0] != B or img_emb.shape[2] != E:
        C.fail(op, "img_emb", f"shape (B={B}, Ly, E={E})", f"shape {tuple(img_emb.shape)}")
    beta = _check_pos(op, "beta", beta)
    n_iters = _check_int(op, "n_iters", n_iters, 0)
    k = _check_int(op, "k", k, 1)
    cost = ref.cosine_cost(txt_emb, img_emb).float()
    _check_problem(op, cost, txt_mask, img_mask, "cost", "txt_mask", "img_mask")
    joint = txt_mask[:, :, None] & img_mask[:, None, :]
    cost = cost.masked_fill(~joint, 0.0)
    if not torch.compiler.is_compiling():  # (the op checks again, in its own terms)
        _check_finite_cost(op, cost, txt_mask, img_mask, "txt_emb/img_emb (their cosine cost)")
    plan = ipot_op(cost.detach(), txt_mask, img_mask, beta, n_iters, k, _dispatch.requested_backend())
    return (cost * plan).sum(dim=(1, 2))
