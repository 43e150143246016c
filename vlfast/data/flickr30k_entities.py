"""Flickr30k Entities -> a UNITER-format text DB for phrase grounding on real features.

The dataset (github.com/BryanPlummer/flickr30k_entities) has, per image id:

* ``Sentences/<id>.txt`` -- one caption per line (five per image), phrases in brackets
  with their coreference-chain (entity) id and one or more coarse types::

      [/EN#18/people A child] in [/EN#19/clothing/other a pink dress] is climbing ...

  Entity id ``0`` is the null chain of ``notvisual`` phrases (never boxed).
* ``Annotations/<id>.xml`` -- PASCAL-VOC-like: ``<size>`` (``<width>``, ``<height>`` in
  pixels) and ``<object>`` elements with one or more ``<name>`` (entity ids) and either a
  ``<bndbox>`` (``xmin ymin xmax ymax``, 1-based pixels) or the 0/1 flags
  ``<nobndbox>`` (not visible) and ``<scene>`` (the whole scene).  An entity may have
  several boxes (one object each), and one box may name several entities.
* ``train.txt`` / ``val.txt`` / ``test.txt`` -- the image ids of each split, one a line.

:func:`parse_sentence` / :func:`parse_sentences_file` and :func:`parse_annotation`
read the two formats; :func:`build_grounding_txt_db` turns a split into a text DB that
``training/jobs.py``'s ``phrase_grounding`` task reads from a feature store
(``data.options.txt_db`` / ``val_txt_db``).  Each sentence becomes one example (id
``"<image id>_<line index>"``)::

    {"input_ids": [...],            # wordpiece ids, no [CLS]/[SEP] (the job adds them)
     "img_fname": "<store key>",   # the image's key in the feature store
     "sentence_id": "<image id>_<k>", "image_id": "<image id>",
     "sentence": "A child in a pink dress ...",   # the plain words, space-joined
     "entity_ids": ["18", "19"],   # per kept phrase
     "phrases": [{"position": p,   # index of the phrase's LAST wordpiece in
                                   # [CLS] + input_ids ([CLS] counted: p >= 1)
                  "regions": [r, ...],   # feature-store regions with IoU >= iou_threshold
                                         # with one of the entity's boxes (sorted)
                  "text": "a pink dress", "entity_id": "19", "types": ["clothing"],
                  "gt_boxes": [[x1, y1, x2, y2], ...]},  # the entity's boxes, normalised
                 ...]}

Boxes: the annotation's pixel boxes are converted as the dataset's own reader does
(each coordinate minus 1, i.e. 0-based pixels) and normalised by the annotation's
``<size>``; feature-store boxes are already normalised ``[x1, y1, x2, y2]`` by their
reader (UNITER's stores keep no image size, so the XML's is the only one used).  IoU is
computed on normalised boxes (it does not change under per-axis scaling).

Command line (prints the statistics as JSON)::

    python -m vlfast.data.flickr30k_entities --root FLICKR30K_ENTITIES --features STORE \\
        --source uniter|vilbert|tsv|npz --vocab vocab.txt --split train --out DB
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from vlfast.data.batch import ImageRecord
from vlfast.data.collate import _iou_matrix
from vlfast.data.tokenization import VLTokenizer

__all__ = ["EntityPhrase", "parse_sentence", "parse_sentences_file", "parse_annotation", "read_split",
           "build_grounding_txt_db", "grounding_db_stats", "open_store", "DROP_REASONS", "main"]

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

#: why a phrase is left out, in the order the rules are checked (each dropped phrase is
#: counted once, under the first that applies)
DROP_REASONS: tuple[str, ...] = (
    "notvisual",      # entity id 0 / type notvisual: the dataset never boxes these
    "scene",          # the entity is flagged <scene> (the whole image), no box
    "nobox",          # the entity is flagged <nobndbox> (not visible), no box
    "unannotated",    # the entity has no object in the XML at all
    "below_iou",      # it has boxes, but no feature-store region reaches iou_threshold
    "no_wordpieces",  # its words give no wordpiece (the tokenizer's normaliser dropped them)
    "truncated",      # its last wordpiece is past max_txt_len - 2 wordpieces
)

_HEADER = re.compile(r"\[/EN#(\d+)((?:/[^/\s\[\]]+)+)")
_STORE_KINDS = ("uniter", "vilbert", "tsv", "npz")


# ----------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EntityPhrase:
    """One bracketed phrase of a sentence: ``words[start:end]`` of the plain words."""

    entity_id: str          # coreference chain id ("0": notvisual)
    types: tuple[str, ...]  # coarse types, e.g. ("clothing", "other")
    start: int              # index of the first word in the plain words
    end: int                # one past the last word (exclusive)
    text: str               # the phrase's words, space-joined


def parse_sentence(line: str, where: str = "sentence") -> tuple[list[str], list[EntityPhrase]]:
    """Split an annotated caption into its plain words and its phrases.

    ``line``: ``"[/EN#18/people A child] in [/EN#19/clothing/other a pink dress] ."``
    (tokens separated by whitespace; a phrase opens with a ``[/EN#<id>/<type>[/<type>...]``
    token and closes at the first word ending in ``]``).  Returns ``(words, phrases)``:
    ``["A", "child", "in", "a", "pink", "dress", "."]`` and one :class:`EntityPhrase` per
    bracket, in order, e.g. ``EntityPhrase("19", ("clothing", "other"), 3, 6, "a pink
    dress")``.  ``where`` names the line in errors (``"<file>, line 3"``).

    Raises ValueError naming ``where`` for a malformed opening token, a phrase without
    words, a phrase opened inside another or never closed, and a ``]`` that closes no
    phrase.
    """
    if not isinstance(line, str):
        raise TypeError(f"parse_sentence: {where}: expected str, got {type(line).__name__}")
    words: list[str] = []
    phrases: list[EntityPhrase] = []
    open_: Optional[tuple[str, tuple[str, ...], int]] = None  # (entity id, types, first word) of the open phrase

    def fail(what: str) -> None:
        raise ValueError(f"{where}: {what} (line: {line.strip()!r})")

    for tok in line.split():
        if tok.startswith("["):
            if open_ is not None:
                fail(f"phrase opened by {tok!r} inside the unclosed phrase of entity {open_[0]!r}")
            m = _HEADER.fullmatch(tok)
            if m is None:
                if _HEADER.fullmatch(tok.rstrip("]")):
                    fail(f"phrase {tok!r} has no words")
                fail(f"expected a phrase opening '[/EN#<entity id>/<type>[/<type>...]', got {tok!r}")
            open_ = (m.group(1), tuple(m.group(2)[1:].split("/")), len(words))
            continue
        if tok.endswith("]"):
            if open_ is None:
                fail(f"{tok!r} closes no phrase")
            word = tok[:-1]
            if word:
                words.append(word)
            eid, types, start = open_
            if len(words) == start:
                fail(f"the phrase of entity {eid!r} has no words")
            phrases.append(EntityPhrase(eid, types, start, len(words), " ".join(words[start:])))
            open_ = None
            continue
        words.append(tok)
    if open_ is not None:
        fail(f"the phrase of entity {open_[0]!r} is not closed (expected a word ending in ']')")
    return words, phrases


def parse_sentences_file(path: PathLike) -> list[tuple[list[str], list[EntityPhrase]]]:
    """:func:`parse_sentence` of every non-empty line of a ``Sentences/<id>.txt`` (utf-8),
    in file order; errors name the file and the line number."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not utf-8 text ({e})") from e
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            out.append(parse_sentence(line, where=f"{p}, line {i + 1}"))
    return out


