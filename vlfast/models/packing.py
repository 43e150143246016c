"""Packing of the real tokens for the padding-free path, and the packing metadata a
caller computes ahead of time so that the forward never waits on the device.

Shapes: B batch, L padded length, total = number of real tokens.

* :class:`Packed` -- the packing of one (B, L) mask as the encoder layers use it:
  ``index`` (total,) flat positions into B*L, ``cu_seqlens`` (B+1,) int32,
  ``max_seqlen`` (a host int), and the mask.  :meth:`Packed.from_mask` derives it
  from the mask's values: two host syncs on a GPU (``nonzero`` sizes the index, and
  the longest row is read back for ``max_seqlen``).
* :class:`PackedLayout` -- the same packing without the mask, computed on the host
  (numpy) where the mask is built (the collator), and moved to the device with the
  batch.  ``max_seqlen`` and ``total`` are host ints, so nothing on the forward or the
  backward has to read a device value.
* :class:`VLPacking` -- a batch's layouts: ``text`` (attention_mask), ``visual``
  (visual_mask) and ``joint`` (``[text | visual]``, each sample's words then its
  regions).  Every model takes one as ``packing=`` (``VLBatch.model_inputs`` passes
  it): UNITER and VisualBERT use ``joint``, VL-BERT ``joint`` with its [END] slot
  appended (:meth:`PackedLayout.extended`), ViLBERT ``text`` (with the task token
  prepended when it has one) and ``visual``.

The derived layouts (:meth:`PackedLayout.extended`) are built on the layout's device
from host ints and index arithmetic only: no ``nonzero``, no boolean indexing, no
``.item()``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from vlfast.kernels import _common as C

MaskLike = Union[Tensor, np.ndarray]


# ----------------------------------------------------------------------------------
# The encoder's packing of one mask
# ----------------------------------------------------------------------------------

@dataclass
class Packed:
    """The real tokens of a batch, packed: index (total,) int64 flat positions into
    B*L (row by row, each row's real tokens in order), cu_seqlens (B+1,) int32,
    max_seqlen (host int, the longest row), and the (B, L) bool mask they describe.

    ``pack`` / ``unpack`` and their gradients are ``index_select`` / ``index_copy_``
    with ``index``: no host sync."""
    index: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    mask: Tensor

    @property
    def total(self) -> int:
        """Number of real tokens (a host int: the index's length)."""
        return int(self.index.shape[0])

    @classmethod
    def from_mask(cls, mask: Tensor) -> "Packed":
        """From the (B, L) bool mask's values, on its device.  On a GPU this waits on
        the device twice (``nonzero`` and the longest row); callers that know the
        layout pass a :class:`PackedLayout` instead (:meth:`from_layout`)."""
        lens = mask.sum(1)
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lens.cumsum(0)
        # real tokens in row order (masks with holes are fine: the order is kept)
        index = mask.flatten().nonzero().squeeze(1)
        return cls(index, cu, int(lens.max()) if lens.numel() else 0, mask)

    @classmethod
    def from_layout(cls, layout: "PackedLayout", mask: Tensor, *, where: str = "Packed.from_layout",
                    arg: str = "layout") -> "Packed":
        """Bind a precomputed ``layout`` to the (B, L) bool ``mask`` it describes.

        Shapes and devices are checked always (host metadata only).  The values
        (that ``layout`` is the packing of ``mask``) are checked where value checks
        run -- on CPU always, on CUDA only with ``VLFAST_CHECK=1`` -- as those cost a
        host sync.  Errors name ``where`` and ``arg``."""
        if not isinstance(layout, PackedLayout):
            _fail(where, arg, "a PackedLayout", type(layout).__name__)
        B, L = mask.shape
        if layout.batch != B or layout.width != L:
            _fail(where, arg, f"the layout of a (B={B}, L={L}) mask", f"one of a (B={layout.batch}, "
                  f"L={layout.width}) mask")
        if layout.index.device != mask.device or layout.cu_seqlens.device != mask.device:
            _fail(where, arg, f"tensors on the mask's device ({mask.device}; move it with .to(device))",
                  f"index on {layout.index.device}, cu_seqlens on {layout.cu_seqlens.device}")
        if C.value_checks_enabled(mask):
            ref = cls.from_mask(mask)
            if (ref.total != layout.total or not torch.equal(ref.index, layout.index)
                    or not torch.equal(ref.cu_seqlens, layout.cu_seqlens) or ref.max_seqlen != layout.max_seqlen):
                _fail(where, arg, "the packing of the mask it is given with (index, cu_seqlens, max_seqlen)",
                      f"a layout of {layout.total} tokens, max_seqlen {layout.max_seqlen}, for a mask of "
                      f"{ref.total} real tokens, longest row {ref.max_seqlen}")
        return cls(layout.index, layout.cu_seqlens, layout.max_seqlen, mask)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (total, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(total, ...) -> (B, L, ...) with zeros at padding."""
        B, L = self.mask.shape
        out = x.new_zeros((B * L,) + tuple(x.shape[1:]))
        out.index_copy_(0, self.index, x)
        return out.view((B, L) + tuple(x.shape[1:]))


def _fail(where: str, arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{where}: {arg}: expected {expected}, got {got}")


# ----------------------------------------------------------------------------------
# Precomputed layouts
# ----------------------------------------------------------------------------------

def _host_mask(mask: MaskLike, where: str, arg: str) -> np.ndarray:
    """A (B, L) mask as a host bool array (a device tensor is copied: a sync)."""
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 2:
        _fail(where, arg, "a (B, L) mask", f"shape {tuple(m.shape)}")
    return m if m.dtype == np.bool_ else m != 0


@dataclass(frozen=True)
class PackedLayout:
    """Where the real tokens of a (B, L) mask are, computed ahead of the forward.

    index (total,) int64: flat positions into B*L, row by row (each row's real tokens
    in order) -- the layout :meth:`Packed.from_mask` builds; cu_seqlens (B+1,) int32:
    row offsets into the packed tokens; max_seqlen: the longest row; width: L.
    ``max_seqlen``, ``width``, ``batch`` and ``total`` are host ints: a model given a
    layout never reads a device value to size a grid or an output.
    """
    index: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    width: int

    def __post_init__(self) -> None:
        where = "PackedLayout"
        if not isinstance(self.index, Tensor) or self.index.dim() != 1 or self.index.dtype != torch.int64:
            _fail(where, "index", "a (total,) int64 tensor", _describe(self.index))
        if (not isinstance(self.cu_seqlens, Tensor) or self.cu_seqlens.dim() != 1
                or self.cu_seqlens.dtype != torch.int32 or self.cu_seqlens.shape[0] < 1):
            _fail(where, "cu_seqlens", "a (B+1,) int32 tensor", _describe(self.cu_seqlens))
        for name in ("max_seqlen", "width"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                _fail(where, name, "a host int >= 0", repr(v))
            object.__setattr__(self, name, int(v))
        if self.max_seqlen > self.width:
            _fail(where, "max_seqlen", f"at most the width ({self.width})", self.max_seqlen)

    @property
    def batch(self) -> int:
        """B (host int)."""
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def total(self) -> int:
        """Number of real tokens (host int)."""
        return int(self.index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.index.device

    @classmethod
    def from_mask(cls, mask: MaskLike) -> "PackedLayout":
        """The layout of a (B, L) mask (bool, or 0/1), computed on the host with numpy.
        Meant for the CPU masks of a collated batch; a device mask is copied to the
        host first (a sync)."""
        return cls._from_host(_host_mask(mask, "PackedLayout.from_mask", "mask"))

    @classmethod
    def _from_host(cls, m: np.ndarray) -> "PackedLayout":
        B, L = m.shape
        lens = m.sum(1, dtype=np.int64)
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        if cu[-1] > np.iinfo(np.int32).max:
            _fail("PackedLayout.from_mask", "mask", "at most 2**31 - 1 real tokens (int32 cu_seqlens)", int(cu[-1]))
        index = np.flatnonzero(m.reshape(-1)).astype(np.int64)
        return cls(torch.from_numpy(index), torch.from_numpy(cu.astype(np.int32)),
                   int(lens.max()) if B else 0, L)

    def to(self, device: Union[torch.device, str], non_blocking: bool = False) -> "PackedLayout":
        """The layout with its tensors on ``device`` (host ints unchanged).  A
        host-to-device move is always asynchronous (these tensors are never written
        after they are built, so that is safe), so moving the metadata never waits on
        the device, whatever ``non_blocking`` says."""
        dev = torch.device(device)
        nb = non_blocking or (self.device.type == "cpu" and dev.type != "cpu")
        return dataclasses.replace(self, index=self.index.to(dev, non_blocking=nb),
                                   cu_seqlens=self.cu_seqlens.to(dev, non_blocking=nb))

    def extended(self, before: int = 0, after: int = 0) -> "PackedLayout":
        """The layout of the mask with ``before`` real columns prepended and ``after``
        real columns appended to every row (ViLBERT's task token, VL-BERT's [END]
        slot): width L + before + after, each row ``before + after`` tokens longer.

        Built on the layout's device from host ints and index arithmetic (``//``,
        ``%``, ``index_copy_`` with long indices): no host sync."""
        if before < 0 or after < 0:
            _fail("PackedLayout.extended", "before/after", "ints >= 0", (before, after))
        extra = before + after
        if extra == 0:
            return self
        B, W, n, dev = self.batch, self.width, self.total, self.device
        W2 = W + extra
        out = torch.empty(n + B * extra, dtype=torch.int64, device=dev)
        if n:
            rows = torch.div(self.index, W, rounding_mode="floor")
            col = self.index - rows * W
            # packed position: old position + the extra slots of the rows before + own prefix
            pos = torch.arange(n, device=dev) + rows * extra + before
            out.index_copy_(0, pos, rows * W2 + before + col)
        if B:
            ar = torch.arange(B, device=dev)
            cu = self.cu_seqlens.long()
            for k in range(before):
                out.index_copy_(0, cu[:-1] + ar * extra + k, ar * W2 + k)
            for k in range(after):
                out.index_copy_(0, cu[1:] + ar * extra + before + k, ar * W2 + before + W + k)
        cu_new = self.cu_seqlens + (torch.arange(B + 1, device=dev, dtype=torch.int32) * extra)
        return PackedLayout(out, cu_new, self.max_seqlen + extra if B else 0, W2)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


@dataclass(frozen=True)
class VLPacking:
    """The packing metadata of a batch of B samples (text length Lt, Lv regions):

    * ``text``: layout of ``attention_mask`` (B, Lt);
    * ``visual``: layout of ``visual_mask`` (B, Lv);
    * ``joint``: layout of ``cat([attention_mask, visual_mask], 1)`` (B, Lt+Lv) --
      each sample's words, then its regions (UNITER's packed order).

    Built on the host by the collator (or :meth:`from_masks`), moved with the batch
    (:meth:`to`), passed to a model as ``packing=`` with ``padding_free=True``.

    ``source`` (the mask tensors it was computed from) and ``host_masks`` (numpy copies
    of them) let :class:`~vlfast.data.batch.VLBatch` tell whether it still describes
    its masks (see ``VLBatch.current_packing``); neither is needed by the models.
    """
    text: PackedLayout
    visual: PackedLayout
    joint: PackedLayout
    source: Optional[tuple[Tensor, Tensor]] = field(default=None, repr=False, compare=False)
    host_masks: Optional[tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("text", "visual", "joint"):
            if not isinstance(getattr(self, name), PackedLayout):
                _fail("VLPacking", name, "a PackedLayout", type(getattr(self, name)).__name__)
        t, v, j = self.text, self.visual, self.joint
        if not (t.batch == v.batch == j.batch) or j.width != t.width + v.width:
            _fail("VLPacking", "joint", f"the layout of a (B={t.batch}, Lt+Lv={t.width + v.width}) mask",
                  f"one of (B={j.batch}, {j.width}) (text B={t.batch}, visual B={v.batch})")

    @property
    def batch(self) -> int:
        return self.text.batch

    @property
    def device(self) -> torch.device:
        return self.joint.device

    @classmethod
    def from_masks(cls, attention_mask: MaskLike, visual_mask: MaskLike) -> "VLPacking":
        """All three layouts from the (B, Lt) and (B, Lv) masks, on the host (numpy);
        ``source`` is set to the given tensors.  Masks with holes are fine."""
        t = _host_mask(attention_mask, "VLPacking.from_masks", "attention_mask")
        v = _host_mask(visual_mask, "VLPacking.from_masks", "visual_mask")
        if t.shape[0] != v.shape[0]:
            _fail("VLPacking.from_masks", "visual_mask", f"{t.shape[0]} rows (as attention_mask)", v.shape[0])
        src = ((attention_mask, visual_mask) if isinstance(attention_mask, Tensor) and isinstance(visual_mask, Tensor)
               else None)
        return cls(PackedLayout._from_host(t), PackedLayout._from_host(v),
                   PackedLayout._from_host(np.concatenate([t, v], 1)), source=src, host_masks=(t, v))

    def describes(self, attention_mask: Tensor, visual_mask: Tensor) -> bool:
        """True when these are the very mask tensors it was built for (or was moved
        with); no tensor value is read."""
        return self.source is not None and self.source[0] is attention_mask and self.source[1] is visual_mask

    def matches_host(self, attention_mask: Tensor, visual_mask: Tensor) -> bool:
        """True when the given CPU masks hold the values it was built from (compared on
        the host; False for device masks or without host copies)."""
        if self.host_masks is None or attention_mask.device.type != "cpu" or visual_mask.device.type != "cpu":
            return False
        t, v = self.host_masks
        return (tuple(attention_mask.shape) == t.shape and tuple(visual_mask.shape) == v.shape
                and bool(np.array_equal(_host_mask(attention_mask, "", ""), t))
                and bool(np.array_equal(_host_mask(visual_mask, "", ""), v)))

    def bound_to(self, attention_mask: Tensor, visual_mask: Tensor) -> "VLPacking":
        """The same packing with ``source`` set to the given masks (which must hold the
        same values; the caller knows they do)."""
        return dataclasses.replace(self, source=(attention_mask, visual_mask))

    def to(self, device: Union[torch.device, str], non_blocking: bool = False,
           source: Optional[tuple[Tensor, Tensor]] = None) -> "VLPacking":
        """The layouts on ``device``; ``source``: the moved masks they now describe
        (None: keep none)."""
        return VLPacking(self.text.to(device, non_blocking), self.visual.to(device, non_blocking),
                         self.joint.to(device, non_blocking), source=source, host_masks=self.host_masks)


__all__ = ["Packed", "PackedLayout", "VLPacking"]
