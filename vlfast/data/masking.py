"""Conditional masking for pretraining: words (MLM) or regions (MRM), one modality at
a time, as UNITER does (a batch of the MLM task masks words only, a batch of a
region task masks regions only).

Words -- BERT's rule as UNITER's ``data/mlm.py::random_word`` applies it: each
non-special token is picked with probability ``prob`` (0.15); one uniform draw ``u``
decides both the pick (``u < prob``) and what happens to a picked token
(``u / prob < 0.8``: [MASK]; ``< 0.9``: a random word uniform in ``vocab_range``;
else kept); the label is the original id at picked positions and -100 elsewhere.
At least one word per sample: if nothing was picked, the *first* maskable token
becomes [MASK] (UNITER's rule: ``tokens[0]`` of the words, always [MASK]).

Regions -- UNITER's ``data/mrm.py::_get_img_mask``: each region is masked with
probability ``prob``; if none was, one region chosen uniformly at random is.
ViLBERT's overlap rule (vilbert-multi-task ``concept_cap_dataset.py``,
``random_region``): every region whose IoU with a picked region is above the
threshold (0.4) is masked too, so the masked content cannot be read off an
overlapping box.  (The official code computes the IoU on pixel boxes with the
legacy "+1" width convention -- ``iou_offset=1.0`` on pixel boxes reproduces it --
and applies the overlap set where it forms the global image feature; here the
overlap set is part of the returned mask.)

Randomness comes from a ``numpy.random.Generator`` in bulk draws per batch, or from
one Generator per sample (a sequence of B Generators): then each sample's draws
come from its own Generator, so a sample's mask does not depend on which batch or
rank it lands in (the training collator does this; 2 ranks x B = 1 process x 2B).
The per-sample loops (the 80/10/10 decisions with the at-least-one rule, the IoU
expansion) run in numba ``@njit`` kernels, with a vectorized numpy path that gives
identical results (``backend="numpy"``; "auto" uses numba when it is installed).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

try:  # numba is a dependency; the numpy path keeps the package importable without it
    import numba as _numba
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    _numba = None
    HAVE_NUMBA = False

__all__ = ["IGNORE_INDEX", "mask_text", "mask_text_batch", "mask_regions", "mask_regions_batch", "box_iou",
           "HAVE_NUMBA"]

IGNORE_INDEX = -100
_BACKENDS = ("auto", "numpy", "numba")


def _njit(fn):
    return _numba.njit(cache=True, nogil=True)(fn) if HAVE_NUMBA else fn


def _use_numba(backend: str, where: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError(f"{where}: backend='numba' needs the numba package, which is not installed")
    return backend == "numba" or (backend == "auto" and HAVE_NUMBA)


RngOrPerSample = Union[np.random.Generator, Sequence[np.random.Generator]]


def _check_rng(rng: RngOrPerSample, where: str, n: Optional[int] = None) -> None:
    """rng: one Generator, or (when ``n`` is given) a sequence of ``n`` Generators."""
    if isinstance(rng, np.random.Generator):
        return
    if n is not None and isinstance(rng, (list, tuple)):
        if len(rng) != n:
            raise ValueError(f"{where}: rng: expected one Generator per sample ({n}), got {len(rng)}")
        for b, g in enumerate(rng):
            if not isinstance(g, np.random.Generator):
                raise TypeError(f"{where}: rng[{b}]: expected a numpy.random.Generator, got {type(g).__name__}")
        return
    what = "a numpy.random.Generator" + (" or a list of one per sample" if n is not None else "")
    raise TypeError(f"{where}: rng: expected {what}, got {type(rng).__name__}")


def _draw(rng: RngOrPerSample, sizes: np.ndarray, second: "Callable[[np.random.Generator, int, int], np.ndarray]"
          ) -> tuple[np.ndarray, np.ndarray]:
    """(u (sum(sizes),) uniform, second draw (sum(sizes) or len(sizes),)): one bulk
    draw each from a single Generator, or per sample, in order, from its own."""
    if isinstance(rng, np.random.Generator):
        return rng.random(int(sizes.sum())), second(rng, -1, int(sizes.sum()))
    us, vs = [], []
    for b, (g, n) in enumerate(zip(rng, sizes)):
        us.append(g.random(int(n)))
        vs.append(np.atleast_1d(second(g, b, int(n))))
    if not us:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(us), np.concatenate(vs)


def _check_prob(prob: float, where: str) -> float:
    p = float(prob)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"{where}: prob: expected a probability in (0, 1], got {prob!r}")
    return p


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=off[1:])
    return off


# ----------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------

@_njit
def _mask_text_kernel(ids, offsets, is_special, u, rand_words, prob, mask_id, out_ids, out_labels):
    """Per sample: 80/10/10 on picked tokens, then the at-least-one rule.
    Returns -1, or the index of the first sample that has no maskable token."""
    for s in range(offsets.shape[0] - 1):
        first = -1
        picked = False
        for i in range(offsets[s], offsets[s + 1]):
            out_ids[i] = ids[i]
            out_labels[i] = -100
            if is_special[i]:
                continue
            if first < 0:
                first = i
            if u[i] < prob:
                picked = True
                out_labels[i] = ids[i]
                r = u[i] / prob
                if r < 0.8:
                    out_ids[i] = mask_id
                elif r < 0.9:
                    out_ids[i] = rand_words[i]
        if not picked:
            if first < 0:
                return s
            out_ids[first] = mask_id
            out_labels[first] = ids[first]
    return -1


def _mask_text_numpy(ids, offsets, is_special, u, rand_words, prob, mask_id):
    lens = np.diff(offsets)
    seg = np.repeat(np.arange(len(lens)), lens)
    maskable = ~is_special
    picked = maskable & (u < prob)
    r = u / prob
    out_ids = ids.copy()
    out_ids[picked & (r < 0.8)] = mask_id
    rnd = picked & (r >= 0.8) & (r < 0.9)
    out_ids[rnd] = rand_words[rnd]
    out_labels = np.where(picked, ids, IGNORE_INDEX)
    n_picked = np.bincount(seg[picked], minlength=len(lens))
    n_maskable = np.bincount(seg[maskable], minlength=len(lens))
    if np.any(n_maskable == 0):
        return out_ids, out_labels, int(np.flatnonzero(n_maskable == 0)[0])
    need = np.flatnonzero(n_picked == 0)
    if need.size:
        pos = np.flatnonzero(maskable)
        # the first maskable position of each sample: first entry of pos at or after its offset
        first = pos[np.searchsorted(pos, offsets[need])]
        out_ids[first] = mask_id
        out_labels[first] = ids[first]
    return out_ids, out_labels, -1


def mask_text_batch(seqs: Sequence[Sequence[int]], rng: RngOrPerSample, vocab_range: tuple[int, int],
                    mask_id: int, special_ids: Iterable[int], prob: float = 0.15,
                    backend: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
    """MLM masking of a batch of token id sequences (see the module docstring).

    Args:
        seqs: B sequences of token ids (list[int] or 1-d int arrays), specials included.
        rng: the numpy Generator every draw comes from (one ``random`` draw and one
            ``integers`` draw over all tokens of the batch, in that order), or B
            Generators, one per sample (the same two draws over its own tokens).
        vocab_range: [lo, hi) of the ids a random replacement is drawn from.
        mask_id: the [MASK] id.  special_ids: ids never masked ([CLS], [SEP], [PAD], ...).
        prob: the masking probability.  backend: "auto" | "numba" | "numpy".

    Returns:
        B pairs ``(ids (L_b,) int64, labels (L_b,) int64)``: masked ids, and the
        original id at masked positions / -100 elsewhere.  Every sample has at least
        one label; a sample without a maskable token is an error.
    """
    where = "mask_text_batch"
    _check_rng(rng, where, len(seqs))
    p = _check_prob(prob, where)
    lo, hi = _check_vocab_range(vocab_range, where)
    arrays = [np.asarray(s) for s in seqs]
    for b, a in enumerate(arrays):
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{where}: seqs[{b}]: expected a 1-d sequence of int token ids, "
                             f"got shape {a.shape} dtype {a.dtype}")
    if not arrays:
        return []
    offsets = _offsets([a.size for a in arrays])
    ids = np.concatenate(arrays).astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
    specials = np.fromiter((int(x) for x in special_ids), dtype=np.int64)
    is_special = np.isin(ids, specials)
    u, rand_words = _draw(rng, np.diff(offsets), lambda g, b, n: g.integers(lo, hi, size=n, dtype=np.int64))
    if _use_numba(backend, where):
        out_ids = np.empty_like(ids)
        out_labels = np.empty_like(ids)
        bad = _mask_text_kernel(ids, offsets, is_special, u, rand_words, p, int(mask_id), out_ids, out_labels)
    else:
        out_ids, out_labels, bad = _mask_text_numpy(ids, offsets, is_special, u, rand_words, p, int(mask_id))
    if bad >= 0:
        raise ValueError(f"{where}: seqs[{bad}]: no maskable token (every id is special or the sequence "
                         f"is empty): {arrays[bad].tolist()}")
    return [(out_ids[offsets[b]:offsets[b + 1]], out_labels[offsets[b]:offsets[b + 1]])
            for b in range(len(arrays))]


def _check_vocab_range(vocab_range: tuple[int, int], where: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in vocab_range)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: vocab_range: expected (lo, hi) ints, got {vocab_range!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"{where}: vocab_range: expected 0 <= lo < hi, got {vocab_range!r}")
    return lo, hi


def mask_text(input_ids: Sequence[int], rng: np.random.Generator, vocab_range: tuple[int, int], mask_id: int,
              special_ids: Iterable[int], prob: float = 0.15,
              backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """MLM masking of one sequence: ``(masked ids (L,), labels (L,))`` int64, labels
    -100 where not masked.  15% of the non-special tokens (``prob``), 80% of them
    [MASK], 10% a random id in ``vocab_range`` = [lo, hi), 10% kept; at least one
    masked token (the first maskable one becomes [MASK] when none was picked)."""
    return mask_text_batch([input_ids], rng, vocab_range, mask_id, special_ids, prob, backend)[0]


# ----------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------

def box_iou(boxes_a: np.ndarray, boxes_b: Optional[np.ndarray] = None, offset: float = 0.0) -> np.ndarray:
    """IoU of (N, 4) and (K, 4) [x1, y1, x2, y2] boxes -> (N, K).

    ``offset`` is added to widths and heights (1.0 = the legacy pixel "+1"
    convention of vilbert-multi-task's ``iou``).  A pair with an empty union has IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64)
    b = a if boxes_b is None else np.asarray(boxes_b, dtype=np.float64)
    for name, x in (("boxes_a", a), ("boxes_b", b)):
        if x.ndim != 2 or x.shape[1] != 4:
            raise ValueError(f"box_iou: {name}: expected shape (N, 4), got {x.shape}")
    area_a = (a[:, 2] - a[:, 0] + offset) * (a[:, 3] - a[:, 1] + offset)
    area_b = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + offset
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + offset
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@_njit
def _expand_overlap_kernel(mask, picked, boxes, offsets, threshold, offset):
    """mask |= IoU(picked region, region) > threshold, within each image."""
    for s in range(offsets.shape[0] - 1):
        lo, hi = offsets[s], offsets[s + 1]
        for i in range(lo, hi):
            if not picked[i]:
                continue
            ax1, ay1, ax2, ay2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            area_a = (ax2 - ax1 + offset) * (ay2 - ay1 + offset)
            for j in range(lo, hi):
                if mask[j]:
                    continue
                iw = min(ax2, boxes[j, 2]) - max(ax1, boxes[j, 0]) + offset
                ih = min(ay2, boxes[j, 3]) - max(ay1, boxes[j, 1]) + offset
                if iw <= 0.0 or ih <= 0.0:
                    continue
                inter = iw * ih
                union = area_a + (boxes[j, 2] - boxes[j, 0] + offset) * (boxes[j, 3] - boxes[j, 1] + offset) - inter
                if union > 0.0 and inter > threshold * union:
                    mask[j] = True


def _expand_overlap_numpy(picked, boxes, offsets, threshold, offset):
    """Same as the kernel, vectorized: each picked region against its image's (padded) regions."""
    lens = np.diff(offsets)
    B, nmax = len(lens), int(lens.max()) if len(lens) else 0
    seg = np.repeat(np.arange(B), lens)
    col = np.arange(offsets[-1]) - offsets[:-1][seg]
    pb = np.full((B, nmax, 4), np.nan)            # NaN padding never overlaps
    pb[seg, col] = boxes
    p = np.flatnonzero(picked)
    a = boxes[p][:, None, :]                      # (P, 1, 4)
    o = pb[seg[p]]                                # (P, Nmax, 4)
    area_a = (a[..., 2] - a[..., 0] + offset) * (a[..., 3] - a[..., 1] + offset)
    area_o = (o[..., 2] - o[..., 0] + offset) * (o[..., 3] - o[..., 1] + offset)
    iw = np.minimum(a[..., 2], o[..., 2]) - np.maximum(a[..., 0], o[..., 0]) + offset
    ih = np.minimum(a[..., 3], o[..., 3]) - np.maximum(a[..., 1], o[..., 1]) + offset
    with np.errstate(invalid="ignore"):
        inter = iw * ih
        union = area_a + area_o - inter
        over = (iw > 0) & (ih > 0) & (union > 0) & (inter > threshold * union)   # (P, Nmax)
    hit = np.zeros((B, nmax), dtype=bool)
    rows, cols = np.nonzero(over)
    hit[seg[p][rows], cols] = True
    return picked | hit[seg, col]


def mask_regions_batch(num_boxes: Sequence[int], rng: RngOrPerSample, prob: float = 0.15,
                       boxes: Optional[Sequence[np.ndarray]] = None, iou_threshold: Optional[float] = None,
                       iou_offset: float = 0.0, backend: str = "auto") -> list[np.ndarray]:
    """Region masks for a batch of images (see the module docstring).

    Args:
        num_boxes: B region counts (each >= 1).
        rng: draws ``random(total)`` then ``integers(0, num_boxes)`` (one per image,
            for the at-least-one rule; drawn whether needed or not); or B
            Generators, one per image (``random(N_b)`` then ``integers(0, N_b)``).
        prob: masking probability per region.
        boxes: B arrays (N_b, 4) [x1, y1, x2, y2]; needed with ``iou_threshold``.
        iou_threshold: ViLBERT's overlap rule (0.4 there): regions with IoU above it
            with a picked region are masked too.  None: UNITER's rule only.
        iou_offset: added to widths/heights in the IoU (1.0 = legacy pixel "+1").
        backend: "auto" | "numba" | "numpy".

    Returns B bool arrays (N_b,), each with at least one True.
    """
    where = "mask_regions_batch"
    _check_rng(rng, where, len(num_boxes))
    p = _check_prob(prob, where)
    nb = np.asarray(num_boxes, dtype=np.int64).reshape(-1)
    if nb.size and nb.min() < 1:
        bad = int(np.argmin(nb))
        raise ValueError(f"{where}: num_boxes[{bad}]: expected >= 1 regions, got {nb[bad]}")
    if nb.size == 0:
        return []
    offsets = _offsets(nb)
    u, pick_one = _draw(rng, nb, lambda g, b, n: g.integers(0, nb if b < 0 else n))
    picked = u < p
    n_picked = np.add.reduceat(picked.astype(np.int64), offsets[:-1])
    none = np.flatnonzero(n_picked == 0)
    picked[offsets[none] + pick_one[none]] = True
    if iou_threshold is not None:
        if boxes is None:
            raise ValueError(f"{where}: boxes: needed when iou_threshold is given")
        if len(boxes) != nb.size:
            raise ValueError(f"{where}: boxes: expected {nb.size} arrays, got {len(boxes)}")
        for b, (bx, n) in enumerate(zip(boxes, nb)):
            if np.shape(bx) != (n, 4):
                raise ValueError(f"{where}: boxes[{b}]: expected shape ({n}, 4), got {np.shape(bx)}")
        flat = np.concatenate([np.asarray(bx, dtype=np.float64) for bx in boxes])
        thr = float(iou_threshold)
        if _use_numba(backend, where):
            mask = picked.copy()
            _expand_overlap_kernel(mask, picked, flat, offsets, thr, float(iou_offset))
        else:
            mask = _expand_overlap_numpy(picked, flat, offsets, thr, float(iou_offset))
    else:
        _use_numba(backend, where)  # validates the name
        mask = picked
    return [mask[offsets[b]:offsets[b + 1]] for b in range(nb.size)]


def mask_regions(num_boxes: int, rng: np.random.Generator, prob: float = 0.15, boxes: Optional[np.ndarray] = None,
                 iou_threshold: Optional[float] = None, iou_offset: float = 0.0,
                 backend: str = "auto") -> np.ndarray:
    """(num_boxes,) bool region mask: each region with probability ``prob``, at least
    one (uniformly chosen when none was), plus -- with ``iou_threshold`` and ``boxes``
    (num_boxes, 4) -- every region overlapping a picked one by IoU > threshold."""
    return mask_regions_batch([num_boxes], rng, prob, None if boxes is None else [boxes], iou_threshold,
                              iou_offset, backend)[0]