# ----------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------

def _number(el: Optional[ET.Element], what: str, where: str) -> float:
    if el is None or el.text is None or not el.text.strip():
        raise ValueError(f"{where}: expected {what} with a number, found none")
    try:
        return float(el.text.strip())
    except ValueError:
        raise ValueError(f"{where}: {what}: expected a number, got {el.text.strip()!r}") from None


def parse_annotation(xml_path: PathLike) -> dict[str, Any]:
    """Read an ``Annotations/<id>.xml``.

    Returns ``{"width": int, "height": int, "boxes": {entity_id: [[x1, y1, x2, y2], ...]},
    "nobox": set of entity ids, "scene": set of entity ids}``: boxes in 0-based pixels
    (the file's 1-based ``xmin ymin xmax ymax`` minus 1, as the dataset's own reader),
    floats, in file order; a box whose object names several entities is listed under
    each.  Box-less objects add their names to ``nobox`` / ``scene`` by their flags (a
    missing flag counts as 0).

    Raises ValueError naming the file for XML that does not parse, a missing or
    non-positive ``<size>``, an object without ``<name>``, a ``<bndbox>`` with a missing,
    non-numeric or inverted coordinate, and an object with neither ``<bndbox>`` nor a
    ``<nobndbox>``/``<scene>`` flag.
    """
    p = Path(xml_path)
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{p}: not well-formed XML ({e})") from e
    size = root.find("size")
    if size is None:
        raise ValueError(f"{p}: expected a <size> element with <width> and <height>, found none")
    wh = []
    for name in ("width", "height"):
        v = _number(size.find(name), f"<size><{name}>", str(p))
        if not v > 0 or v != int(v):
            raise ValueError(f"{p}: <size><{name}>: expected a positive integer (pixels), got {v:g}")
        wh.append(int(v))
    boxes: dict[str, list[list[float]]] = {}
    nobox: set[str] = set()
    scene: set[str] = set()
    for k, obj in enumerate(root.findall("object")):
        where = f"{p}: <object> #{k + 1}"
        names = [(n.text or "").strip() for n in obj.findall("name")]
        if not names or not all(names):
            raise ValueError(f"{where}: expected one or more non-empty <name> (entity ids), got {names}")
        bnd = obj.find("bndbox")
        if bnd is not None:
            x1, y1, x2, y2 = (_number(bnd.find(c), f"<bndbox><{c}>", where) - 1.0
                              for c in ("xmin", "ymin", "xmax", "ymax"))
            if x2 < x1 or y2 < y1:
                raise ValueError(f"{where}: <bndbox>: expected xmin <= xmax and ymin <= ymax, got "
                                 f"[{x1 + 1:g}, {y1 + 1:g}, {x2 + 1:g}, {y2 + 1:g}]")
            for n in names:
                boxes.setdefault(n, []).append([x1, y1, x2, y2])
            continue
        flags = {}
        for tag in ("nobndbox", "scene"):
            el = obj.find(tag)
            flags[tag] = None if el is None else _number(el, f"<{tag}>", where)
        if all(v is None for v in flags.values()):
            raise ValueError(f"{where} (entities {names}): expected a <bndbox> or the <nobndbox>/<scene> flags, "
                             "found neither")
        if (flags["nobndbox"] or 0) > 0:
            nobox.update(names)
        if (flags["scene"] or 0) > 0:
            scene.update(names)
    return {"width": wh[0], "height": wh[1], "boxes": boxes, "nobox": nobox, "scene": scene}


