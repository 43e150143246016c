"""Fused linear + cross-entropy: custom ops, autograd, dispatch and the public functions.

``hidden (N,E) -> logits (N,V) = hidden @ weight.T + bias -> loss`` without ever holding
the N x V logits (the idea of Liger-Kernel's fused linear cross-entropy).  The rows are
processed in chunks; per chunk:

1. ``z = F.linear(h_chunk, weight, bias)`` -- cuBLAS (or the CPU BLAS), fp32
   accumulation, in the inputs' dtype, like the eager ``F.linear``;
2. the row kernel (``triton.py``; ``reference.chunk_loss_and_grad`` in torch) computes
   the log-sum-exp, the loss, the argmax and, when a gradient is wanted, overwrites
   ``z`` with the gradient of the (scaled) loss w.r.t. the logits;
3. ``grad_hidden[chunk] = z @ weight``, ``grad_weight += z^T @ h_chunk`` (fp32
   accumulator), ``grad_bias += z.sum(0)`` (fp32).

With ``reduction="mean"``/``"sum"`` the forward computes the gradients already (the
loss's gradient w.r.t. itself is 1), so the backward only multiplies them by
``grad_output``: no logits are recomputed and none are kept.  ``reduction="none"``
cannot do that (each row's loss gets its own ``grad_output``); its forward computes the
losses only and its backward runs the chunk loop once more with
``scale = grad_output``.

Chunk size (:func:`chunk_rows`): ``ceil(N / ceil(V / E))`` rows, so a chunk's logits
(rows x V) hold about as many elements as ``hidden`` (N x E); at least
``MIN_CHUNK_ELEMENTS / V`` rows (so a GEMM stays large enough to run at speed: 2**23
elements, 16 MiB of bf16 logits) and at most N.  MLM at N = 32k, V = 30522, E = 768:
40 chunks of 820 rows (48 MiB of bf16 logits instead of 1.9 GiB).

Custom ops (opaque to torch.compile, checked by ``torch.library.opcheck``):

* ``vlfast::linear_cross_entropy_fwd(hidden, weight, bias?, labels?, targets?, ignore_index,
  reduction, kl, need_grad_hidden, need_grad_weight, need_grad_bias, backend)
  -> (loss, argmax, grad_hidden, grad_weight, grad_bias)`` -- hard labels when ``labels``
  is given, soft targets when ``targets`` is; gradients are empty (0,) tensors when not
  wanted or when ``reduction="none"``.
* ``vlfast::linear_cross_entropy_bwd(grad_loss, hidden, weight, bias?, labels?, targets?,
  ignore_index, reduction, kl, need_grad_hidden, need_grad_weight, need_grad_bias, backend)
  -> (grad_hidden, grad_weight, grad_bias)`` -- the recomputing backward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.linear_cross_entropy import reference as ref

HARD = "linear_cross_entropy"
SOFT = "linear_soft_cross_entropy"
#: smallest chunk, in logits elements (a chunk has at least this / V rows)
MIN_CHUNK_ELEMENTS = 1 << 23
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_triton_inputs(device_type: str, dtype: torch.dtype = torch.float32, **_: object) -> Optional[str]:
    why = _dispatch.check_triton(device_type)
    if why is not None:
        return why
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernel takes fp16/bf16/fp32, inputs are {str(dtype).replace('torch.', '')}"
    return None


for _op in (HARD, SOFT):
    _dispatch.register_op(_op, cuda_order=("triton",), cpu_order=(),
                          checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def _triton():
    from vlfast.kernels.linear_cross_entropy import triton as tk  # imported on first use (TRITON_INTERPRET)
    return tk


def chunk_rows(n: int, v: int, e: int) -> int:
    """Rows per chunk: ``ceil(N / ceil(V/E))`` (chunk logits ~ the size of hidden), at
    least ``ceil(MIN_CHUNK_ELEMENTS / V)``, at most N (and at least 1)."""
    if n <= 0:
        return 1
    rows = math.ceil(n / max(1, math.ceil(v / max(e, 1))))
    rows = max(rows, math.ceil(MIN_CHUNK_ELEMENTS / max(v, 1)))
    return max(1, min(n, rows))


# ----------------------------------------------------------------------------------
# The chunk loop
# ----------------------------------------------------------------------------------

Step = Callable[..., tuple[Tensor, Tensor]]

_ADDMM_OUT_DTYPE = {"ok": True}


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32/fp64 and a, b possibly fp16/bf16: on CUDA the
    GEMM writes fp32 directly (``addmm`` with ``out_dtype``); elsewhere (or if that is
    unsupported) the product is rounded to the inputs' dtype once per chunk, then added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE["ok"] = False
    acc.add_(torch.mm(a, b))


def fused_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
               targets: Optional[Tensor], ignore_index: int, kl: bool, scale: Tensor, need_gh: bool,
               need_gw: bool, need_gb: bool, step: Step) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop.  ``scale`` (N,) or (1,): the weight of each row's loss in the
    gradient.  Returns per-row loss (N,) in the compute dtype, argmax (N,) int64, and the
    gradients of ``sum_i scale_i loss_i`` w.r.t. hidden, weight, bias (in their dtypes;
    (0,) tensors when not wanted)."""
    N, E = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    ct = ref.compute_dtype(hidden)
    write = need_gh or need_gw or need_gb
    loss = torch.empty(N, dtype=ct, device=dev)
    argmax = torch.empty(N, dtype=torch.int64, device=dev)
    gh = torch.zeros(N, E, dtype=hidden.dtype, device=dev) if need_gh else hidden.new_empty(0)
    gw_acc = torch.zeros(V, E, dtype=ct, device=dev) if need_gw else None
    gb_acc = torch.zeros(V, dtype=ct, device=dev) if need_gb else None
    per_row = scale.numel() > 1
    rows = chunk_rows(N, V, E)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        h = hidden[s:e]
        z = F.linear(h, weight, bias)  # (n, V) in the inputs' dtype
        lab = labels[s:e] if labels is not None else None
        tgt = targets[s:e] if targets is not None else None
        l_c, a_c = step(z, lab, tgt, ignore_index, kl, scale[s:e] if per_row else scale, write)
        loss[s:e] = l_c
        argmax[s:e] = a_c
        if need_gh:
            torch.mm(z, weight, out=gh[s:e])
        if need_gw:
            _accumulate_mm(gw_acc, z.t(), h)
        if need_gb:
            gb_acc += z.sum(0, dtype=ct)
        del z
    gw = gw_acc.to(weight.dtype) if need_gw else weight.new_empty(0)
    gb = gb_acc.to(bias.dtype) if need_gb else hidden.new_empty(0)
    return loss, argmax, gh, gw, gb


