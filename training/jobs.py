"""Jobs: the data, model and losses of a training run, driven by :func:`loop.train`.

A :class:`VLJob` is built from a :class:`~vlfast.training.config.TrainConfig`:

* ``tasks`` names either pretraining tasks of the model (UNITER: mlm, itm (+WRA),
  mrfr, mrc, mrc-kl; VisualBERT: mlm, sip; ViLBERT: mlm, masked_multimodal,
  alignment; VL-BERT: mlm, masked_roi, itm) mixed by ratio, or ONE fine-tuning task
  (vqa, nlvr2, vcr, refcoco, retrieval, phrase_grounding -- for the models whose
  official code has it, :data:`vlfast.training.tasks.HEADS`);
* ``data.source``: ``synthetic`` (the embedded world of :mod:`vlfast.data.synthetic`;
  ``data.options``: seed, n_images, feat_dim, ...), or real features: a feature
  store (``data.path``; uniter | vilbert | tsv | npz layouts) with UNITER-format text
  DBs (``data.options.txt_db`` / ``val_txt_db`` / ``test_txt_db``, ``vocab``: a WordPiece
  vocab file; for VCR also ``gt_img_db``: the ground-truth-box feature store whose
  regions go before ``data.path``'s detected ones, see :class:`FeatureStoreSource`;
  ``max_txt_len``: word pieces per text, 60 by default as UNITER's, longer texts left
  out of the DB);
* the model: ``model.name``/``size``/``config``; the model's vocabulary and region
  feature size follow the data.

Task options, also under ``data.options`` (taken out before the source sees them;
:data:`TASK_OPTIONS` has the defaults):

* ``nlvr2_mode``: UNITER's NLVR2 head, ``paired`` | ``triplet`` | ``paired-attn``
  (``triplet``: one row with both images' regions -- the "triplet" collator layout;
  VisualBERT always uses that layout, ViLBERT always the paired one);
* ``retrieval_negatives``: negative images drawn per text in training (from the
  split's images); ``retrieval_text_negatives``: negative texts drawn per text (texts
  of other images); ``retrieval_hard_negatives``: k > 0 keeps, per text, the k
  negatives the model scores highest (scored without gradient before each step,
  UNITER's hard-negative training) out of the drawn ones;
* ``grounding_iou``: the IoU from which a region counts as showing a phrase (targets);
* ``max_train_examples``: train on the first N examples of the train split (in the
  source's order: the synthetic world's examples go image by image, so this is also
  fewer images), as HF's ``max_train_samples``; ``null`` (the default) takes all.  The
  low-data regime where pretraining matters most: pretrain on every image's captions,
  fine-tune on a few images' questions.  Evaluation splits are never cut.

VCR trains on its two sub-tasks mixed, as UNITER does: each item (a question, 4
answers, 4 rationales) gives a Q->A sample (question + answer choice rows) and a QA->R
sample (question + the right answer as the text, rationale choice rows), shuffled
together (:func:`vlfast.data.collate.vcr_samples`).  Evaluation scores Q->A and QA->R
given every answer j, and reports ``accuracy`` (= ``q2a``), ``q2a``, ``qa2r`` (the
rationale given the right answer) and ``q2ar`` (both right); the submission CSV holds
the answer probabilities and, per answer j, the rationale probabilities given j.

Image-text retrieval is evaluated UNITER's way: every text of the split against every
image of the split (one ITM score per pair), R@1/5/10 both ways
(:func:`vlfast.training.metrics.retrieval_recall`; ``r_mean`` is their mean).  Phrase
grounding: the synthetic world's caption phrases with their regions (word-region
alignments); ViLBERT grounds one phrase per row (the phrase as the text), VisualBERT
all phrases of a caption at once (each phrase queried at its last wordpiece, the head
noun of the synthetic noun phrases); accuracy = the predicted region's box has IoU >=
0.5 with a gold box of the phrase (Flickr30k Entities' any-box rule).

Batches are a pure function of (seed, task, epoch, position): every rank draws the
same permutation, global batch i is its i-th run of ``batch_size x world_size``
examples, and rank r takes the r-th ``batch_size`` of them, so resumed and distributed
runs see the same data, and 2 ranks x B see at each step the samples of 1 process x 2B.  Train and evaluation batches come from a ``torch.utils.data.DataLoader`` over
the batches' index lists with ``data.num_workers`` workers (no persistent workers;
pinned memory on CUDA; workers ignore SIGTERM so the loop can checkpoint; a loader that
ends early -- an error, its batches dropped, the process exiting -- shuts its workers
down and SIGKILLs those alive after ``WORKER_EXIT_GRACE_S`` = 5 s): the
collator seeds each batch from its samples and the epoch, so 0 or N workers give the
same batches (pretraining samples are seeded one by one: their masks and ITM negatives
do not depend on the batch either).  Evaluation returns the same numbers on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from vlfast.data.batch import ImageRecord, VLBatch
from vlfast.data.collate import Collator, collate_retrieval, vcr_samples
from vlfast.data.sampler import TokenBucketSampler
from vlfast.data.tokenization import VLTokenizer

from . import metrics as M
from . import tasks as T
from .config import ConfigError, TrainConfig
from .loop import StepOutput
from .pretrain import MODEL_TASKS, build_pretrain_model, make_config

# pretraining task (objective) -> the collator task that prepares its batches
PRETRAIN_COLLATE = {"mlm": "mlm", "itm": "itm", "sip": "itm", "alignment": "itm", "mrfr": "mrfr", "mrc": "mrc",
                    "mrc-kl": "mrc-kl", "masked_multimodal": "mrm-vilbert", "masked_roi": "mrc-vlbert"}
# fine-tuning task (head) -> collator task, and the example split names of the synthetic world
FINETUNE_COLLATE = {"vqa": "vqa", "nlvr2": "nlvr2", "vcr": "mc", "refcoco": "ref", "retrieval": "retrieval",
                    "phrase_grounding": "grounding"}
SYNTHETIC_EXAMPLES = {"vqa": "vqa", "nlvr2": "nlvr2", "vcr": "mc", "refcoco": "refexp", "retrieval": "captions",
                      "phrase_grounding": "alignment"}
# job-level task options read from data.options (see the module docstring), with defaults
TASK_OPTIONS: dict[str, Any] = {"nlvr2_mode": None, "retrieval_negatives": 3, "retrieval_text_negatives": 0,
                                "retrieval_hard_negatives": 0, "grounding_iou": 0.5, "max_train_examples": None}


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """data.options -> (the source's options, the task options with defaults filled)."""
    src = {k: v for k, v in options.items() if k not in TASK_OPTIONS}
    task = {k: options.get(k, d) for k, d in TASK_OPTIONS.items()}
    return src, task


def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"VLJob: {arg}: expected {expected}, got {got}")


SOURCES = ("synthetic", "uniter", "vilbert", "tsv", "npz")


def check_names(cfg: TrainConfig, check_source: bool = True) -> None:
    """``model.name``, ``tasks`` and ``data.source`` of ``cfg`` against the registries
    (:data:`~vlfast.training.pretrain.MODEL_TASKS`, :data:`~vlfast.training.tasks.HEADS`),
    before anything is built: a ConfigError naming the key and listing the valid names.
    VLJob calls it first (``check_source=False`` when it is handed a source); the
    command-line tools call it right after loading a config."""
    name, tasks = cfg.model.name, list(cfg.tasks)
    if name not in MODEL_TASKS:
        raise ConfigError(f"model.name: expected one of {sorted(MODEL_TASKS)}, got {name!r}")
    pre = sorted(t for t in MODEL_TASKS[name] if t in PRETRAIN_COLLATE)
    fine = sorted(t for t in FINETUNE_COLLATE if name in T.HEADS.get(t, {}))
    for t in tasks:
        if t in pre:
            continue
        if t in FINETUNE_COLLATE and t not in fine:
            raise ConfigError(f"tasks: {t!r} needs model.name among {sorted(T.HEADS.get(t, {}))} (the models whose "
                              f"official code has a {t} head), got {name!r}")
        if t not in FINETUNE_COLLATE:
            close = difflib.get_close_matches(t, pre + fine, n=1)
            others = sorted(m for m, table in MODEL_TASKS.items() if t in table)
            hint = (f" (did you mean {close[0]!r}?)" if close
                    else f" ({t!r} is a task of {', '.join(others)})" if others else "")
            raise ConfigError(f"tasks: expected pretraining tasks of {name} {pre} or one fine-tuning task of "
                              f"{fine}, got {t!r}{hint}")
    if any(t in FINETUNE_COLLATE for t in tasks) and len(tasks) > 1:
        raise ConfigError(f"tasks: expected pretraining tasks, or exactly one fine-tuning task, got {tasks}")
    if check_source and cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source: expected one of {list(SOURCES)}, got {cfg.data.source!r}")
    if cfg.data.source in SOURCES:
        check_options(cfg.data.source, cfg.data.options)


