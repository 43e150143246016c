"""Evaluation metrics of the fine-tuning benchmarks.

* VQA -- :func:`vqa_accuracy` / :func:`vqa_score`: the official VQA evaluation's
  accuracy, the 10-annotator leave-one-out average: for each of the n human answers,
  ``min(1, #matches among the other n-1 / 3)``, averaged over the n.  (With 10 humans an
  answer given by c of them scores 0, 0.3, 0.6, 0.9 for c = 0..3 and 1 from 4 on --
  :func:`vqa_answer_score`, the soft training target.)  Answers are compared as the
  official script does: whitespace (newlines, tabs) trimmed always; when the annotators
  disagree, both sides are also normalised -- punctuation handled as the official
  ``processPunctuation`` (a mark next to a space, or any mark in a string with a
  digit-comma-digit, is deleted, others become spaces; a period not followed by a
  digit is deleted -- at most 32 of them, as the official ``periodStrip.sub`` call, whose
  ``re.UNICODE`` lands in the ``count`` slot), then as ``processDigitArticle``: lower-cased
  and split into words, number words none/zero..ten -> digits, articles a/an/the dropped,
  then each remaining word looked up in the official contraction table (120 entries,
  "dont" -> "don't", "whats" -> "what's", ...; its capitalised keys "Im", "Ive", "Id've",
  "I'dve" never match a lower-cased word, as in the official script).
  :func:`vqa_soft_score` is the training-time score of UNITER/ViLBERT: the soft target
  of the argmax answer.
* Accuracy (NLVR2, VCR, RefCOCO+ by region index): :func:`accuracy`; NLVR2's consistency:
  :func:`nlvr2_consistency`; VCR Q->A, QA->R, Q->AR: :func:`vcr_accuracy`.
* Boxes: :func:`box_iou`; RefCOCO+ accuracy by box: :func:`refcoco_accuracy` (IoU > 0.5,
  as UNITER's and ViLBERT's evaluations); phrase grounding: :func:`grounding_accuracy`
  (IoU >= 0.5 with the gold box, the Flickr30k Entities convention).
* Retrieval: :func:`retrieval_recall` -- R@1/5/10 both ways from an (n_text, n_image)
  score matrix (UNITER's ``itm_eval``).

Inputs are tensors or sequences; results are Python floats in [0, 1].
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Hashable, Mapping, NoReturn, Optional, Sequence, Union

import torch
from torch import Tensor

ArrayLike = Union[Tensor, Sequence[int], Sequence[float]]


def _fail(name: str, arg: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{name}: {arg}: expected {expected}, got {got}")


def _as_tensor(x: ArrayLike) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    return t.detach().cpu()


# ----------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------

_PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!')
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # the official periodStrip in effect: a period not followed by a digit
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# the official ``contractions`` table of vqaEval.py, verbatim (120 entries, quirks kept: keys with capitals can
# never match the lower-cased words, and "somebody'd" maps to "somebodyd")
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_PERIOD_STRIP_COUNT = 32  # the official periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is sub's count


def _punctuation(text: str) -> str:
    out = text
    has_num_comma = _COMMA_NUM.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_num_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_STRIP_COUNT)


def _digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split, number words -> digits,
    drop articles, then map each remaining word through the contraction table."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Whitespace, punctuation, number words, articles and contractions as the official
    evaluation normalises them (see the module docstring)."""
    a = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(a))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer against the human answers
    (usually 10): mean over annotators i of min(1, #{j != i : gt_j == prediction} / 3)."""
    if not isinstance(prediction, str):
        _fail("vqa_accuracy", "prediction", "a string", type(prediction).__name__)
    if len(gt_answers) == 0:
        _fail("vqa_accuracy", "gt_answers", "at least one human answer", "none")
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = [g.replace("\n", " ").replace("\t", " ").strip() for g in gt_answers]
    if len(set(gts)) > 1:
        gts = [_digits_articles(_punctuation(g)) for g in gts]
        res = _digits_articles(_punctuation(res))
    matches = sum(g == res for g in gts)
    total = 0.0
    for g in gts:
        others = matches - (g == res)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def vqa_score(predictions: Mapping[Hashable, str], gt_answers: Mapping[Hashable, Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over questions; ``predictions`` {question_id: answer}
    must cover every question of ``gt_answers`` {question_id: human answers}."""
    missing = [q for q in gt_answers if q not in predictions]
    if missing:
        _fail("vqa_score", "predictions", f"an answer for each of the {len(gt_answers)} questions",
              f"{len(missing)} missing (e.g. {missing[:5]})")
    if not gt_answers:
        _fail("vqa_score", "gt_answers", "at least one question", "none")
    return sum(vqa_accuracy(predictions[q], a) for q, a in gt_answers.items()) / len(gt_answers)


def vqa_answer_score(count: int, num_annotators: int = 10) -> float:
    """The official accuracy of an answer given by ``count`` of ``num_annotators``
    humans (the soft target): 0, 0.3, 0.6, 0.9, 1.0 for count 0..4+ of 10."""
    if not 0 <= count <= num_annotators:
        _fail("vqa_answer_score", "count", f"an int in [0, {num_annotators}]", count)
    c, n = count, num_annotators
    return (c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)) / n if c else 0.0


def vqa_targets(gt_answers: Sequence[str], ans2label: Mapping[str, int], num_answers: Optional[int] = None
                ) -> Tensor:
    """(A,) soft target scores for one question: :func:`vqa_answer_score` of each
    (normalised) answer in the label map; answers outside it are dropped."""
    n = len(ans2label) if num_answers is None else num_answers
    counts: dict[str, int] = defaultdict(int)
    for a in gt_answers:
        counts[normalize_vqa_answer(a)] += 1
    out = torch.zeros(n)
    for a, c in counts.items():
        if a in ans2label:
            out[ans2label[a]] = vqa_answer_score(c, len(gt_answers))
    return out


def vqa_soft_score(logits: Tensor, targets: Tensor) -> Tensor:
    """(B,) the soft target of the argmax answer (UNITER's / ViLBERT's
    ``compute_score_with_logits``); logits, targets (B, A)."""
    if logits.shape != targets.shape or logits.dim() != 2:
        _fail("vqa_soft_score", "logits/targets", "two (B, A) tensors of one shape",
              f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1).float()


# ----------------------------------------------------------------------------------
# Accuracy family
# ----------------------------------------------------------------------------------

def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the labels (NLVR2, VCR, RefCOCO+ region index)."""
    p, y = _as_tensor(predictions), _as_tensor(labels)
    if p.shape != y.shape:
        _fail("accuracy", "predictions", f"shape {tuple(y.shape)} (that of labels)", f"shape {tuple(p.shape)}")
    if p.numel() == 0:
        _fail("accuracy", "predictions", "at least one prediction", "none")
    return float((p == y).float().mean())


def nlvr2_consistency(identifiers: Sequence[str], correct: Sequence[bool]) -> float:
    """NLVR2's consistency: the fraction of statements all of whose examples are
    right.  Identifiers "split-set-pair-sentence" (e.g. "dev-850-0-0"); examples share a
    statement when they agree outside the third field (as the official metrics.py)."""
    if len(identifiers) != len(correct):
        _fail("nlvr2_consistency", "correct", f"{len(identifiers)} values (one per identifier)", len(correct))
    if not identifiers:
        _fail("nlvr2_consistency", "identifiers", "at least one", "none")
    ok: dict[str, bool] = {}
    for ident, c in zip(identifiers, correct):
        parts = ident.split("-")
        if len(parts) < 3:
            _fail("nlvr2_consistency", "identifiers", "'split-set-pair-sentence' ids", repr(ident))
        parts[2] = ""
        key = "-".join(parts)
        ok[key] = ok.get(key, True) and bool(c)
    return sum(ok.values()) / len(ok)


def vcr_accuracy(answer_pred: ArrayLike, answer_gold: ArrayLike, rationale_pred: Optional[ArrayLike] = None,
                 rationale_gold: Optional[ArrayLike] = None) -> dict[str, float]:
    """VCR: {"q2a"} and, with rationales, {"qa2r", "q2ar"} (Q->AR: both right)."""
    a = _as_tensor(answer_pred) == _as_tensor(answer_gold)
    out = {"q2a": accuracy(answer_pred, answer_gold)}
    if (rationale_pred is None) != (rationale_gold is None):
        _fail("vcr_accuracy", "rationale_pred/rationale_gold", "both or neither", "only one")
    if rationale_pred is not None:
        out["qa2r"] = accuracy(rationale_pred, rationale_gold)  # type: ignore[arg-type]
        r = _as_tensor(rationale_pred) == _as_tensor(rationale_gold)  # type: ignore[arg-type]
        if r.shape != a.shape:
            _fail("vcr_accuracy", "rationale_pred", f"shape {tuple(a.shape)}", f"shape {tuple(r.shape)}")
        out["q2ar"] = float((a & r).float().mean())
    return out


# ----------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------

def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of (..., 4) [x1, y1, x2, y2] boxes (any units: IoU is invariant to
    scaling each axis) -> (...)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape[-1:] != (4,) or a.shape != b.shape:
        _fail("box_iou", "a/b", "two (..., 4) tensors of one shape", f"{tuple(a.shape)} and {tuple(b.shape)}")
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def refcoco_accuracy(pred_boxes: Tensor, gold_boxes: Tensor, threshold: float = 0.5) -> float:
    """RefCOCO(+/g) accuracy: the fraction of predicted boxes with IoU > ``threshold``
    with the gold box (strict, as UNITER's and ViLBERT's evaluations).  (N, 4) xyxy."""
    iou = box_iou(pred_boxes, gold_boxes)
    if iou.numel() == 0:
        _fail("refcoco_accuracy", "pred_boxes", "at least one box", "none")
    return float((iou > threshold).float().mean())


def grounding_accuracy(pred_boxes: Tensor, gold_boxes: Tensor, threshold: float = 0.5,
                       valid: Optional[Tensor] = None) -> float:
    """Phrase-grounding accuracy: the fraction of phrases whose predicted box has IoU >=
    ``threshold`` with the gold box.  (..., 4) xyxy; ``valid`` (...) bool selects the
    real phrases (e.g. (B, P) with padding)."""
    iou = box_iou(pred_boxes, gold_boxes)
    hit = iou >= threshold
    if valid is not None:
        valid = torch.as_tensor(valid).bool().to(hit.device)
        if valid.shape != hit.shape:
            _fail("grounding_accuracy", "valid", f"shape {tuple(hit.shape)}", f"shape {tuple(valid.shape)}")
        hit = hit[valid]
    if hit.numel() == 0:
        _fail("grounding_accuracy", "pred_boxes", "at least one (valid) phrase", "none")
    return float(hit.float().mean())


# ----------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------

def retrieval_recall(scores: Tensor, txt2img: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from a score matrix (n_text, n_image) and each text's gold
    image index ``txt2img`` (n_text,) (every image may own several texts).

    ``t2i_r{k}``: text -> image (UNITER's ``img_r{k}``): the fraction of texts whose
    gold image is among the k best images of their row.  ``i2t_r{k}``: image -> text
    (UNITER's ``txt_r{k}``): the fraction of images with at least one of their texts
    among the k best texts of their column (images owning no text are skipped).  Rank
    = the number of strictly higher scores (ties rank optimistically).  Also
    ``t2i_r_mean``, ``i2t_r_mean`` and ``r_mean`` (their average)."""
    s = torch.as_tensor(scores).detach().float().cpu()
    if s.dim() != 2:
        _fail("retrieval_recall", "scores", "an (n_text, n_image) matrix", f"shape {tuple(s.shape)}")
    gold = _as_tensor(txt2img).long()
    nt, ni = s.shape
    if gold.shape != (nt,):
        _fail("retrieval_recall", "txt2img", f"shape ({nt},) (one image per text)", f"shape {tuple(gold.shape)}")
    if nt == 0 or ni == 0:
        _fail("retrieval_recall", "scores", "at least one text and one image", f"shape {tuple(s.shape)}")
    if int(gold.min()) < 0 or int(gold.max()) >= ni:
        _fail("retrieval_recall", "txt2img", f"image indices in [0, {ni})",
              f"values in [{int(gold.min())}, {int(gold.max())}]")
    gold_s = s.gather(1, gold[:, None])                                 # (nt, 1)
    t_rank = (s > gold_s).sum(1)                                        # (nt,)
    # image -> text: each image's best rank among its own texts, one column at a time
    best = torch.full((ni,), -1, dtype=torch.long)
    order = torch.argsort(gold, stable=True)
    imgs, counts = torch.unique_consecutive(gold[order], return_counts=True)
    for i, texts in zip(imgs.tolist(), torch.split(order, counts.tolist())):
        col = s[:, i]
        best[i] = int((col[None, :] > col[texts][:, None]).sum(1).min())
    owned = best >= 0
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            _fail("retrieval_recall", "ks", "positive ints", list(ks))
        out[f"t2i_r{k}"] = float((t_rank < k).float().mean())
        out[f"i2t_r{k}"] = float((best[owned] < k).float().mean())
    out["t2i_r_mean"] = sum(out[f"t2i_r{k}"] for k in ks) / len(ks)
    out["i2t_r_mean"] = sum(out[f"i2t_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["t2i_r_mean"] + out["i2t_r_mean"]) / 2
    return out


__all__ = ["normalize_vqa_answer", "vqa_accuracy", "vqa_score", "vqa_answer_score", "vqa_targets", "vqa_soft_score",
           "accuracy", "nlvr2_consistency", "vcr_accuracy", "box_iou", "refcoco_accuracy", "grounding_accuracy",
           "retrieval_recall"]
