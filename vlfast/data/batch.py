"""The records and the batch that flow from data sources to the models.

* :class:`ImageRecord` -- one image as a detector saw it: region features, boxes,
  confidences and soft class labels.  Every reader (UNITER LMDB, ViLBERT LMDB,
  bottom-up-attention tsv, npz folder) and the synthetic world produce these.
* :class:`VLBatch` -- a collated, padded batch of B samples; ``model_inputs(model)``
  turns it into the keyword arguments of any of the four models (each wants its own
  box format), and ``targets`` carries what the objectives and tasks need.  It also
  carries the packing metadata of the padding-free path (``packing``, a
  :class:`~vlfast.models.packing.VLPacking` the collator computes on the host), which
  ``model_inputs(model, padding_free=True)`` passes, so the model's forward and
  backward never wait on the device to learn where the real tokens are.

Boxes are stored once, normalised to the image: ``(N, 4)`` ``[x1, y1, x2, y2]`` in
[0, 1].  :func:`box_features` derives the model formats: UNITER's 7-d
``[x1,y1,x2,y2,w,h,w*h]``, ViLBERT's 5-d ``[x1,y1,x2,y2,area]``, VL-BERT's pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from vlfast.models.packing import VLPacking


@dataclass
class ImageRecord:
    """One image's detections.

    features (N, F) float32; boxes (N, 4) float32 normalised [x1,y1,x2,y2]; conf (N,)
    float32 detector confidences; soft_labels (N, C) float32 class distributions (or
    None); width/height in pixels.
    """
    img_id: str
    features: np.ndarray
    boxes: np.ndarray
    conf: Optional[np.ndarray] = None
    soft_labels: Optional[np.ndarray] = None
    width: int = 1
    height: int = 1

    def __post_init__(self) -> None:
        f, b = self.features, self.boxes
        if f.ndim != 2:
            raise ValueError(f"ImageRecord {self.img_id!r}: features: expected (N, F), got shape {f.shape}")
        if b.shape != (f.shape[0], 4):
            raise ValueError(f"ImageRecord {self.img_id!r}: boxes: expected shape ({f.shape[0]}, 4), got {b.shape}")
        if self.conf is not None and self.conf.shape != (f.shape[0],):
            raise ValueError(f"ImageRecord {self.img_id!r}: conf: expected shape ({f.shape[0]},), "
                             f"got {self.conf.shape}")
        if self.soft_labels is not None and (self.soft_labels.ndim != 2 or self.soft_labels.shape[0] != f.shape[0]):
            raise ValueError(f"ImageRecord {self.img_id!r}: soft_labels: expected ({f.shape[0]}, C), "
                             f"got {self.soft_labels.shape}")

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


def box_features(boxes: Tensor, kind: str, image_size: Optional[Tensor] = None) -> Tensor:
    """Normalised (..., 4) [x1,y1,x2,y2] -> a model's box format.

    kind "uniter": (..., 7) [x1,y1,x2,y2,w,h,w*h]; "vilbert": (..., 5)
    [x1,y1,x2,y2,w*h]; "vlbert": (..., 4) in pixels (needs image_size (B, 2) = (w, h)).
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    if kind == "uniter":
        return torch.stack([x1, y1, x2, y2, w, h, w * h], -1)
    if kind == "vilbert":
        return torch.stack([x1, y1, x2, y2, w * h], -1)
    if kind == "vlbert":
        if image_size is None:
            raise ValueError("box_features: image_size (B, 2) is needed for VL-BERT's pixel boxes")
        scale = torch.cat([image_size, image_size], -1).to(boxes.dtype)[:, None, :]
        return boxes * scale
    raise ValueError(f"box_features: kind: expected 'uniter', 'vilbert' or 'vlbert', got {kind!r}")


def _model_kind(model: Any) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", "")
    if mt not in ("uniter", "vilbert", "vlbert", "visualbert"):
        raise ValueError(f"VLBatch.model_inputs: unknown model type {mt!r} (expected one of the four models)")
    return mt


