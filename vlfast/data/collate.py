"""Collators: sample dicts + an ImageRecord mapping -> a padded :class:`VLBatch`.

Every collator pads text to the batch's longest sequence and regions to the batch's
largest region count, fills ``image_size`` from the records' (width, height), puts
the shared target names of :mod:`vlfast.data.batch` in ``batch.targets`` and the
ids in ``batch.meta``.

Sample dict fields (all tasks)::

    {"input_ids": list[int],        # complete token ids, [CLS] ... [SEP] included
     "img_id": str,                 # key into the ImageRecord mapping
     "token_type_ids": list[int],   # optional, default all 0
     "id": str | int}               # optional example id (meta["ids"]; seeds Collator's rng)

Task-specific fields::

    vqa        "answers": list[str] (the human answers; score per answer =
               min(1, 0.3 x count): 0, .3, .6, .9, 1) or "answer_scores": {answer: score}
    nlvr2      "img_ids": [left, right] (instead of "img_id"), "label": 0/1
    mc         "choices": list[list[int]] (K answer token ids each), "label": int
               (VCR items -- a question with answers and rationales -- become Q->A and
               QA->R samples of this form by :func:`vcr_samples`)
    ref        "target_region": int (index of the referred region)
    nlvr2      (layout "triplet": the same fields; both images share one row)
    retrieval  "neg_img_ids": list[str] (optional: explicit, e.g. hard, negatives),
               "neg_input_ids": list[list[int]] (optional: negative texts)
    grounding  "phrases": list of {"position": int, "regions": list[int]} (a caption
               with several phrases: VisualBERT's layout), or "target_regions":
               list[int] (the text is one phrase: ViLBERT's layout)

A fine-tuning target is produced when every sample carries its field, and left out
when none does (test splits); a batch mixing both is an error.

``meta``: ``"task"``; ``"ids"`` (per sample); ``"img_ids"`` (per row: the image
each row of the batch shows -- for ITM the negative where there is one);
``"pos_img_ids"`` (per sample, ITM/retrieval).

Pretraining tasks of :func:`collate_pretrain` (conditional masking: one modality):

    "mlm"                words masked (15%, 80/10/10, >= 1 per sample); mlm_labels
    "mrfr", "mrc", "mrc-kl", "mrc-vlbert"
                         regions masked (15%, >= 1 per image): their visual_feats are
                         zeroed; img_masks, masked_feats, masked_soft_labels
    "mrm-vilbert"        as above plus ViLBERT's overlap rule (IoU > 0.4 with a masked
                         region -> masked too)
    "itm"                no masking; with probability itm_neg_prob (0.5) a sample's
                         image is replaced by a different image id; itm_labels
                         (1 = matched).  The same batches serve WRA and VisualBERT's
                         sentence-image prediction.

Rows and samples: NLVR2 (paired: one row per image), multiple choice (one row per
choice) and retrieval (one row per candidate image/text) give more rows than
samples; ``targets["pair_index"]`` (rows,) says which sample each row belongs to.
NLVR2's "triplet" layout (UNITER's triplet, VisualBERT) keeps one row per sample
with both images' regions and says which image each region is from in
``targets["img_index"]`` (B, Lv) long (0 left, 1 right).

Randomness: the functions take ``rng`` (a numpy Generator or an int seed;
:func:`collate_pretrain` also takes one Generator per sample).
:func:`make_collator` returns a picklable :class:`Collator` (DataLoader
``collate_fn``) that gives each sample its own generator from ``(seed, epoch, the
sample's id)`` -- a sample gets the same masks and negatives whatever the batch,
worker, rank or resume point, so 2 ranks x B draw what 1 process x 2B draws.

Packing helpers for the padding-free path: :func:`pack_offsets` (cu_seqlens),
:func:`packed_index` and :func:`joint_packed_index` (flat positions of the real
tokens, the layout ``Packed.from_mask`` builds), with a numba kernel, and
:func:`batch_packing`, which every collator runs on the host to fill
``VLBatch.packing`` (the models' ``packing=`` metadata: no host sync on the
padding-free forward).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from vlfast.data.batch import ImageRecord, VLBatch
from vlfast.data.masking import (IGNORE_INDEX, _njit, _use_numba, mask_regions_batch, mask_text_batch)
from vlfast.models.packing import PackedLayout, VLPacking

__all__ = ["PRETRAIN_TASKS", "FINETUNE_TASKS", "Collator", "make_collator", "collate_pretrain", "collate_vqa",
           "collate_nlvr2", "collate_mc", "vcr_samples", "VCR_MODES", "VCR_TYPE_IDS", "collate_ref", "collate_retrieval",
           "collate_grounding", "grounding_region_targets", "vqa_answer_score", "pack_offsets", "packed_index",
           "joint_packed_index", "batch_packing"]

TEXT_TASKS = ("mlm",)
REGION_TASKS = ("mrfr", "mrc", "mrc-kl", "mrc-vlbert", "mrm-vilbert")
SOFT_LABEL_TASKS = ("mrc", "mrc-kl", "mrc-vlbert", "mrm-vilbert")
PRETRAIN_TASKS = TEXT_TASKS + REGION_TASKS + ("itm",)
FINETUNE_TASKS = ("vqa", "nlvr2", "mc", "ref", "retrieval", "grounding")
NLVR2_LAYOUTS = ("paired", "triplet")
VCR_MODES = ("train", "eval")
VCR_TYPE_IDS = ("bert", "uniter")

RngLike = Union[np.random.Generator, int]
Sample = Mapping[str, Any]


# ----------------------------------------------------------------------------------
# Checks and padding
# ----------------------------------------------------------------------------------

def _rng(rng: Optional[RngLike], where: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"{where}: rng: expected a numpy.random.Generator or a non-negative int seed, got {rng!r}")


def _sample_rngs(rng: Any, n: int, where: str) -> Union[np.random.Generator, list[np.random.Generator]]:
    """One Generator for the batch (a Generator or an int seed), or a list of ``n``
    Generators, one per sample."""
    if isinstance(rng, (list, tuple)):
        if len(rng) != n:
            raise ValueError(f"{where}: rng: expected one Generator per sample ({n}), got {len(rng)}")
        for b, g in enumerate(rng):
            if not isinstance(g, np.random.Generator):
                raise TypeError(f"{where}: rng[{b}]: expected a numpy.random.Generator, got {g!r}")
        return list(rng)
    return _rng(rng, where)


def _check_samples(samples: Sequence[Sample], where: str) -> None:
    if len(samples) == 0:
        raise ValueError(f"{where}: samples: expected at least one sample, got an empty batch")
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping):
            raise TypeError(f"{where}: samples[{i}]: expected a dict, got {type(s).__name__}")


def _field(sample: Sample, key: str, i: int, where: str) -> Any:
    if key not in sample:
        raise KeyError(f"{where}: samples[{i}]: missing field {key!r} (has {sorted(sample)})")
    return sample[key]


def _ids(x: Any, what: str, where: str) -> list[int]:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: {what}: expected a non-empty list of int token ids, "
                         f"got {type(x).__name__} of shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64).tolist()


def _text(sample: Sample, i: int, where: str) -> tuple[list[int], list[int]]:
    ids = _ids(_field(sample, "input_ids", i, where), f"samples[{i}]['input_ids']", where)
    tt = sample.get("token_type_ids")
    if tt is None:
        return ids, [0] * len(ids)
    tt = _ids(tt, f"samples[{i}]['token_type_ids']", where)
    if len(tt) != len(ids):
        raise ValueError(f"{where}: samples[{i}]['token_type_ids']: expected {len(ids)} entries "
                         f"(one per input id), got {len(tt)}")
    return ids, tt


def _record(records: Mapping[str, ImageRecord], img_id: Any, where: str) -> ImageRecord:
    try:
        rec = records[img_id]
    except KeyError as e:
        why = "not found in the records" if e.args in ((), (img_id,)) else str(e.args[0])
        raise KeyError(f"{where}: image record {img_id!r}: {why}") from e
    if not isinstance(rec, ImageRecord):
        raise TypeError(f"{where}: image record {img_id!r}: expected an ImageRecord, got {type(rec).__name__}")
    if rec.num_boxes < 1:
        raise ValueError(f"{where}: image record {img_id!r}: has no regions")
    return rec


def _pad_text(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    B, L = len(rows), max(len(r[0]) for r in rows)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    types = np.zeros((B, L), dtype=np.int64)
    mask = np.zeros((B, L), dtype=bool)
    for b, (i, t) in enumerate(rows):
        ids[b, :len(i)] = i
        types[b, :len(t)] = t
        mask[b, :len(i)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)


class _Images:
    """Padded region tensors of a list of records (numpy until the end)."""

    def __init__(self, recs: Sequence[ImageRecord], img_ids: Sequence[Any], where: str, need_soft: bool) -> None:
        F = recs[0].features.shape[1]
        soft = all(r.soft_labels is not None for r in recs)
        if need_soft and not soft:
            bad = next(i for i, r in zip(img_ids, recs) if r.soft_labels is None)
            raise ValueError(f"{where}: image record {bad!r}: soft_labels: needed by this task, got None")
        C = recs[0].soft_labels.shape[1] if soft else 0
        for i, r in zip(img_ids, recs):
            if r.features.shape[1] != F:
                raise ValueError(f"{where}: image record {i!r}: features: expected width {F} (as "
                                 f"{img_ids[0]!r}), got {r.features.shape[1]}")
            if soft and r.soft_labels.shape[1] != C:
                raise ValueError(f"{where}: image record {i!r}: soft_labels: expected {C} classes (as "
                                 f"{img_ids[0]!r}), got {r.soft_labels.shape[1]}")
        self.num_boxes = np.array([r.num_boxes for r in recs], dtype=np.int64)
        B, Lv = len(recs), int(self.num_boxes.max())
        self.feats = np.zeros((B, Lv, F), dtype=np.float32)
        self.boxes = np.zeros((B, Lv, 4), dtype=np.float32)
        self.mask = np.zeros((B, Lv), dtype=bool)
        self.soft = np.zeros((B, Lv, C), dtype=np.float32) if soft else None
        self.size = np.zeros((B, 2), dtype=np.float32)
        for b, r in enumerate(recs):
            n = r.num_boxes
            self.feats[b, :n] = r.features
            self.boxes[b, :n] = r.boxes
            self.mask[b, :n] = True
            if self.soft is not None:
                self.soft[b, :n] = r.soft_labels
            self.size[b] = (r.width, r.height)


def _batch(text_rows: Sequence[tuple[list[int], list[int]]], imgs: _Images, pad_id: int,
           targets: dict[str, Tensor], meta: dict[str, Any]) -> VLBatch:
    ids, amask, types = _pad_text(text_rows, pad_id)
    batch = VLBatch(input_ids=ids, attention_mask=amask, token_type_ids=types,
                    visual_feats=torch.from_numpy(imgs.feats), boxes=torch.from_numpy(imgs.boxes),
                    visual_mask=torch.from_numpy(imgs.mask), image_size=torch.from_numpy(imgs.size),
                    soft_labels=None if imgs.soft is None else torch.from_numpy(imgs.soft),
                    targets=targets, meta=meta)
    # the padding-free path's metadata, here on the host where the lengths are known
    # (rows are left-aligned: text_rows' lengths, imgs.num_boxes)
    txt_lens = np.array([len(r[0]) for r in text_rows], dtype=np.int64)
    packing = batch_packing(txt_lens, imgs.num_boxes, ids.shape[1], imgs.mask.shape[1],
                            masks=(amask.numpy().copy(), imgs.mask.copy()))
    batch.packing = packing.bound_to(batch.attention_mask, batch.visual_mask)
    return batch


def _images(records: Mapping[str, ImageRecord], img_ids: Sequence[Any], where: str,
            need_soft: bool = False) -> _Images:
    recs = [_record(records, i, where) for i in img_ids]
    return _Images(recs, img_ids, where, need_soft)


def _has_all(samples: Sequence[Sample], keys: Sequence[str], where: str) -> bool:
    """True when every sample has one of ``keys``, False when none does; else an error."""
    has = [any(k in s for k in keys) for s in samples]
    if all(has):
        return True
    if not any(has):
        return False
    i = has.index(False) if has[0] else has.index(True)
    raise ValueError(f"{where}: samples[{i}]: the batch mixes samples with and without "
                     f"{' / '.join(map(repr, keys))}")


def _sample_negative(pool: Sequence[Any], positive: Any, rng: np.random.Generator, where: str) -> Any:
    """Uniform draw from ``pool`` of an id different from ``positive`` (draw and retry)."""
    n = len(pool)
    if n == 0:
        raise ValueError(f"{where}: image_pool: expected image ids to draw negatives from, got none")
    for _ in range(64):
        cand = pool[int(rng.integers(n))]
        if cand != positive:
            return cand
    others = [x for x in pool if x != positive]
    if not others:
        raise ValueError(f"{where}: image_pool: no image other than {positive!r} to use as a negative")
    return others[int(rng.integers(len(others)))]


# ----------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------

def collate_pretrain(samples: Sequence[Sample], task: str, records: Mapping[str, ImageRecord], *,
                     rng: RngLike, mask_id: Optional[int] = None, vocab_range: Optional[tuple[int, int]] = None,
                     special_ids: Optional[Iterable[int]] = None, mask_prob: float = 0.15,
                     itm_neg_prob: float = 0.5, image_pool: Optional[Sequence[Any]] = None,
                     iou_threshold: float = 0.4, iou_offset: float = 0.0, pad_id: int = 0,
                     backend: str = "auto") -> VLBatch:
    """Collate B pretraining samples for one task (see the module docstring).

    Args:
        samples: dicts with "input_ids" and "img_id" (+ optional "token_type_ids", "id").
        task: one of PRETRAIN_TASKS.
        records: img_id -> ImageRecord.
        rng: numpy Generator or int seed (every random choice of the batch), or a list
            of B Generators, one per sample (each sample's choices from its own).
        mask_id, vocab_range, special_ids: [MASK] id, [lo, hi) of random words, ids
            never masked -- needed by "mlm".
        mask_prob: words / regions masking probability.
        itm_neg_prob: probability that an ITM sample gets a negative image.
        image_pool: image ids negatives are drawn from (default: the records' keys).
        iou_threshold, iou_offset: ViLBERT's overlap rule ("mrm-vilbert").
        pad_id: text padding id.  backend: masking kernels ("auto" | "numba" | "numpy").

    Returns:
        VLBatch (B rows; Lt = longest text, Lv = most regions).  targets:
        mlm: ``mlm_labels`` (B,Lt) long (-100 = not masked, padding included);
        region tasks: ``img_masks`` (B,Lv) bool, ``masked_feats`` (Nm,F) float32 original
        features, ``masked_soft_labels`` (Nm,C) (when the records have soft labels;
        required by the mrc/mrm tasks), in ``img_masks.nonzero()`` order;
        itm: ``itm_labels`` (B,) long.
    """
    where = f"collate_pretrain[{task}]"
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"collate_pretrain: task: expected one of {PRETRAIN_TASKS}, got {task!r}")
    _check_samples(samples, where)
    g = _sample_rngs(rng, len(samples), where)
    text = [_text(s, i, where) for i, s in enumerate(samples)]
    pos_ids = [_field(s, "img_id", i, where) for i, s in enumerate(samples)]
    meta: dict[str, Any] = {"task": task, "ids": [s.get("id") for s in samples]}
    targets: dict[str, Tensor] = {}

    if task == "itm":
        if not 0.0 <= float(itm_neg_prob) <= 1.0:
            raise ValueError(f"{where}: itm_neg_prob: expected a probability in [0, 1], got {itm_neg_prob!r}")
        pool = list(records.keys()) if image_pool is None else image_pool
        if isinstance(g, list):  # per sample: the coin, then the negative, from its own generator
            neg = np.array([gb.random() < float(itm_neg_prob) for gb in g], dtype=bool)
            img_ids = [_sample_negative(pool, p, gb, where) if n else p for p, n, gb in zip(pos_ids, neg, g)]
        else:
            neg = g.random(len(samples)) < float(itm_neg_prob)
            img_ids = [_sample_negative(pool, p, g, where) if n else p for p, n in zip(pos_ids, neg)]
        imgs = _images(records, img_ids, where)
        targets["itm_labels"] = torch.from_numpy((~neg).astype(np.int64))
        meta.update(img_ids=img_ids, pos_img_ids=list(pos_ids))
        return _batch(text, imgs, pad_id, targets, meta)

    imgs = _images(records, pos_ids, where, need_soft=task in SOFT_LABEL_TASKS)
    meta["img_ids"] = list(pos_ids)
    if task == "mlm":
        if mask_id is None or vocab_range is None or special_ids is None:
            raise ValueError(f"{where}: mask_id, vocab_range and special_ids are needed for MLM, got "
                             f"mask_id={mask_id!r}, vocab_range={vocab_range!r}, special_ids={special_ids!r}")
        masked = mask_text_batch([t[0] for t in text], g, vocab_range, mask_id, special_ids, mask_prob, backend)
        labels = np.full((len(samples), max(len(t[0]) for t in text)), IGNORE_INDEX, dtype=np.int64)
        for b, (ids, lab) in enumerate(masked):
            labels[b, :len(lab)] = lab
        text = [(ids.tolist(), t[1]) for (ids, _), t in zip(masked, text)]
        targets["mlm_labels"] = torch.from_numpy(labels)
        return _batch(text, imgs, pad_id, targets, meta)

    # region tasks
    boxes = [imgs.boxes[b, :n] for b, n in enumerate(imgs.num_boxes)] if task == "mrm-vilbert" else None
    masks = mask_regions_batch(imgs.num_boxes, g, mask_prob, boxes,
                               iou_threshold if task == "mrm-vilbert" else None, iou_offset, backend)
    img_masks = np.zeros_like(imgs.mask)
    for b, m in enumerate(masks):
        img_masks[b, :len(m)] = m
    targets["masked_feats"] = torch.from_numpy(imgs.feats[img_masks])
    if imgs.soft is not None:
        targets["masked_soft_labels"] = torch.from_numpy(imgs.soft[img_masks])
    imgs.feats[img_masks] = 0.0
    targets["img_masks"] = torch.from_numpy(img_masks)
    return _batch(text, imgs, pad_id, targets, meta)


# ----------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------

_VQA_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def vqa_answer_score(count: int) -> float:
    """Soft score of an answer given by ``count`` of the annotators: min(1, 0.3 x count)
    -- 0, 0.3, 0.6, 0.9, then 1 (bottom-up-attention's ``compute_softscore``, the
    targets UNITER and VisualBERT train on)."""
    if count < 0:
        raise ValueError(f"vqa_answer_score: count: expected >= 0, got {count}")
    return _VQA_SCORES[min(int(count), 4)]


def collate_vqa(samples: Sequence[Sample], records: Mapping[str, ImageRecord], answer_map: Mapping[str, int], *,
                pad_id: int = 0) -> VLBatch:
    """VQA: one row per question.  ``targets["vqa_targets"]`` (B, A) float32 soft scores
    over ``answer_map`` (answer -> label index, A = len(answer_map)); answers outside
    the map are dropped (as in the official preprocessing).  Samples: "answers"
    (list[str]) or "answer_scores" ({answer: score})."""
    where = "collate_vqa"
    _check_samples(samples, where)
    A = len(answer_map)
    if A == 0:
        raise ValueError(f"{where}: answer_map: expected at least one answer, got an empty map")
    text = [_text(s, i, where) for i, s in enumerate(samples)]
    img_ids = [_field(s, "img_id", i, where) for i, s in enumerate(samples)]
    imgs = _images(records, img_ids, where)
    targets: dict[str, Tensor] = {}
    if _has_all(samples, ("answers", "answer_scores"), where):
        t = np.zeros((len(samples), A), dtype=np.float32)
        for b, s in enumerate(samples):
            if "answer_scores" in s:
                scores = dict(s["answer_scores"])
            else:
                answers = s["answers"]
                if isinstance(answers, str):
                    raise ValueError(f"{where}: samples[{b}]['answers']: expected a list of answer strings, "
                                     f"got the string {answers!r}")
                scores = {a: vqa_answer_score(c) for a, c in Counter(answers).items()}
            for a, sc in scores.items():
                k = answer_map.get(a)
                if k is not None:
                    if not 0 <= k < A:
                        raise ValueError(f"{where}: answer_map[{a!r}]: expected an index in [0, {A}), got {k}")
                    t[b, k] = sc
        targets["vqa_targets"] = torch.from_numpy(t)
    meta = {"task": "vqa", "ids": [s.get("id") for s in samples], "img_ids": img_ids}
    return _batch(text, imgs, pad_id, targets, meta)


def _int_label(s: Sample, i: int, where: str, hi: Optional[int] = None) -> int:
    lab = s["label"]
    if isinstance(lab, (bool, np.bool_)):
        lab = int(lab)
    if not isinstance(lab, (int, np.integer)) or lab < 0 or (hi is not None and lab >= hi):
        rng = f"[0, {hi})" if hi is not None else ">= 0"
        raise ValueError(f"{where}: samples[{i}]['label']: expected an int in {rng}, got {lab!r}")
    return int(lab)


def _concat_pairs(imgs: _Images) -> tuple[_Images, np.ndarray]:
    """Rows 2b, 2b+1 of ``imgs`` -> one row b holding row 2b's regions then row 2b+1's;
    also the (B, Lv) image index (0 / 1) of each slot."""
    n = imgs.num_boxes.reshape(-1, 2)
    B, Lv = n.shape[0], int(n.sum(1).max())
    out = _Images.__new__(_Images)
    out.num_boxes = n.sum(1)
    out.feats = np.zeros((B, Lv, imgs.feats.shape[2]), dtype=np.float32)
    out.boxes = np.zeros((B, Lv, 4), dtype=np.float32)
    out.mask = np.zeros((B, Lv), dtype=bool)
    out.soft = None if imgs.soft is None else np.zeros((B, Lv, imgs.soft.shape[2]), dtype=np.float32)
    out.size = imgs.size[0::2].copy()
    index = np.zeros((B, Lv), dtype=np.int64)
    for b in range(B):
        k = 0
        for j in range(2):
            r, m = 2 * b + j, int(n[b, j])
            out.feats[b, k:k + m] = imgs.feats[r, :m]
            out.boxes[b, k:k + m] = imgs.boxes[r, :m]
            if out.soft is not None:
                out.soft[b, k:k + m] = imgs.soft[r, :m]
            index[b, k:k + m] = j
            k += m
        out.mask[b, :k] = True
    return out, index


def collate_nlvr2(samples: Sequence[Sample], records: Mapping[str, ImageRecord], *, layout: str = "paired",
                  pad_id: int = 0) -> VLBatch:
    """NLVR2.  Samples: "img_ids" [left, right], "label" 0/1 (optional).

    layout "paired" (UNITER's "paired"/"paired-attn", ViLBERT's NLVR2): each sample's
    statement is paired with each of its two images -> 2B rows, sample b on rows 2b
    (left) and 2b+1 (right); ``pair_index`` (2B,) long.

    layout "triplet" (UNITER's "triplet", VisualBERT's NLVR2): one row per sample, the
    statement once and the left image's regions followed by the right one's (Lv = the
    largest sum); ``img_index`` (B, Lv) long: 0 for the left image's regions, 1 for the
    right one's (0 at padding); ``image_size`` is the left image's.  meta["img_ids"] is
    per row: the pair [left, right].

    ``nlvr2_labels`` (B,) long in both layouts."""
    where = "collate_nlvr2"
    if layout not in NLVR2_LAYOUTS:
        raise ValueError(f"{where}: layout: expected one of {NLVR2_LAYOUTS}, got {layout!r}")
    _check_samples(samples, where)
    text, img_ids = [], []
    for i, s in enumerate(samples):
        pair = _field(s, "img_ids", i, where)
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"{where}: samples[{i}]['img_ids']: expected two image ids [left, right], got {pair!r}")
        t = _text(s, i, where)
        text += [t, t]
        img_ids += list(pair)
    imgs = _images(records, img_ids, where)
    if layout == "triplet":
        joint, index = _concat_pairs(imgs)
        targets = {"img_index": torch.from_numpy(index)}
        if _has_all(samples, ("label",), where):
            targets["nlvr2_labels"] = torch.tensor([_int_label(s, i, where, 2) for i, s in enumerate(samples)],
                                                   dtype=torch.long)
        meta = {"task": "nlvr2", "ids": [s.get("id") for s in samples],
                "img_ids": [list(img_ids[2 * b:2 * b + 2]) for b in range(len(samples))]}
        return _batch(text[0::2], joint, pad_id, targets, meta)
    targets = {"pair_index": torch.arange(len(samples), dtype=torch.long).repeat_interleave(2)}
    if _has_all(samples, ("label",), where):
        targets["nlvr2_labels"] = torch.tensor([_int_label(s, i, where, 2) for i, s in enumerate(samples)],
                                               dtype=torch.long)
    meta = {"task": "nlvr2", "ids": [s.get("id") for s in samples], "img_ids": img_ids}
    return _batch(text, imgs, pad_id, targets, meta)


def collate_mc(samples: Sequence[Sample], records: Mapping[str, ImageRecord], *, sep_id: Optional[int] = None,
               pad_id: int = 0) -> VLBatch:
    """VCR-style multiple choice: sample b's K choices give rows bK .. bK+K-1, each the
    question ids + the choice ids (+ ``sep_id`` when given), token type 0 for the
    question (or the sample's "token_type_ids") and 1 for the choice (or the sample's
    "choice_type_id").  ``pair_index`` (BK,) long; ``mc_labels`` (B,) long (the right
    choice).  Samples: "choices" list of K id lists (same K in the batch), "label"."""
    where = "collate_mc"
    _check_samples(samples, where)
    K = None
    text, img_ids = [], []
    for i, s in enumerate(samples):
        q, qt = _text(s, i, where)
        choices = _field(s, "choices", i, where)
        if K is None:
            K = len(choices)
            if K < 2:
                raise ValueError(f"{where}: samples[{i}]['choices']: expected at least 2 choices, got {K}")
        if len(choices) != K:
            raise ValueError(f"{where}: samples[{i}]['choices']: expected {K} choices (as samples[0]), "
                             f"got {len(choices)}")
        img = _field(s, "img_id", i, where)
        ct = s.get("choice_type_id", 1)
        if not isinstance(ct, (int, np.integer)) or isinstance(ct, bool) or ct < 0:
            raise ValueError(f"{where}: samples[{i}]['choice_type_id']: expected a token type (an int >= 0), "
                             f"got {ct!r}")
        for k, c in enumerate(choices):
            c = _ids(c, f"samples[{i}]['choices'][{k}]", where) + ([] if sep_id is None else [int(sep_id)])
            text.append((q + c, qt + [int(ct)] * len(c)))
            img_ids.append(img)
    imgs = _images(records, img_ids, where)
    targets = {"pair_index": torch.arange(len(samples), dtype=torch.long).repeat_interleave(K)}
    if _has_all(samples, ("label",), where):
        targets["mc_labels"] = torch.tensor([_int_label(s, i, where, K) for i, s in enumerate(samples)],
                                            dtype=torch.long)
    meta = {"task": "mc", "ids": [s.get("id") for s in samples], "img_ids": img_ids}
    return _batch(text, imgs, pad_id, targets, meta)


def vcr_samples(items: Sequence[Sample], *, sep_id: int, mode: str, type_ids: str = "bert") -> list[dict[str, Any]]:
    """VCR's two sub-tasks as multiple-choice samples for :func:`collate_mc`.

    An item: ``{"id", "input_ids" (the question, [CLS] ... [SEP]), "img_id", "choices"
    (K answers, token ids without [CLS]/[SEP]), "rationale_choices" (K rationales, the
    same), and, when labelled, "label" (the right answer) and "rationale_label"}``.
    Samples (each with the item's ``img_id``, ``"item"``: its index in ``items``,
    ``"item_id"``: its id (the index when it has none), ``"vcr"``: "q2a" | "qa2r",
    ``"answer"``: the answer a QA->R sample is given, None for Q->A):

    * Q->A: id ``"<id>/q2a"``, the question, ``choices`` = the answers, ``label`` =
      the right answer;
    * QA->R given answer j: id ``"<id>/qa2r/<j>"``, ``input_ids`` = the question +
      answer j + ``sep_id`` (one text segment, token types 0, as the BERT baseline of
      Zellers et al. 2019; :func:`collate_mc` appends each rationale as segment 1),
      ``choices`` = the rationales, ``label`` = the right rationale (the one that
      justifies the right answer, for every j: each batch is all labelled or all not).

    ``mode="train"``: per item its Q->A sample, then its QA->R sample given the right
    answer (UNITER trains on Q->A and QA->R data together) -- needs the labels.
    ``mode="eval"``: per item its Q->A sample, then QA->R given every answer j = 0..K-1
    (VCR's submission holds the rationale probabilities given each answer; QA->R
    accuracy reads the one given the right answer).  Returns 2N (train) or N(K+1)
    (eval) new dicts, in item order.

    ``type_ids``: "bert" -- the question (with the given answer) type 0, the choices
    type 1 (the default of :func:`collate_mc`); "uniter" -- UNITER's VCR types ([CLS] and
    the question 0, the answer 2, the rationale 3, each separator typed with the
    segment it opens: ``[CLS] q | [SEP] a | [SEP] r [SEP]``), set through the samples'
    ``token_type_ids`` and ``choice_type_id``."""
    where = "vcr_samples"
    if mode not in VCR_MODES:
        raise ValueError(f"{where}: mode: expected one of {VCR_MODES}, got {mode!r}")
    if type_ids not in VCR_TYPE_IDS:
        raise ValueError(f"{where}: type_ids: expected one of {VCR_TYPE_IDS}, got {type_ids!r}")
    uniter = type_ids == "uniter"
    if not isinstance(sep_id, (int, np.integer)) or isinstance(sep_id, bool) or sep_id < 0:
        raise ValueError(f"{where}: sep_id: expected a token id (an int >= 0), got {sep_id!r}")
    out: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        if not isinstance(it, Mapping):
            raise TypeError(f"{where}: items[{i}]: expected a dict, got {type(it).__name__}")
        q = _ids(_field(it, "input_ids", i, where), f"items[{i}]['input_ids']", where)
        answers = [_ids(a, f"items[{i}]['choices'][{k}]", where) for k, a in enumerate(_field(it, "choices", i, where))]
        rationales = [_ids(r, f"items[{i}]['rationale_choices'][{k}]", where)
                      for k, r in enumerate(_field(it, "rationale_choices", i, where))]
        K = len(answers)
        if K < 2 or len(rationales) != K:
            raise ValueError(f"{where}: items[{i}]: expected K >= 2 answers and K rationales, got "
                             f"{K} answers and {len(rationales)} rationales")
        labelled = "label" in it or "rationale_label" in it
        if labelled:
            for key in ("label", "rationale_label"):
                lab = _field(it, key, i, where)
                if not isinstance(lab, (int, np.integer)) or isinstance(lab, bool) or not 0 <= lab < K:
                    raise ValueError(f"{where}: items[{i}]['{key}']: expected an int in [0, {K}), got {lab!r}")
        elif mode == "train":
            raise ValueError(f"{where}: items[{i}]: mode 'train' needs 'label' and 'rationale_label' "
                             f"(the right answer and rationale), got fields {sorted(it)}")
        base = {"img_id": _field(it, "img_id", i, where), "item": i, "item_id": it.get("id", i)}
        qa = {**base, "id": f"{it.get('id', i)}/q2a", "input_ids": list(q), "choices": answers, "vcr": "q2a",
              "answer": None}
        if uniter:  # [CLS] q -> 0; [SEP] a [SEP] -> 2
            qa.update(token_type_ids=[0] * (len(q) - 1) + [2], choice_type_id=2)
        if labelled:
            qa["label"] = int(it["label"])
        out.append(qa)
        for j in ([int(it["label"])] if mode == "train" else range(K)):
            qr = {**base, "id": f"{it.get('id', i)}/qa2r/{j}", "input_ids": q + answers[j] + [int(sep_id)],
                  "choices": rationales, "vcr": "qa2r", "answer": j}
            if uniter:  # [CLS] q -> 0; [SEP] a -> 2; [SEP] r [SEP] -> 3
                qr.update(token_type_ids=[0] * (len(q) - 1) + [2] * (1 + len(answers[j])) + [3], choice_type_id=3)
            if labelled:
                qr["label"] = int(it["rationale_label"])
            out.append(qr)
    return out


def collate_ref(samples: Sequence[Sample], records: Mapping[str, ImageRecord], *, pad_id: int = 0) -> VLBatch:
    """Referring expressions (RefCOCO+-style region scoring): one row per expression;
    ``ref_targets`` (B,) long, the index of the referred region among the image's
    regions.  Samples: "target_region"."""
    where = "collate_ref"
    _check_samples(samples, where)
    text = [_text(s, i, where) for i, s in enumerate(samples)]
    img_ids = [_field(s, "img_id", i, where) for i, s in enumerate(samples)]
    imgs = _images(records, img_ids, where)
    targets: dict[str, Tensor] = {}
    if _has_all(samples, ("target_region",), where):
        tgt = []
        for i, (s, n) in enumerate(zip(samples, imgs.num_boxes)):
            r = s["target_region"]
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 <= r < n:
                raise ValueError(f"{where}: samples[{i}]['target_region']: expected a region index in "
                                 f"[0, {n}) (image {img_ids[i]!r}), got {r!r}")
            tgt.append(int(r))
        targets["ref_targets"] = torch.tensor(tgt, dtype=torch.long)
    meta = {"task": "ref", "ids": [s.get("id") for s in samples], "img_ids": img_ids}
    return _batch(text, imgs, pad_id, targets, meta)


def _sample_negative_text(pool: Sequence[Sample], positive: Any, rng: np.random.Generator, where: str
                          ) -> list[int]:
    """Uniform draw from ``pool`` of a text whose "img_id" differs from ``positive``."""
    n = len(pool)
    for _ in range(64):
        cand = pool[int(rng.integers(n))] if n else None
        if cand is not None and cand.get("img_id") != positive:
            return _ids(cand.get("input_ids"), "text_pool[...]['input_ids']", where)
    others = [t for t in pool if t.get("img_id") != positive]
    if not others:
        raise ValueError(f"{where}: text_pool: no text of an image other than {positive!r} to use as a negative")
    return _ids(others[int(rng.integers(len(others)))].get("input_ids"), "text_pool[...]['input_ids']", where)


def collate_retrieval(samples: Sequence[Sample], records: Mapping[str, ImageRecord], *,
                      rng: Optional[Union[RngLike, Sequence[np.random.Generator]]] = None, num_negatives: int = 0,
                      image_pool: Optional[Sequence[Any]] = None, num_text_negatives: int = 0,
                      text_pool: Optional[Sequence[Sample]] = None, pad_id: int = 0) -> VLBatch:
    """Image-text retrieval as ITM ranking (UNITER's ``ItmRankDataset``): sample b gives
    a group of rows -- the positive (its text, its image) first, then (its text,
    negative image) for each negative image, then (negative text, its image) for each
    negative text.  Negative images are the sample's "neg_img_ids" when present (hard
    negatives, or every other image at evaluation), else ``num_negatives`` draws from
    ``image_pool`` (default: the records' keys) different from the positive; negative
    texts come from "neg_input_ids" when present, else ``num_text_negatives`` draws
    from ``text_pool`` (dicts with "input_ids" and "img_id") of texts of other images
    (per sample: the image draws, then the text draws; ``rng`` is one Generator for the
    batch or one per sample).  Every sample must give the same number of rows.

    targets: ``itm_labels`` (rows,) long (1 on each group's first row), ``pair_index``
    (rows,) long.  meta["img_ids"] per row, meta["pos_img_ids"] per sample.
    """
    where = "collate_retrieval"
    _check_samples(samples, where)
    if not isinstance(num_negatives, (int, np.integer)) or num_negatives < 0:
        raise ValueError(f"{where}: num_negatives: expected an int >= 0, got {num_negatives!r}")
    if not isinstance(num_text_negatives, (int, np.integer)) or num_text_negatives < 0:
        raise ValueError(f"{where}: num_text_negatives: expected an int >= 0, got {num_text_negatives!r}")
    if num_text_negatives and not text_pool:
        raise ValueError(f"{where}: text_pool: expected texts to draw {num_text_negatives} negative texts from, "
                         f"got {'none' if text_pool is None else 'an empty pool'}")
    gen = None if rng is None else _sample_rngs(rng, len(samples), where)

    def g_of(i: int, what: str) -> np.random.Generator:
        if gen is None:
            raise ValueError(f"{where}: rng: needed to draw {what} per sample")
        return gen[i] if isinstance(gen, list) else gen

    pool = None
    text, img_ids, labels, index = [], [], [], []
    n_rows = None
    pos_ids = []
    for i, s in enumerate(samples):
        t = _text(s, i, where)
        pos = _field(s, "img_id", i, where)
        pos_ids.append(pos)
        if "neg_img_ids" in s:
            negs = list(s["neg_img_ids"])
            if pos in negs:
                raise ValueError(f"{where}: samples[{i}]['neg_img_ids']: contains the positive image {pos!r}")
        else:
            negs = []
            if num_negatives:
                g = g_of(i, f"{num_negatives} negatives")
                pool = (list(records.keys()) if image_pool is None else image_pool) if pool is None else pool
                negs = [_sample_negative(pool, pos, g, where) for _ in range(num_negatives)]
        if "neg_input_ids" in s:
            neg_txt = [_ids(x, f"samples[{i}]['neg_input_ids'][{k}]", where)
                       for k, x in enumerate(s["neg_input_ids"])]
        else:
            neg_txt = []
            if num_text_negatives:
                g = g_of(i, f"{num_text_negatives} negative texts")
                neg_txt = [_sample_negative_text(text_pool, pos, g, where)  # type: ignore[arg-type]
                           for _ in range(num_text_negatives)]
        rows = [(t, pos)] + [(t, n) for n in negs] + [((x, [0] * len(x)), pos) for x in neg_txt]
        if n_rows is None:
            n_rows = len(rows)
        elif len(rows) != n_rows:
            raise ValueError(f"{where}: samples[{i}]: expected {n_rows} rows (1 + negatives, as samples[0]), "
                             f"got {len(rows)}")
        for k, (tx, im) in enumerate(rows):
            text.append(tx)
            img_ids.append(im)
            labels.append(1 if k == 0 else 0)
            index.append(i)
    imgs = _images(records, img_ids, where)
    targets = {"itm_labels": torch.tensor(labels, dtype=torch.long),
               "pair_index": torch.tensor(index, dtype=torch.long)}
    meta = {"task": "retrieval", "ids": [s.get("id") for s in samples], "img_ids": img_ids,
            "pos_img_ids": pos_ids}
    return _batch(text, imgs, pad_id, targets, meta)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy boxes -> (N, M) IoU (0 where the union is empty)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def grounding_region_targets(boxes: np.ndarray, gold: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """Per-region targets of a phrase grounded to the regions ``gold`` (indices into
    ``boxes`` (N, 4) xyxy): each region's largest IoU with a gold region's box, zeroed
    below ``threshold`` (ViLBERT's grounding / RefCOCO targets; the gold regions get
    1).  (N,) float32."""
    if len(gold) == 0:
        raise ValueError("grounding_region_targets: gold: expected at least one gold region, got none")
    iou = _iou_matrix(boxes.astype(np.float64), boxes[list(gold)].astype(np.float64)).max(1)
    iou[list(gold)] = 1.0
    return np.where(iou >= threshold, iou, 0.0).astype(np.float32)


def _gold_regions(x: Any, n: int, what: str, where: str) -> list[int]:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 \
            or arr.max() >= n:
        raise ValueError(f"{where}: {what}: expected a non-empty list of region indices in [0, {n}), got {x!r}")
    return arr.astype(np.int64).tolist()


def collate_grounding(samples: Sequence[Sample], records: Mapping[str, ImageRecord], *, iou_threshold: float = 0.5,
                      pad_id: int = 0) -> VLBatch:
    """Phrase grounding (Flickr30k Entities-style): one row per sample, in one of two
    layouts (one per batch).

    * The text is one phrase (ViLBERT's FlickrGrounding): samples carry
      "target_regions" (the regions the phrase names) -> ``ref_region_targets`` (B, Lv)
      float32, :func:`grounding_region_targets` (IoU with the gold boxes, zeroed below
      ``iou_threshold``; 0 at padding).
    * The text is a caption with several phrases (VisualBERT's region-to-phrase
      alignment): samples carry "phrases", a list of {"position": the text position of
      the phrase's token, "regions": gold region indices} -> ``phrase_positions`` (B, P)
      long (-1 = padding, P = the most phrases of a sample) and ``phrase_targets``
      (B, P, Lv) float32: each phrase's distribution over the regions, uniform over
      those whose IoU with a gold region's box is >= ``iou_threshold`` (0 at padded
      phrases).

    Targets are made when every sample (every phrase) has its gold regions, left out
    when none does (phrase positions are always needed).  meta["gold_regions"]: per
    sample, the gold region lists (one per phrase; [] for the one-phrase layout's
    single list), for the accuracy."""
    where = "collate_grounding"
    _check_samples(samples, where)
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"{where}: iou_threshold: expected a value in (0, 1], got {iou_threshold!r}")
    text = [_text(s, i, where) for i, s in enumerate(samples)]
    img_ids = [_field(s, "img_id", i, where) for i, s in enumerate(samples)]
    imgs = _images(records, img_ids, where)
    B, Lv = imgs.mask.shape
    targets: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"task": "grounding", "ids": [s.get("id") for s in samples], "img_ids": img_ids}
    multi = _has_all(samples, ("phrases",), where)
    if not multi:
        if _has_all(samples, ("target_regions",), where):
            t = np.zeros((B, Lv), dtype=np.float32)
            gold = []
            for b, s in enumerate(samples):
                n = int(imgs.num_boxes[b])
                g = _gold_regions(s["target_regions"], n, f"samples[{b}]['target_regions']", where)
                t[b, :n] = grounding_region_targets(imgs.boxes[b, :n], g, iou_threshold)
                gold.append([g])
            targets["ref_region_targets"] = torch.from_numpy(t)
            meta["gold_regions"] = gold
        return _batch(text, imgs, pad_id, targets, meta)
    phrases = []
    for b, s in enumerate(samples):
        ph = s["phrases"]
        if isinstance(ph, (str, bytes)) or not isinstance(ph, Sequence):
            raise ValueError(f"{where}: samples[{b}]['phrases']: expected a list of {{'position', 'regions'}} dicts, "
                             f"got {type(ph).__name__}")
        phrases.append(ph)
    P = max(len(ph) for ph in phrases)
    pos = np.full((B, P), -1, dtype=np.int64)
    labelled = [all(isinstance(q, Mapping) and "regions" in q for q in ph) for ph in phrases]
    has_regions = all(labelled)
    if not has_regions and any(lab and len(ph) for lab, ph in zip(labelled, phrases)):
        i = labelled.index(False)
        raise ValueError(f"{where}: samples[{i}]['phrases']: the batch mixes phrases with and without 'regions'")
    t = np.zeros((B, P, Lv), dtype=np.float32)
    gold_all = []
    for b, ph in enumerate(phrases):
        L, n = len(text[b][0]), int(imgs.num_boxes[b])
        gold_b = []
        for k, q in enumerate(ph):
            if not isinstance(q, Mapping) or "position" not in q:
                raise ValueError(f"{where}: samples[{b}]['phrases'][{k}]: expected a dict with 'position' "
                                 f"(and 'regions'), got {q!r}")
            p_ = q["position"]
            if not isinstance(p_, (int, np.integer)) or isinstance(p_, bool) or not 0 <= p_ < L:
                raise ValueError(f"{where}: samples[{b}]['phrases'][{k}]['position']: expected a text position in "
                                 f"[0, {L}), got {p_!r}")
            pos[b, k] = int(p_)
            if has_regions:
                g = _gold_regions(q["regions"], n, f"samples[{b}]['phrases'][{k}]['regions']", where)
                hit = grounding_region_targets(imgs.boxes[b, :n], g, iou_threshold) > 0
                t[b, k, :n] = hit / hit.sum()
                gold_b.append(g)
        gold_all.append(gold_b)
    targets["phrase_positions"] = torch.from_numpy(pos)
    if has_regions:
        targets["phrase_targets"] = torch.from_numpy(t)
        meta["gold_regions"] = gold_all
    return _batch(text, imgs, pad_id, targets, meta)


# ----------------------------------------------------------------------------------
# The collate_fn object
# ----------------------------------------------------------------------------------

def _sample_key(s: Sample) -> list[int]:
    """A stable (process-independent) digest of one sample's identity (its "id", else
    its text and image)."""
    h = hashlib.blake2b(digest_size=16, person=b"vlfast-sample")
    if "id" in s:
        h.update(b"i" + repr(s["id"]).encode())
    else:
        h.update(b"t" + np.asarray(s.get("input_ids", ()), dtype=np.int64).tobytes())
        h.update(b"m" + repr(s.get("img_id", s.get("img_ids"))).encode())
    d = h.digest()
    return [int.from_bytes(d[k:k + 4], "little") for k in range(0, 16, 4)]


class Collator:
    """A DataLoader ``collate_fn``: ``collator(samples) -> VLBatch`` for one task.

    The records and options are bound once; the image pool for negatives is the
    records' keys, listed once.  Each sample's generator is
    ``default_rng([seed, epoch, digest of the sample's id])`` (:meth:`sample_rngs`),
    so its masks and negatives depend on neither the batch it is in, the worker,
    the rank, the batch order nor a resume.
    ``set_epoch`` changes them per epoch (DataLoader workers copy the collator when
    an epoch's iterator starts, so call it before iterating; with
    ``persistent_workers`` the epoch stays the one the workers started with).
    """

    def __init__(self, task: str, records: Mapping[str, ImageRecord], *, seed: int = 0,
                 **options: Any) -> None:
        if task not in PRETRAIN_TASKS + FINETUNE_TASKS:
            raise ValueError(f"Collator: task: expected one of {PRETRAIN_TASKS + FINETUNE_TASKS}, got {task!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"Collator: seed: expected a non-negative int, got {seed!r}")
        allowed = _OPTIONS["pretrain" if task in PRETRAIN_TASKS else task]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"Collator[{task}]: unknown options {unknown}; this task takes {sorted(allowed)}")
        self.task = task
        self.records = records
        self.seed = int(seed)
        self.epoch = 0
        self.options = dict(options)
        if task in ("itm", "retrieval") and self.options.get("image_pool") is None:
            self.options["image_pool"] = list(records.keys())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_rngs(self, samples: Sequence[Sample]) -> list[np.random.Generator]:
        """One generator per sample (masks, ITM and retrieval negatives)."""
        _check_samples(samples, f"Collator[{self.task}]")
        return [np.random.default_rng([self.seed, self.epoch] + _sample_key(s)) for s in samples]

    def __call__(self, samples: Sequence[Sample]) -> VLBatch:
        t = self.task
        if t in PRETRAIN_TASKS:
            return collate_pretrain(samples, t, self.records, rng=self.sample_rngs(samples), **self.options)
        if t == "vqa":
            return collate_vqa(samples, self.records, **self.options)
        if t == "nlvr2":
            return collate_nlvr2(samples, self.records, **self.options)
        if t == "mc":
            return collate_mc(samples, self.records, **self.options)
        if t == "ref":
            return collate_ref(samples, self.records, **self.options)
        if t == "grounding":
            return collate_grounding(samples, self.records, **self.options)
        return collate_retrieval(samples, self.records, rng=self.sample_rngs(samples), **self.options)


_OPTIONS = {
    "pretrain": ("mask_id", "vocab_range", "special_ids", "mask_prob", "itm_neg_prob", "image_pool",
                 "iou_threshold", "iou_offset", "pad_id", "backend"),
    "vqa": ("answer_map", "pad_id"),
    "nlvr2": ("layout", "pad_id"),
    "mc": ("sep_id", "pad_id"),
    "ref": ("pad_id",),
    "retrieval": ("num_negatives", "image_pool", "num_text_negatives", "text_pool", "pad_id"),
    "grounding": ("iou_threshold", "pad_id"),
}


def make_collator(task: str, records: Mapping[str, ImageRecord], *, seed: int = 0, **options: Any) -> Collator:
    """The :class:`Collator` of ``task`` (a pretraining task or "vqa", "nlvr2", "mc",
    "ref", "retrieval", "grounding") over ``records``; ``options`` are the keyword arguments of the
    task's collate function (e.g. ``mask_id``/``vocab_range``/``special_ids`` for
    "mlm", ``answer_map`` for "vqa")."""
    return Collator(task, records, seed=seed, **options)


# ----------------------------------------------------------------------------------
# Packing (padding-free path)
# ----------------------------------------------------------------------------------

def _lengths(lengths: Any, where: str) -> np.ndarray:
    arr = lengths.detach().cpu().numpy() if isinstance(lengths, Tensor) else np.asarray(lengths)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{where}: lengths: expected a 1-d sequence of ints, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{where}: lengths: expected lengths >= 0, got {arr.min()}")
    return arr


def pack_offsets(lengths: Any) -> Tensor:
    """(B,) lengths -> cu_seqlens (B+1,) int32: 0, l0, l0+l1, ... (varlen attention's)."""
    arr = _lengths(lengths, "pack_offsets")
    cu = np.zeros(arr.size + 1, dtype=np.int64)
    np.cumsum(arr, out=cu[1:])
    if cu[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"pack_offsets: lengths: total {cu[-1]} overflows int32 cu_seqlens")
    return torch.from_numpy(cu.astype(np.int32))


@_njit
def _packed_index_kernel(a_lens, a_width, b_lens, b_width, out):
    row = a_width + b_width
    k = 0
    for s in range(a_lens.shape[0]):
        base = s * row
        for i in range(a_lens[s]):
            out[k] = base + i
            k += 1
        for i in range(b_lens[s]):
            out[k] = base + a_width + i
            k += 1


def _packed_index_numpy(a_lens, a_width, b_lens, b_width):
    row = a_width + b_width
    B = a_lens.size
    starts = np.stack([np.arange(B) * row, np.arange(B) * row + a_width], 1).reshape(-1)
    lens = np.stack([a_lens, b_lens], 1).reshape(-1)
    cu = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    return np.repeat(starts - cu[:-1], lens) + np.arange(cu[-1])


def _packed(a_lens, a_width, b_lens, b_width, backend, where):
    if a_lens.size and a_lens.max() > a_width:
        raise ValueError(f"{where}: a length {a_lens.max()} exceeds the padded width {a_width}")
    if b_lens.size and b_lens.max() > b_width:
        raise ValueError(f"{where}: a length {b_lens.max()} exceeds the padded width {b_width}")
    if _use_numba(backend, where):
        out = np.empty(int(a_lens.sum() + b_lens.sum()), dtype=np.int64)
        _packed_index_kernel(a_lens, a_width, b_lens, b_width, out)
    else:
        out = _packed_index_numpy(a_lens, a_width, b_lens, b_width)
    return torch.from_numpy(out)


def packed_index(lengths: Any, max_len: int, backend: str = "auto") -> Tensor:
    """(B,) lengths of left-aligned rows padded to ``max_len`` -> (total,) int64 flat
    positions of the real tokens in the (B*max_len) view, row by row (what
    ``Packed.from_mask`` computes from the mask, without a device sync)."""
    arr = _lengths(lengths, "packed_index")
    return _packed(arr, int(max_len), np.zeros_like(arr), 0, backend, "packed_index")


def joint_packed_index(txt_lens: Any, num_boxes: Any, max_txt: int, max_boxes: int,
                       backend: str = "auto") -> Tensor:
    """Flat positions of the real tokens of the joint sequence [text (max_txt) |
    regions (max_boxes)] per row -- each sample's words, then its regions (UNITER's
    packed layout) -- in the (B*(max_txt+max_boxes)) view.  (total,) int64."""
    a = _lengths(txt_lens, "joint_packed_index")
    b = _lengths(num_boxes, "joint_packed_index")
    if a.size != b.size:
        raise ValueError(f"joint_packed_index: num_boxes: expected {a.size} entries (as txt_lens), got {b.size}")
    return _packed(a, int(max_txt), b, int(max_boxes), backend, "joint_packed_index")


def batch_packing(txt_lens: Any, num_boxes: Any, max_txt: int, max_boxes: int, backend: str = "auto", *,
                  masks: Optional[tuple[np.ndarray, np.ndarray]] = None) -> VLPacking:
    """The :class:`~vlfast.models.packing.VLPacking` of a batch of left-aligned rows,
    on the host: ``text`` (B, max_txt) and ``visual`` (B, max_boxes) layouts
    (:func:`packed_index`, :func:`pack_offsets`), and ``joint`` (each sample's words
    then its regions: :func:`joint_packed_index`), with their host ints (max_seqlen,
    total).  ``txt_lens``, ``num_boxes``: (B,) lengths.  ``masks``: the (B, max_txt)
    and (B, max_boxes) bool masks when the caller has them (else they are derived from
    the lengths); the packing keeps them as its host copies."""
    t = _lengths(txt_lens, "batch_packing")
    v = _lengths(num_boxes, "batch_packing")
    if t.size != v.size:
        raise ValueError(f"batch_packing: num_boxes: expected {t.size} entries (as txt_lens), got {v.size}")
    max_txt, max_boxes = int(max_txt), int(max_boxes)

    def longest(a: np.ndarray) -> int:
        return int(a.max()) if a.size else 0
    text = PackedLayout(packed_index(t, max_txt, backend), pack_offsets(t), longest(t), max_txt)
    visual = PackedLayout(packed_index(v, max_boxes, backend), pack_offsets(v), longest(v), max_boxes)
    joint = PackedLayout(joint_packed_index(t, v, max_txt, max_boxes, backend), pack_offsets(t + v), longest(t + v),
                         max_txt + max_boxes)
    if masks is None:
        masks = (np.arange(max_txt)[None, :] < t[:, None], np.arange(max_boxes)[None, :] < v[:, None])
    return VLPacking(text, visual, joint, host_masks=(np.asarray(masks[0], dtype=bool),
                                                      np.asarray(masks[1], dtype=bool)))