def _resolve(backend: str, hidden: Tensor, soft: bool) -> str:
    return _dispatch.select(SOFT if soft else HARD, hidden.device.type, requested=backend, dtype=hidden.dtype)


def _step(b: str) -> Step:
    return _triton().chunk_loss_and_grad if b == "triton" else ref.chunk_loss_and_grad


def _check_label_values(op: str, labels: Tensor, v: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        C.fail(op, "labels", f"class indices in [0, {v}) or ignore_index={ignore_index}",
               f"labels[{i}] = {int(labels[i])}")


def _mean_scale(hidden: Tensor, labels: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor]:
    """(count, 1/max(count,1)) of the rows a "mean" averages over, as tensors (no sync)."""
    ct = ref.compute_dtype(hidden)
    if labels is not None:
        n = (labels != ignore_index).sum().to(ct)
    else:
        n = torch.tensor(float(hidden.shape[0]), dtype=ct, device=hidden.device)
    return n, (1.0 / n.clamp(min=1.0)).reshape(1)


def _row_scale(grad_loss: Tensor, hidden: Tensor, labels: Optional[Tensor], ignore_index: int,
               reduction: str) -> Tensor:
    ct = ref.compute_dtype(hidden)
    g = grad_loss.to(ct)
    if reduction == "none":
        return g.reshape(-1)
    if reduction == "mean":
        return g.reshape(1) * _mean_scale(hidden, labels, ignore_index)[1]
    return g.reshape(1)


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------

@torch.library.custom_op("vlfast::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                             targets: Optional[Tensor], ignore_index: int, reduction: str, kl: bool,
                             need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    soft = targets is not None
    if labels is not None and C.value_checks_enabled(labels):
        _check_label_values(HARD, labels, weight.shape[0], ignore_index)
    b = _resolve(backend, hidden, soft)
    precompute = reduction != "none"
    ct = ref.compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        if precompute:
            n, scale = _mean_scale(hidden, labels, ignore_index)
            if reduction == "sum":
                scale = torch.ones(1, dtype=ct, device=hidden.device)
        else:
            scale = torch.zeros(1, dtype=ct, device=hidden.device)
        loss, argmax, gh, gw, gb = fused_pass(
            hidden, weight, bias, labels, targets, ignore_index, kl, scale,
            precompute and need_grad_hidden, precompute and need_grad_weight,
            precompute and need_grad_bias and bias is not None, _step(b))
        if reduction == "sum":
            loss = loss.sum()
        elif reduction == "mean":
            loss = loss.sum() / n.clamp(min=1.0)
    return loss, argmax, gh, gw, gb


def _fake_grads(hidden, weight, bias, reduction, need_gh, need_gw, need_gb):
    pre = reduction != "none"
    gh = hidden.new_empty(hidden.shape) if pre and need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if pre and need_gw else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if pre and need_gb and bias is not None else hidden.new_empty(0)
    return gh, gw, gb


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, labels, targets, ignore_index, reduction, kl, need_grad_hidden, need_grad_weight,
      need_grad_bias, backend):
    ct = ref.compute_dtype(hidden)
    n = hidden.shape[0]
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=ct)
    argmax = hidden.new_empty((n,), dtype=torch.int64)
    return (loss, argmax, *_fake_grads(hidden, weight, bias, reduction, need_grad_hidden, need_grad_weight,
                                       need_grad_bias))