# data.options keys the feature-store sources read (FeatureStoreSource), besides TASK_OPTIONS
STORE_OPTIONS = ("vocab", "gt_img_db", "num_region_classes", "txt_db", "val_txt_db", "test_txt_db", "max_txt_len")


def source_option_keys(source: str) -> tuple[str, ...]:
    """The ``data.options`` keys a data source takes (the synthetic world's keyword
    arguments, or the feature stores' :data:`STORE_OPTIONS`), plus the task options."""
    if source == "synthetic":
        import inspect

        from vlfast.data.synthetic import SyntheticWorld

        own = tuple(n for n, p in inspect.signature(SyntheticWorld.__init__).parameters.items()
                    if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    else:
        own = STORE_OPTIONS
    return own + tuple(TASK_OPTIONS)


def check_options(source: str, options: Mapping[str, Any]) -> None:
    """An unknown ``data.options`` key is a ConfigError naming it, with the valid keys
    (instead of a TypeError deep in the source's constructor, or a silently ignored key)."""
    valid = source_option_keys(source)
    for k in options:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"data.options.{k}: not an option of data.source={source!r}{hint}; valid keys: "
                              f"{', '.join(valid)}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's CPU RNG seeded with ``seed`` inside, restored after: a job's model
    initialisation is a function of ``config.seed`` alone (the same in every process
    and on every rank; torch seeds its default generator randomly per process), and
    building a job leaves the caller's RNG stream where it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % 2**63)
        yield


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}".encode()).digest()[:4], "little")


# ----------------------------------------------------------------------------------
# Data sources: records (img_id -> ImageRecord), a tokenizer, tokenized examples
# ----------------------------------------------------------------------------------

class DataSource:
    """What a job needs from its data: ``records``, ``tokenizer``, ``feat_dim``,
    ``num_region_classes``, ``answers`` (VQA label map) and tokenized example dicts
    per (task, split) in the collators' format (``id``, ``input_ids``, ``img_id``...)."""

    records: Mapping[str, ImageRecord]
    tokenizer: VLTokenizer
    feat_dim: int
    num_region_classes: int
    answers: list[str]

    def examples(self, task: str, split: str) -> list[dict[str, Any]]:
        raise KeyError(task)


class SyntheticSource(DataSource):
    """The embedded synthetic world (``data.options``: the keyword arguments of
    :class:`~vlfast.data.synthetic.SyntheticWorld`, e.g. seed, n_images, feat_dim)."""

    def __init__(self, options: Mapping[str, Any], max_len: int = 40):
        from vlfast.data.synthetic import SyntheticWorld

        self.world = SyntheticWorld(**split_options(options)[0])
        self.records = self.world.images
        self.tokenizer = VLTokenizer.for_synthetic(self.world)
        self.feat_dim = int(self.world.config["feat_dim"])
        self.num_region_classes = int(self.world.n_classes)
        self.answers = list(self.world.answer_vocab)
        self.max_len = max_len
        self._cache: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def examples(self, task: str, split: str) -> list[dict[str, Any]]:
        key = (task, split)
        if key not in self._cache:
            self._cache[key] = self._build(task, split)
        return self._cache[key]

    def _build(self, task: str, split: str) -> list[dict[str, Any]]:
        tok, w, L = self.tokenizer, self.world, self.max_len
        if task in PRETRAIN_COLLATE:
            return [{"id": e["txt_id"], "input_ids": tok.encode(e["text"], L), "img_id": e["img_id"]}
                    for e in w.captions(split)]
        if task == "vqa":
            return [{"id": e["qid"], "input_ids": tok.encode(e["question"], L), "img_id": e["img_id"],
                     "answers": list(e["answers"])} for e in w.vqa(split)]
        if task == "nlvr2":
            return [{"id": e["identifier"], "input_ids": tok.encode(e["statement"], L), "img_ids": list(e["img_ids"]),
                     "label": int(bool(e["label"]))} for e in w.nlvr2(split)]
        if task == "vcr":
            out = []
            for e in w.multiple_choice(split):
                choices = [tok.encode(c, L)[1:-1] or [tok.unk_id] for c in e["choices"]]
                rationales = [tok.encode(c, L)[1:-1] or [tok.unk_id] for c in e["rationale_choices"]]
                out.append({"id": e["annot_id"], "input_ids": tok.encode(e["question"], L), "img_id": e["img_id"],
                            "choices": choices, "label": int(e["label"]), "rationale_choices": rationales,
                            "rationale_label": int(e["rationale_label"])})
            return out
        if task == "refcoco":
            return [{"id": e["ref_id"], "input_ids": tok.encode(e["text"], L), "img_id": e["img_id"],
                     "target_region": int(e["target_region"])} for e in w.refexp(split)]
        if task == "retrieval":
            return [{"id": e["txt_id"], "input_ids": tok.encode(e["text"], L), "img_id": e["img_id"]}
                    for e in w.captions(split)]
        if task == "phrase_grounding":
            out = []
            for e in w.alignments(split):
                ids, wid = tok.encode_with_word_ids(e["text"], L)
                words = e["text"].split()
                phrases = []
                for ph in e["phrases"]:
                    toks = [i for i, x in enumerate(wid) if ph["start"] <= x < ph["end"]]
                    if not toks or not ph["regions"]:
                        continue  # truncated away, or names no region
                    phrases.append({"position": toks[-1], "regions": [int(r) for r in ph["regions"]],
                                    "text": " ".join(words[ph["start"]:ph["end"]])})
                if phrases:
                    out.append({"id": e["txt_id"], "input_ids": ids, "img_id": e["img_id"], "phrases": phrases})
            return out
        raise KeyError(f"the synthetic world has no examples for task {task!r}")


class VcrImages(Mapping):
    """The image mapping of a VCR source: ``data.path``'s records (the detected boxes),
    plus combined keys ``"<gt key>+<det key>"`` (registered by :meth:`pair`) whose record
    is the ground-truth-box store's regions followed by the detected ones -- UNITER's
    ``img_db_gt`` + ``img_db`` concatenation.

    A combined record: ``features`` (N_gt + N_det, F), ``boxes`` (N_gt + N_det, 4)
    normalised, ``conf`` (N,) when both parts have one, ``soft_labels`` (N, C) when both
    have them with the same C (else None: fine-tuning does not read them), width/height
    of the detected record.  ``num_boxes(key)`` is the parts' ``num_boxes`` summed."""

    def __init__(self, det: Mapping[str, ImageRecord], gt: Optional[Mapping[str, ImageRecord]] = None) -> None:
        self.det, self.gt = det, gt
        self._pairs: dict[str, tuple[str, str]] = {}

    def pair(self, gt_key: str, det_key: str) -> str:
        """The key of the image of a VCR example whose ``img_fname`` is [gt_key, det_key]:
        ``"<gt_key>+<det_key>"`` with a ground-truth store, else ``det_key``.  KeyError
        (a FeatureStoreError) naming the store when a key is missing."""
        from vlfast.data.readers import FeatureStoreError

        for store, k, what in ((self.det, det_key, "data.path"), (self.gt, gt_key, "data.options.gt_img_db")):
            if store is not None and k not in store:
                raise FeatureStoreError(f"{what} ({getattr(store, 'path', store)!r}) has no image {k!r}",
                                        path=getattr(store, "path", None), key=k, reason="missing")
        if self.gt is None:
            return det_key
        key = f"{gt_key}+{det_key}"
        self._pairs[key] = (gt_key, det_key)
        return key

    def __getitem__(self, key: Any) -> ImageRecord:
        pair = self._pairs.get(key) if isinstance(key, str) else None
        if pair is None:
            return self.det[key]
        assert self.gt is not None
        g, d = self.gt[pair[0]], self.det[pair[1]]
        if g.features.shape[1] != d.features.shape[1]:
            raise ValueError(f"image {key!r}: data.options.gt_img_db's features have {g.features.shape[1]} "
                             f"dims, data.path's {d.features.shape[1]}: expected the same feature size")
        conf = None if g.conf is None or d.conf is None else np.concatenate([g.conf, d.conf])
        soft = None
        if (g.soft_labels is not None and d.soft_labels is not None
                and g.soft_labels.shape[1] == d.soft_labels.shape[1]):
            soft = np.concatenate([g.soft_labels, d.soft_labels])
        return ImageRecord(key, np.concatenate([g.features, d.features]), np.concatenate([g.boxes, d.boxes]),
                           conf=conf, soft_labels=soft, width=d.width, height=d.height)

    @staticmethod
    def _count(store: Mapping[str, ImageRecord], key: str) -> int:
        n = getattr(store, "num_boxes", None)
        return int(n(key)) if callable(n) else store[key].num_boxes

    def num_boxes(self, key: Any) -> int:
        """Region count of ``key``'s record (ground-truth + detected for a combined key)."""
        pair = self._pairs.get(key) if isinstance(key, str) else None
        if pair is None:
            return self._count(self.det, key)
        assert self.gt is not None
        return self._count(self.gt, pair[0]) + self._count(self.det, pair[1])

    def __contains__(self, key: object) -> bool:
        return (isinstance(key, str) and key in self._pairs) or key in self.det

    def __iter__(self) -> Iterator[str]:
        yield from self.det
        yield from (k for k in self._pairs if k not in self.det)

    def __len__(self) -> int:
        return len(self.det) + sum(1 for k in self._pairs if k not in self.det)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"VcrImages(det={self.det!r}, gt={self.gt!r}, {len(self._pairs)} combined images)"


