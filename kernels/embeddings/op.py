"""Embedding custom ops, their autograd, dispatch and the public functions.

Custom ops (opaque to torch.compile, checked by ``torch.library.opcheck``), each a
``_fwd`` returning ``(out, stats)`` (stats: (6, N) fp32 LayerNorm statistics the Triton
backward reuses; zeros on the reference) and a ``_bwd`` returning the gradients of every
float input:

* ``vlfast::text_embeddings_fwd/_bwd``
* ``vlfast::uniter_visual_embeddings_fwd/_bwd``
* ``vlfast::vilbert_visual_embeddings_fwd/_bwd``
* ``vlfast::vlbert_visual_embeddings_fwd/_bwd``
* ``vlfast::visualbert_visual_embeddings_fwd/_bwd``

All take explicit ``seed, offset`` (dropout) and the requested ``backend``; the
implementation resolves it for the device and inputs, and the backward gets the same
request, so a forward forced to Triton is differentiated by Triton.  The public
functions evaluate the reference directly (native autograd) when the backend resolves
to ``reference`` -- the CPU default -- and the custom op otherwise.

Matmuls stay outside: the visual ops take the outputs of the models' ``nn.Linear``
layers (cuBLAS on GPU) and fuse everything after them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.dropout_mask import keep_mask as _keep_mask
from vlfast.kernels.embeddings import reference as ref

OPS = ("text_embeddings", "uniter_visual_embeddings", "vilbert_visual_embeddings", "vlbert_visual_embeddings",
       "visualbert_visual_embeddings")
HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int64, torch.int32)
MAX_HIDDEN = 8192


def _check_triton_inputs(device_type: str, dtype: torch.dtype = torch.float32, hidden: int = 768,
                         **_: object) -> Optional[str]:
    why = _dispatch.check_triton(device_type)
    if why is not None:
        return why
    if dtype not in HALF_AND_FLOAT:
        return f"the Triton kernel takes fp16/bf16/fp32, inputs are {str(dtype).replace('torch.', '')}"
    if hidden > MAX_HIDDEN:
        return f"the Triton kernel takes hidden sizes up to {MAX_HIDDEN}, inputs have {hidden}"
    return None


for _op in OPS:
    _dispatch.register_op(_op, cuda_order=("triton",), cpu_order=(),
                          checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def _resolve(op: str, backend: str, x: Tensor) -> str:
    return _dispatch.select(op, x.device.type, requested=backend, dtype=x.dtype, hidden=x.shape[-1])


def _triton():
    from vlfast.kernels.embeddings import triton as tk  # imported on first use (TRITON_INTERPRET)
    return tk


def embeddings_keep_mask(batch: int, length: int, hidden: int, dropout_p: float, seed: int, offset: int = 0,
                         device: torch.device | str = "cpu") -> Tensor:
    """Keep-mask (B,L,E) bool that every embedding op with this seed/offset applies to its
    (B,L,E) output: element (b,l,e) uses Philox counter ``offset + (b*L + l)*E + e``."""
    return _keep_mask((batch, length, hidden), dropout_p, seed, offset, device=device)


text_embeddings_keep_mask = embeddings_keep_mask
uniter_visual_embeddings_keep_mask = embeddings_keep_mask
vilbert_visual_embeddings_keep_mask = embeddings_keep_mask
vlbert_visual_embeddings_keep_mask = embeddings_keep_mask
visualbert_visual_embeddings_keep_mask = embeddings_keep_mask


def _keep(shape: Sequence[int], dropout_p: float, seed: int, offset: int, device: torch.device) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    return _keep_mask(tuple(shape), dropout_p, seed, offset, device=device)


def _rows(t: Tensor) -> Tensor:
    """(B,L,E) -> (N,E) contiguous."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _ids(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


def _c(t: Tensor) -> Tensor:
    return t.contiguous()


def _stats_like(x: Tensor) -> Tensor:
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.zeros(6, n, dtype=torch.float32, device=x.device)


def _fake_stats(x: Tensor) -> Tensor:
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((6, n), dtype=torch.float32)


