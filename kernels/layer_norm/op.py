"""LayerNorm and dropout + residual + LayerNorm: custom ops, autograd, dispatch and the
public functions ``layer_norm``, ``dropout_add_layer_norm`` and
``dropout_add_layer_norm_keep_mask``.

Custom ops (opaque to torch.compile, checked by ``torch.library.opcheck``), on rows
(N, E) -- the public functions flatten the leading dims:

* ``vlfast::layer_norm_fwd(x, weight, bias, eps, out_dtype, backend) -> (out, mean, rstd)``
* ``vlfast::layer_norm_bwd(dout, x, weight, bias, mean, rstd, backend) -> (dx, dweight, dbias)``
* ``vlfast::dropout_add_layer_norm_fwd(x, residual, weight, bias, dropout_p, eps, seed, offset, out_dtype,
  backend) -> (out, prenorm, mean, rstd)``
* ``vlfast::dropout_add_layer_norm_bwd(dout, dprenorm?, prenorm, weight, bias, mean, rstd, dropout_p, seed,
  offset, x_dtype, backend) -> (dsum, dx, dweight, dbias)``: ``dsum`` is the gradient
  of the pre-norm sum (= the residual's), ``dx = dsum * keep / (1 - p)`` (an empty
  tensor when ``dropout_p == 0``: then dx is dsum).  The backward normalises the saved
  ``prenorm`` with the saved mean/rstd: nothing of the sum is recomputed.

``backend`` is the requested backend at the forward; the backward gets the same
request, so it runs where the forward ran.  On the ``reference`` backend the public
functions evaluate ``reference.py`` under torch's own autograd (no custom op): on CPU
that is exactly the plain-torch code and as fast.

Dtypes: outside autocast, x, residual, weight and bias may differ: the pre-norm sum
has the promoted dtype of x and residual, the output the dtype of the normalised
input.  Under autocast the ops' autocast rule (:func:`vlfast.kernels._common.autocast_op`)
first casts every float input to the autocast dtype, so the output is in it (on CPU and
CUDA alike; torch's own CUDA autocast would upcast ``layer_norm`` to fp32, flash-attn's
and apex's fused LayerNorms keep the autocast dtype, as here) and the statistics stay
fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.dropout_mask import keep_mask as _keep_mask
from vlfast.kernels.layer_norm import reference as ref

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HIDDEN = 16384


def _check_triton_inputs(device_type: str, hidden: int = 768, dtypes: tuple = (torch.float32,),
                         **_: object) -> Optional[str]:
    why = _dispatch.check_triton(device_type)
    if why is not None:
        return why
    bad = [d for d in dtypes if d not in TRITON_DTYPES]
    if bad:
        return (f"the Triton kernel takes fp16/bf16/fp32, inputs include "
                f"{', '.join(sorted({str(d).replace('torch.', '') for d in bad}))}")
    if hidden > MAX_TRITON_HIDDEN:
        return f"the Triton kernel keeps a row in registers: hidden size up to {MAX_TRITON_HIDDEN}, got {hidden}"
    return None


for _op in ("layer_norm", "dropout_add_layer_norm"):
    _dispatch.register_op(_op, cuda_order=("triton",), cpu_order=(),
                          checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def _triton():
    from vlfast.kernels.layer_norm import triton as tk  # imported on first use (TRITON_INTERPRET)
    return tk


def _resolve(op: str, backend: str, *tensors: Tensor) -> str:
    return _dispatch.select(op, tensors[0].device.type, requested=backend, hidden=tensors[0].shape[-1],
                            dtypes=tuple(t.dtype for t in tensors))


def use_reference(requested: str, device_type: str) -> bool:
    """Whether a public function evaluates the reference directly (torch autograd, no
    custom op): the reference is forced, or ``auto`` on a non-CUDA device (where auto
    never picks Triton).  Decided without probing backends, so torch.compile can trace
    it; every other request goes to the custom op, which resolves it (and raises
    :class:`~vlfast._dispatch.BackendError` when a forced backend cannot run)."""
    return requested == "reference" or (requested == "auto" and device_type != "cuda")


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:1], dtype=ref.stats_dtype(x.dtype))


# ----------------------------------------------------------------------------------
# layer_norm
# ----------------------------------------------------------------------------------

@torch.library.custom_op("vlfast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    b = _resolve("layer_norm", backend, x, weight, bias)
    if b == "triton":
        out, _, mean, rstd = _triton().forward(x.contiguous(), None, weight.contiguous(), bias.contiguous(), eps,
                                               0.0, 0, 0, out_dtype)
        return out, mean, rstd
    out = ref.layer_norm(x, weight, bias, eps).to(out_dtype).contiguous()
    mean, rstd = ref.layer_norm_stats(x, eps)
    return out, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


@torch.library.custom_op("vlfast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    b = _resolve("layer_norm", backend, x, weight, bias)
    if b == "triton":
        dx, _, dw, db = _triton().backward(dout.contiguous(), None, x.contiguous(), weight.contiguous(), mean, rstd,
                                           0.0, 0, 0, x.dtype, None, bias.dtype)
        return dx, dw, db
    dx, dw, db = ref.layer_norm_backward(dout, x, weight, mean, rstd)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype), db.to(bias.dtype)


@layer_norm_bwd.register_fake
def _(dout, x, weight, bias, mean, rstd, backend):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, out_dtype, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.backend = backend


def _ln_backward(ctx, dout, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dout, x, weight, bias, mean, rstd, ctx.backend)
    return dx, dw, db, None, None, None


layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


# ----------------------------------------------------------------------------------
# dropout_add_layer_norm
# ----------------------------------------------------------------------------------

def dropout_add_layer_norm_keep_mask(shape: tuple[int, ...] | torch.Size, dropout_p: float, seed: int,
                                     offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Keep-mask (..., E) bool that ``dropout_add_layer_norm`` with this seed/offset applies
    to ``x`` of ``shape``: element i in C order uses Philox counter ``offset + i``."""
    return _keep_mask(tuple(shape), dropout_p, seed, offset, device=device)