def _feature_dim(store: Mapping[str, ImageRecord], probe: int = 64) -> int:
    """The feature width of a store: that of its first readable record among the first
    ``probe`` (a bad record is the batches' business: data.on_bad_record)."""
    first: Optional[BaseException] = None
    for k, key in enumerate(store.keys()):
        if k >= probe:
            break
        try:
            return int(store[key].features.shape[1])
        except Exception as e:
            if _bad_record(e) is None:
                raise
            first = first or e
    if first is not None:
        raise first
    raise ValueError(f"data.path: the feature store {getattr(store, 'path', store)!r} holds no record")


class FeatureStoreSource(DataSource):
    """Real features: a feature store (``data.path``, any layout of
    :func:`vlfast.data.readers.open_feature_store`) and UNITER-format text DBs
    (``options.txt_db``, ``options.val_txt_db``, ``options.test_txt_db``) with a WordPiece
    vocab (``options.vocab``; default: the offline BERT's).  VQA targets come from the
    text DB's ``target`` ({labels, scores}) and its ``ans2label.json``.

    VCR (UNITER's VCR text DBs: ``id2len_qa.json``/``id2len_qar.json``, examples with
    ``input_ids`` (the question), ``input_ids_as``, ``input_ids_rs``, ``qa_target``,
    ``qar_target``, ``img_fname`` = [gt key, detected key]): ``options.gt_img_db`` (any
    store layout) names the ground-truth-box features; then ``records`` is a
    :class:`VcrImages` whose combined images put those regions before ``data.path``'s
    (UNITER's layout); without it only the detected key's regions are used.  Every row
    (``[CLS] q [SEP] a [SEP] r [SEP]``) is kept within ``max_len`` (and the model's
    ``max_positions``) by cutting the question first, then the answers/rationales
    (longest first); VCR items are never dropped by length.  UNITER's VCR DBs map
    object tags to word ids past BERT's vocabulary: those need ``model_vocab_size``
    (``model.config.vocab_size``) >= the largest id + 1.

    ``model_vocab_size``: the model's word-embedding rows when they differ from the
    tokenizer's vocab (None: the tokenizer's); ``max_positions``: the model's
    ``max_position_embeddings`` (None: ``max_len`` alone bounds VCR rows)."""

    def __init__(self, path: str, options: Mapping[str, Any], max_len: int = 60,
                 model_vocab_size: Optional[int] = None, max_positions: Optional[int] = None):
        from vlfast.data.readers import open_feature_store
        from vlfast.data.textdb import TxtDb
        from vlfast.data.tokenization import load_wordpiece
        from vlfast.models.base import bert_checkpoint_dir

        if not path:
            _fail("data.path", "a feature store path for a non-synthetic source", path)
        opts = dict(options)
        det = open_feature_store(path)
        vocab = opts.get("vocab") or str(bert_checkpoint_dir() / "vocab.txt")
        self.vocab_path = vocab
        self.tokenizer = load_wordpiece(vocab)
        self.feat_dim = _feature_dim(det)
        gt_path = opts.get("gt_img_db")
        self.records: Mapping[str, ImageRecord]
        if gt_path:
            gt = open_feature_store(gt_path)
            gt_dim = _feature_dim(gt)
            if gt_dim != self.feat_dim:
                _fail("data.options.gt_img_db", f"features of data.path's size {self.feat_dim} ({path})",
                      f"{gt_dim} in {gt_path}")
            self.records = VcrImages(det, gt)
        else:
            self.records = det
        self.num_region_classes = int(opts.get("num_region_classes", 1601))
        self.dbs = {"train": opts.get("txt_db"), "val": opts.get("val_txt_db"), "test": opts.get("test_txt_db")}
        if not self.dbs["train"]:
            _fail("data.options.txt_db", "the training text DB of UNITER's format", self.dbs["train"])
        self.answers = []
        ans = Path(self.dbs["train"]) / "ans2label.json"
        if ans.is_file():
            a2l = json.loads(ans.read_text())
            self.answers = [a for a, _ in sorted(a2l.items(), key=lambda kv: kv[1])]
        # data.options.max_txt_len: UNITER's max_txt_len (its TxtTokLmdb drops longer texts;
        # 60 by default, 220 in its VCR configs)
        max_len = opts.get("max_txt_len", max_len)
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 3:
            _fail("data.options.max_txt_len", "an int >= 3 (word pieces per text, [CLS]/[SEP] included)",
                  repr(max_len))
        self.max_len = max_len
        for name, v in (("model_vocab_size", model_vocab_size), ("max_positions", max_positions)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                _fail(f"FeatureStoreSource {name}", "None or an int >= 1", repr(v))
        self.model_vocab_size = model_vocab_size
        self.max_positions = max_positions
        self._TxtDb = TxtDb

    def examples(self, task: str, split: str) -> list[dict[str, Any]]:
        path = self.dbs.get(split)
        if not path:
            _fail(f"data.options.{split}_txt_db", f"a text DB for the {split} split", path)
        if task == "vcr":
            return self._vcr_items(path)
        db = self._TxtDb(path, max_txt_len=self.max_len)
        out = []
        cut = 0
        for txt_id in db.id2len:
            ex = db[txt_id]
            ids = [self.tokenizer.cls_id] + list(ex["input_ids"])[: self.max_len - 2] + [self.tokenizer.sep_id]
            s: dict[str, Any] = {"id": txt_id, "input_ids": ids, "img_id": ex["img_fname"]}
            if task == "vqa" and "target" in ex:
                s["answer_scores"] = {self.answers[int(lab)]: float(sc)
                                      for lab, sc in zip(ex["target"]["labels"], ex["target"]["scores"])}
            if task == "phrase_grounding":
                # word-region annotations a text DB may carry: {"position" (in input_ids, [CLS]
                # counted), "regions", "text"} per phrase
                if "phrases" not in ex:
                    _fail(f"text DB {path}: record {txt_id!r}", "'phrases' (phrase grounding annotations: "
                          "position, regions, text per phrase)", sorted(ex))
                # a phrase whose last wordpiece was cut off with the text cannot be queried: dropped
                # and counted (a sentence left with none is skipped)
                kept = [dict(ph) for ph in ex["phrases"] if 0 < int(ph["position"]) < len(ids) - 1]
                cut += len(ex["phrases"]) - len(kept)
                if not kept:
                    continue
                s["phrases"] = kept
            out.append(s)
        if cut:
            warnings.warn(f"text DB {path}: {cut} phrase(s) lie past the first {self.max_len - 2} wordpieces "
                          f"of their sentence and were dropped from {task}/{split}", stacklevel=2)
        return out

    def _vcr_items(self, path: str) -> list[dict[str, Any]]:
        """UNITER's VCR text DB -> VCR items for :func:`vlfast.data.collate.vcr_samples`:
        ``{"id", "input_ids" ([CLS] question [SEP]), "img_id", "choices" (K answers),
        "rationale_choices" (K rationales), and "label"/"rationale_label" when the record's
        qa_target/qar_target are >= 0}``, truncated so the longest row fits (see the class)."""
        tok = self.tokenizer
        L = self.max_len if self.max_positions is None else min(self.max_len, self.max_positions)
        if L < 7:
            _fail("VCR row budget (min(max_len, max_position_embeddings))", "at least 7 tokens "
                  "([CLS] q [SEP] a [SEP] r [SEP] with one word piece each)", L)
        db = self._TxtDb(path)  # every item: rows are truncated, not dropped
        limit = self.model_vocab_size or tok.vocab_size
        worst: tuple[int, str] = (-1, "")
        out: list[dict[str, Any]] = []
        truncated = 0
        for txt_id in db.id2len:
            ex = db[txt_id]
            where = f"text DB {path}: record {txt_id!r}"
            missing = [k for k in ("input_ids", "input_ids_as", "input_ids_rs", "img_fname") if k not in ex]
            if missing:
                _fail(where, "UNITER's VCR fields input_ids, input_ids_as, input_ids_rs, img_fname",
                      f"fields {sorted(ex)} (missing {missing})")
            q = [int(t) for t in ex["input_ids"]]
            answers = [[int(t) for t in a] for a in ex["input_ids_as"]]
            rationales = [[int(t) for t in r] for r in ex["input_ids_rs"]]
            if not answers or not rationales:
                _fail(where, "answers (input_ids_as) and rationales (input_ids_rs)",
                      f"{len(answers)} answers and {len(rationales)} rationales")
            for ids in [q, *answers, *rationales]:
                if ids and max(ids) > worst[0]:
                    worst = (max(ids), txt_id)
            # fit [CLS] q [SEP] a_j [SEP] r_k [SEP] for every j, k: the question first, then the
            # longer of the answer / rationale caps
            ca, cr = max(len(a) for a in answers), max(len(r) for r in rationales)
            over = len(q) + ca + cr + 4 - L
            if over > 0:
                truncated += 1
                q = q[: len(q) - min(over, max(0, len(q) - 1))]
                while len(q) + ca + cr + 4 > L:
                    if ca >= cr:
                        ca -= 1
                    else:
                        cr -= 1
                answers = [a[:ca] for a in answers]
                rationales = [r[:cr] for r in rationales]
            img = ex["img_fname"]
            if isinstance(img, str):
                img_id = self._vcr_image(None, img, where)
            elif isinstance(img, (list, tuple)) and len(img) == 2 and all(isinstance(k, str) for k in img):
                img_id = self._vcr_image(img[0], img[1], where)
            else:
                _fail(f"{where}: img_fname", "[ground-truth image key, detected image key]", repr(img))
                raise AssertionError
            item: dict[str, Any] = {"id": txt_id, "input_ids": [tok.cls_id] + q + [tok.sep_id], "img_id": img_id,
                                    "choices": answers, "rationale_choices": rationales}
            qa, qar = ex.get("qa_target"), ex.get("qar_target")
            qa = -1 if qa is None else int(qa)
            qar = -1 if qar is None else int(qar)
            if (qa >= 0) != (qar >= 0):
                _fail(f"{where}: qa_target/qar_target", "both labels (>= 0) or neither (-1 / absent: test)",
                      f"qa_target={ex.get('qa_target')!r}, qar_target={ex.get('qar_target')!r}")
            if qa >= 0:
                item["label"], item["rationale_label"] = qa, qar
            out.append(item)
        if worst[0] >= limit:
            raise ValueError(
                f"text DB {path}: record {worst[1]!r} has word id {worst[0]}, expected ids < the model's vocab size "
                f"{limit} (the tokenizer {self.vocab_path} has {tok.vocab_size} ids).  UNITER's VCR DBs map object "
                "tags to ids past BERT's vocabulary (its VCR head's num_special_tokens, 81 in UNITER): set "
                f"model.config.vocab_size to at least {worst[0] + 1} (vocab + special tokens) so the word "
                "embedding has those rows")
        if truncated:
            warnings.warn(f"text DB {path}: {truncated} VCR item(s) were cut to fit [CLS] q [SEP] a [SEP] r [SEP] "
                          f"into {L} tokens (the question first, then answers/rationales)", stacklevel=3)
        return out

    def _vcr_image(self, gt_key: Optional[str], det_key: str, where: str) -> str:
        """The image key of a VCR example: the combined ground-truth + detected key with
        ``gt_img_db``, else the detected key (checked against ``data.path``)."""
        if isinstance(self.records, VcrImages):
            if gt_key is None:
                _fail(f"{where}: img_fname", "[ground-truth image key, detected image key] (data.options."
                      "gt_img_db is set)", repr(det_key))
                raise AssertionError
            return self.records.pair(gt_key, det_key)
        if det_key not in self.records:
            from vlfast.data.readers import FeatureStoreError

            raise FeatureStoreError(f"{where}: data.path ({getattr(self.records, 'path', '?')!r}) has no image "
                                    f"{det_key!r}", path=getattr(self.records, "path", None), key=det_key,
                                    reason="missing")
        return det_key


def make_source(cfg: TrainConfig) -> DataSource:
    """The data source of ``cfg.data``: the synthetic world, or a feature store with text
    DBs (told the model's ``vocab_size`` when ``model.config`` sets one, and the model's
    ``max_position_embeddings``, which bound VCR's word ids and rows)."""
    opts = split_options(cfg.data.options)[0]
    if cfg.data.source == "synthetic":
        return SyntheticSource(opts)
    if cfg.data.source in ("uniter", "vilbert", "tsv", "npz"):
        vocab = cfg.model.config.get("vocab_size")
        try:
            positions = getattr(make_config(cfg.model.name, {"size": cfg.model.size, **cfg.model.config}),
                                "max_position_embeddings", None)
        except (ValueError, TypeError, KeyError):
            positions = None  # the job reports a bad model config when it builds the model
        return FeatureStoreSource(cfg.data.path or "", opts,
                                  model_vocab_size=int(vocab) if isinstance(vocab, int) else None,
                                  max_positions=int(positions) if isinstance(positions, int) else None)
    _fail("data.source", "synthetic | uniter | vilbert | tsv | npz", repr(cfg.data.source))
    raise AssertionError


# ----------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------

@dataclass
class _TaskData:
    examples: list[dict[str, Any]]
    collator: Collator
    lens: list[int] = field(default_factory=list)


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the main process (it checkpoints, then exits)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Seconds the workers of a DataLoader iterator that is torn down (an error, the batches
# dropped, the process exiting) get to exit once asked; survivors are killed (SIGKILL).
WORKER_EXIT_GRACE_S = 5.0

# The multi-process DataLoader iterators of this process whose workers may be alive
# (weakly held: an iterator that is collected shuts its workers down itself).
_LIVE_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_EXIT_HOOK_REGISTERED = False


def _workers_of(it: Any) -> list[Any]:
    """``it``'s worker processes, when ``it`` is a multi-process DataLoader iterator of this process."""
    if getattr(it, "_vlfast_owner_pid", None) != os.getpid():
        return []  # a copy inherited by a forked child: the workers are not its children
    return list(getattr(it, "_workers", None) or ())


def _stop_workers(iterators: list[Any], grace: Optional[float] = None) -> None:
    """Shut down the workers of DataLoader iterators (``_MultiProcessingDataLoaderIter``)
    within ``grace`` seconds (default :data:`WORKER_EXIT_GRACE_S`), then SIGKILL the
    ones still alive.  Never raises.

    Why: the workers ignore SIGTERM (:func:`_ignore_sigterm`), and a worker only leaves
    its loop when its iterator is shut down (``_shutdown_workers``: done event, ``None``
    on its index queue) or when this process is gone.  An iterator that outlives an
    error -- its generator frame kept alive by a reference cycle through the
    exception's traceback, as torch's re-raised worker errors make -- is still alive
    when the interpreter exits; torch's own atexit hook then turns ``_shutdown_workers``
    into a no-op, and multiprocessing's ``_exit_function`` calls ``terminate()`` (SIGTERM,
    ignored) and ``join()`` without a timeout on every daemonic child: a hang.  Torch's
    ``_shutdown_workers`` alone also waits ``MP_STATUS_CHECK_INTERVAL`` (5 s) per worker,
    then SIGTERMs (ignored) and waits 5 s more per worker, and leaves them running.

    So: ask every worker to exit as ``_shutdown_workers`` does (done event + ``None``),
    wait for all of them against one deadline, SIGKILL the survivors (after taking
    their pids out of torch's SIGCHLD check, which would otherwise raise "worker killed
    by signal" here), reap them, then let ``_shutdown_workers`` close the queues and the
    pin-memory thread (immediate: no worker is left to wait for)."""
    try:
        iterators = [it for it in iterators if _workers_of(it)]
        if not iterators:
            return
        for it in iterators:
            if getattr(it, "_shutdown", True):
                continue  # torch already asked them (and closed the queues)
            try:
                it._workers_done_event.set()
                for wid, q in enumerate(it._index_queues):
                    if it._workers_status[wid]:
                        q.put(None)
            except Exception:  # noqa: BLE001 -- a half-built or broken iterator: the deadline still applies
                pass
        deadline = time.monotonic() + max(0.0, float(WORKER_EXIT_GRACE_S if grace is None else grace))
        workers = [(it, w) for it in iterators for w in _workers_of(it)]
        for _, w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        survivors = [(it, w) for it, w in workers if w.is_alive()]
        if survivors:
            from torch.utils.data import _utils as data_utils

            for it in {id(it): it for it, _ in survivors}.values():
                if getattr(it, "_worker_pids_set", False):
                    data_utils.signal_handling._remove_worker_pids(id(it))
                    it._worker_pids_set = False
            for _, w in survivors:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except (ProcessLookupError, TypeError):
                    pass
            for _, w in survivors:
                w.join(timeout=1.0)
        for it in iterators:
            try:
                it._shutdown_workers()
            except Exception:  # noqa: BLE001 -- bookkeeping only; the workers are gone
                pass
            with _LIVE_LOCK:
                _LIVE_ITERATORS.discard(it)
    except Exception:  # noqa: BLE001 -- called from finally blocks and exit hooks
        pass


def _stop_all_workers() -> None:
    """atexit: stop the workers of every DataLoader iterator of this process still alive
    (registered after multiprocessing's and torch's exit hooks, so it runs before them)."""
    with _LIVE_LOCK:
        its = list(_LIVE_ITERATORS)
    _stop_workers(its)


def _track_workers(it: Any) -> None:
    """Remember a multi-process DataLoader iterator for :func:`_stop_all_workers`."""
    global _EXIT_HOOK_REGISTERED
    if not getattr(it, "_workers", None):
        return
    it._vlfast_owner_pid = os.getpid()
    with _LIVE_LOCK:
        _LIVE_ITERATORS.add(it)
        if not _EXIT_HOOK_REGISTERED:
            import atexit
            import multiprocessing.util  # noqa: F401 -- its exit hook is registered first, so it runs after ours

            atexit.register(_stop_all_workers)
            _EXIT_HOOK_REGISTERED = True


@contextlib.contextmanager
def _workers_stopped_on_exit(it: Any, grace: Optional[float] = None) -> Iterator[Any]:
    """``with`` block over a DataLoader iterator: when the block ends -- the iterator
    exhausted, an exception, or the generator holding the block closed or collected --
    its workers are shut down (SIGKILL after ``grace`` s); while the block is open the
    process's exit hook stops them too (see :func:`_stop_workers`)."""
    _track_workers(it)
    try:
        yield it
    finally:
        _stop_workers([it], grace)


class _Items(torch.utils.data.Dataset):
    """A list as a map-style dataset (index -> item)."""

    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _pin_batch(batch: VLBatch) -> VLBatch:
    """The batch with every tensor in page-locked memory (for async host-to-GPU copies)."""
    def pin(x: Any) -> Any:
        return x.pin_memory() if isinstance(x, torch.Tensor) else x
    return dataclasses.replace(batch, **{f.name: pin(getattr(batch, f.name)) for f in dataclasses.fields(batch)
                                         if f.name not in ("targets", "meta")},
                               targets={k: pin(v) for k, v in batch.targets.items()}, meta=dict(batch.meta))


class _Pinnable:
    """Carries a VLBatch through the DataLoader's pin-memory thread (which pins objects
    with a ``pin_memory()`` method)."""

    __slots__ = ("batch",)

    def __init__(self, batch: VLBatch):
        self.batch = batch

    def pin_memory(self) -> "_Pinnable":
        return _Pinnable(_pin_batch(self.batch))


class _Dropped:
    """A batch whose every sample read a bad feature record (``data.on_bad_record=skip``)."""

    __slots__ = ("skipped",)

    def __init__(self, skipped: list[dict[str, Any]]):
        self.skipped = skipped


class _CollateFn:
    """The DataLoader's collate_fn: ``fn(samples)``, wrapped for pinning when asked.

    ``skip_bad``: a FeatureStoreError naming a record (missing, undecodable, NaN/inf,
    short) does not stop the run: the samples are collated one by one to find those
    that read a bad record (per-sample generators: each draws alone what it draws in
    the batch), the rest is collated again, and ``meta["skipped_records"]`` (one dict
    per dropped sample: position, store, key, field, error) and
    ``meta["kept_positions"]`` say what happened; a batch with no good sample comes
    back as :class:`_Dropped`."""

    def __init__(self, fn: Any, pin: bool, skip_bad: bool = False):
        self.fn, self.pin, self.skip_bad = fn, pin, skip_bad

    def __call__(self, samples: list[Any]) -> Any:
        try:
            b = self.fn(samples)
        except Exception as e:
            if not self.skip_bad or _bad_record(e) is None:
                raise
            b = self._without_bad(samples)
            if isinstance(b, _Dropped):
                return b
        return _Pinnable(b) if self.pin else b

    def _without_bad(self, samples: list[Any]) -> Any:
        keep: list[int] = []
        skipped: list[dict[str, Any]] = []
        for i, smp in enumerate(samples):
            try:
                self.fn([smp])
            except Exception as e:
                bad = _bad_record(e)
                if bad is None:
                    raise
                skipped.append({"position": i, "store": bad.path, "key": bad.key, "field": bad.field,
                                "error": str(bad)})
                continue
            keep.append(i)
        if not skipped:  # only the batch fails (a negative drawn across samples): name it
            raise RuntimeError("data.on_bad_record=skip: the batch reads a bad feature record that none of its "
                               "samples reads alone; cannot tell which sample to drop")
        if not keep:
            return _Dropped(skipped)
        b = self.fn([samples[i] for i in keep])
        b.meta["skipped_records"] = skipped
        b.meta["kept_positions"] = keep
        return b


def _bad_record(e: Optional[BaseException]) -> Any:
    """The FeatureStoreError naming one record (not an unreadable store) that ``e`` is
    or was raised from (the collators re-raise it with their own context), else None."""
    from vlfast.data.readers import FeatureStoreError
    while e is not None:
        if isinstance(e, FeatureStoreError):
            return e if e.key is not None and e.reason != "store" else None
        e = e.__cause__
    return None


class _PairCollate:
    """Retrieval evaluation: (text index, image index) pairs -> one ITM row each."""

    def __init__(self, texts: list[dict[str, Any]], img_ids: list[Any], records: Mapping[str, ImageRecord],
                 pad_id: int):
        self.texts, self.img_ids, self.records, self.pad_id = texts, img_ids, records, pad_id

    def __call__(self, pairs: list[tuple[int, int]]) -> VLBatch:
        samples = [{"id": self.texts[t]["id"], "input_ids": self.texts[t]["input_ids"],
                    "img_id": self.img_ids[i], "neg_img_ids": []} for t, i in pairs]
        return collate_retrieval(samples, self.records, pad_id=self.pad_id)


class VLJob:
    """Pretraining (a mix of the model's objectives) or one fine-tuning task, on a
    data source.  Implements the :class:`~vlfast.training.loop.Job` protocol."""

    def __init__(self, cfg: TrainConfig, source: Optional[DataSource] = None, rank: int = 0, world_size: int = 1):
        check_names(cfg, check_source=source is None)  # before the data source is built
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        # data.on_bad_record=skip: (store, key) -> the error, and the samples dropped so far
        self.bad_records: dict[tuple[Optional[str], str], str] = {}
        self.skipped_samples = 0
        self.options = split_options(cfg.data.options)[1]
        self.source = source if source is not None else make_source(cfg)
        tasks = list(cfg.tasks)
        fine = [t for t in tasks if t in FINETUNE_COLLATE]
        if fine and len(tasks) > 1:
            _fail("tasks", "pretraining tasks, or exactly one fine-tuning task", tasks)
        self.kind = "finetune" if fine else "pretrain"
        self.tasks = tasks
        src, tok = self.source, self.source.tokenizer
        name = cfg.model.name
        overrides = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id}
        feat_field = {"uniter": "img_dim", "vilbert": "v_feature_size", "vlbert": "visual_feat_dim",
                      "visualbert": "visual_embedding_dim"}[name]
        overrides[feat_field] = src.feat_dim
        overrides.update(cfg.model.config)
        model_cfg = make_config(name, {"size": cfg.model.size, **overrides})
        if self.kind == "pretrain":
            for t in tasks:
                if t not in PRETRAIN_COLLATE:
                    _fail("tasks", f"tasks of {sorted(PRETRAIN_COLLATE)} or one of {sorted(FINETUNE_COLLATE)}", t)
            allowed = ("itm_ot_lambda", "wra", "wra_beta", "wra_iters", "mrc_skip_background", "mrc_kl_reduction",
                       "alignment_dropout")
            for k in cfg.model.objectives:
                if k not in allowed:
                    _fail(f"model.objectives.{k}", f"one of {allowed}", k)
            with _seeded(cfg.seed):
                self.model: nn.Module = build_pretrain_model(name, model_cfg, tasks,
                                                             num_region_classes=src.num_region_classes,
                                                             padding_free=cfg.model.padding_free,
                                                             **dict(cfg.model.objectives))
        else:
            task = tasks[0]
            kw: dict[str, Any] = {"padding_free": cfg.model.padding_free}
            if task == "vqa":
                if not src.answers:
                    _fail("data", "an answer label map for VQA (ans2label.json)", "none")
                kw["answers"] = src.answers
            if task == "nlvr2":
                mode = self.options["nlvr2_mode"]
                allowed = {"uniter": ("paired", "triplet", "paired-attn"), "vilbert": ("paired",),
                           "visualbert": ("triplet",)}.get(name, ())
                if mode is not None and mode not in allowed:
                    _fail("data.options.nlvr2_mode", f"one of {allowed} for {name}'s NLVR2 head (or null)",
                          repr(mode))
                if name == "uniter":
                    kw["mode"] = mode or "paired"
                self.nlvr2_layout = "triplet" if (name == "visualbert" or mode == "triplet") else "paired"
            if task == "retrieval":
                o = self.options
                for k in ("retrieval_negatives", "retrieval_text_negatives", "retrieval_hard_negatives"):
                    if not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 0:
                        _fail(f"data.options.{k}", "an int >= 0", repr(o[k]))
                if o["retrieval_negatives"] + o["retrieval_text_negatives"] < 1:
                    _fail("data.options.retrieval_negatives", "at least one negative (image or text) per text",
                          o["retrieval_negatives"])
                if o["retrieval_hard_negatives"] > o["retrieval_negatives"] + o["retrieval_text_negatives"]:
                    _fail("data.options.retrieval_hard_negatives", "<= the drawn negatives "
                          f"({o['retrieval_negatives'] + o['retrieval_text_negatives']})",
                          o["retrieval_hard_negatives"])
            if task == "phrase_grounding":
                iou = self.options["grounding_iou"]
                if not isinstance(iou, (int, float)) or not 0 < float(iou) <= 1:
                    _fail("data.options.grounding_iou", "a value in (0, 1]", repr(iou))
            with _seeded(cfg.seed):
                self.model = T.head_for(task, model_cfg, **kw)
        self.model_name = name
        self.pad_id = tok.pad_id
        self._train: dict[str, _TaskData] = {}
        self._eval: dict[tuple[str, str], _TaskData] = {}

    # -- data --------------------------------------------------------------------

    def _collator(self, task: str, seed: int, examples: Optional[list[dict[str, Any]]] = None) -> Collator:
        tok = self.source.tokenizer
        if self.kind == "pretrain":
            opts: dict[str, Any] = {"pad_id": tok.pad_id}
            ct = PRETRAIN_COLLATE[task]
            if ct == "mlm":
                opts.update(mask_id=tok.mask_id, special_ids=sorted(tok.special_ids),
                            vocab_range=(tok.random_token_ids.start, tok.random_token_ids.stop))
            return Collator(ct, self.source.records, seed=seed, **opts)
        ct = FINETUNE_COLLATE[task]
        opts = {"pad_id": tok.pad_id}
        if ct == "vqa":
            opts["answer_map"] = {a: i for i, a in enumerate(self.source.answers)}
        if ct == "mc":
            opts["sep_id"] = tok.sep_id
        if ct == "nlvr2":
            opts["layout"] = self.nlvr2_layout
        if ct == "grounding":
            opts["iou_threshold"] = float(self.options["grounding_iou"])
        if ct == "retrieval" and examples is not None:
            # negatives come from the split's own images and texts
            opts["num_negatives"] = int(self.options["retrieval_negatives"])
            opts["image_pool"] = sorted({e["img_id"] for e in examples})
            if self.options["retrieval_text_negatives"]:
                opts["num_text_negatives"] = int(self.options["retrieval_text_negatives"])
                opts["text_pool"] = [{"input_ids": e["input_ids"], "img_id": e["img_id"]} for e in examples]
        return Collator(ct, self.source.records, seed=seed, **opts)

    def _task_data(self, task: str, split: str) -> _TaskData:
        # evaluation data per (task, split): val and test of one job must not share a cache entry
        cache = self._train if split == "train" else self._eval
        key = task if split == "train" else (task, split)
        if key not in cache:
            ex = self.source.examples(task, split)
            if task == "phrase_grounding" and self.model_name == "vilbert":
                ex = self._one_phrase_examples(ex)
            if not ex:
                _fail(f"data ({split} split)", f"examples for task {task!r}", "none")
            cap = self.options["max_train_examples"]
            if split == "train" and cap is not None:
                if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                    _fail("data.options.max_train_examples", "an int >= 1 or null", repr(cap))
                ex = ex[:cap]
            if task == "vcr":  # items -> Q->A and QA->R samples (QA->R given every answer in evaluation)
                ex = vcr_samples(ex, sep_id=self.source.tokenizer.sep_id,
                                 mode="train" if split == "train" else "eval",
                                 type_ids="uniter" if self.model_name == "uniter" else "bert")
            seed = _task_seed(self.cfg.seed, task) + (0 if split == "train" else 1)
            lens = [len(e["input_ids"]) + self.source.records.num_boxes(e["img_id"])
                    if hasattr(self.source.records, "num_boxes") and "img_id" in e else len(e["input_ids"])
                    for e in ex]
            cache[key] = _TaskData(ex, self._collator(task, seed, ex), lens)
        return cache[key]

    def _one_phrase_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """ViLBERT's grounding layout: one example per phrase, the phrase as the text."""
        tok, L = self.source.tokenizer, getattr(self.source, "max_len", 40)
        out = []
        for e in examples:
            for k, ph in enumerate(e["phrases"]):
                ex = {"id": f"{e['id']}#{k}", "input_ids": tok.encode(ph["text"], L), "img_id": e["img_id"],
                      "sentence_id": e["id"], "phrase_index": k}
                if "regions" in ph:
                    ex["target_regions"] = list(ph["regions"])
                if "gt_boxes" in ph:
                    ex["gt_boxes"] = [list(b) for b in ph["gt_boxes"]]
                out.append(ex)
        return out

    def _loader(self, items: list[Any], batches: list[list[int]], collate: Any, seed: int) -> Iterator[VLBatch]:
        """Batches of ``items`` (index lists ``batches``) through a DataLoader with
        data.num_workers workers; ``seed`` seeds the loader's own generator (the global
        RNGs are never drawn from, so the training trajectory does not depend on it)."""
        nw = int(self.cfg.data.num_workers)
        pin = self.cfg.device != "cpu" and torch.cuda.is_available()
        g = torch.Generator()
        g.manual_seed(seed % 2**63)
        skip = self.cfg.data.on_bad_record == "skip"
        loader = torch.utils.data.DataLoader(
            _Items(items), batch_sampler=batches, num_workers=nw, collate_fn=_CollateFn(collate, pin, skip),
            pin_memory=pin, persistent_workers=False, worker_init_fn=_ignore_sigterm if nw else None, generator=g)
        if not nw:
            for b in loader:
                yield self._unwrap(b)
            return
        # workers: shut down (SIGKILL after WORKER_EXIT_GRACE_S) when this generator ends
        # in any way, or at exit while it is still suspended (a failed training step)
        with _workers_stopped_on_exit(iter(loader)) as it:
            for b in it:
                yield self._unwrap(b)

    def _unwrap(self, b: Any) -> Optional[VLBatch]:
        """The loader's item as a batch, or None for a batch dropped whole; skipped
        records are logged (once each) and counted in :attr:`bad_records`."""
        if isinstance(b, _Pinnable):
            b = b.batch
        skipped = b.skipped if isinstance(b, _Dropped) else getattr(b, "meta", {}).get("skipped_records", ())
        for rec in skipped:
            key = (rec["store"], rec["key"])
            if key not in self.bad_records:
                self.bad_records[key] = rec["error"]
                where = f"rank {self.rank}: " if self.world_size > 1 else ""
                print(f"vlfast: {where}data.on_bad_record=skip: {rec['error']}; its samples are dropped "
                      f"({len(self.bad_records)} bad record(s) so far)", file=sys.stderr, flush=True)
        self.skipped_samples += len(skipped)
        return None if isinstance(b, _Dropped) else b

    def _batches_of_epoch(self, td: _TaskData, task: str, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of example indices) of an epoch."""
        bs = self.cfg.data.batch_size
        if self.cfg.data.batch_tokens > 0:
            sampler = TokenBucketSampler(td.lens, bucket_size=8 * bs, batch_size=self.cfg.data.batch_tokens,
                                         seed=_task_seed(self.cfg.seed, task), rank=self.rank,
                                         world_size=self.world_size)
            sampler.set_epoch(epoch)
            return [list(b) for b in sampler.batches(epoch)]
        # The global batch i is perm[i*B*W:(i+1)*B*W] and rank r takes its r-th slice of B:
        # 2 ranks x B see, step by step, the samples 1 process x 2B sees.
        rng = np.random.default_rng([_task_seed(self.cfg.seed, task), epoch])
        perm = rng.permutation(len(td.examples))
        gb = bs * self.world_size
        n = len(perm) // gb  # full batches only: every rank the same count, every micro-batch the same size
        if n == 0:
            _fail("data.batch_size", f"<= the examples per rank ({len(perm) // self.world_size}) of task {task!r}", bs)
        lo = self.rank * bs
        return [perm[i * gb + lo:i * gb + lo + bs].tolist() for i in range(n)]

    def train_batches(self, task: str, epoch: int, start: int) -> Iterator[VLBatch]:
        """This rank's batches of ``task`` in ``epoch`` from position ``start`` on (a
        DataLoader over the epoch's index lists; the skipped ones are never loaded)."""
        td = self._task_data(task, "train")
        td.collator.set_epoch(epoch)
        batches = self._batches_of_epoch(td, task, epoch)[start:]
        seed = _task_seed(self.cfg.seed, f"{task}/loader/{epoch}/{start}/{self.rank}")
        return self._loader(td.examples, batches, td.collator, seed)

    # -- steps -------------------------------------------------------------------

    def step(self, model: nn.Module, batch: VLBatch, task: str) -> StepOutput:
        if self.kind == "pretrain":
            res = model(batch, task)
            return StepOutput(res.loss, res.metrics, batch.batch_size, batch.num_real_tokens)
        hard = int(self.options["retrieval_hard_negatives"]) if task == "retrieval" else 0
        if hard:
            # UNITER's hard negatives: score the drawn candidates without gradient, keep the k best
            batch = getattr(model, "module", model).mine_hard_negatives(batch, hard)
        out = model(batch)
        return StepOutput(out.loss, {}, len(batch.meta.get("ids", ())) or batch.batch_size, batch.num_real_tokens)

    # -- evaluation ----------------------------------------------------------------

    def _eval_batches(self, task: str, split: str) -> Iterator[tuple[list[dict[str, Any]], VLBatch]]:
        td = self._task_data(task, split)
        bs = self.cfg.data.eval_batch_size
        chunks = [list(range(i, min(i + bs, len(td.examples)))) for i in range(0, len(td.examples), bs)]
        batches = self._loader(td.examples, chunks, td.collator, _task_seed(self.cfg.seed, f"{task}/eval/{split}"))
        for idx, batch in zip(chunks, batches):
            if batch is None:  # every sample read a bad record (data.on_bad_record=skip)
                continue
            kept = batch.meta.get("kept_positions")
            yield [td.examples[idx[k]] for k in (kept if kept is not None else range(len(idx)))], batch

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """Validation metrics: pretraining -> mean loss (and metrics) per task, and for
        MLM the image probe ``mlm/acc_shuffled_images`` (the same masked texts on
        other samples' images) and ``mlm/image_gain`` (``mlm/acc`` minus it: how much
        the word predictions read the image); fine-tuning -> the task's score
        (vqa_score, accuracy; VCR also q2a, qa2r, q2ar)."""
        device = next(model.parameters()).device
        if self.kind == "pretrain":
            out: dict[str, float] = {}
            for task in self.tasks:
                tot, n, sums = 0.0, 0, {}
                probe, same, pn = 0.0, 0.0, 0
                for _, batch in self._eval_batches(task, split):
                    batch = batch.to(device)
                    res = model(batch, task)
                    tot += float(res.loss) * batch.batch_size
                    n += batch.batch_size
                    for k, v in res.metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * batch.batch_size
                    if task == "mlm" and "mlm/acc" in res.metrics and batch.batch_size > 1:
                        # the same masked texts on other samples' images: how much MLM reads the image
                        probe += float(model(batch.with_images_shuffled(), task).metrics["mlm/acc"]) * batch.batch_size
                        same += float(res.metrics["mlm/acc"]) * batch.batch_size
                        pn += batch.batch_size
                out[f"loss/{task}"] = tot / max(n, 1)
                out.update({k: v / max(n, 1) for k, v in sums.items()})
                if pn:
                    out["mlm/acc_shuffled_images"] = probe / pn
                    out["mlm/image_gain"] = (same - probe) / pn
            out["loss"] = float(np.mean([out[f"loss/{t}"] for t in self.tasks]))
            return out
        preds = self.predict(model, split)
        return preds["metrics"]

    def predict(self, model: nn.Module, split: str) -> dict[str, Any]:
        """Predictions of the fine-tuning task on ``split``: {"ids", "predictions"
        (answers / labels / region indices), "metrics" (when the split has labels)}.
        Retrieval adds "scores" (n_text, n_image), "text_ids", "image_ids"; phrase
        grounding gives one prediction per phrase with "phrases" (sentence id, phrase
        index, image id) and "boxes" (the predicted boxes, normalised xyxy); VCR adds
        "answer_probs", "rationale_probs" and "rationale_predictions" (:meth:`_predict_vcr`)."""
        task = self.tasks[0]
        if task == "retrieval":
            return self._predict_retrieval(model, split)
        if task == "phrase_grounding":
            return self._predict_grounding(model, split)
        if task == "vcr":
            return self._predict_vcr(model, split)
        device = next(model.parameters()).device
        ids: list[Any] = []
        preds: list[Any] = []
        gold: list[Any] = []
        for ex, batch in self._eval_batches(task, split):
            out = model(batch.to(device))
            ids += [e["id"] for e in ex]
            if task == "vqa":
                preds += model.answer_strings(out.predictions)
                gold += [e.get("answers") for e in ex]
            elif task == "nlvr2":
                preds += [bool(p) for p in out.predictions.tolist()]
                gold += [e.get("label") for e in ex]
            elif task == "refcoco":
                preds += out.predictions.tolist()
                gold += [e.get("target_region") for e in ex]
        result: dict[str, Any] = {"ids": ids, "predictions": preds, "metrics": {}}
        if gold and all(g is not None for g in gold):
            if task == "vqa":
                result["metrics"] = {"vqa_score": M.vqa_score(dict(zip(ids, preds)), dict(zip(ids, gold)))}
            else:
                p = [int(x) for x in preds]
                result["metrics"] = {"accuracy": M.accuracy(p, [int(g) for g in gold])}
        return result

    def _predict_vcr(self, model: nn.Module, split: str) -> dict[str, Any]:
        """VCR: every item's Q->A sample and its QA->R samples given each answer j (see
        :func:`vlfast.data.collate.vcr_samples`) -> per item (N of them, K = 4 choices):
        "answer_probs" (N, K) softmax of the head's choice logits, "rationale_probs"
        (N, K, K) [n, j] = softmax over the rationales given answer j, "predictions" (the
        answer argmax), "rationale_predictions" (the rationale argmax given the predicted
        answer: the Q->AR output); with labels, metrics accuracy (= q2a), q2a, qa2r (the
        rationale argmax given the right answer) and q2ar (both right),
        :func:`vlfast.training.metrics.vcr_accuracy`."""
        device = next(model.parameters()).device
        td = self._task_data("vcr", split)
        n_items = td.examples[-1]["item"] + 1
        K = len(td.examples[0]["choices"])
        ids: list[Any] = [None] * n_items
        gold_a: list[Optional[int]] = [None] * n_items
        gold_r: list[Optional[int]] = [None] * n_items
        answer = torch.full((n_items, K), float("nan"))
        rationale = torch.full((n_items, K, K), float("nan"))
        for ex, batch in self._eval_batches("vcr", split):
            with torch.no_grad():
                probs = torch.softmax(model(batch.to(device)).logits.float(), -1).cpu()  # (samples, K)
            for e, p in zip(ex, probs):
                n = e["item"]
                if e["vcr"] == "q2a":
                    answer[n] = p
                    ids[n] = e["item_id"]
                    gold_a[n] = e.get("label")
                else:
                    rationale[n, e["answer"]] = p
                    gold_r[n] = e.get("label")
        if bool(answer.isnan().any()) or bool(rationale.isnan().any()):
            _fail(f"vcr evaluation ({split} split)", "a Q->A sample and K QA->R samples per item", "missing samples")
        pred = answer.argmax(-1)
        r_pred = rationale[torch.arange(n_items), pred].argmax(-1)
        result: dict[str, Any] = {"ids": ids, "predictions": pred.tolist(), "rationale_predictions": r_pred.tolist(),
                                  "answer_probs": answer, "rationale_probs": rationale, "metrics": {}}
        if all(g is not None for g in gold_a) and all(g is not None for g in gold_r):
            r_given_gold = rationale[torch.arange(n_items), torch.tensor(gold_a)].argmax(-1)
            m = M.vcr_accuracy(pred, torch.tensor(gold_a), r_given_gold, torch.tensor(gold_r))
            result["metrics"] = {"accuracy": m["q2a"], **m}
        return result

    def retrieval_scores(self, model: nn.Module, split: str) -> tuple[torch.Tensor, list[Any], list[Any], list[int]]:
        """Every text of ``split`` against every image of it: (scores (n_text, n_image)
        float32, text ids, image ids (sorted), each text's image index)."""
        td = self._task_data("retrieval", split)
        texts = td.examples
        img_ids = sorted({e["img_id"] for e in texts})
        col = {k: j for j, k in enumerate(img_ids)}
        nt, ni = len(texts), len(img_ids)
        pairs = [(t, i) for t in range(nt) for i in range(ni)]
        bs = self.cfg.data.eval_batch_size
        chunks = [list(range(k, min(k + bs, len(pairs)))) for k in range(0, len(pairs), bs)]
        collate = _PairCollate(texts, img_ids, self.source.records, self.pad_id)
        device = next(model.parameters()).device
        scores = torch.empty(nt * ni, dtype=torch.float32)
        batches = self._loader(pairs, chunks, collate, _task_seed(self.cfg.seed, f"retrieval/eval/{split}"))
        for idx, batch in zip(chunks, batches):
            if batch is None or "kept_positions" in batch.meta:  # pairs of a bad record (on_bad_record=skip)
                scores[idx[0]:idx[-1] + 1] = float("-inf")
                if batch is None:
                    continue
                kept = torch.tensor([idx[k] for k in batch.meta["kept_positions"]])
                scores[kept] = model.row_scores(batch.to(device)).float().cpu()
                continue
            scores[idx[0]:idx[-1] + 1] = model.row_scores(batch.to(device)).float().cpu()
        return scores.view(nt, ni), [e["id"] for e in texts], img_ids, [col[e["img_id"]] for e in texts]

    def _predict_retrieval(self, model: nn.Module, split: str) -> dict[str, Any]:
        scores, tids, iids, gold = self.retrieval_scores(model, split)
        best = scores.argmax(1).tolist()
        return {"ids": tids, "predictions": [iids[j] for j in best], "scores": scores, "text_ids": tids,
                "image_ids": iids, "metrics": M.retrieval_recall(scores, gold)}

    def _predict_grounding(self, model: nn.Module, split: str) -> dict[str, Any]:
        device = next(model.parameters()).device
        ids: list[Any] = []
        preds: list[int] = []
        phrases: list[dict[str, Any]] = []
        boxes: list[list[float]] = []
        hits: list[bool] = []
        labelled = True
        for ex, batch in self._eval_batches("phrase_grounding", split):
            out = model(batch.to(device))
            pred = out.predictions.cpu()
            if pred.dim() == 1:  # one phrase per row (ViLBERT)
                pred = pred[:, None]
            for b, e in enumerate(ex):
                rec = self.source.records[e["img_id"]]
                if "phrases" in e:
                    items = [(e["id"], k, ph.get("regions"), ph.get("gt_boxes")) for k, ph in enumerate(e["phrases"])]
                else:
                    items = [(e["sentence_id"], e["phrase_index"], e.get("target_regions"), e.get("gt_boxes"))]
                for k, (sid, pk, gold, gt_boxes) in enumerate(items):
                    r = int(pred[b, k])
                    ids.append(f"{sid}#{pk}")
                    preds.append(r)
                    phrases.append({"sentence_id": sid, "phrase_index": pk, "image_id": e["img_id"]})
                    box = torch.as_tensor(rec.boxes[r], dtype=torch.float32)
                    boxes.append(box.tolist())
                    if gt_boxes is not None and len(gt_boxes):
                        # the dataset's own boxes (Flickr30k Entities, normalised x1y1x2y2): the
                        # benchmark's metric, IoU >= 0.5 with any box of the phrase's entity
                        g = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
                        hits.append(bool((M.box_iou(box.expand_as(g), g) >= 0.5).any()))
                    elif gold is None:
                        labelled = False
                    else:
                        g = torch.as_tensor(np.asarray(rec.boxes)[list(gold)], dtype=torch.float32)
                        hits.append(bool((M.box_iou(box.expand_as(g), g) >= 0.5).any()))
        result: dict[str, Any] = {"ids": ids, "predictions": preds, "phrases": phrases, "boxes": boxes, "metrics": {}}
        if labelled and hits:
            result["metrics"] = {"accuracy": float(np.mean(hits))}
        return result

    def write_predictions(self, model: nn.Module, split: str, out_dir: Path) -> tuple[Path, dict[str, float]]:
        """Run :meth:`predict` and write the benchmark's submission file into out_dir."""
        from . import submission as S

        task = self.tasks[0]
        r = self.predict(model, split)
        out_dir = Path(out_dir)
        unsized: list[str] = []

        def to_pixels(img_id: str, x1: float, y1: float, x2: float, y2: float) -> list[float]:
            rec = self.source.records[img_id]
            if rec.width == 1 and rec.height == 1:  # a store without image sizes (UNITER's layout)
                unsized.append(img_id)
            return [x1 * rec.width, y1 * rec.height, x2 * rec.width, y2 * rec.height]

        if task == "vqa":
            path = S.write_vqa_submission(out_dir / f"vqa_{split}.json", r["ids"], r["predictions"])
        elif task == "nlvr2":
            path = S.write_nlvr2_predictions(out_dir / f"nlvr2_{split}.csv", r["ids"], r["predictions"])
        elif task == "refcoco":
            td = self._task_data(task, split)
            boxes = []
            for e, region in zip(td.examples, r["predictions"]):
                rec = self.source.records[e["img_id"]]
                boxes.append(to_pixels(e["img_id"], *(float(v) for v in rec.boxes[int(region)])))
            path = S.write_refcoco_predictions(out_dir / f"refcoco_{split}.json", r["ids"], boxes)
        elif task == "retrieval":
            path = S.write_retrieval_rankings(out_dir / f"retrieval_{split}.json", r["scores"], r["text_ids"],
                                              r["image_ids"], k=10)
        elif task == "phrase_grounding":
            pix = [to_pixels(ph["image_id"], *box) for ph, box in zip(r["phrases"], r["boxes"])]
            path = S.write_grounding_predictions(out_dir / f"grounding_{split}.json",
                                                 [ph["sentence_id"] for ph in r["phrases"]],
                                                 [ph["phrase_index"] for ph in r["phrases"]],
                                                 [ph["image_id"] for ph in r["phrases"]], pix)
        else:  # vcr: the answer probabilities and, for each answer j, the rationale probabilities given j
            path = S.write_vcr_submission(out_dir / f"vcr_{split}.csv", r["ids"], r["answer_probs"],
                                          r["rationale_probs"])
        if unsized:
            warnings.warn(f"{path}: the feature store has no image sizes for {len(set(unsized))} image(s) "
                          f"(e.g. {unsized[0]!r}; UNITER's layout keeps none), so their boxes are written "
                          "normalised to [0, 1], not in pixels", stacklevel=2)
        return path, r["metrics"]

    # -- state ---------------------------------------------------------------------

    def data_state(self) -> dict[str, Any]:
        return {}

    def load_data_state(self, state: Mapping[str, Any]) -> None:
        return None


__all__ = ["VLJob", "DataSource", "SyntheticSource", "FeatureStoreSource", "VcrImages", "make_source",
           "check_names", "check_options", "source_option_keys", "STORE_OPTIONS", "PRETRAIN_COLLATE", "FINETUNE_COLLATE", "SOURCES"]