@torch.library.custom_op("vlfast::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             labels: Optional[Tensor], targets: Optional[Tensor], ignore_index: int,
                             reduction: str, kl: bool, need_grad_hidden: bool, need_grad_weight: bool,
                             need_grad_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    b = _resolve(backend, hidden, targets is not None)
    with torch.autocast(hidden.device.type, enabled=False):
        scale = _row_scale(grad_loss, hidden, labels, ignore_index, reduction)
        _, _, gh, gw, gb = fused_pass(hidden, weight, bias, labels, targets, ignore_index, kl, scale,
                                      need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None,
                                      _step(b))
    return gh, gw, gb


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, bias, labels, targets, ignore_index, reduction, kl, need_grad_hidden,
      need_grad_weight, need_grad_bias, backend):
    return _fake_grads(hidden, weight, bias, "sum", need_grad_hidden, need_grad_weight, need_grad_bias)


def _setup(ctx, inputs, output):
    (hidden, weight, bias, labels, targets, ignore_index, reduction, kl, ngh, ngw, ngb, backend) = inputs
    _, argmax, gh, gw, gb = output
    ctx.mark_non_differentiable(argmax, gh, gw, gb)
    ctx.precomputed = reduction != "none"
    ctx.needs = (ngh, ngw, ngb and bias is not None)
    ctx.args = (ignore_index, reduction, kl, backend)
    if ctx.precomputed:
        ctx.save_for_backward(gh, gw, gb)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, targets)


def _backward(ctx, dloss, dargmax, dgh, dgw, dgb):
    ngh, ngw, ngb = ctx.needs
    if ctx.precomputed:
        gh, gw, gb = ctx.saved_tensors
        out = [g * dloss.to(g.dtype) if need else None for g, need in ((gh, ngh), (gw, ngw), (gb, ngb))]
    else:
        hidden, weight, bias, labels, targets = ctx.saved_tensors
        ignore_index, reduction, kl, backend = ctx.args
        gh, gw, gb = linear_cross_entropy_bwd(dloss, hidden, weight, bias, labels, targets, ignore_index,
                                              reduction, kl, ngh, ngw, ngb, backend)
        out = [gh if ngh else None, gw if ngw else None, gb if ngb else None]
    return (out[0], out[1], out[2]) + (None,) * 9


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------