def read_split(flickr_root: PathLike, split: str) -> list[str]:
    """The image ids of ``<flickr_root>/<split>.txt`` (one a line; blanks skipped,
    repeats kept once, file order)."""
    f = Path(flickr_root) / f"{split}.txt"
    if not f.is_file():
        raise FileNotFoundError(f"Flickr30k Entities: no split file {f} (expected train.txt / val.txt / test.txt "
                                f"in the dataset root)")
    ids = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return list(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------

def open_store(path: PathLike, source: Optional[str] = None) -> Mapping[str, ImageRecord]:
    """Open a feature store with :func:`vlfast.data.readers.open_feature_store` and, when
    ``source`` (uniter | vilbert | tsv | npz) is given, check that the layout is that one."""
    from vlfast.data import readers as R

    if source is not None and source not in _STORE_KINDS:
        raise ValueError(f"open_store: source: expected one of {' | '.join(_STORE_KINDS)}, got {source!r}")
    store = R.open_feature_store(path)
    if source is not None:
        want = {"uniter": R.UniterFeatureStore, "vilbert": R.VilbertFeatureStore, "tsv": R.TsvFeatureStore,
                "npz": R.NpzFolderStore}[source]
        if not isinstance(store, want):
            raise ValueError(f"open_store: {str(path)!r} is a {type(store).__name__}, not the {source!r} layout "
                             f"({want.__name__}) that source={source!r} asks for")
    return store


def _new_stats(split: str, n_split: int) -> dict[str, Any]:
    return {"split": split, "images_in_split": n_split, "images": 0, "images_missing": 0,
            "images_without_examples": 0, "images_size_mismatch": 0, "sentences": 0, "sentences_kept": 0,
            "sentences_skipped": 0, "phrases": 0, "phrases_kept": 0,
            "phrases_dropped": {r: 0 for r in DROP_REASONS}, "regions_per_phrase": 0.0}


def _image_examples(image_id: str, key: str, rec: ImageRecord, sentences: list[tuple[list[str], list[EntityPhrase]]],
                    ann: dict[str, Any], tokenizer: VLTokenizer, iou_threshold: float, max_txt_len: int,
                    stats: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The text-DB examples of one image (updates ``stats``)."""
    W, H = ann["width"], ann["height"]
    scale = np.array([W, H, W, H], dtype=np.float64)
    regions = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
    grounded: dict[str, tuple[list[int], list[list[float]]]] = {}  # entity -> (regions, normalised gt boxes)
    for eid, bxs in ann["boxes"].items():
        gt = np.asarray(bxs, dtype=np.float64) / scale
        hit = (_iou_matrix(regions, gt) >= iou_threshold).any(1) if len(regions) else np.zeros(0, bool)
        grounded[eid] = (np.flatnonzero(hit).tolist(), gt.tolist())
    keep_n = max_txt_len - 2
    drops = stats["phrases_dropped"]
    made = 0
    for k, (words, phrases) in enumerate(sentences):
        sid = f"{image_id}_{k}"
        stats["sentences"] += 1
        text = " ".join(words)
        ids, wid = tokenizer.encode_with_word_ids(text)
        kept = []
        for ph in phrases:
            stats["phrases"] += 1
            reason = None
            regs, gt = grounded.get(ph.entity_id, ([], []))
            toks = [i for i, w in enumerate(wid) if ph.start <= w < ph.end]
            if ph.entity_id not in grounded:
                if ph.entity_id == "0" or "notvisual" in ph.types:
                    reason = "notvisual"
                elif ph.entity_id in ann["scene"]:
                    reason = "scene"
                elif ph.entity_id in ann["nobox"]:
                    reason = "nobox"
                else:
                    reason = "unannotated"
            elif not regs:
                reason = "below_iou"
            elif not toks:
                reason = "no_wordpieces"
            elif toks[-1] > keep_n:  # positions 1..keep_n survive the cut ([CLS] is 0)
                reason = "truncated"
            if reason is not None:
                drops[reason] += 1
                continue
            kept.append({"position": int(toks[-1]), "regions": [int(r) for r in regs], "text": ph.text,
                         "entity_id": ph.entity_id, "types": list(ph.types), "gt_boxes": gt})
        if not kept:
            stats["sentences_skipped"] += 1
            continue
        stats["sentences_kept"] += 1
        stats["phrases_kept"] += len(kept)
        stats["regions_per_phrase"] += sum(len(p["regions"]) for p in kept)  # a sum until the end
        made += 1
        yield sid, {"input_ids": [int(i) for i in ids[1:-1][:keep_n]], "img_fname": key, "sentence_id": sid,
                    "image_id": image_id, "sentence": text, "entity_ids": [p["entity_id"] for p in kept],
                    "phrases": kept}
    if not made:
        stats["images_without_examples"] += 1


def build_grounding_txt_db(flickr_root: PathLike, feature_store: Union[PathLike, Mapping[str, ImageRecord]],
                           tokenizer: VLTokenizer, out_path: PathLike, split: str, *, iou_threshold: float = 0.5,
                           max_txt_len: int = 60, key_format: str = "{}", overwrite: bool = False) -> Path:
    """Write the phrase-grounding text DB of one Flickr30k Entities split; returns its path.

    ``flickr_root``: the dataset folder (``Sentences/``, ``Annotations/``, ``<split>.txt``).
    ``feature_store``: a :class:`~vlfast.data.readers.FeatureStore` (any layout) or a path
    for :func:`~vlfast.data.readers.open_feature_store`; image ``<id>`` is its record
    ``key_format.format(<id>)`` (e.g. ``"flickr30k_{}.npz"`` for a store keyed by npz
    file names).  ``tokenizer``: the WordPiece tokenizer of the model (the job must use
    the same vocab: ``data.options.vocab``).

    Every sentence of every split image found in the store becomes one example (format in
    the module docstring).  A phrase's ``regions`` are the store regions whose box has IoU
    >= ``iou_threshold`` with one of its entity's boxes; phrases without boxes
    (notvisual / scene / nobndbox / not in the XML), without such a region, or whose last
    wordpiece falls past ``max_txt_len - 2`` wordpieces (``max_txt_len`` counts [CLS] and
    [SEP], like the job's ``max_len`` of 60; longer texts are cut there) are left out
    and counted (:data:`DROP_REASONS`); sentences left without phrases are skipped.

    Statistics -- logged at INFO and stored in the DB's ``meta.json`` under ``"stats"``
    (read them back with :func:`grounding_db_stats`)::

        {"split", "images_in_split", "images" (converted), "images_missing" (not in the
         store), "images_without_examples", "images_size_mismatch" (the store's image size,
         where it has one, differs from the XML's), "sentences", "sentences_kept",
         "sentences_skipped", "phrases", "phrases_kept",
         "phrases_dropped": {reason: count}, "regions_per_phrase" (mean over kept)}

    ``meta.json`` also has the tokenizer ids (``CLS``, ``SEP``, ``MASK``, ``UNK``,
    ``v_range``) and the settings.  Raises FileNotFoundError for a missing split,
    sentence or annotation file, ValueError (naming the file and line) for malformed
    ones, FileExistsError when ``out_path`` exists and not ``overwrite``, and ValueError
    when the split yields no example (with the store's and the expected keys, to fix
    ``key_format``).
    """
    from vlfast.data.readers import _write_json_atomic
    from vlfast.data.textdb import write_txt_db

    if not isinstance(tokenizer, VLTokenizer):
        raise TypeError(f"build_grounding_txt_db: tokenizer: expected a VLTokenizer, got {type(tokenizer).__name__}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) \
            or not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"build_grounding_txt_db: iou_threshold: expected a value in (0, 1], got {iou_threshold!r}")
    if isinstance(max_txt_len, bool) or not isinstance(max_txt_len, int) or max_txt_len < 3:
        raise ValueError(f"build_grounding_txt_db: max_txt_len: expected an int >= 3 ([CLS], a wordpiece, [SEP]), "
                         f"got {max_txt_len!r}")
    if not isinstance(key_format, str) or "{" not in key_format:
        raise ValueError(f"build_grounding_txt_db: key_format: expected a format string with '{{}}' for the image "
                         f"id, got {key_format!r}")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"build_grounding_txt_db: {str(out)!r} exists; pass overwrite=True to replace it")
    root = Path(flickr_root)
    for sub in ("Sentences", "Annotations"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"build_grounding_txt_db: {root} has no {sub}/ folder (expected the Flickr30k "
                                    "Entities root: Sentences/, Annotations/, train.txt, val.txt, test.txt)")
    store = open_store(feature_store) if isinstance(feature_store, (str, os.PathLike)) else feature_store
    ids = read_split(root, split)
    stats = _new_stats(split, len(ids))
    thr = float(iou_threshold)

    def examples() -> Iterator[tuple[str, dict[str, Any]]]:
        for image_id in ids:
            key = key_format.format(image_id)
            if key not in store:
                stats["images_missing"] += 1
                continue
            sent_file, xml_file = root / "Sentences" / f"{image_id}.txt", root / "Annotations" / f"{image_id}.xml"
            for f in (sent_file, xml_file):
                if not f.is_file():
                    raise FileNotFoundError(f"build_grounding_txt_db: image {image_id!r} of {split}.txt has no {f}")
            sentences, ann = parse_sentences_file(sent_file), parse_annotation(xml_file)
            rec = store[key]
            stats["images"] += 1
            if (rec.width, rec.height) != (1, 1) and (rec.width, rec.height) != (ann["width"], ann["height"]):
                stats["images_size_mismatch"] += 1
            yield from _image_examples(image_id, key, rec, sentences, ann, tokenizer, thr, max_txt_len, stats)

    gen = examples()
    first = next(gen, None)
    if first is None:
        hint = ""
        if stats["images_missing"] == len(ids) and ids:
            have = list(store.keys())[:3]
            hint = (f"; none of the split's images is in the store (image {ids[0]!r} -> key "
                    f"{key_format.format(ids[0])!r}, the store has e.g. {have}: set key_format)")
        raise ValueError(f"build_grounding_txt_db: split {split!r} of {root} gives no grounding example{hint} "
                         f"(stats: {json.dumps(stats)})")
    meta: dict[str, Any] = {
        "CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "MASK": tokenizer.mask_id, "UNK": tokenizer.unk_id,
        "v_range": [tokenizer.random_token_ids.start, tokenizer.random_token_ids.stop],
        "vocab_size": tokenizer.vocab_size, "do_lower_case": tokenizer.lowercase,
        "source": "flickr30k_entities", "split": split, "iou_threshold": thr, "max_txt_len": max_txt_len,
        "key_format": key_format}
    path = write_txt_db(out, chain([first], gen), meta=meta, overwrite=overwrite)
    kept = stats["phrases_kept"]
    stats["regions_per_phrase"] = stats["regions_per_phrase"] / kept if kept else 0.0
    _write_json_atomic(path / "meta.json", {**meta, "stats": stats})
    log.info("flickr30k_entities %s -> %s: %d images (%d not in the store), %d/%d sentences, %d/%d phrases "
             "(dropped: %s)", split, path, stats["images"], stats["images_missing"], stats["sentences_kept"],
             stats["sentences"], kept, stats["phrases"],
             ", ".join(f"{k} {v}" for k, v in stats["phrases_dropped"].items() if v) or "none")
    return path


def grounding_db_stats(path: PathLike) -> dict[str, Any]:
    """The statistics :func:`build_grounding_txt_db` stored in a DB's ``meta.json``."""
    f = Path(path) / "meta.json"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"grounding_db_stats: cannot read {f} ({e})") from e
    if not isinstance(meta, dict) or "stats" not in meta:
        raise ValueError(f"grounding_db_stats: {f} has no 'stats' (not written by build_grounding_txt_db)")
    return meta["stats"]


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    """``python -m vlfast.data.flickr30k_entities``: build one split's DB, print its stats (JSON)."""
    ap = argparse.ArgumentParser(prog="python -m vlfast.data.flickr30k_entities",
                                 description="Flickr30k Entities -> a UNITER-format phrase-grounding text DB")
    ap.add_argument("--root", required=True, help="the Flickr30k Entities folder (Sentences/, Annotations/, "
                                                  "train.txt, val.txt, test.txt)")
    ap.add_argument("--features", required=True, help="the feature store (a path open_feature_store reads)")
    ap.add_argument("--source", choices=_STORE_KINDS, help="the store's layout (checked; default: detected)")
    ap.add_argument("--vocab", help="WordPiece vocab.txt of the model (default: the offline BERT's)")
    ap.add_argument("--cased", action="store_true", help="the vocab is cased (default: uncased)")
    ap.add_argument("--split", default="train", help="split name: <root>/<split>.txt (default: train)")
    ap.add_argument("--out", required=True, help="the text DB folder to write")
    ap.add_argument("--iou-threshold", type=float, default=0.5, help="region-box IoU for a region to show a "
                                                                      "phrase (default: 0.5)")
    ap.add_argument("--max-txt-len", type=int, default=60, help="wordpieces per sentence with [CLS]/[SEP] "
                                                                 "(default: 60, the job's)")
    ap.add_argument("--key-format", default="{}", help="store key of an image id, e.g. 'flickr30k_{}.npz' "
                                                        "(default: '{}', the id itself)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    from vlfast.data.readers import FeatureStoreError
    from vlfast.data.tokenization import load_wordpiece

    try:
        vocab = args.vocab
        if vocab is None:
            from vlfast.models.base import bert_checkpoint_dir

            vocab = str(bert_checkpoint_dir() / "vocab.txt")
        tok = load_wordpiece(vocab, lowercase=not args.cased)
        store = open_store(args.features, args.source)
        path = build_grounding_txt_db(args.root, store, tok, args.out, args.split, iou_threshold=args.iou_threshold,
                                      max_txt_len=args.max_txt_len, key_format=args.key_format,
                                      overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FeatureStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(path), **grounding_db_stats(path)}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
