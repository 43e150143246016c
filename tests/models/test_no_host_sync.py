"""No host sync on the padding-free forward and backward of the four models.

On a GPU every read of a device value on the host (``.item()``, ``int(t)``,
``bool(t)``, ``.tolist()``, a device-to-host copy) and every op whose output size
depends on the values (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``) stalls the
launch queue (``nonzero_static``, whose size is given, is fine).
The padding-free path needs the packing of the masks (flat indices, ``cu_seqlens``,
``max_seqlen``); the collator computes it on the host (``VLBatch.packing``) and
``VLBatch.model_inputs(model, padding_free=True)`` passes it as ``packing=``.

:class:`NoHostSync` is a ``TorchDispatchMode`` that raises :class:`HostSyncError` on
any such op, and (for the duration) on ``Tensor.tolist`` / ``Tensor.numpy``, which a
CPU run does not route through the dispatcher.  It runs the models as on a GPU:

* the input checks that read values (ids in range, 0/1 masks, the packing against the
  mask) are CPU-only by contract -- on CUDA they run only with ``VLFAST_CHECK=1`` --
  so the test switches them off (``value_checks_enabled`` -> False), as on CUDA;
* vlfast's custom ops are opaque: the mode sees ``vlfast.varlen_attention_fwd`` and
  friends, not their implementation (the Triton launchers take ``max_seqlen`` as a
  host int in the op's schema; the CPU reference loops over sequences on the host,
  which is the CPU path and not a device sync);
* the one ``_local_scalar_dense`` allowed is the dropout seed: ``draw_seed`` reads a
  scalar drawn by torch's CPU generator, on the CPU (checked: the tensor is a CPU
  tensor), which never waits on a device.

On this CPU-only machine the device-to-host branch cannot fire, but it is there for a
CUDA run.  The control test proves the mode bites: without the packing metadata the
models pack from the mask, and the mode catches the ``nonzero``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from vlfast import ops
from vlfast.data.batch import ImageRecord, VLBatch
from vlfast.data.collate import batch_packing, make_collator
from vlfast.kernels import _common as kernels_common
from vlfast.models import (Uniter, UniterConfig, ViLBert, ViLBertConfig, VisualBert, VisualBertConfig, VLBert,
                           VLBertConfig)
from vlfast.models.packing import Packed, PackedLayout, VLPacking

FEAT = 16
MODELS = {"uniter": (Uniter, UniterConfig, "img_dim"), "vilbert": (ViLBert, ViLBertConfig, "v_feature_size"),
          "vlbert": (VLBert, VLBertConfig, "visual_feat_dim"),
          "visualbert": (VisualBert, VisualBertConfig, "visual_embedding_dim")}


# ----------------------------------------------------------------------------------
# The mode
# ----------------------------------------------------------------------------------

class HostSyncError(AssertionError):
    """An op that would wait on the device ran."""


_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_", "aten::_unsafe_index",
              "aten::_unsafe_index_put"}
_ALWAYS = {"aten::nonzero": "nonzero (output size read back from the device)",
           "aten::argwhere": "argwhere (nonzero)",
           "aten::masked_select": "masked_select (output size read back from the device)",
           "aten::equal": "equal (a host bool of device values)",
           "aten::is_nonzero": "is_nonzero (a host bool of a device value)",
           "aten::bincount": "bincount (output size from the values)"}


def _schema_name(func: Any) -> str:
    return func._schema.name  # e.g. "aten::index"


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MODE_FRAMES = {"_check", "_fail", "__torch_dispatch__", "guarded"}


def _frames() -> list[str]:
    """The innermost frames of this checkout (file:line function), for the message."""
    out = []
    f = sys._getframe(1)
    while f is not None and len(out) < 8:
        fn = os.path.abspath(f.f_code.co_filename)
        if (fn.startswith(_ROOT) and f"{os.sep}.venv{os.sep}" not in fn
                and not (fn == os.path.abspath(__file__) and f.f_code.co_name in _MODE_FRAMES)):
            out.append(f"{os.path.relpath(fn, _ROOT)}:{f.f_lineno} {f.f_code.co_name}")
        f = f.f_back
    return out


def _in_draw_seed() -> bool:
    """Whether the caller is ``vlfast.kernels._common.draw_seed`` (the dropout seed)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "draw_seed" and f.f_code.co_filename.endswith(os.path.join("kernels", "_common.py")):
            return True
        f = f.f_back
    return False