def _check_linear(op: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    C.check_tensor(op, "hidden", hidden, ndim=2, shape_doc="(N,E)", dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, "weight", weight, ndim=2, shape_doc="(V,E)", dtypes=C.FLOAT_DTYPES)
    C.check_same(op, ("hidden", "weight"), (hidden, weight))
    if weight.shape[1] != hidden.shape[1]:
        C.fail(op, "weight", f"shape (V, E={hidden.shape[1]}) to match hidden {tuple(hidden.shape)}",
               f"shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        C.fail(op, "weight", "V >= 1 classes (rows)", f"shape {tuple(weight.shape)}")
    if hidden.shape[1] == 0:
        C.fail(op, "hidden", "a hidden width E >= 1", f"shape {tuple(hidden.shape)}")
    if bias is not None:
        C.check_tensor(op, "bias", bias, ndim=1, shape_doc=f"(V={weight.shape[0]},)", dtypes=C.FLOAT_DTYPES)
        C.check_same(op, ("hidden", "bias"), (hidden, bias))
        if bias.shape[0] != weight.shape[0]:
            C.fail(op, "bias", f"shape (V={weight.shape[0]},)", f"shape {tuple(bias.shape)}")


def _check_reduction(op: str, reduction: object) -> str:
    if reduction not in ref.REDUCTIONS:
        C.fail(op, "reduction", "'mean', 'sum' or 'none'", repr(reduction))
    return str(reduction)


def _check_flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        C.fail(op, name, "a bool", repr(value))
    return value


def use_reference(requested: str, hidden: Tensor) -> bool:
    """Whether a public function evaluates the reference directly (torch autograd, no
    custom op): the reference is forced, or ``auto`` where auto would pick it (not a CUDA
    tensor, or an fp64 one).  Decided without probing backends, so torch.compile can
    trace it; every other request goes to the custom op, which resolves it (and raises
    :class:`~vlfast._dispatch.BackendError` when a forced backend cannot run)."""
    return requested == "reference" or (requested == "auto" and (hidden.device.type != "cuda"
                                                                  or hidden.dtype not in TRITON_DTYPES))


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


@C.autocast_op()
def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         return_argmax: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` without the
    N x V logits (chunked; see the module docstring).

    Args:
        hidden: (N,E) fp32/bf16/fp16 (fp64 runs on the reference).
        weight: (V,E), same dtype and device (e.g. the tied word embeddings of an MLM
            decoder; it may require no gradient).
        bias: (V,) or None.
        labels: (N,) int64 in [0, V), or ``ignore_index`` (zero loss and gradient).
            Values are checked on CPU always and on CUDA with ``VLFAST_CHECK=1`` (a host
            sync); unchecked out-of-range labels give a NaN loss on the Triton path.
        ignore_index: label value of rows to skip.
        reduction: "mean" over the rows that are not ignored (0.0 with zero gradients
            when every row is ignored or N = 0; ``F.cross_entropy`` gives NaN there),
            "sum", or "none" (N,) with 0 on ignored rows.
        return_argmax: also return the logits' argmax (N,) int64 (first maximum, as
            ``torch.argmax``), a by-product of the kernel for accuracy metrics.
    Returns:
        the loss, fp32 (fp64 for fp64 inputs), scalar or (N,); with ``return_argmax``
        the pair (loss, argmax).

    The logits are made in the inputs' dtype (cuBLAS, fp32 accumulation; under autocast
    in autocast's dtype, as ``F.linear``) and reduced in fp32.  On CPU (backend
    ``reference``) this is the plain formula, bitwise.
    """
    op = HARD
    _check_linear(op, hidden, weight, bias)
    C.check_tensor(op, "labels", labels, ndim=1, shape_doc=f"(N={hidden.shape[0]},)", dtypes=(torch.int64,))
    if labels.shape[0] != hidden.shape[0]:
        C.fail(op, "labels", f"shape (N={hidden.shape[0]},) like hidden's rows", f"shape {tuple(labels.shape)}")
    if labels.device != hidden.device:
        C.fail(op, "labels", f"the device of hidden ({hidden.device})", labels.device)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        C.fail(op, "ignore_index", "an int", repr(ignore_index))
    red = _check_reduction(op, reduction)
    _check_flag(op, "return_argmax", return_argmax)
    requested = _dispatch.requested_backend()
    if use_reference(requested, hidden):
        if not torch.compiler.is_compiling() and C.value_checks_enabled(labels):
            _check_label_values(op, labels, weight.shape[0], ignore_index)
        loss, argmax = ref.linear_cross_entropy_reference(hidden, weight, bias, labels, ignore_index=ignore_index,
                                                          reduction=red, return_argmax=return_argmax)
    else:
        loss, argmax, _, _, _ = linear_cross_entropy_fwd(hidden, weight, bias, labels, None, ignore_index, red,
                                                         False, *_needs(hidden, weight, bias), requested)
    return (loss, argmax) if return_argmax else loss


@C.autocast_op(keep=("targets",))
def linear_soft_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                              reduction: str = "mean", kl: bool = False,
                              return_argmax: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy with probability targets, ``sum_c -targets_c * log_softmax(z)_c``
    per row, ``z = F.linear(hidden, weight, bias)``, without the N x V logits.

    Relation to KL: ``KL(t || softmax(z)) = CE(t, z) - H(t)`` with ``H(t) = -sum t log t``
    the targets' entropy, a constant: the same gradient.  ``kl=True`` returns the KL
    values themselves (``F.kl_div(log_softmax(z), t)`` terms, 0 where t = 0), for
    objectives that log or normalise KL (UNITER's MRC-kl, ViLBERT's masked multimodal
    loss).

    Args:
        hidden: (N,E) fp32/bf16/fp16 (fp64 runs on the reference).
        weight: (V,E); bias: (V,) or None; same dtype and device as hidden.
        targets: (N,V) float, any dtype (read in fp32).  Rows need not sum to 1: the row
            loss is ``S*lse - sum t z`` with ``S = sum t`` and the logits' gradient
            ``softmax*S - t``.  No gradient flows into the targets.
        reduction: "mean" over the N rows (0.0 when N = 0), "sum" (of every term), or
            "none" (N,).
        kl: return KL divergences instead of cross entropies.
        return_argmax: also return the logits' argmax (N,) int64.
    Returns:
        the loss, fp32 (fp64 for fp64 inputs); with ``return_argmax`` (loss, argmax).
    """
    op = SOFT
    _check_linear(op, hidden, weight, bias)
    C.check_tensor(op, "targets", targets, ndim=2, shape_doc=f"(N={hidden.shape[0]}, V={weight.shape[0]})",
                   dtypes=C.FLOAT_DTYPES)
    if tuple(targets.shape) != (hidden.shape[0], weight.shape[0]):
        C.fail(op, "targets", f"shape (N={hidden.shape[0]}, V={weight.shape[0]})", f"shape {tuple(targets.shape)}")
    if targets.device != hidden.device:
        C.fail(op, "targets", f"the device of hidden ({hidden.device})", targets.device)
    if targets.numel() and not torch.compiler.is_compiling() and C.value_checks_enabled(targets):
        bad = ~torch.isfinite(targets) | (targets < 0)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            C.fail(op, "targets", "finite probabilities >= 0", f"{float(targets[idx])} at index {idx}")
    red = _check_reduction(op, reduction)
    _check_flag(op, "kl", kl)
    _check_flag(op, "return_argmax", return_argmax)
    requested = _dispatch.requested_backend()
    if use_reference(requested, hidden):
        loss, argmax = ref.linear_soft_cross_entropy_reference(hidden, weight, bias, targets, reduction=red, kl=kl,
                                                               return_argmax=return_argmax)
    else:
        t = targets.detach()
        if t.shape[0] and t.stride(1) != 1:
            t = t.contiguous()
        loss, argmax, _, _, _ = linear_cross_entropy_fwd(hidden, weight, bias, None, t, 0, red, kl,
                                                         *_needs(hidden, weight, bias), requested)
    return (loss, argmax) if return_argmax else loss
