"""Bias + erf GELU: custom ops, autograd, dispatch and the public ``bias_gelu``.

Custom ops (opaque to torch.compile, checked by ``torch.library.opcheck``), on rows
(N, E) -- the public function flattens the leading dims:

* ``vlfast::bias_gelu_fwd(x, bias, backend) -> out``
* ``vlfast::bias_gelu_bwd(dout, x, bias, backend) -> (dx, dbias)``: recomputes
  ``x + bias`` (the forward saves only its inputs); dbias sums dx over the rows.

``backend`` is the requested backend at the forward; the backward gets the same
request.  On the ``reference`` backend ``bias_gelu`` evaluates ``F.gelu(x + bias)``
under torch's own autograd (no custom op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.bias_gelu import reference as ref
from vlfast.kernels.layer_norm.op import use_reference

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_triton_inputs(device_type: str, dtypes: tuple = (torch.float32,), **_: object) -> Optional[str]:
    why = _dispatch.check_triton(device_type)
    if why is not None:
        return why
    bad = [d for d in dtypes if d not in TRITON_DTYPES]
    if bad:
        return (f"the Triton kernel takes fp16/bf16/fp32, inputs include "
                f"{', '.join(sorted({str(d).replace('torch.', '') for d in bad}))}")
    return None


_dispatch.register_op("bias_gelu", cuda_order=("triton",), cpu_order=(),
                      checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def _triton():
    from vlfast.kernels.bias_gelu import triton as tk  # imported on first use (TRITON_INTERPRET)
    return tk


def _resolve(backend: str, x: Tensor, bias: Tensor) -> str:
    return _dispatch.select("bias_gelu", x.device.type, requested=backend, hidden=x.shape[-1],
                            dtypes=(x.dtype, bias.dtype))


@torch.library.custom_op("vlfast::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Tensor, backend: str) -> Tensor:
    if _resolve(backend, x, bias) == "triton":
        return _triton().forward(x.contiguous(), bias.contiguous())
    return ref.bias_gelu(x, bias).contiguous()


@bias_gelu_fwd.register_fake
def _(x, bias, backend):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, bias.dtype))


@torch.library.custom_op("vlfast::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dout: Tensor, x: Tensor, bias: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if _resolve(backend, x, bias) == "triton":
        return _triton().backward(dout.contiguous(), x.contiguous(), bias.contiguous())
    dx, db = ref.bias_gelu_backward(dout, x, bias)
    return dx.to(x.dtype).contiguous(), db.to(bias.dtype)


@bias_gelu_bwd.register_fake
def _(dout, x, bias, backend):
    return x.new_empty(x.shape), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    x, bias, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.backend = backend


def _backward(ctx, dout):
    x, bias = ctx.saved_tensors
    dx, db = bias_gelu_bwd(dout, x, bias, ctx.backend)
    return dx, db, None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup)


@C.autocast_op()
def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """erf GELU of ``x + bias`` (BERT's intermediate activation after a bias-free matmul).

    Args:
        x: (..., E), any leading shape; fp16/bf16/fp32 (fp64 runs on the reference).
        bias: (E,).
    Returns:
        ``F.gelu(x + bias)``, (..., E) in the promoted dtype of x and bias.  The
        backward gives dx (x's dtype) and dbias (the sum of dx over all rows;
        deterministic: per-program partial sums, then a fixed-order reduction).
    """
    op = "bias_gelu"
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        C.fail(op, "x", "a tensor (..., E) with E >= 1", f"shape {tuple(x.shape)}")
    E = x.shape[-1]
    C.check_tensor(op, "bias", bias, dtypes=C.FLOAT_DTYPES)
    if tuple(bias.shape) != (E,):
        C.fail(op, "bias", f"shape (E={E},) to match x {tuple(x.shape)}", f"shape {tuple(bias.shape)}")
    if bias.device != x.device:
        C.fail(op, "bias", f"the device of x ({x.device})", bias.device)
    requested = _dispatch.requested_backend()
    if use_reference(requested, x.device.type):
        return ref.bias_gelu(x, bias)
    return bias_gelu_fwd(x.reshape(-1, E), bias, requested).view(x.shape)
