"""UNITER's text DB: an LMDB of tokenized examples plus JSON metadata, read-only.

Layout (UNITER's prepro.py / data.TxtLmdb): a folder that is itself an LMDB
(``data.mdb``) whose values are ``lz4.frame.compress(msgpack.dumps(example))`` under the
example id (utf-8), next to

* ``id2len.json`` -- id -> number of word pieces (the ids of the DB; required), or, in
  UNITER's VCR DBs, ``id2len_qa.json`` (question + answer) and ``id2len_qar.json``
  (question + answer + rationale) instead (see :class:`TxtDb`'s ``id2len``);
* ``txt2img.json`` -- id -> image key in the image DB (a list of two for NLVR2);
* ``img2txts.json`` -- image key -> ids (retrieval DBs);
* ``meta.json`` -- tokenizer settings: ``CLS``, ``SEP``, ``MASK``, ``UNK`` ids, ``v_range``.

An example is a dict with at least ``input_ids`` (list of int) and ``img_fname``; task
fields vary: VQA ``target = {"labels": [...], "scores": [...]}``, NLVR2 ``target`` 0/1,
referring expressions ``sent_id``/``ann_id``/``bbox``, VCR ``input_ids`` (the question),
``input_ids_as`` / ``input_ids_rs`` (4 answers / 4 rationales, lists of ids), ``qa_target`` /
``qar_target`` (ints, -1 or absent on test) and ``img_fname`` = [ground-truth-box image
key, detected-box image key], ...  numpy arrays inside examples
use msgpack-numpy's encoding (read and written by :mod:`vlfast.data.readers`).

A missing id or an undecodable record raises :class:`~vlfast.data.readers.FeatureStoreError`
naming the id and the DB path.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, KeysView, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lmdb
import lz4.frame
import msgpack

from vlfast.data.readers import (FeatureStoreError, _SharedEnvMixin, _acquire_env, _atomic_path, _corrupt,
                                 _missing, _write_json_atomic, _write_lmdb, mp_dumps, mp_loads)

__all__ = ["TxtDb", "write_txt_db", "ID2LEN_FILES"]

# TxtDb's ``id2len`` argument -> the length file it reads (UNITER's VcrTxtTokLmdb task names;
# "qa,qar" reads the qar lengths, as UNITER does)
ID2LEN_FILES: dict[str, str] = {"qa": "id2len_qa.json", "qar": "id2len_qar.json", "qa,qar": "id2len_qar.json"}

PathLike = Union[str, os.PathLike]


class TxtDb(_SharedEnvMixin, Mapping):
    """UNITER's text DB at ``path`` (read-only): ``db[id] -> example dict``.

    ``max_txt_len`` keeps only ids with at most that many word pieces (UNITER's
    TxtTokLmdb filters at 60 for training; None or -1 keeps all).  ``keys()`` are the
    ids of the length file in file order (after the filter).

    ``id2len`` picks the length file: None (default) reads ``id2len.json`` and, when a
    DB has none, UNITER's VCR files -- ``id2len_qar.json`` (preferred, as UNITER's
    "qa,qar" task does), else ``id2len_qa.json``; "qa" / "qar" / "qa,qar" read
    ``id2len_qa.json`` / ``id2len_qar.json`` / ``id2len_qar.json`` and nothing else.
    ``self.id2len_file`` is the name of the file read.
    """

    def __init__(self, path: PathLike, max_txt_len: Optional[int] = None, id2len: Optional[str] = None) -> None:
        p = Path(path)
        if not (p / "data.mdb").is_file():
            raise FeatureStoreError(f"TxtDb: {str(p)!r} is not an LMDB folder (no data.mdb)", path=p, reason="store")
        self.path = str(p)
        if id2len is not None and id2len not in ID2LEN_FILES:
            raise ValueError(f"TxtDb {self.path!r}: id2len: expected None or one of {sorted(ID2LEN_FILES)}, "
                             f"got {id2len!r}")
        if id2len is not None:
            name = ID2LEN_FILES[id2len]
        else:
            found = [n for n in ("id2len.json", "id2len_qar.json", "id2len_qa.json") if (p / n).is_file()]
            if not found:
                raise FeatureStoreError(f"TxtDb {self.path!r}: id2len.json is missing (and so are VCR's "
                                        "id2len_qar.json and id2len_qa.json): expected one of them next to "
                                        "data.mdb", path=self.path, reason="store")
            name = found[0]
        self.id2len_file = name
        lengths = self._json(name, required=True)
        if not isinstance(lengths, dict):
            raise FeatureStoreError(f"TxtDb {self.path!r}: {name}: expected an object id -> length, got "
                                    f"{type(lengths).__name__}", path=p, reason="store")
        if max_txt_len is not None and max_txt_len != -1:
            lengths = {k: v for k, v in lengths.items() if v <= max_txt_len}
        self.id2len: dict[str, int] = {str(k): int(v) for k, v in lengths.items()}
        self._keys = list(self.id2len)
        self._env: Optional[lmdb.Environment] = None
        self._env_key: Optional[tuple[int, int, int]] = None
        self._cache: dict[str, Any] = {}

    # -- metadata ------------------------------------------------------------------
    def _json(self, name: str, required: bool = False) -> Any:
        f = Path(self.path) / name
        if not f.is_file():
            if required:
                raise FeatureStoreError(f"TxtDb {self.path!r}: {name} is missing", path=self.path, reason="store")
            return None
        try:
            with open(f) as fh:
                return json.load(fh)
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"TxtDb {self.path!r}: cannot read {name} ({e})", path=self.path,
                                    reason="store") from e

    def _cached_json(self, name: str) -> Any:
        if name not in self._cache:
            value = self._json(name)
            if value is None:
                raise FeatureStoreError(f"TxtDb {self.path!r}: this DB has no {name}", path=self.path, reason="store")
            self._cache[name] = value
        return self._cache[name]

    @property
    def txt2img(self) -> dict[str, Any]:
        """id -> image key (str, or a list of keys for multi-image examples), from txt2img.json."""
        return self._cached_json("txt2img.json")

    @property
    def img2txts(self) -> dict[str, list[str]]:
        """image key -> ids, from img2txts.json."""
        return self._cached_json("img2txts.json")

    @property
    def meta(self) -> dict[str, Any]:
        """meta.json (tokenizer ids ``CLS``/``SEP``/``MASK``/``UNK``, ``v_range``, ...); {} when absent."""
        if "meta.json" not in self._cache:
            self._cache["meta.json"] = self._json("meta.json") or {}
        return self._cache["meta.json"]

    def lengths(self) -> list[int]:
        """Word-piece counts, in ``keys()`` order."""
        return [self.id2len[k] for k in self._keys]

    def joint_lengths(self, name2nbb: Mapping[str, int]) -> list[int]:
        """Text length + region count of the example's image(s), in ``keys()`` order
        (UNITER's ``lens`` for its token-bucket sampler).  ``name2nbb``: image key -> boxes."""
        t2i = self.txt2img
        out = []
        for k in self._keys:
            imgs = t2i.get(k)
            if imgs is None:
                raise FeatureStoreError(f"TxtDb {self.path!r}: id {k!r} is not in txt2img.json", path=self.path,
                                        key=k, reason="missing")
            imgs = [imgs] if isinstance(imgs, str) else list(imgs)
            try:
                out.append(self.id2len[k] + sum(int(name2nbb[i]) for i in imgs))
            except KeyError as e:
                raise FeatureStoreError(f"TxtDb {self.path!r}: id {k!r} refers to image {e.args[0]!r}, which the "
                                        "image store does not have", path=self.path, key=k, reason="missing") from e
        return out

    # -- mapping -------------------------------------------------------------------
    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._env_key is None or self._env_key[0] != os.getpid():
            self._env, self._env_key = _acquire_env(self.path)
        return self._env

    def __getitem__(self, key: Any) -> dict[str, Any]:
        if not isinstance(key, str):
            raise TypeError(f"TxtDb key: expected str, got {type(key).__name__}")
        if key not in self.id2len:
            raise _missing(self.path, key)
        with self._environment().begin(buffers=False) as txn:
            data = txn.get(key.encode("utf-8"))
        if data is None:
            raise _missing(self.path, key)
        try:
            example = mp_loads(lz4.frame.decompress(data))
        except (RuntimeError, ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
            raise _corrupt(self.path, key, e) from e
        if not isinstance(example, dict):
            raise _corrupt(self.path, key, f"expected a msgpack map, got {type(example).__name__}")
        return example

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def keys(self) -> KeysView:
        return KeysView(self)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.id2len

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"TxtDb({self.path!r}, {len(self)} examples)"



def write_txt_db(path: PathLike, examples: Union[Mapping[str, dict], Iterable[tuple[str, dict]]], *,
                 meta: Optional[dict[str, Any]] = None, img2txts: bool = True, overwrite: bool = False) -> Path:
    """Write a text DB in UNITER's layout at ``path`` (a new folder).

    ``examples``: id -> example dict (with ``input_ids``; ``img_fname`` -- a key or a list
    of keys -- fills txt2img/img2txts).  Writes the LMDB (lz4-compressed msgpack),
    ``id2len.json`` (len of input_ids), ``txt2img.json`` and, when ``img2txts``,
    ``img2txts.json`` (for examples with ``img_fname``), and ``meta.json`` (``meta`` or {}).
    The folder is built under a temporary name and renamed into place.
    """
    items = examples.items() if isinstance(examples, Mapping) else examples
    id2len: dict[str, int] = {}
    t2i: dict[str, Any] = {}
    i2t: dict[str, list[str]] = {}

    def values() -> Iterator[tuple[bytes, bytes]]:
        for k, ex in items:
            if not isinstance(k, str) or k in id2len:
                raise ValueError(f"write_txt_db: id {k!r} is not a str or is repeated")
            if not isinstance(ex, dict) or "input_ids" not in ex:
                raise ValueError(f"write_txt_db: example {k!r}: expected a dict with 'input_ids'")
            id2len[k] = len(ex["input_ids"])
            if "img_fname" in ex:
                img = ex["img_fname"]
                t2i[k] = img if isinstance(img, str) else list(img)
                for i in ([img] if isinstance(img, str) else img):
                    i2t.setdefault(i, []).append(k)
            yield k.encode("utf-8"), lz4.frame.compress(mp_dumps(ex))

    with _atomic_path(path, overwrite=overwrite, is_dir=True) as tmp:
        _write_lmdb(tmp, values())
        _write_json_atomic(tmp / "id2len.json", id2len)
        _write_json_atomic(tmp / "txt2img.json", t2i)
        if img2txts:
            _write_json_atomic(tmp / "img2txts.json", i2t)
        _write_json_atomic(tmp / "meta.json", meta or {})
    return Path(path)