@torch.library.custom_op("vlfast::dropout_add_layer_norm_fwd", mutates_args=())
def dropout_add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, dropout_p: float,
                               eps: float, seed: int, offset: int, out_dtype: torch.dtype,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = _resolve("dropout_add_layer_norm", backend, x, residual, weight, bias)
    if b == "triton":
        out, pre, mean, rstd = _triton().forward(x.contiguous(), residual.contiguous(), weight.contiguous(),
                                                 bias.contiguous(), eps, dropout_p, seed, offset, out_dtype)
        return out, pre, mean, rstd
    keep = dropout_add_layer_norm_keep_mask(x.shape, dropout_p, seed, offset, x.device) if dropout_p > 0 else None
    out, pre = ref.dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p, keep)
    mean, rstd = ref.layer_norm_stats(pre, eps)
    return out.to(out_dtype).contiguous(), pre.contiguous(), mean, rstd


@dropout_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, dropout_p, eps, seed, offset, out_dtype, backend):
    pre = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=out_dtype), pre, _stats_like(pre), _stats_like(pre)


@torch.library.custom_op("vlfast::dropout_add_layer_norm_bwd", mutates_args=())
def dropout_add_layer_norm_bwd(dout: Tensor, dprenorm: Optional[Tensor], prenorm: Tensor, weight: Tensor,
                               bias: Tensor, mean: Tensor, rstd: Tensor, dropout_p: float, seed: int, offset: int,
                               x_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = _resolve("dropout_add_layer_norm", backend, prenorm, weight, bias)
    if b == "triton":
        dsum, dxd, dw, db = _triton().backward(
            dout.contiguous(), None if dprenorm is None else dprenorm.contiguous(), prenorm.contiguous(),
            weight.contiguous(), mean, rstd, dropout_p, seed, offset, prenorm.dtype, x_dtype, bias.dtype)
        return dsum, (dxd if dxd is not None else prenorm.new_empty((0,), dtype=x_dtype)), dw, db
    dsum, dw, db = ref.layer_norm_backward(dout, prenorm, weight, mean, rstd, dprenorm)
    if dropout_p > 0:
        keep = dropout_add_layer_norm_keep_mask(prenorm.shape, dropout_p, seed, offset, prenorm.device)
        dxd = (dsum * keep / (1.0 - dropout_p)).to(x_dtype).contiguous()
    else:
        dxd = prenorm.new_empty((0,), dtype=x_dtype)
    return dsum.to(prenorm.dtype).contiguous(), dxd, dw.to(weight.dtype), db.to(bias.dtype)


@dropout_add_layer_norm_bwd.register_fake
def _(dout, dprenorm, prenorm, weight, bias, mean, rstd, dropout_p, seed, offset, x_dtype, backend):
    dxd = prenorm.new_empty(prenorm.shape if dropout_p > 0 else (0,), dtype=x_dtype)
    return torch.empty_like(prenorm), dxd, torch.empty_like(weight), torch.empty_like(bias)


def _dal_setup(ctx, inputs, output):
    x, residual, weight, bias, dropout_p, eps, seed, offset, out_dtype, backend = inputs
    out, pre, mean, rstd = output
    ctx.save_for_backward(pre, weight, bias, mean, rstd)
    ctx.args = (dropout_p, seed, offset, x.dtype, residual.dtype, out_dtype, backend)


def _dal_backward(ctx, dout, dpre, dmean, drstd):
    pre, weight, bias, mean, rstd = ctx.saved_tensors
    dropout_p, seed, offset, x_dtype, res_dtype, out_dtype, backend = ctx.args
    if dout is None:  # only the pre-norm sum was used
        dout = torch.zeros_like(pre, dtype=out_dtype)
    dsum, dxd, dw, db = dropout_add_layer_norm_bwd(dout, dpre, pre, weight, bias, mean, rstd, dropout_p, seed,
                                                   offset, x_dtype, backend)
    dx = dxd if dropout_p > 0 else dsum.to(x_dtype)
    return dx, dsum.to(res_dtype), dw, db, None, None, None, None, None, None


dropout_add_layer_norm_fwd.register_autograd(_dal_backward, setup_context=_dal_setup)


# ----------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------

def _check_eps(op: str, eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(float(eps)) or eps < 0:
        C.fail(op, "eps", "a finite float >= 0", repr(eps))
    return float(eps)


def _check_affine(op: str, x: Tensor, weight: Tensor, bias: Tensor) -> int:
    """x (..., E) with E >= 1; weight, bias (E,) on x's device; floating dtypes. Returns E."""
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        C.fail(op, "x", "a tensor (..., E) with E >= 1", f"shape {tuple(x.shape)}")
    E = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        C.check_tensor(op, name, t, dtypes=C.FLOAT_DTYPES)
        if tuple(t.shape) != (E,):
            C.fail(op, name, f"shape (E={E},) to match x {tuple(x.shape)}", f"shape {tuple(t.shape)}")
        if t.device != x.device:
            C.fail(op, name, f"the device of x ({x.device})", t.device)
    return E


@C.autocast_op()
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, *, eps: float = 1e-12) -> Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: (..., E), any leading shape; fp16/bf16/fp32 (fp64 runs on the reference).
        weight, bias: (E,).
        eps: added to the (biased) variance.
    Returns:
        (..., E) in x's dtype (the autocast dtype under autocast).
    Statistics are fp32; the backward gives x, weight and bias gradients
    (deterministic: per-program partial sums, then a fixed-order reduction).
    """
    op = "layer_norm"
    E = _check_affine(op, x, weight, bias)
    eps = _check_eps(op, eps)
    requested = _dispatch.requested_backend()
    if use_reference(requested, x.device.type):
        return ref.layer_norm(x, weight, bias, eps)
    out, _, _ = layer_norm_fwd(x.reshape(-1, E), weight, bias, eps, x.dtype,
                               requested)
    return out.view(x.shape)


@C.autocast_op()
def dropout_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, *, dropout_p: float = 0.0,
                           eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """``prenorm = dropout(x) + residual``; ``out = LayerNorm(prenorm)`` -- BERT's
    ``LayerNorm(dropout(dense(h)) + residual)`` in one pass.

    Args:
        x: (..., E) (the dense layer's output); residual: (..., E), same shape.
        weight, bias: (E,) LayerNorm affine parameters.
        dropout_p: drop probability on x (Philox seeded from torch's generator; element
            i in C order uses counter i, see :func:`dropout_add_layer_norm_keep_mask`).
        eps: added to the variance.
    Returns:
        (out, prenorm): both (..., E); prenorm in the promoted dtype of x and residual,
        out in prenorm's dtype (both the autocast dtype under autocast).  The backward reads the
        saved prenorm and fp32 mean/rstd (no recompute of the sum) and gives x,
        residual, weight and bias gradients; a gradient into prenorm is added.
    """
    op = "dropout_add_layer_norm"
    E = _check_affine(op, x, weight, bias)
    C.check_tensor(op, "residual", residual, dtypes=C.FLOAT_DTYPES)
    if residual.shape != x.shape:
        C.fail(op, "residual", f"the shape of x {tuple(x.shape)}", f"shape {tuple(residual.shape)}")
    if residual.device != x.device:
        C.fail(op, "residual", f"the device of x ({x.device})", residual.device)
    p = C.check_dropout(op, dropout_p)
    eps = _check_eps(op, eps)
    seed = C.draw_seed() if p > 0 else 0
    requested = _dispatch.requested_backend()
    if use_reference(requested, x.device.type):
        keep = dropout_add_layer_norm_keep_mask(x.shape, p, seed, 0, x.device) if p > 0 else None
        return ref.dropout_add_layer_norm(x, residual, weight, bias, eps, p, keep)
    pre_dtype = torch.promote_types(x.dtype, residual.dtype)
    out, pre, _, _ = dropout_add_layer_norm_fwd(x.reshape(-1, E), residual.reshape(-1, E), weight, bias, p, eps,
                                                seed, 0, pre_dtype, requested)
    return out.view(x.shape), pre.view(x.shape)
