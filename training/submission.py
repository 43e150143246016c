"""Prediction files in each benchmark's submission format, written atomically (a
temporary file in the same folder, flushed and fsynced, then renamed over the target:
an interrupted write never leaves a partial file under the final name).

* VQA (EvalAI test-dev / test-std): a JSON list ``[{"question_id": int, "answer": str}]``
  -- :func:`write_vqa_submission`.
* NLVR2: the CSV the official ``metrics.py`` reads, no header, one
  ``identifier,prediction`` line per example with prediction ``True``/``False`` (the
  labels' spelling) -- :func:`write_nlvr2_predictions`.
* VCR (leaderboard CSV, as vilbert-multi-task's ``VCR_submission.py`` and r2c build it):
  header ``annot_id,answer_0..3,rationale_conditioned_on_a0_0..3, ..., _a3_0..3``, one
  row per question with the answer probabilities and, for each of the 4 answers, the
  rationale probabilities conditioned on it -- :func:`write_vcr_submission`.
* RefCOCO(+/g): no public server; a JSON list ``[{"ref_id": id, "box": [x, y, w, h]}]``
  (COCO's box format, in pixels when the boxes are) -- :func:`write_refcoco_predictions`.
* Phrase grounding (Flickr30k Entities-style; no public server): a JSON list
  ``[{"sentence_id": id, "phrase_index": int, "image_id": id, "box": [x, y, w, h]}]``
  -- one predicted box per phrase of a sentence (COCO's box format, in pixels when
  the boxes are) -- :func:`write_grounding_predictions`.
* Image-text retrieval: a JSON object ``{"text_to_image": {text_id: [image ids, best
  first]}, "image_to_text": {image_id: [text ids, best first]}}`` of the top-k lists --
  :func:`write_retrieval_rankings`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Hashable, NoReturn, Sequence, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]


def _fail(name: str, arg: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{name}: {arg}: expected {expected}, got {got}")


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync,
    os.replace); parent folders are created."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return p


def _json_id(x: Any) -> Any:
    """An id as JSON wants it: ints stay ints (numpy/torch scalars too), strings stay."""
    if isinstance(x, Tensor):
        x = x.item()
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        _fail("submission", "id", "an int or a str", f"{x!r} ({type(x).__name__})")
    return x


def _same_len(name: str, **seqs: Sequence[Any]) -> int:
    lens = {k: len(v) for k, v in seqs.items()}
    if len(set(lens.values())) > 1:
        _fail(name, "/".join(lens), "sequences of one length", lens)
    return next(iter(lens.values()))


def write_vqa_submission(path: PathLike, question_ids: Sequence[Hashable], answers: Sequence[str]) -> Path:
    """VQA: ``[{"question_id": int, "answer": str}, ...]`` in the given order."""
    _same_len("write_vqa_submission", question_ids=question_ids, answers=answers)
    rows = []
    seen = set()
    for q, a in zip(question_ids, answers):
        q = _json_id(q)
        if not isinstance(q, int):
            _fail("write_vqa_submission", "question_ids", "integer question ids", repr(q))
        if q in seen:
            _fail("write_vqa_submission", "question_ids", "distinct ids", f"{q} twice")
        if not isinstance(a, str):
            _fail("write_vqa_submission", "answers", "strings", f"{a!r}")
        seen.add(q)
        rows.append({"question_id": q, "answer": a})
    return atomic_write_text(path, json.dumps(rows))


def write_nlvr2_predictions(path: PathLike, identifiers: Sequence[str], predictions: Sequence[Any]) -> Path:
    """NLVR2: ``identifier,True|False`` lines (no header).  predictions: bools, 0/1, or
    "True"/"False" strings (any case)."""
    _same_len("write_nlvr2_predictions", identifiers=identifiers, predictions=predictions)
    lines = []
    for ident, p in zip(identifiers, predictions):
        if not isinstance(ident, str) or "," in ident or not ident:
            _fail("write_nlvr2_predictions", "identifiers", "non-empty strings without commas", repr(ident))
        if isinstance(p, Tensor):
            p = p.item()
        if isinstance(p, str):
            if p.lower() not in ("true", "false"):
                _fail("write_nlvr2_predictions", "predictions", "True/False", repr(p))
            v = p.lower() == "true"
        elif p in (0, 1):
            v = bool(p)
        else:
            _fail("write_nlvr2_predictions", "predictions", "bools, 0/1 or 'True'/'False'", repr(p))
        lines.append(f"{ident},{'True' if v else 'False'}\n")
    return atomic_write_text(path, "".join(lines))


def _probs(name: str, arg: str, x: Any, shape: tuple[int, ...]) -> Tensor:
    t = torch.as_tensor(x).detach().double().cpu()
    if tuple(t.shape) != shape:
        _fail(name, arg, f"shape {shape}", f"shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        _fail(name, arg, "probabilities in [0, 1]", "values outside it")
    return t


def write_vcr_submission(path: PathLike, annot_ids: Sequence[str], answer_probs: Any, rationale_probs: Any
                         ) -> Path:
    """VCR leaderboard CSV.  annot_ids (N,) e.g. "test-0"; answer_probs (N, 4);
    rationale_probs (N, 4, 4): [n, a] = the rationale probabilities given answer a.
    (Probabilities: softmax of each head's choice logits.)"""
    name = "write_vcr_submission"
    n = len(annot_ids)
    a = _probs(name, "answer_probs", answer_probs, (n, 4))
    r = _probs(name, "rationale_probs", rationale_probs, (n, 4, 4))
    cols = ["annot_id"] + [f"answer_{i}" for i in range(4)] + \
        [f"rationale_conditioned_on_a{j}_{i}" for j in range(4) for i in range(4)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for k, aid in enumerate(annot_ids):
        if not isinstance(aid, str) or not aid:
            _fail(name, "annot_ids", "non-empty strings", repr(aid))
        w.writerow([aid] + [repr(float(v)) for v in a[k].tolist()] + [repr(float(v)) for v in r[k].flatten().tolist()])
    return atomic_write_text(path, buf.getvalue())


def write_refcoco_predictions(path: PathLike, ref_ids: Sequence[Hashable], boxes: Any) -> Path:
    """RefCOCO(+/g): ``[{"ref_id": id, "box": [x, y, w, h]}]`` from (N, 4) [x1, y1, x2, y2]
    boxes (pixels: ``RegionScoringHead.predicted_boxes(..., pixels=True)``)."""
    name = "write_refcoco_predictions"
    b = torch.as_tensor(boxes).detach().double().cpu()
    if tuple(b.shape) != (len(ref_ids), 4):
        _fail(name, "boxes", f"shape ({len(ref_ids)}, 4)", f"shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        _fail(name, "boxes", "finite coordinates", "NaN/inf")
    rows = []
    for rid, (x1, y1, x2, y2) in zip(ref_ids, b.tolist()):
        rows.append({"ref_id": _json_id(rid), "box": [x1, y1, x2 - x1, y2 - y1]})
    return atomic_write_text(path, json.dumps(rows))


def write_grounding_predictions(path: PathLike, sentence_ids: Sequence[Hashable], phrase_indices: Sequence[int],
                                image_ids: Sequence[Hashable], boxes: Any) -> Path:
    """Phrase grounding: ``[{"sentence_id", "phrase_index", "image_id", "box": [x, y, w,
    h]}]`` from (N, 4) [x1, y1, x2, y2] boxes, one per phrase; (sentence_id,
    phrase_index) pairs must be distinct."""
    name = "write_grounding_predictions"
    n = _same_len(name, sentence_ids=sentence_ids, phrase_indices=phrase_indices, image_ids=image_ids)
    b = torch.as_tensor(boxes, dtype=torch.float64).detach().cpu() if len(sentence_ids) else torch.zeros(0, 4)
    if tuple(b.shape) != (n, 4):
        _fail(name, "boxes", f"shape ({n}, 4)", f"shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        _fail(name, "boxes", "finite coordinates", "NaN/inf")
    rows, seen = [], set()
    for sid, k, iid, (x1, y1, x2, y2) in zip(sentence_ids, phrase_indices, image_ids, b.tolist()):
        sid, iid = _json_id(sid), _json_id(iid)
        if isinstance(k, Tensor):
            k = k.item()
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            _fail(name, "phrase_indices", "ints >= 0", repr(k))
        if (sid, k) in seen:
            _fail(name, "sentence_ids/phrase_indices", "distinct (sentence, phrase) pairs", f"{(sid, k)} twice")
        seen.add((sid, k))
        rows.append({"sentence_id": sid, "phrase_index": k, "image_id": iid, "box": [x1, y1, x2 - x1, y2 - y1]})
    return atomic_write_text(path, json.dumps(rows))


def write_retrieval_rankings(path: PathLike, scores: Any, text_ids: Sequence[Hashable],
                             image_ids: Sequence[Hashable], k: int = 10) -> Path:
    """Top-k rankings both ways from scores (n_text, n_image) (higher = better match)."""
    name = "write_retrieval_rankings"
    s = torch.as_tensor(scores).detach().float().cpu()
    if tuple(s.shape) != (len(text_ids), len(image_ids)):
        _fail(name, "scores", f"shape ({len(text_ids)}, {len(image_ids)})", f"shape {tuple(s.shape)}")
    if k < 1:
        _fail(name, "k", "a positive int", k)
    if bool(torch.isnan(s).any()):
        _fail(name, "scores", "no NaN", "NaN")
    tids, iids = [_json_id(t) for t in text_ids], [_json_id(i) for i in image_ids]
    for arg, ids in (("text_ids", tids), ("image_ids", iids)):
        if len(set(ids)) != len(ids):
            _fail(name, arg, "distinct ids", f"{len(ids) - len(set(ids))} duplicates")
    kt, ki = min(k, s.shape[1]), min(k, s.shape[0])
    t2i = s.topk(kt, dim=1).indices.tolist() if s.numel() else [[] for _ in tids]
    i2t = s.topk(ki, dim=0).indices.T.tolist() if s.numel() else [[] for _ in iids]
    out = {"text_to_image": {str(t): [iids[j] for j in row] for t, row in zip(tids, t2i)},
           "image_to_text": {str(i): [tids[j] for j in row] for i, row in zip(iids, i2t)}}
    return atomic_write_text(path, json.dumps(out))


__all__ = ["atomic_write_text", "write_vqa_submission", "write_nlvr2_predictions", "write_vcr_submission",
           "write_refcoco_predictions", "write_grounding_predictions", "write_retrieval_rankings"]