def _ref_grads(fn: Callable[..., Tensor], dout: Tensor, inputs: Sequence[Optional[Tensor]],
               diff: Sequence[bool]) -> list[Optional[Tensor]]:
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs flagged in ``diff`` (None for the
    others), by ``torch.func.vjp``: custom-op implementations run below autograd, where
    ``torch.autograd.grad`` would see no graph."""
    idx = [i for i, (t, d) in enumerate(zip(inputs, diff)) if d and t is not None]

    def f(*xs: Tensor) -> Tensor:
        args = list(inputs)
        for i, x in zip(idx, xs):
            args[i] = x
        return fn(*args)

    _, vjp = torch.func.vjp(f, *[inputs[i] for i in idx])
    gs = vjp(dout)
    res: list[Optional[Tensor]] = [None] * len(inputs)
    for i, g in zip(idx, gs):  # fresh contiguous copies: vjp may hand one tensor to two inputs
        res[i] = torch.empty_like(g, memory_format=torch.contiguous_format).copy_(g)
    return res


def _row0_grad(w: Tensor, drow: Tensor) -> Tensor:
    """Gradient of a table of which only row 0 was used."""
    g = torch.zeros_like(w)
    g[0] = drow.to(w.dtype)
    return g


# ----------------------------------------------------------------------------------
# text_embeddings
# ----------------------------------------------------------------------------------

def _text_values(ids, tt, pos, W, P, T) -> None:
    _check_id_values("text_embeddings", [("input_ids", ids, W.shape[0], False),
                                         ("token_type_ids", tt, T.shape[0], False),
                                         ("position_ids", pos, P.shape[0], False)])


def _text_problem(ids, tt, pos, W, P, T, g, b):
    tk = _triton()
    N = ids.numel()
    return tk.RowProblem(N, W.shape[1], W.dtype, W.device, _c(g), _c(b),
                         tables=[(_ids(ids), _c(W)), (_ids(pos), _c(P)), (_ids(tt), _c(T))])


@torch.library.custom_op("vlfast::text_embeddings_fwd", mutates_args=())
def text_embeddings_fwd(input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor, word_weight: Tensor,
                        position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                        padding_idx: int, eps: float, dropout_p: float, seed: int, offset: int,
                        backend: str) -> tuple[Tensor, Tensor]:
    B, L = input_ids.shape
    E = word_weight.shape[1]
    _text_values(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight)
    if _resolve("text_embeddings", backend, word_weight) == "triton":
        p = _text_problem(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                          ln_weight, ln_bias)
        out, stats = _triton().forward(p, eps, dropout_p, seed, offset)
        return out.view(B, L, E), stats
    out = ref.text_embeddings(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                              ln_weight, ln_bias, padding_idx=None if padding_idx < 0 else padding_idx, eps=eps,
                              dropout_p=dropout_p, keep=_keep((B, L, E), dropout_p, seed, offset, word_weight.device))
    return out.contiguous(), torch.zeros(6, B * L, dtype=torch.float32, device=word_weight.device)


@text_embeddings_fwd.register_fake
def _(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
      padding_idx, eps, dropout_p, seed, offset, backend):
    B, L = input_ids.shape
    return (word_weight.new_empty((B, L, word_weight.shape[1])),
            word_weight.new_empty((6, B * L), dtype=torch.float32))


@torch.library.custom_op("vlfast::text_embeddings_bwd", mutates_args=())
def text_embeddings_bwd(dout: Tensor, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor,
                        word_weight: Tensor, position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor,
                        ln_bias: Tensor, stats: Tensor, padding_idx: int, eps: float, dropout_p: float, seed: int,
                        offset: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, L = input_ids.shape
    E = word_weight.shape[1]
    if _resolve("text_embeddings", backend, word_weight) == "triton":
        tk = _triton()
        p = _text_problem(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                          ln_weight, ln_bias)
        gr = tk.backward(p, dout.reshape(-1, E), stats, eps, dropout_p, seed, offset)
        dW = tk.table_grad(p.tables[0][0], gr.ds, word_weight.shape[0], word_weight.dtype,
                           skip=None if padding_idx < 0 else padding_idx)
        dP = tk.table_grad(p.tables[1][0], gr.ds, position_weight.shape[0], position_weight.dtype)
        dT = tk.table_grad(p.tables[2][0], gr.ds, type_weight.shape[0], type_weight.dtype)
        return dW, dP, dT, gr.dg.to(ln_weight.dtype), gr.db.to(ln_bias.dtype)
    keep = _keep((B, L, E), dropout_p, seed, offset, word_weight.device)
    pidx = None if padding_idx < 0 else padding_idx

    def fn(W, P, T, g, b):
        return ref.text_embeddings(input_ids, token_type_ids, position_ids, W, P, T, g, b, padding_idx=pidx,
                                   eps=eps, dropout_p=dropout_p, keep=keep)

    gs = _ref_grads(fn, dout, (word_weight, position_weight, type_weight, ln_weight, ln_bias), [True] * 5)
    return tuple(gs)  # type: ignore[return-value]


@text_embeddings_bwd.register_fake
def _(dout, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias,
      stats, padding_idx, eps, dropout_p, seed, offset, backend):
    return tuple(torch.empty_like(t) for t in (word_weight, position_weight, type_weight, ln_weight, ln_bias))


def _text_setup(ctx, inputs, output):
    ids, tt, pos, W, P, T, g, b, padding_idx, eps, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(ids, tt, pos, W, P, T, g, b, output[1])
    ctx.args = (padding_idx, eps, dropout_p, seed, offset, backend)


def _text_backward(ctx, dout, dstats):
    ids, tt, pos, W, P, T, g, b, stats = ctx.saved_tensors
    gs = text_embeddings_bwd(dout.contiguous(), ids, tt, pos, W, P, T, g, b, stats, *ctx.args)
    return (None, None, None, *gs, None, None, None, None, None, None)


text_embeddings_fwd.register_autograd(_text_backward, setup_context=_text_setup)


# ----------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------

def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _check_ids(op: str, name: str, t: object, shape: tuple[int, ...], *, device: torch.device) -> Tensor:
    C.check_tensor(op, name, t, ndim=len(shape), shape_doc=str(shape).replace(" ", ""), dtypes=INT_DTYPES)
    assert isinstance(t, Tensor)
    if tuple(t.shape) != tuple(shape):
        C.fail(op, name, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")
    if t.device != device:
        C.fail(op, name, f"the device of the tables ({device})", t.device)
    return t


def _check_id_values(op: str, checks: Sequence[tuple[str, Optional[Tensor], int, bool]]) -> None:
    """Ids within their tables: (name, ids, rows, -1 allowed).  Reads values, so on CPU
    always and on CUDA only with VLFAST_CHECK=1; skipped while torch.compile traces (the
    custom ops check again when they run)."""
    if torch.compiler.is_compiling():
        return
    for name, t, upper, allow_minus_one in checks:
        if t is None or not t.numel() or not C.value_checks_enabled(t):
            continue
        lo = -1 if allow_minus_one else 0
        bad = (t < lo) | (t >= upper)
        if bool(bad.any()):
            v = int(t[bad][0])
            idx = tuple(int(i) for i in bad.nonzero()[0])
            rng = f"[{lo}, {upper})" + (" (-1 = none)" if allow_minus_one else "")
            C.fail(op, name, f"values in {rng}", f"{v} at index {idx}")


def _check_table(op: str, name: str, t: object, E: int, dtype: torch.dtype, device: torch.device,
                 rows: Optional[int] = None) -> Tensor:
    C.check_tensor(op, name, t, ndim=2, shape_doc=f"(rows, E={E})", dtypes=C.FLOAT_DTYPES)
    assert isinstance(t, Tensor)
    if t.shape[1] != E or (rows is not None and t.shape[0] != rows) or t.shape[0] == 0:
        want = f"({rows}, E={E})" if rows is not None else f"(rows >= 1, E={E})"
        C.fail(op, name, f"shape {want}", f"shape {tuple(t.shape)}")
    _same(op, name, t, dtype, device)
    return t


def _check_vec(op: str, name: str, t: object, E: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    C.check_tensor(op, name, t, ndim=1, shape_doc=f"(E={E},)", dtypes=C.FLOAT_DTYPES)
    assert isinstance(t, Tensor)
    if t.shape[0] != E:
        C.fail(op, name, f"shape ({E},)", f"shape {tuple(t.shape)}")
    _same(op, name, t, dtype, device)
    return t


def _same(op: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.device != device:
        C.fail(op, name, f"device {device}", t.device)
    if t.dtype != dtype:
        C.fail(op, name, f"dtype {_dtype_name(dtype)} (like the other float inputs)", _dtype_name(t.dtype))


def _check_dense(op: str, name: str, t: object, shape: Optional[tuple[int, int, int]] = None) -> Tensor:
    C.check_tensor(op, name, t, ndim=3, shape_doc="(B,L,E)", dtypes=C.FLOAT_DTYPES)
    assert isinstance(t, Tensor)
    if shape is not None and tuple(t.shape) != shape:
        C.fail(op, name, f"shape {shape}", f"shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        C.fail(op, name, "a hidden size E >= 1", f"shape {tuple(t.shape)}")
    return t


def _check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (float(eps) > 0.0):
        C.fail(op, "eps", "a float > 0", repr(eps))
    return float(eps)


def _public_backend(op: str, x: Tensor) -> tuple[str, str]:
    """(requested, resolved) backend.  While torch.compile traces, only a forced
    "reference" runs the reference inline; anything else goes through the opaque custom
    op, which resolves the backend when it runs."""
    req = _dispatch.requested_backend()
    if torch.compiler.is_compiling():
        return req, "reference" if req == "reference" else "custom_op"
    return req, _resolve(op, req, x)


# ----------------------------------------------------------------------------------
# text_embeddings: public
# ----------------------------------------------------------------------------------

@C.autocast_op()
def text_embeddings(input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor],
                    word_weight: Tensor, position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor, *, padding_idx: Optional[int] = None, eps: float = 1e-12,
                    dropout_p: float = 0.0) -> Tensor:
    """BERT's text embeddings in one kernel:
    ``dropout(LayerNorm((word[input_ids] + position[position_ids]) + type[token_type_ids]))``.

    Args:
        input_ids: (B,L) int64/int32 word ids in [0, V).
        token_type_ids: (B,L) ids in [0, T); None = all 0.
        position_ids: (B,L) or (1,L) ids in [0, P); None = 0..L-1 in every row.
        word_weight (V,E), position_weight (P,E), type_weight (T,E): the tables.
        ln_weight, ln_bias: (E,) LayerNorm affine parameters.
        padding_idx: the word row that gets no gradient (as ``nn.Embedding``).
        eps: LayerNorm epsilon; dropout_p: dropout on the output (Philox; see
            :func:`text_embeddings_keep_mask`).
    Id values are checked on CPU always, on CUDA with ``VLFAST_CHECK=1``.
    The backward accumulates into the three tables deterministically (sorted-id segment
    sums, no atomics) and into the LayerNorm parameters.
    Returns:
        (B,L,E) in the tables' dtype.
    """
    op = "text_embeddings"
    C.check_tensor(op, "word_weight", word_weight, ndim=2, shape_doc="(V,E)", dtypes=C.FLOAT_DTYPES)
    V, E = word_weight.shape
    dt, dev = word_weight.dtype, word_weight.device
    if E == 0 or V == 0:
        C.fail(op, "word_weight", "shape (V >= 1, E >= 1)", f"shape {tuple(word_weight.shape)}")
    C.check_tensor(op, "input_ids", input_ids, ndim=2, shape_doc="(B,L)", dtypes=INT_DTYPES)
    B, L = input_ids.shape
    _check_table(op, "position_weight", position_weight, E, dt, dev)
    _check_table(op, "type_weight", type_weight, E, dt, dev)
    _check_vec(op, "ln_weight", ln_weight, E, dt, dev)
    _check_vec(op, "ln_bias", ln_bias, E, dt, dev)
    _check_ids(op, "input_ids", input_ids, (B, L), device=dev)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    _check_ids(op, "token_type_ids", token_type_ids, (B, L), device=dev)
    if position_ids is None:
        position_ids = torch.arange(L, device=dev)[None].expand(B, L)
    elif isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == 1 and B != 1:
        position_ids = position_ids.expand(B, L) if position_ids.shape[1] == L else position_ids
    _check_ids(op, "position_ids", position_ids, (B, L), device=dev)
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (0 <= padding_idx < V):
            C.fail(op, "padding_idx", f"None or an int in [0, {V})", repr(padding_idx))
    e = _check_eps(op, eps)
    p = C.check_dropout(op, dropout_p)
    seed = C.draw_seed() if p > 0 else 0
    req, b = _public_backend(op, word_weight)
    if b == "reference":
        _text_values(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight)
        keep = _keep((B, L, E), p, seed, 0, dev)
        return ref.text_embeddings(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                   type_weight, ln_weight, ln_bias, padding_idx=padding_idx, eps=e, dropout_p=p,
                                   keep=keep)
    out, _ = text_embeddings_fwd(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                 type_weight, ln_weight, ln_bias, -1 if padding_idx is None else padding_idx, e, p,
                                 seed, 0, req)
    return out


# ----------------------------------------------------------------------------------
# uniter_visual_embeddings
# ----------------------------------------------------------------------------------

def _uniter_problem(img, pos, tid, T, g1, b1, g2, b2, g, b):
    tk = _triton()
    x1 = _rows(img)
    return tk.RowProblem(x1.shape[0], x1.shape[1], img.dtype, img.device, _c(g), _c(b), x1=x1, ln1=(_c(g1), _c(b1)),
                         x2=_rows(pos), ln2=(_c(g2), _c(b2)), tables=[(_ids(tid), _c(T))])


@torch.library.custom_op("vlfast::uniter_visual_embeddings_fwd", mutates_args=())
def uniter_visual_embeddings_fwd(img_proj: Tensor, pos_proj: Tensor, type_ids: Tensor, type_weight: Tensor,
                                 img_ln_weight: Tensor, img_ln_bias: Tensor, pos_ln_weight: Tensor,
                                 pos_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                                 dropout_p: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    args = (img_proj, pos_proj, type_ids, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias,
            ln_weight, ln_bias)
    _check_id_values("uniter_visual_embeddings", [("type_ids", type_ids, type_weight.shape[0], False)])
    if _resolve("uniter_visual_embeddings", backend, img_proj) == "triton":
        out, stats = _triton().forward(_uniter_problem(*args), eps, dropout_p, seed, offset)
        return out.view(img_proj.shape), stats
    out = ref.uniter_visual_embeddings(*args, eps=eps, dropout_p=dropout_p,
                                       keep=_keep(img_proj.shape, dropout_p, seed, offset, img_proj.device))
    return out.contiguous(), _stats_like(img_proj)


@uniter_visual_embeddings_fwd.register_fake
def _(img_proj, pos_proj, type_ids, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias, ln_weight,
      ln_bias, eps, dropout_p, seed, offset, backend):
    return torch.empty_like(img_proj, memory_format=torch.contiguous_format), _fake_stats(img_proj)


@torch.library.custom_op("vlfast::uniter_visual_embeddings_bwd", mutates_args=())
def uniter_visual_embeddings_bwd(dout: Tensor, img_proj: Tensor, pos_proj: Tensor, type_ids: Tensor,
                                 type_weight: Tensor, img_ln_weight: Tensor, img_ln_bias: Tensor,
                                 pos_ln_weight: Tensor, pos_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                                 stats: Tensor, eps: float, dropout_p: float, seed: int, offset: int,
                                 backend: str) -> list[Tensor]:
    args = (img_proj, pos_proj, type_ids, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias,
            ln_weight, ln_bias)
    if _resolve("uniter_visual_embeddings", backend, img_proj) == "triton":
        tk = _triton()
        p = _uniter_problem(*args)
        gr = tk.backward(p, dout.reshape(-1, p.E), stats, eps, dropout_p, seed, offset)
        dT = tk.table_grad(p.tables[0][0], gr.ds, type_weight.shape[0], type_weight.dtype)
        dt = ln_weight.dtype
        return [gr.dx1.view(img_proj.shape), gr.dx2.view(pos_proj.shape), dT, gr.dg1.to(dt), gr.db1.to(dt),
                gr.dg2.to(dt), gr.db2.to(dt), gr.dg.to(dt), gr.db.to(dt)]
    keep = _keep(img_proj.shape, dropout_p, seed, offset, img_proj.device)

    def fn(*a):
        return ref.uniter_visual_embeddings(*a, eps=eps, dropout_p=dropout_p, keep=keep)

    gs = _ref_grads(fn, dout, args, [True, True, False] + [True] * 7)
    return [g for g in gs if g is not None]


@uniter_visual_embeddings_bwd.register_fake
def _(dout, img_proj, pos_proj, type_ids, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias,
      ln_weight, ln_bias, stats, eps, dropout_p, seed, offset, backend):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (img_proj, pos_proj, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias,
                      ln_weight, ln_bias)]


def _uniter_setup(ctx, inputs, output):
    *tensors, eps, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = (eps, dropout_p, seed, offset, backend)


def _uniter_backward(ctx, dout, dstats):
    *tensors, stats = ctx.saved_tensors
    di, dp, dT, dg1, db1, dg2, db2, dg, db = uniter_visual_embeddings_bwd(dout.contiguous(), *tensors, stats,
                                                                          *ctx.args)
    return di, dp, None, dT, dg1, db1, dg2, db2, dg, db, None, None, None, None, None


uniter_visual_embeddings_fwd.register_autograd(_uniter_backward, setup_context=_uniter_setup)


@C.autocast_op()
def uniter_visual_embeddings(img_proj: Tensor, pos_proj: Tensor, type_ids: Optional[Tensor], type_weight: Tensor,
                             img_ln_weight: Tensor, img_ln_bias: Tensor, pos_ln_weight: Tensor,
                             pos_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, *, eps: float = 1e-12,
                             dropout_p: float = 0.0) -> Tensor:
    """UNITER's region embeddings after its two Linear layers (``UniterImageEmbeddings``):
    ``dropout(LN((LN_img(img_proj) + LN_pos(pos_proj)) + type_weight[type_ids]))``.

    Args:
        img_proj: (B,Lv,E) ``img_linear(feat [+ mask_embedding])``.
        pos_proj: (B,Lv,E) ``pos_linear(box7)``.
        type_ids: (B,Lv) token types (None = all 1, UNITER's region type) into
            ``type_weight`` (T,E) (the text embeddings' token-type table, shared).
        img_ln_weight/img_ln_bias, pos_ln_weight/pos_ln_bias, ln_weight/ln_bias: (E,)
            the three LayerNorms (``img_layer_norm``, ``pos_layer_norm``, ``LayerNorm``),
            all with ``eps``.
        dropout_p: dropout on the output (see :func:`uniter_visual_embeddings_keep_mask`).
    Returns:
        (B,Lv,E) in img_proj's dtype.  Gradients reach img_proj, pos_proj, the type table
        (deterministically) and the six LayerNorm parameters.
    """
    op = "uniter_visual_embeddings"
    _check_dense(op, "img_proj", img_proj)
    B, Lv, E = img_proj.shape
    dt, dev = img_proj.dtype, img_proj.device
    _check_dense(op, "pos_proj", pos_proj, (B, Lv, E))
    _same(op, "pos_proj", pos_proj, dt, dev)
    _check_table(op, "type_weight", type_weight, E, dt, dev)
    for n, t in (("img_ln_weight", img_ln_weight), ("img_ln_bias", img_ln_bias), ("pos_ln_weight", pos_ln_weight),
                 ("pos_ln_bias", pos_ln_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_vec(op, n, t, E, dt, dev)
    if type_ids is None:
        type_ids = torch.ones(B, Lv, dtype=torch.long, device=dev)
    _check_ids(op, "type_ids", type_ids, (B, Lv), device=dev)
    e = _check_eps(op, eps)
    p = C.check_dropout(op, dropout_p)
    seed = C.draw_seed() if p > 0 else 0
    args = (img_proj, pos_proj, type_ids, type_weight, img_ln_weight, img_ln_bias, pos_ln_weight, pos_ln_bias,
            ln_weight, ln_bias)
    req, b = _public_backend(op, img_proj)
    if b == "reference":
        _check_id_values(op, [("type_ids", type_ids, type_weight.shape[0], False)])
        return ref.uniter_visual_embeddings(*args, eps=e, dropout_p=p, keep=_keep(img_proj.shape, p, seed, 0, dev))
    return uniter_visual_embeddings_fwd(*args, e, p, seed, 0, req)[0]


# ----------------------------------------------------------------------------------
# vilbert_visual_embeddings
# ----------------------------------------------------------------------------------

def _vilbert_problem(img, loc, g, b):
    tk = _triton()
    x1 = _rows(img)
    return tk.RowProblem(x1.shape[0], x1.shape[1], img.dtype, img.device, _c(g), _c(b), x1=x1, x2=_rows(loc))


@torch.library.custom_op("vlfast::vilbert_visual_embeddings_fwd", mutates_args=())
def vilbert_visual_embeddings_fwd(img_proj: Tensor, loc_proj: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                                  eps: float, dropout_p: float, seed: int, offset: int,
                                  backend: str) -> tuple[Tensor, Tensor]:
    if _resolve("vilbert_visual_embeddings", backend, img_proj) == "triton":
        out, stats = _triton().forward(_vilbert_problem(img_proj, loc_proj, ln_weight, ln_bias), eps, dropout_p,
                                       seed, offset)
        return out.view(img_proj.shape), stats
    out = ref.vilbert_visual_embeddings(img_proj, loc_proj, ln_weight, ln_bias, eps=eps, dropout_p=dropout_p,
                                        keep=_keep(img_proj.shape, dropout_p, seed, offset, img_proj.device))
    return out.contiguous(), _stats_like(img_proj)


@vilbert_visual_embeddings_fwd.register_fake
def _(img_proj, loc_proj, ln_weight, ln_bias, eps, dropout_p, seed, offset, backend):
    return torch.empty_like(img_proj, memory_format=torch.contiguous_format), _fake_stats(img_proj)


@torch.library.custom_op("vlfast::vilbert_visual_embeddings_bwd", mutates_args=())
def vilbert_visual_embeddings_bwd(dout: Tensor, img_proj: Tensor, loc_proj: Tensor, ln_weight: Tensor,
                                  ln_bias: Tensor, stats: Tensor, eps: float, dropout_p: float, seed: int,
                                  offset: int, backend: str) -> list[Tensor]:
    if _resolve("vilbert_visual_embeddings", backend, img_proj) == "triton":
        p = _vilbert_problem(img_proj, loc_proj, ln_weight, ln_bias)
        gr = _triton().backward(p, dout.reshape(-1, p.E), stats, eps, dropout_p, seed, offset)
        return [gr.dx1.view(img_proj.shape), gr.dx2.view(loc_proj.shape), gr.dg.to(ln_weight.dtype),
                gr.db.to(ln_bias.dtype)]
    keep = _keep(img_proj.shape, dropout_p, seed, offset, img_proj.device)

    def fn(*a):
        return ref.vilbert_visual_embeddings(*a, eps=eps, dropout_p=dropout_p, keep=keep)

    return [g for g in _ref_grads(fn, dout, (img_proj, loc_proj, ln_weight, ln_bias), [True] * 4)]


@vilbert_visual_embeddings_bwd.register_fake
def _(dout, img_proj, loc_proj, ln_weight, ln_bias, stats, eps, dropout_p, seed, offset, backend):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (img_proj, loc_proj, ln_weight, ln_bias)]


def _vilbert_setup(ctx, inputs, output):
    *tensors, eps, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = (eps, dropout_p, seed, offset, backend)


def _vilbert_backward(ctx, dout, dstats):
    *tensors, stats = ctx.saved_tensors
    gs = vilbert_visual_embeddings_bwd(dout.contiguous(), *tensors, stats, *ctx.args)
    return (*gs, None, None, None, None, None)


vilbert_visual_embeddings_fwd.register_autograd(_vilbert_backward, setup_context=_vilbert_setup)


@C.autocast_op()
def vilbert_visual_embeddings(img_proj: Tensor, loc_proj: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                              eps: float = 1e-12, dropout_p: float = 0.0) -> Tensor:
    """ViLBERT's region embeddings after its feature and location Linear layers
    (``BertImageEmbeddings``): ``dropout(LN(img_proj + loc_proj))``.

    Args:
        img_proj: (B,Lv,Ev) ``image_embeddings(feats)``; loc_proj: (B,Lv,Ev)
            ``image_location_embeddings(boxes5)``; ln_weight, ln_bias: (Ev,).
    Returns:
        (B,Lv,Ev) in img_proj's dtype.
    """
    op = "vilbert_visual_embeddings"
    _check_dense(op, "img_proj", img_proj)
    B, Lv, E = img_proj.shape
    dt, dev = img_proj.dtype, img_proj.device
    _check_dense(op, "loc_proj", loc_proj, (B, Lv, E))
    _same(op, "loc_proj", loc_proj, dt, dev)
    _check_vec(op, "ln_weight", ln_weight, E, dt, dev)
    _check_vec(op, "ln_bias", ln_bias, E, dt, dev)
    e = _check_eps(op, eps)
    p = C.check_dropout(op, dropout_p)
    seed = C.draw_seed() if p > 0 else 0
    req, b = _public_backend(op, img_proj)
    if b == "reference":
        return ref.vilbert_visual_embeddings(img_proj, loc_proj, ln_weight, ln_bias, eps=e, dropout_p=p,
                                             keep=_keep(img_proj.shape, p, seed, 0, dev))
    return vilbert_visual_embeddings_fwd(img_proj, loc_proj, ln_weight, ln_bias, e, p, seed, 0, req)[0]


# ----------------------------------------------------------------------------------
# vlbert_visual_embeddings
# ----------------------------------------------------------------------------------

def _vlbert_problem(h, mask, pid, tid, img, P, T, gv, bv, g, b, relu):
    tk = _triton()
    x1 = _rows(h)
    m = None if mask is None else _ids(mask).view(torch.uint8)
    return tk.RowProblem(x1.shape[0], x1.shape[1], h.dtype, h.device, _c(g), _c(b), x1=x1, ln1=(_c(gv), _c(bv)),
                         relu1=relu, mask1=m, row=_c(img[0]), tables=[(_ids(pid), _c(P)), (_ids(tid), _c(T))])


def _vlbert_values(pos, tt, P, T) -> None:
    _check_id_values("vlbert_visual_embeddings", [("position_ids", pos, P.shape[0], False),
                                                  ("token_type_ids", tt, T.shape[0], False)])


@torch.library.custom_op("vlfast::vlbert_visual_embeddings_fwd", mutates_args=())
def vlbert_visual_embeddings_fwd(obj_hidden: Tensor, visual_mask: Optional[Tensor], position_ids: Tensor,
                                 token_type_ids: Tensor, img_weight: Tensor, position_weight: Tensor,
                                 type_weight: Tensor, visual_ln_weight: Tensor, visual_ln_bias: Tensor,
                                 ln_weight: Tensor, ln_bias: Tensor, relu: bool, eps: float, dropout_p: float,
                                 seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    args = (obj_hidden, position_ids, token_type_ids, img_weight, position_weight, type_weight, visual_ln_weight,
            visual_ln_bias, ln_weight, ln_bias)
    _vlbert_values(position_ids, token_type_ids, position_weight, type_weight)
    if _resolve("vlbert_visual_embeddings", backend, obj_hidden) == "triton":
        p = _vlbert_problem(obj_hidden, visual_mask, position_ids, token_type_ids, img_weight, position_weight,
                            type_weight, visual_ln_weight, visual_ln_bias, ln_weight, ln_bias, relu)
        out, stats = _triton().forward(p, eps, dropout_p, seed, offset)
        return out.view(obj_hidden.shape), stats
    out = ref.vlbert_visual_embeddings(*args, visual_mask=visual_mask, relu=relu, eps=eps, dropout_p=dropout_p,
                                       keep=_keep(obj_hidden.shape, dropout_p, seed, offset, obj_hidden.device))
    return out.contiguous(), _stats_like(obj_hidden)


@vlbert_visual_embeddings_fwd.register_fake
def _(obj_hidden, visual_mask, position_ids, token_type_ids, img_weight, position_weight, type_weight,
      visual_ln_weight, visual_ln_bias, ln_weight, ln_bias, relu, eps, dropout_p, seed, offset, backend):
    return torch.empty_like(obj_hidden, memory_format=torch.contiguous_format), _fake_stats(obj_hidden)


@torch.library.custom_op("vlfast::vlbert_visual_embeddings_bwd", mutates_args=())
def vlbert_visual_embeddings_bwd(dout: Tensor, obj_hidden: Tensor, visual_mask: Optional[Tensor],
                                 position_ids: Tensor, token_type_ids: Tensor, img_weight: Tensor,
                                 position_weight: Tensor, type_weight: Tensor, visual_ln_weight: Tensor,
                                 visual_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, stats: Tensor,
                                 relu: bool, eps: float, dropout_p: float, seed: int, offset: int,
                                 backend: str) -> list[Tensor]:
    args = (obj_hidden, position_ids, token_type_ids, img_weight, position_weight, type_weight, visual_ln_weight,
            visual_ln_bias, ln_weight, ln_bias)
    if _resolve("vlbert_visual_embeddings", backend, obj_hidden) == "triton":
        tk = _triton()
        p = _vlbert_problem(obj_hidden, visual_mask, position_ids, token_type_ids, img_weight, position_weight,
                            type_weight, visual_ln_weight, visual_ln_bias, ln_weight, ln_bias, relu)
        gr = tk.backward(p, dout.reshape(-1, p.E), stats, eps, dropout_p, seed, offset)
        dP = tk.table_grad(p.tables[0][0], gr.ds, position_weight.shape[0], position_weight.dtype)
        dT = tk.table_grad(p.tables[1][0], gr.ds, type_weight.shape[0], type_weight.dtype)
        dt = ln_weight.dtype
        return [gr.dx1.view(obj_hidden.shape), _row0_grad(img_weight, gr.drow), dP, dT, gr.dg1.to(dt),
                gr.db1.to(dt), gr.dg.to(dt), gr.db.to(dt)]
    keep = _keep(obj_hidden.shape, dropout_p, seed, offset, obj_hidden.device)

    def fn(*a):
        return ref.vlbert_visual_embeddings(*a, visual_mask=visual_mask, relu=relu, eps=eps, dropout_p=dropout_p,
                                            keep=keep)

    gs = _ref_grads(fn, dout, args, [True, False, False] + [True] * 7)
    return [g for g in gs if g is not None]


@vlbert_visual_embeddings_bwd.register_fake
def _(dout, obj_hidden, visual_mask, position_ids, token_type_ids, img_weight, position_weight, type_weight,
      visual_ln_weight, visual_ln_bias, ln_weight, ln_bias, stats, relu, eps, dropout_p, seed, offset, backend):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (obj_hidden, img_weight, position_weight, type_weight, visual_ln_weight, visual_ln_bias,
                      ln_weight, ln_bias)]


def _vlbert_setup(ctx, inputs, output):
    *tensors, relu, eps, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = (relu, eps, dropout_p, seed, offset, backend)


def _vlbert_backward(ctx, dout, dstats):
    *tensors, stats = ctx.saved_tensors
    dh, dimg, dP, dT, dgv, dbv, dg, db = vlbert_visual_embeddings_bwd(dout.contiguous(), *tensors, stats, *ctx.args)
    return dh, None, None, None, dimg, dP, dT, dgv, dbv, dg, db, None, None, None, None, None, None


vlbert_visual_embeddings_fwd.register_autograd(_vlbert_backward, setup_context=_vlbert_setup)


@C.autocast_op()
def vlbert_visual_embeddings(obj_hidden: Tensor, position_ids: Tensor, token_type_ids: Tensor, img_weight: Tensor,
                             position_weight: Tensor, type_weight: Tensor, visual_ln_weight: Tensor,
                             visual_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                             visual_mask: Optional[Tensor] = None, relu: bool = True, eps: float = 1e-12,
                             dropout_p: float = 0.0) -> Tensor:
    """VL-BERT's object slots after the object matmul (``VisualLinguisticBert.embedding``):

        x   = relu(obj_hidden) (when ``relu``) * visual_mask
        out = dropout(LN(((img_weight[0] + LN_vis(x)) + position_weight[position_ids])
                         + type_weight[token_type_ids]))

    Args:
        obj_hidden: (B,Lv,E) ``obj_downsample(...)`` before its ReLU (``relu=True``, the
            released configs: visual_size == hidden_size), or ``visual_1x1_object(obj_reps)``
            (``relu=False``; ReLU and mask then come before that matmul, in the caller).
        position_ids, token_type_ids: (B,Lv) ids into position_weight (P,E) / type_weight (T,E).
        img_weight: (1,E) the [IMG] row (``object_linguistic_embeddings``).
        visual_ln_weight, visual_ln_bias: (E,) ``visual_ln_object``; ln_weight, ln_bias: (E,)
            ``embedding_LayerNorm``; both with ``eps``.
        visual_mask: (B,Lv) bool, False zeroes the slot's object representation (as the
            official code does for padded slots); None = all real.
    Returns:
        (B,Lv,E) in obj_hidden's dtype.
    """
    op = "vlbert_visual_embeddings"
    _check_dense(op, "obj_hidden", obj_hidden)
    B, Lv, E = obj_hidden.shape
    dt, dev = obj_hidden.dtype, obj_hidden.device
    _check_table(op, "img_weight", img_weight, E, dt, dev, rows=1)
    _check_table(op, "position_weight", position_weight, E, dt, dev)
    _check_table(op, "type_weight", type_weight, E, dt, dev)
    for n, t in (("visual_ln_weight", visual_ln_weight), ("visual_ln_bias", visual_ln_bias),
                 ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _check_vec(op, n, t, E, dt, dev)
    _check_ids(op, "position_ids", position_ids, (B, Lv), device=dev)
    _check_ids(op, "token_type_ids", token_type_ids, (B, Lv), device=dev)
    if visual_mask is not None:
        C.check_tensor(op, "visual_mask", visual_mask, ndim=2, shape_doc=f"(B={B}, Lv={Lv})", dtypes=(torch.bool,))
        if tuple(visual_mask.shape) != (B, Lv):
            C.fail(op, "visual_mask", f"shape ({B}, {Lv})", f"shape {tuple(visual_mask.shape)}")
        if visual_mask.device != dev:
            C.fail(op, "visual_mask", f"device {dev}", visual_mask.device)
    if not isinstance(relu, bool):
        C.fail(op, "relu", "a bool", repr(relu))
    e = _check_eps(op, eps)
    p = C.check_dropout(op, dropout_p)
    seed = C.draw_seed() if p > 0 else 0
    args = (obj_hidden, position_ids, token_type_ids, img_weight, position_weight, type_weight, visual_ln_weight,
            visual_ln_bias, ln_weight, ln_bias)
    req, b = _public_backend(op, obj_hidden)
    if b == "reference":
        _vlbert_values(position_ids, token_type_ids, position_weight, type_weight)
        return ref.vlbert_visual_embeddings(*args, visual_mask=visual_mask, relu=relu, eps=e, dropout_p=p,
                                            keep=_keep(obj_hidden.shape, p, seed, 0, dev))
    return vlbert_visual_embeddings_fwd(obj_hidden, visual_mask, *args[1:], relu, e, p, seed, 0, req)[0]


# ----------------------------------------------------------------------------------
# visualbert_visual_embeddings
# ----------------------------------------------------------------------------------

def _align_count(align: Tensor) -> Tensor:
    """(N,) fp32 max(1, number of aligned words) per region."""
    return (align != -1).sum(-1).reshape(-1).to(torch.float32).clamp(min=1.0)


def _visualbert_problem(v, tid, align, VT, VP, P, g, b):
    tk = _triton()
    x1 = _rows(v)
    a = None if align is None else align.reshape(-1, align.shape[-1]).contiguous()
    return tk.RowProblem(x1.shape[0], x1.shape[1], v.dtype, v.device, _c(g), _c(b), x1=x1, row=_c(VP[0]),
                         align=a, apos=None if align is None else _c(P), tables=[(_ids(tid), _c(VT))])


def _visualbert_values(tt, align, T, P) -> None:
    _check_id_values("visualbert_visual_embeddings", [("token_type_ids", tt, T.shape[0], False),
                                                      ("image_text_alignment", align, P.shape[0], True)])


@torch.library.custom_op("vlfast::visualbert_visual_embeddings_fwd", mutates_args=())
def visualbert_visual_embeddings_fwd(visual_proj: Tensor, token_type_ids: Tensor,
                                     image_text_alignment: Optional[Tensor], type_weight: Tensor,
                                     visual_position_weight: Tensor, position_weight: Tensor, ln_weight: Tensor,
                                     ln_bias: Tensor, eps: float, dropout_p: float, seed: int, offset: int,
                                     backend: str) -> tuple[Tensor, Tensor]:
    args = (visual_proj, token_type_ids, image_text_alignment, type_weight, visual_position_weight, position_weight,
            ln_weight, ln_bias)
    _visualbert_values(token_type_ids, image_text_alignment, type_weight, position_weight)
    if _resolve("visualbert_visual_embeddings", backend, visual_proj) == "triton":
        out, stats = _triton().forward(_visualbert_problem(*args), eps, dropout_p, seed, offset)
        return out.view(visual_proj.shape), stats
    out = ref.visualbert_visual_embeddings(*args, eps=eps, dropout_p=dropout_p,
                                           keep=_keep(visual_proj.shape, dropout_p, seed, offset, visual_proj.device))
    return out.contiguous(), _stats_like(visual_proj)


@visualbert_visual_embeddings_fwd.register_fake
def _(visual_proj, token_type_ids, image_text_alignment, type_weight, visual_position_weight, position_weight,
      ln_weight, ln_bias, eps, dropout_p, seed, offset, backend):
    return torch.empty_like(visual_proj, memory_format=torch.contiguous_format), _fake_stats(visual_proj)


@torch.library.custom_op("vlfast::visualbert_visual_embeddings_bwd", mutates_args=())
def visualbert_visual_embeddings_bwd(dout: Tensor, visual_proj: Tensor, token_type_ids: Tensor,
                                     image_text_alignment: Optional[Tensor], type_weight: Tensor,
                                     visual_position_weight: Tensor, position_weight: Tensor, ln_weight: Tensor,
                                     ln_bias: Tensor, stats: Tensor, eps: float, dropout_p: float, seed: int,
                                     offset: int, backend: str) -> list[Tensor]:
    args = (visual_proj, token_type_ids, image_text_alignment, type_weight, visual_position_weight, position_weight,
            ln_weight, ln_bias)
    if _resolve("visualbert_visual_embeddings", backend, visual_proj) == "triton":
        tk = _triton()
        p = _visualbert_problem(*args)
        gr = tk.backward(p, dout.reshape(-1, p.E), stats, eps, dropout_p, seed, offset)
        dVT = tk.table_grad(p.tables[0][0], gr.ds, type_weight.shape[0], type_weight.dtype)
        if image_text_alignment is None:
            dP = torch.zeros_like(position_weight)
        else:
            dP = tk.table_grad(p.align, gr.ds, position_weight.shape[0], position_weight.dtype, skip=-1,
                               group=p.align.shape[1], count=_align_count(image_text_alignment))
        dt = ln_weight.dtype
        return [gr.dx1.view(visual_proj.shape), dVT, _row0_grad(visual_position_weight, gr.drow), dP,
                gr.dg.to(dt), gr.db.to(dt)]
    keep = _keep(visual_proj.shape, dropout_p, seed, offset, visual_proj.device)

    def fn(*a):
        return ref.visualbert_visual_embeddings(*a, eps=eps, dropout_p=dropout_p, keep=keep)

    gs = _ref_grads(fn, dout, args, [True, False, False, True, True, True, True, True])
    return [g for g in gs if g is not None]


@visualbert_visual_embeddings_bwd.register_fake
def _(dout, visual_proj, token_type_ids, image_text_alignment, type_weight, visual_position_weight, position_weight,
      ln_weight, ln_bias, stats, eps, dropout_p, seed, offset, backend):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (visual_proj, type_weight, visual_position_weight, position_weight, ln_weight, ln_bias)]


def _visualbert_setup(ctx, inputs, output):
    *tensors, eps, dropout_p, seed, offset, backend = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = (eps, dropout_p, seed, offset, backend)


def _visualbert_backward(ctx, dout, dstats):
    *tensors, stats = ctx.saved_tensors
    dv, dVT, dVP, dP, dg, db = visualbert_visual_embeddings_bwd(dout.contiguous(), *tensors, stats, *ctx.args)
    return dv, None, None, dVT, dVP, dP, dg, db, None, None, None, None, None


visualbert_visual_embeddings_fwd.register_autograd(_visualbert_backward, setup_context=_visualbert_setup)


@C.autocast_op()
def visualbert_visual_embeddings(visual_proj: Tensor, token_type_ids: Tensor, image_text_alignment: Optional[Tensor],
                                 type_weight: Tensor, visual_position_weight: Tensor, position_weight: Tensor,
                                 ln_weight: Tensor, ln_bias: Tensor, *, eps: float = 1e-12,
                                 dropout_p: float = 0.0) -> Tensor:
    """VisualBERT's region slots after ``visual_projection`` (``VisualBertEmbeddings.visual``
    followed by the shared LayerNorm and dropout):

        pos = visual_position_weight[0]
              (+ mean of position_weight[a] over the aligned words a != -1 of the region,
               0 when it has none, with ``image_text_alignment``)
        out = dropout(LN((visual_proj + pos) + type_weight[token_type_ids]))

    Fusion boundary: VisualBERT's LayerNorm and dropout run over the concatenated
    text+visual sequence, but LayerNorm is per row, so the text rows go through
    :func:`text_embeddings` and the region rows through this op, each normalising its own
    rows with the same ``ln_weight``/``ln_bias``; the model concatenates the two outputs.

    Args:
        visual_proj: (B,Lv,E); token_type_ids: (B,Lv) into type_weight (T,E)
            (``visual_token_type_embeddings``).
        image_text_alignment: (B,Lv,A) text positions aligned to each region, -1 = none;
            or None.
        visual_position_weight: (P,E), only row 0 is used; position_weight: (P',E) the
            text position table (read only through the alignment).
        ln_weight, ln_bias: (E,).
    Returns:
        (B,Lv,E) in visual_proj's dtype.
    """
    op = "visualbert_visual_embeddings"
    _check_dense(op, "visual_proj", visual_proj)
    B, Lv, E = visual_proj.shape
    dt, dev = visual_proj.dtype, visual_proj.device
    _check_table(op, "type_weight", type_weight, E, dt, dev)
    _check_table(op, "visual_position_weight", visual_position_weight, E, dt, dev)
    _check_table(op, "position_weight", position_weight, E, dt, dev)
    _check_vec(op, "ln_weight", ln_weight, E, dt, dev)
    _check_vec(op, "ln_bias", ln_bias, E, dt, dev)
    _check_ids(op, "token_type_ids", token_type_ids, (B, Lv), device=dev)
    if image_text_alignment is not None:
        C.check_tensor(op, "image_text_alignment", image_text_alignment, ndim=3, shape_doc="(B,Lv,A)",
                       dtypes=INT_DTYPES)
        A = image_text_alignment.shape[2]
        _check_ids(op, "image_text_alignment", image_text_alignment, (B, Lv, A), device=dev)
    e = _check_eps(op, eps)
    p = C.check_dropout(op, dropout_p)
    seed = C.draw_seed() if p > 0 else 0
    args = (visual_proj, token_type_ids, image_text_alignment, type_weight, visual_position_weight, position_weight,
            ln_weight, ln_bias)
    req, b = _public_backend(op, visual_proj)
    if b == "reference":
        _visualbert_values(token_type_ids, image_text_alignment, type_weight, position_weight)
        return ref.visualbert_visual_embeddings(*args, eps=e, dropout_p=p,
                                                keep=_keep(visual_proj.shape, p, seed, 0, dev))
    return visualbert_visual_embeddings_fwd(*args, e, p, seed, 0, req)[0]


__all__ = ["text_embeddings", "uniter_visual_embeddings", "vilbert_visual_embeddings", "vlbert_visual_embeddings",
           "visualbert_visual_embeddings", "embeddings_keep_mask", "text_embeddings_keep_mask",
           "uniter_visual_embeddings_keep_mask", "vilbert_visual_embeddings_keep_mask",
           "vlbert_visual_embeddings_keep_mask", "visualbert_visual_embeddings_keep_mask"]