@dataclass
class VLBatch:
    """A padded batch of B samples (text length Lt, region count Lv).

    input_ids (B,Lt) long; attention_mask (B,Lt) bool; token_type_ids (B,Lt) long;
    visual_feats (B,Lv,F) float; boxes (B,Lv,4) normalised [x1,y1,x2,y2];
    visual_mask (B,Lv) bool; image_size (B,2) float (w, h) in pixels;
    soft_labels (B,Lv,C) detector class distributions or None.
    ``targets``: what a loss needs.  Names shared by the collators, objectives and
    tasks (Nm = number of masked regions, in ``img_masks.nonzero()`` order):

    - ``mlm_labels`` (B,Lt) long: original ids at masked words, -100 elsewhere
      (input_ids already hold [MASK]/random/kept tokens, 80/10/10);
    - ``img_masks`` (B,Lv) bool: masked regions (their visual_feats are zeroed);
      ``masked_feats`` (Nm,F) original features; ``masked_soft_labels`` (Nm,C)
      detector class distributions of the masked regions;
    - ``itm_labels`` (B,) long: 1 = the text matches the image (ITM, VisualBERT's
      sentence-image prediction, ViLBERT's alignment prediction);
    - ``vqa_targets`` (B,A) float soft scores; ``nlvr2_labels`` (B,) long;
      ``mc_labels`` (B,) long (VCR-style choice index); ``ref_targets`` (B,) long
      (index of the referred region); ``pair_index`` (B',) long when a sample spans
      several image-text pairs (NLVR2's two images, VCR's choices).
    ``meta``: non-tensor per-sample data (ids for prediction files).

    ``packing``: the :class:`~vlfast.models.packing.VLPacking` of ``attention_mask`` and
    ``visual_mask`` (text, visual and joint layouts: flat indices, cu_seqlens and the
    host ints max_seqlen / total), computed on the host by the collator or, lazily, by
    :meth:`current_packing` while the masks are on the CPU; :meth:`to` moves it with
    the batch.  It is used only while it describes this batch's very mask tensors
    (a batch rebuilt with other masks recomputes it on the CPU, or leaves the model to
    pack from the masks); it is not a field the losses read.
    """
    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    visual_feats: Tensor
    boxes: Tensor
    visual_mask: Tensor
    image_size: Tensor
    soft_labels: Optional[Tensor] = None
    targets: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    packing: Optional[VLPacking] = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_real_tokens(self) -> int:
        """Real words + real regions (the unit of tokens/s): the packing's host int when
        the batch has its packing metadata (no device read), else counted from the masks."""
        p = self.current_packing()
        if p is not None:
            return p.joint.total
        return int(self.attention_mask.sum()) + int(self.visual_mask.sum())

    def current_packing(self) -> Optional[VLPacking]:
        """The :class:`VLPacking` of this batch's masks, or None when none is at hand.

        ``self.packing`` when it describes these very mask tensors; else, while the
        masks are on the CPU, the packing rebound to them (same values, e.g. pinned
        copies) or computed from them on the host (numpy; cached in ``self.packing``);
        else (device masks it does not describe) None -- the model then packs from the
        masks itself, with a host sync.  Never reads a device value."""
        am, vm = self.attention_mask, self.visual_mask
        p = self.packing
        if p is not None and p.describes(am, vm):
            return p
        if am.device.type != "cpu" or vm.device.type != "cpu":
            return None
        if p is not None and p.matches_host(am, vm):
            p = p.bound_to(am, vm)
        else:
            p = VLPacking.from_masks(am, vm)
        self.packing = p
        return p

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VLBatch":
        """The batch on ``device``; its packing metadata (computed first, on the CPU,
        when the batch is there) travels with it."""
        p = self.current_packing()

        def mv(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, Tensor) else x
        out = dataclasses.replace(
            self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in ("targets", "meta", "packing")},
            targets={k: mv(v) for k, v in self.targets.items()}, meta=dict(self.meta), packing=None)
        if p is not None:
            out.packing = p.to(device, non_blocking, source=(out.attention_mask, out.visual_mask))
        return out

    def with_images_shuffled(self, shift: int = 1) -> "VLBatch":
        """The same texts paired with other samples' images: every image-side tensor
        (``visual_feats`` (B,Lv,F), ``boxes``, ``visual_mask``, ``image_size``,
        ``soft_labels`` and the region targets ``img_masks`` / ``masked_*`` are left
        alone) is rolled by ``shift`` along the batch, so sample i sees the image of
        sample i - shift.  Text, text targets and meta are shared.  A probe of how much
        a model's text predictions use the image (see ``mlm/image_gain`` in
        pretraining evaluation).  Needs B >= 2 and a shift that is not a multiple of
        B, else ValueError."""
        B = self.batch_size
        if not isinstance(shift, int) or B < 2 or shift % B == 0:
            raise ValueError(f"VLBatch.with_images_shuffled: shift: expected an int that is not a multiple "
                             f"of the batch size {B} (and B >= 2), got {shift!r}")
        img_targets = {"img_masks", "masked_feats", "masked_soft_labels"}
        if img_targets & set(self.targets):
            raise ValueError("VLBatch.with_images_shuffled: batch: expected a batch without masked regions "
                             f"(a text task's), got targets {sorted(img_targets & set(self.targets))}")

        def roll(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x.roll(shift, 0)
        out = dataclasses.replace(self, visual_feats=roll(self.visual_feats), boxes=roll(self.boxes),
                                  visual_mask=roll(self.visual_mask), image_size=roll(self.image_size),
                                  soft_labels=roll(self.soft_labels), targets=dict(self.targets),
                                  meta=dict(self.meta), packing=None)
        # the packing of the rolled masks, from the host copies of the masks (no device read)
        p = self.current_packing()
        if p is not None and p.host_masks is not None:
            t, v = p.host_masks
            rolled = VLPacking.from_masks(t, np.roll(v, shift, 0))
            out.packing = rolled.to(out.visual_mask.device, non_blocking=out.visual_mask.device.type == "cuda",
                                    source=(out.attention_mask, out.visual_mask))
        return out

    def model_inputs(self, model: Any, **extra: Any) -> dict[str, Any]:
        """Keyword arguments of ``model``'s forward (any of the four models), with the
        model's box format; ``extra`` is merged in (e.g. padding_free=True).  UNITER and
        VL-BERT also get ``targets["img_masks"]`` (the masked regions) when the batch has it.
        With ``padding_free=True`` every model also gets ``packing`` (the batch's
        :class:`VLPacking`, see :meth:`current_packing`) when there is one, so its
        padding-free forward and backward never wait on the device; an explicit
        ``packing`` in ``extra`` wins."""
        kind = _model_kind(model)
        kw: dict[str, Any] = dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                                  token_type_ids=self.token_type_ids, visual_feats=self.visual_feats,
                                  visual_mask=self.visual_mask)
        if kind == "uniter":
            kw["visual_boxes"] = box_features(self.boxes, "uniter")
            if "img_masks" in self.targets:
                kw["img_masks"] = self.targets["img_masks"]
        elif kind == "vilbert":
            kw["visual_boxes"] = box_features(self.boxes, "vilbert")
        elif kind == "vlbert":
            kw["visual_boxes"] = box_features(self.boxes, "vlbert", self.image_size)
            kw["image_size"] = self.image_size
            if "img_masks" in self.targets:     # masked RoIs (MVRC): the official mask rows
                kw["img_masks"] = self.targets["img_masks"]
        if extra.get("padding_free") and "packing" not in extra:
            p = self.current_packing()
            if p is not None:
                kw["packing"] = p
        kw.update(extra)
        return kw