def _non_cpu(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on an op that waits on the device (see the module
    docstring); counts every op it sees (``calls``, and per op in ``seen``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.seen: dict[str, int] = {}
        self.violations: list[str] = []
        self.seeds = 0
        self.in_custom_op = 0

    def _fail(self, what: str) -> None:
        msg = f"host sync: {what}\n  at " + "\n     ".join(_frames())
        self.violations.append(msg)
        raise HostSyncError(msg)

    def _check(self, func: Any, args: tuple, kwargs: dict) -> None:
        name = _schema_name(func)
        if name == "aten::_local_scalar_dense":
            if _in_draw_seed() and not _non_cpu(args[0]):
                self.seeds += 1
                return
            self._fail(f"{func} (a device value read on the host: .item(), int(t), bool(t))")
        if name in _ALWAYS:
            self._fail(f"{func}: {_ALWAYS[name]}")
        if "unique" in name:
            self._fail(f"{func} (output size from the values)")
        if name == "aten::repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
            self._fail(f"{func} without output_size (output size read back from the device)")
        if name in _INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            for i in idx or ():
                if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
                    self._fail(f"{func} with a boolean index (nonzero)")
        if name == "aten::_to_copy":
            dev = kwargs.get("device")
            if _non_cpu(args[0]) and dev is not None and torch.device(dev).type == "cpu":
                self._fail(f"{func}: a device-to-host copy ({args[0].device} -> cpu)")
        if name == "aten::copy_":
            dst, src = args[0], args[1]
            if isinstance(dst, torch.Tensor) and dst.device.type == "cpu" and _non_cpu(src):
                self._fail(f"{func}: a device-to-host copy ({src.device} -> cpu)")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        key = str(func)
        self.seen[key] = self.seen.get(key, 0) + 1
        if func.namespace == "vlfast":
            # a vlfast custom op: opaque (its implementation runs below the dispatcher)
            self.in_custom_op += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.in_custom_op -= 1
        self._check(func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync() -> Iterator[NoHostSync]:
    """The mode, with value checks off (the CUDA policy) and ``Tensor.tolist`` /
    ``Tensor.numpy`` guarded outside vlfast's custom ops."""
    mode = NoHostSync()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels_common, "value_checks_enabled", lambda t: False)
        for meth in ("tolist", "numpy"):
            mp.setattr(torch.Tensor, meth, _guarded(mode, meth, getattr(torch.Tensor, meth)))
        with mode:
            yield mode


def _guarded(mode: NoHostSync, meth: str, orig: Any) -> Any:
    def guarded(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if mode.in_custom_op == 0 and _active(mode):
            mode._fail(f"Tensor.{meth}() (a device-to-host read)")
        return orig(self, *args, **kwargs)
    return guarded


def _active(mode: NoHostSync) -> bool:
    return any(m is mode for m in _get_current_dispatch_mode_stack())


# ----------------------------------------------------------------------------------
# Batches as training builds them, and small models
# ----------------------------------------------------------------------------------

def _records() -> dict[str, ImageRecord]:
    g = np.random.default_rng(0)
    out = {}
    for k, n in (("a", 3), ("b", 5), ("c", 2)):
        xy = g.uniform(0.0, 0.5, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + g.uniform(0.1, 0.4, (n, 2)).astype(np.float32)], 1)
        out[k] = ImageRecord(k, g.standard_normal((n, FEAT)).astype(np.float32), boxes, width=640, height=480)
    return out


SAMPLES = [{"id": 0, "input_ids": [1, 50, 51, 52, 2], "img_id": "a"},
           {"id": 1, "input_ids": [1, 53, 2], "img_id": "b"},
           {"id": 2, "input_ids": [1, 54, 55, 56, 57, 2], "img_id": "c"}]


def _batch(device: str = "cpu") -> VLBatch:
    """A region-masking (MRFR) batch from the DataLoader collate_fn, moved as the
    training loop moves it (``batch.to(device)``)."""
    collate = make_collator("mrfr", _records(), seed=0)
    return collate(SAMPLES).to(device)


def _model(name: str, **cfg: Any) -> torch.nn.Module:
    cls, ccls, feat = MODELS[name]
    torch.manual_seed(0)
    return cls(ccls.small().replace(**{feat: FEAT}, **cfg)).train()   # dropout on, as in training


def _inputs(model: torch.nn.Module, batch: VLBatch, **extra: Any) -> dict[str, Any]:
    kw = batch.model_inputs(model, padding_free=True, **extra)
    if getattr(model.config, "task_specific_tokens", False):
        kw["task_ids"] = torch.ones(batch.batch_size, 1, dtype=torch.long, device=batch.input_ids.device)
    return kw


def _loss(out: Any) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in out.to_tuple())


def _run(model: torch.nn.Module, kw: dict[str, Any]) -> None:
    out = model(**kw)
    _loss(out).backward()


CASES = [("uniter", {}), ("vilbert", {}), ("vlbert", {}), ("visualbert", {}),
         ("vilbert", {"task_specific_tokens": True}), ("uniter", {"checkpointing": True})]


def _case_id(c: tuple[str, dict]) -> str:
    return c[0] + "".join(f"-{k}" for k in c[1])


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_padding_free_forward_and_backward_do_not_sync(case, backend):
    name, opts = case
    opts = dict(opts)
    ck = opts.pop("checkpointing", False)
    model = _model(name, **opts)
    if ck:
        model.gradient_checkpointing_enable()
    batch = _batch()
    assert batch.packing is not None and batch.current_packing() is batch.packing
    with ops.backend(backend), no_host_sync() as mode:
        kw = _inputs(model, batch)
        assert isinstance(kw["packing"], VLPacking)
        _run(model, kw)
        tokens = batch.num_real_tokens          # the tokens/s count: a host int of the packing
    assert tokens == int(batch.attention_mask.sum() + batch.visual_mask.sum())
    assert not mode.violations
    assert mode.calls > 100
    assert mode.seen.get("vlfast.varlen_attention_fwd.default", 0) > 0      # the packed path ran ...
    assert mode.seen.get("vlfast.varlen_attention_bwd.default", 0) > 0      # ... and its backward
    assert mode.seeds > 0                                                   # dropout was on
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(bool(torch.isfinite(g).all()) for g in grads)


# smaller still for the interpreter: one layer per stream (ViLBERT: text, vision, co-attention)
TRITON_SIZES = {"uniter": {"num_hidden_layers": 1}, "vlbert": {"num_hidden_layers": 1},
                "visualbert": {"num_hidden_layers": 1},
                "vilbert": {"num_hidden_layers": 2, "v_num_hidden_layers": 1, "v_biattention_id": [0],
                            "t_biattention_id": [1]}}


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_free_forward_and_backward_do_not_sync_triton(name):
    """The same under the Triton backend (its kernels run on CPU tensors through the
    interpreter: TRITON_INTERPRET=1, set by conftest without CUDA)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    model = _model(name, **TRITON_SIZES[name])
    batch = _batch()
    with ops.backend("triton"), no_host_sync() as mode:
        _run(model, _inputs(model, batch))
    assert not mode.violations and mode.calls > 100
    assert mode.seen.get("vlfast.varlen_attention_bwd.default", 0) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(MODELS))
def test_padding_free_step_does_not_sync_on_cuda(name):
    """On a GPU, the same step under ``torch.cuda.set_sync_debug_mode("error")`` too,
    which also sees the syncs inside aten kernels and the launchers (a dispatch mode
    sees only op calls).  One warm-up step first (Triton compiles and autotunes)."""
    model = _model(name).cuda()
    batch = _batch("cuda")
    _run(model, _inputs(model, batch))                      # warm-up
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    kw = _inputs(model, batch)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with no_host_sync() as mode:
            _run(model, kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not mode.violations and mode.calls > 100


@pytest.mark.parametrize("name", list(MODELS))
def test_the_mode_catches_the_sync_without_the_metadata(name):
    """Control: without ``packing`` the models pack from the mask (``Packed.from_mask``),
    and the mode catches that sync -- in the forward, before any backward."""
    model = _model(name)
    batch = _batch()
    with pytest.raises(HostSyncError, match="nonzero"):
        with no_host_sync():
            _run(model, _inputs(model, batch, packing=None))


def test_the_mode_catches_each_kind_of_sync():
    """Each forbidden op, one by one (the mode itself is tested)."""
    x = torch.arange(6.0).view(2, 3)
    m = x > 2
    cases = [lambda: x.sum().item(), lambda: int(x[0, 0]), lambda: bool(m.any()), lambda: x.nonzero(),
             lambda: x[m], lambda: x.masked_select(m), lambda: torch.unique(x), lambda: x.tolist(),
             lambda: torch.repeat_interleave(torch.tensor([1, 2])), lambda: torch.equal(x, x),
             lambda: x.index_put_((m,), torch.tensor(0.0))]
    for fn in cases:
        with pytest.raises(HostSyncError):
            with no_host_sync():
                fn()
    # and what is fine: index arithmetic, long indices, repeat_interleave with output_size
    with no_host_sync() as mode:
        idx = torch.tensor([0, 2])
        x.flatten().index_select(0, idx)
        x[torch.arange(2), idx]
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.where(m, x, 0)
    assert mode.calls > 0 and not mode.violations


# ----------------------------------------------------------------------------------
# The metadata itself
# ----------------------------------------------------------------------------------

def test_padded_and_padding_free_agree_with_the_metadata():
    """The metadata path gives the padded outputs (1e-5), for the four models."""
    batch = _batch()
    for name in MODELS:
        model = _model(name).eval()
        with torch.no_grad():
            ref = model(**batch.model_inputs(model))
            got = model(**batch.model_inputs(model, padding_free=True))
            again = model(**batch.model_inputs(model, padding_free=True, packing=None))
        for a, b, c in zip(ref.to_tuple(), got.to_tuple(), again.to_tuple()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
            torch.testing.assert_close(c, b, atol=0, rtol=0)


def test_collator_packing_is_the_packing_of_the_masks():
    batch = make_collator("itm", _records(), seed=0)(SAMPLES)
    p = batch.packing
    ref = VLPacking.from_masks(batch.attention_mask, batch.visual_mask)
    joint = torch.cat([batch.attention_mask, batch.visual_mask], 1)
    for which, mask in (("text", batch.attention_mask), ("visual", batch.visual_mask), ("joint", joint)):
        got, want, pk = getattr(p, which), getattr(ref, which), Packed.from_mask(mask)
        assert torch.equal(got.index, want.index) and torch.equal(got.index, pk.index)
        assert torch.equal(got.cu_seqlens, want.cu_seqlens) and torch.equal(got.cu_seqlens, pk.cu_seqlens)
        assert got.max_seqlen == want.max_seqlen == pk.max_seqlen and got.width == mask.shape[1]
    assert p.describes(batch.attention_mask, batch.visual_mask)
    lens = batch.attention_mask.sum(1).numpy()
    direct = batch_packing(lens, batch.visual_mask.sum(1).numpy(), *batch.attention_mask.shape[1:],
                           batch.visual_mask.shape[1])
    assert torch.equal(direct.joint.index, p.joint.index) and direct.joint.total == int(joint.sum())


def test_extended_layout_is_the_packing_of_the_extended_mask():
    g = torch.Generator().manual_seed(0)
    for B, L in ((3, 5), (1, 1), (4, 0), (0, 3)):
        mask = torch.rand(B, L, generator=g) > 0.4          # with holes, and empty rows
        lay = PackedLayout.from_mask(mask)
        for before, after in ((0, 1), (1, 0), (2, 3)):
            ext = lay.extended(before, after)
            big = torch.cat([torch.ones(B, before, dtype=torch.bool), mask, torch.ones(B, after, dtype=torch.bool)], 1)
            want = Packed.from_mask(big)
            assert torch.equal(ext.index, want.index), (B, L, before, after)
            assert torch.equal(ext.cu_seqlens, want.cu_seqlens) and ext.max_seqlen == want.max_seqlen
            assert ext.width == L + before + after
            Packed.from_layout(ext, big)                    # its value check agrees


def test_extended_layout_does_not_sync():
    lay = PackedLayout.from_mask(torch.tensor([[True, True, False], [True, False, False]]))
    with no_host_sync() as mode:
        lay.extended(1, 1)
    assert mode.calls > 0


def test_batch_packing_follows_the_masks():
    """The metadata is used only while it describes the batch's very masks: pinned (or
    other equal) copies rebind it on the CPU; other masks recompute it on the CPU; a
    device batch with other masks passes none (the model packs from the masks)."""
    batch = _batch()
    p = batch.packing
    # pinned copies (what the DataLoader's pin-memory thread makes): same values, new tensors
    copied = dataclasses.replace(batch, attention_mask=batch.attention_mask.clone(),
                                 visual_mask=batch.visual_mask.clone())
    q = copied.current_packing()
    assert q is not None and q.describes(copied.attention_mask, copied.visual_mask)
    assert torch.equal(q.joint.index, p.joint.index)
    moved = copied.to("cpu")
    assert moved.packing is not None and moved.packing.describes(moved.attention_mask, moved.visual_mask)
    # other masks (a row dropped): recomputed, never stale
    vm = batch.visual_mask.clone()
    vm[1, 1:] = False
    other = dataclasses.replace(batch, visual_mask=vm)
    r = other.current_packing()
    assert torch.equal(r.joint.index, VLPacking.from_masks(other.attention_mask, vm).joint.index)
    assert not torch.equal(r.joint.index, p.joint.index)
    # images shuffled: the rolled masks' packing
    sh = dataclasses.replace(batch, targets={}).with_images_shuffled(1)
    assert sh.packing.describes(sh.attention_mask, sh.visual_mask)
    want = VLPacking.from_masks(sh.attention_mask, sh.visual_mask)
    for which in ("text", "visual", "joint"):
        assert torch.equal(getattr(sh.packing, which).index, getattr(want, which).index)
    # a batch the model is given a stale layout for: the model's value check refuses it (on CPU)
    model = _model("uniter")
    with pytest.raises(ValueError, match="packing.joint: expected the packing of the mask"):
        model(**other.model_inputs(model, padding_free=True, packing=p))
    with pytest.raises(ValueError, match=r"packing.joint: expected the layout of a \(B=3"):
        model(**batch.model_inputs(model, padding_free=True, packing=VLPacking.from_masks(
            batch.attention_mask[:2], batch.visual_mask[:2])))
    with pytest.raises(ValueError, match="packing: expected a VLPacking"):
        model(**batch.model_inputs(model, padding_free=True, packing=p.joint))
