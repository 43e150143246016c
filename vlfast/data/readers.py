"""Readers (and writers) for region features extracted from real images.

Every store is a read-only mapping ``key -> ImageRecord`` with the same small
interface (:class:`FeatureStore`): ``store[key]``, ``keys()``, ``len(store)``,
``key in store``, ``store.num_boxes(key)`` and ``store.name2nbb`` (key -> number of
regions, the image lengths UNITER's token-bucket sampler needs).  Records come back
with float32 features ``(N, F)``, boxes ``(N, 4)`` normalised ``[x1, y1, x2, y2]`` in
[0, 1] (not clipped), detector confidences ``(N,)`` and soft class labels ``(N, C)``
where the layout has them, and the image size in pixels where the layout has it.
:func:`open_feature_store` detects the layout of a path.

Feature extraction from raw images is out of scope; these extractors produce the layouts:

* **UNITER** (:class:`UniterFeatureStore`) -- UNITER's bottom-up-attention docker
  extractor (``scripts/extract_imgfeat.sh``, a Faster R-CNN trained on Visual Genome)
  writes one ``.npz`` per image with ``features``, ``norm_bb``, ``conf`` and
  ``soft_labels``; UNITER's ``scripts/convert_imgdir.py`` packs them into an LMDB.
  The image folder holds the LMDB ``feat_th{conf_th}_max{max_bb}_min{min_bb}`` (or
  ``feat_numbb{num_bb}``, or ``all`` for every box) with a ``_compressed`` suffix when
  the records are npz (``np.savez_compressed``) instead of msgpack, plus the table
  ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` (record name -> number of boxes).
  Keys are the npz file names (``coco_val2014_000000000042.npz``); the LMDB entry
  ``__keys__`` is a JSON list of them.  float32 arrays are stored as float16 (the
  converter casts them), so features come back fp16-rounded.  ``norm_bb`` is 6-d
  ``[x1, y1, x2, y2, w, h]`` (UNITER appends ``w*h`` when it builds its 7-d input);
  the first 4 columns are the boxes.  The layout stores no image size: records have
  ``width = height = 1``.
* **ViLBERT** (:class:`VilbertFeatureStore`) -- vilbert-multi-task's
  ``script/extract_features.py`` (maskrcnn_benchmark / detectron, ResNeXt-152) writes
  one ``.npy`` dict per image and ``script/convert_to_lmdb.py`` packs them into an
  LMDB of pickled dicts ``{image_id, image_h, image_w, num_boxes, boxes, features}``
  (boxes in pixels; optionally ``cls_prob``), keyed by ``str(image_id)`` with the
  pickled key list under ``b"keys"``.  Older stores (converted from tsv) hold
  ``boxes`` and ``features`` as base64 strings of float32 with ``num_boxes`` rows; both
  forms are read.  ViLBERT's reader prepends a whole-image region (the mean feature,
  box ``[0, 0, 1, 1]``) at load time; records here hold the detector regions only --
  the model-specific collation adds it.
* **bottom-up-attention tsv** (:class:`TsvFeatureStore`) -- peteanderson80's
  ``tools/generate_tsv.py`` writes one tab-separated line per image, with no header:
  ``image_id, image_w, image_h, num_boxes, boxes, features``, the last two base64
  float32 (boxes in pixels).  LXMERT's variant of the extractor writes
  ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
  boxes, features``; its ``objects_conf`` becomes ``conf``.  Both are detected by their
  column count (or a header line naming the columns).  The file is indexed once when
  the store is opened (one pass that keeps each line's byte offset and box count in
  memory, not the features); records are then read by offset, so random access costs
  one read of one line.
* **npz folder** (:class:`NpzFolderStore`) -- any extractor: ``<dir>/<key>.npz`` with
  ``features`` ``(N, F)``, ``boxes`` ``(N, 4)`` in pixels ``[x1, y1, x2, y2]``,
  ``image_w`` and ``image_h`` (scalars) and optionally ``conf`` ``(N,)`` and
  ``soft_labels`` ``(N, C)``.

Writers produce each layout from any iterable of :class:`ImageRecord` (the tests'
fixtures; also a way to export the synthetic world): :func:`write_uniter_lmdb`,
:func:`write_vilbert_lmdb`, :func:`write_tsv`, :func:`write_npz_folder`.  They write to
a temporary name and rename into place, and never replace an existing store unless
``overwrite=True``.

Errors: a missing key, an undecodable record or a field of the wrong shape raises
:class:`FeatureStoreError` (a ``KeyError``) naming the store path, the key and, where
it applies, the field and the cause.  ``key in store`` and ``store.get(key)`` treat
only missing keys as missing: a corrupted record always raises.

Pickled ViLBERT records are read with an unpickler that admits numpy arrays, numpy
scalars and plain containers only, so a store cannot run code when it is read.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import threading
import uuid
import zipfile
from abc import abstractmethod
from collections.abc import Iterable, Iterator, KeysView, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import lmdb
import msgpack
import numpy as np

from vlfast.data.batch import ImageRecord

__all__ = [
    "FeatureStoreError", "FeatureStore", "UniterFeatureStore", "VilbertFeatureStore", "TsvFeatureStore",
    "NpzFolderStore", "open_feature_store", "write_uniter_lmdb", "write_vilbert_lmdb", "write_tsv",
    "write_npz_folder", "uniter_num_boxes", "uniter_db_name", "TSV_FIELDS_BUTD", "TSV_FIELDS_LXMERT",
]

PathLike = Union[str, os.PathLike]

TSV_FIELDS_BUTD = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
TSV_FIELDS_LXMERT = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                     "num_boxes", "boxes", "features")


# ----------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------

class FeatureStoreError(KeyError):
    """A missing, undecodable or malformed feature record (or an unreadable store).

    Attributes: ``path`` (the store), ``key`` (the record, or None for store-level
    errors), ``field`` (the offending field, or None), ``reason`` (``"missing"``,
    ``"corrupt"``, ``"field"`` or ``"store"``).  ``str(err)`` is the plain message.
    """

    def __init__(self, message: str, *, path: Optional[PathLike] = None, key: Optional[str] = None,
                 field: Optional[str] = None, reason: str = "corrupt") -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.key = key
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return self.message


def _missing(path: PathLike, key: str) -> FeatureStoreError:
    return FeatureStoreError(f"feature store {str(path)!r}: no record with key {key!r}",
                             path=path, key=key, reason="missing")


def _corrupt(path: PathLike, key: str, cause: BaseException | str) -> FeatureStoreError:
    why = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    return FeatureStoreError(f"feature store {str(path)!r}: record {key!r} cannot be decoded ({why})",
                             path=path, key=key, reason="corrupt")


def _bad_field(path: PathLike, key: str, field: str, what: str) -> FeatureStoreError:
    return FeatureStoreError(f"feature store {str(path)!r}: record {key!r}: field {field!r}: {what}",
                             path=path, key=key, field=field, reason="field")


def _norm_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key).decode("utf-8")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return str(int(key))
    raise TypeError(f"feature store key: expected str (or bytes / int image id), got {type(key).__name__}")


# ----------------------------------------------------------------------------------
# Record assembly (shape checks that name the field)
# ----------------------------------------------------------------------------------

def _as_array(path: PathLike, key: str, field: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:  # noqa: BLE001 -- report any conversion failure on the field
            raise _bad_field(path, key, field, f"not an array ({type(value).__name__}): {e}") from e
    if arr.dtype.kind not in "fiub":
        raise _bad_field(path, key, field, f"expected a numeric array, got dtype {arr.dtype}")
    return arr


def _check_finite(path: PathLike, key: str, field: str, arr: np.ndarray) -> None:
    """NaN/inf in a record's features or boxes is a bad record, named by key and field
    (it would otherwise surface as a NaN loss steps later, with no record to blame)."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise _bad_field(path, key, field, f"finite values expected, got {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}")


def _make_record(path: PathLike, key: str, features: Any, boxes: Any, *, conf: Any = None,
                 soft_labels: Any = None, width: Any = 1, height: Any = 1) -> ImageRecord:
    """Check shapes (errors name the field) and build an ImageRecord with float32 arrays.

    ``boxes`` must already be normalised (N, 4).
    """
    f = _as_array(path, key, "features", features)
    if f.ndim != 2:
        raise _bad_field(path, key, "features", f"expected shape (N, F), got {f.shape}")
    n = f.shape[0]
    b = _as_array(path, key, "boxes", boxes)
    if b.shape != (n, 4):
        raise _bad_field(path, key, "boxes", f"expected shape ({n}, 4) (one box per feature row), got {b.shape}")
    c = None
    if conf is not None:
        c = _as_array(path, key, "conf", conf)
        if c.shape != (n,):
            raise _bad_field(path, key, "conf", f"expected shape ({n},), got {c.shape}")
        c = np.array(c, dtype=np.float32)
    s = None
    if soft_labels is not None:
        s = _as_array(path, key, "soft_labels", soft_labels)
        if s.ndim != 2 or s.shape[0] != n:
            raise _bad_field(path, key, "soft_labels", f"expected shape ({n}, C), got {s.shape}")
        s = np.array(s, dtype=np.float32)
    for name, arr in (("features", f), ("boxes", b)):
        _check_finite(path, key, name, arr)
    w, h = _scalar_size(path, key, "width", width), _scalar_size(path, key, "height", height)
    return ImageRecord(img_id=key, features=np.array(f, dtype=np.float32), boxes=np.array(b, dtype=np.float32),
                       conf=c, soft_labels=s, width=w, height=h)


def _scalar_size(path: PathLike, key: str, field: str, value: Any) -> int:
    try:
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"expected a scalar, got shape {arr.shape}")
        v = float(arr.reshape(()))
    except (TypeError, ValueError) as e:
        raise _bad_field(path, key, field, f"expected a positive image size, got {value!r} ({e})") from e
    if not (v > 0) or v != int(v):
        raise _bad_field(path, key, field, f"expected a positive integer image size in pixels, got {value!r}")
    return int(v)


def _normalise_pixel_boxes(path: PathLike, key: str, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    b = _as_array(path, key, "boxes", boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise _bad_field(path, key, "boxes", f"expected shape (N, 4) [x1, y1, x2, y2] in pixels, got {b.shape}")
    scale = np.array([width, height, width, height], dtype=np.float32)
    return b.astype(np.float32) / scale


# ----------------------------------------------------------------------------------
# msgpack with numpy arrays (the msgpack-numpy wire format, without the package)
# ----------------------------------------------------------------------------------

def _mp_default(obj: Any) -> Any:
    """Encode numpy arrays/scalars exactly as msgpack-numpy does (``{b"nd": ..., b"type": ...}``)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "VO":
            raise TypeError(f"msgpack: cannot encode a numpy array of dtype {obj.dtype}")
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": list(obj.shape),
                b"data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, (np.bool_, np.number)):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    raise TypeError(f"msgpack: cannot encode {type(obj).__name__}")


def _mp_get(obj: dict, name: str) -> Any:
    b = name.encode()
    return obj[b] if b in obj else obj[name]


def _mp_object_hook(obj: dict) -> Any:
    """Decode msgpack-numpy's array dicts (bytes or str keys); other dicts pass through."""
    if b"nd" in obj or "nd" in obj:
        nd = _mp_get(obj, "nd")
        kind = obj.get(b"kind", obj.get("kind", b""))
        if kind in (b"V", b"O", "V", "O"):
            raise ValueError("msgpack record holds a structured or object numpy array, which is not read "
                             "(object arrays are pickles)")
        dtype = np.dtype(_mp_get(obj, "type"))
        data = _mp_get(obj, "data")
        if nd is True:
            shape = tuple(int(s) for s in _mp_get(obj, "shape"))
            return np.frombuffer(data, dtype=dtype).reshape(shape)
        return np.frombuffer(data, dtype=dtype)[0]
    return obj


def mp_dumps(value: Any) -> bytes:
    """msgpack bytes of ``value`` (numpy arrays in msgpack-numpy's format, as UNITER writes)."""
    return msgpack.packb(value, default=_mp_default, use_bin_type=True)


def mp_loads(data: bytes) -> Any:
    """Inverse of :func:`mp_dumps`; reads records written with ``msgpack_numpy.patch()``."""
    return msgpack.unpackb(data, raw=False, object_hook=_mp_object_hook, strict_map_key=False)


# ----------------------------------------------------------------------------------
# Restricted unpickling (ViLBERT records)
# ----------------------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("collections", "OrderedDict"),
    ("builtins", "bytearray"), ("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"),
    ("__builtin__", "bytearray"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
                module = "numpy._core." + module[len("numpy.core."):]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays, numpy "
                                     "scalars and plain containers are read from a feature pickle)")


def _safe_pickle_loads(data: bytes) -> Any:
    return _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


# ----------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------

@contextmanager
def _atomic_path(path: PathLike, *, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    An existing ``path`` raises FileExistsError unless ``overwrite``; then it is replaced
    only after the new one is complete.  On failure the temporary is removed and
    ``path`` is untouched.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{str(dest)!r} exists; pass overwrite=True to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_lmdb(db_dir: Path, items: Iterable[tuple[bytes, bytes]], batch: int = 256) -> None:
    """Put (key, value) pairs into a new LMDB at ``db_dir``, growing the map when full."""
    map_size = 1 << 26
    env = lmdb.open(str(db_dir), map_size=map_size, subdir=True, lock=False)
    try:
        pending: list[tuple[bytes, bytes]] = []

        def flush() -> None:
            nonlocal map_size
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for k, v in pending:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    map_size *= 2
                    env.set_mapsize(map_size)
            pending.clear()

        for kv in items:
            pending.append(kv)
            if len(pending) >= batch:
                flush()
        flush()
        env.sync(True)
    finally:
        env.close()


# ----------------------------------------------------------------------------------
# The shared interface
# ----------------------------------------------------------------------------------

class FeatureStore(Mapping):
    """A read-only mapping ``key -> ImageRecord`` over one feature store.

    Subclasses set ``self.path`` and ``self._keys`` (the ordered key list) and
    implement ``_read(key)`` and ``_count(key)``.
    """

    path: str
    _keys: list[str]

    def __init__(self) -> None:
        self._key_set: Optional[frozenset[str]] = None
        self._nbb_cache: dict[str, int] = {}

    # -- mapping -------------------------------------------------------------------
    def _keyset(self) -> frozenset[str]:
        if self._key_set is None:
            self._key_set = frozenset(self._keys)
        return self._key_set

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def keys(self) -> KeysView:
        """The record keys, in the store's order."""
        return KeysView(self)

    def __contains__(self, key: object) -> bool:
        try:
            return _norm_key(key) in self._keyset()
        except (TypeError, UnicodeDecodeError):
            return False

    def get(self, key: Any, default: Any = None) -> Any:
        """``store[key]`` if the key exists, else ``default`` (a corrupted record still raises)."""
        return self[key] if key in self else default

    def __getitem__(self, key: Any) -> ImageRecord:
        """The record of ``key``; FeatureStoreError if it is missing, undecodable or malformed."""
        k = _norm_key(key)
        if k not in self._keyset():
            raise _missing(self.path, k)
        return self._read(k)

    def num_boxes(self, key: Any) -> int:
        """Number of regions of ``key``'s record, cached after the first call: the rows
        ``store[key]`` returns, except for UNITER's fixed ``num_bb`` / nbb table (see
        :class:`UniterFeatureStore`), which is reported as the official reader does."""
        k = _norm_key(key)
        if k not in self._keyset():
            raise _missing(self.path, k)
        n = self._nbb_cache.get(k)
        if n is None:
            n = self._nbb_cache[k] = int(self._count(k))
        return n

    @property
    def name2nbb(self) -> dict[str, int]:
        """key -> number of regions, for every key (the lengths for the token-bucket sampler)."""
        return {k: self.num_boxes(k) for k in self._keys}

    def lengths(self, keys: Optional[Iterable[Any]] = None) -> list[int]:
        """``[num_boxes(k) for k in keys]`` (all keys when None)."""
        return [self.num_boxes(k) for k in (self._keys if keys is None else keys)]

    # Mapping's __eq__ would read every record; stores compare by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self)} records)"

    def close(self) -> None:
        """Release file handles (they are reopened on the next read)."""

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- subclass hooks ------------------------------------------------------------
    @abstractmethod
    def _read(self, key: str) -> ImageRecord:
        """Decode the record of an existing key."""

    def _count(self, key: str) -> int:
        return self._read(key).num_boxes


_ENVS: dict[tuple[int, int, int], list] = {}  # (pid, st_dev, st_ino of data.mdb) -> [environment, users]
_ENVS_LOCK = threading.Lock()
# (st_dev, st_ino) -> environments this process inherited across fork() and has not opened
# anew yet.  They are never read from here (LMDB: an environment belongs to the process
# that opened it); they are closed (see _drop_inherited) just before this process opens
# the same file itself.
_INHERITED: dict[tuple[int, int], list] = {}

_LMDB_READ_ONLY = dict(readonly=True, create=False, lock=False, readahead=False, meminit=False, subdir=True,
                       max_readers=2048)


def _forget_envs_after_fork() -> None:
    """In a forked child (DataLoader workers): forget the parent's environments.

    py-lmdb refuses to open a file that is "already open in this process", and its
    registry of open files is copied into the child by fork() and never reset: the
    parent's environment still counts as open in the child, whether the child keeps the
    object or drops it (dropping runs no close in the child).  So the inherited
    environments move to ``_INHERITED`` (still referenced, so nothing happens to them at
    fork time), the per-process cache starts empty, and the first read of a store in the
    child closes the inherited handle of that file and opens a new one
    (:func:`_acquire_env`).  The lock is renewed too: another thread of the parent may
    have held it when the process forked.
    """
    global _ENVS_LOCK
    _ENVS_LOCK = threading.Lock()
    for (_pid, dev, ino), entry in _ENVS.items():
        _INHERITED.setdefault((dev, ino), []).append(entry[0])
    _ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_envs_after_fork)


def _drop_inherited(dev: int, ino: int) -> None:
    """Close this process's copies of environments inherited (via fork) on ``(dev, ino)``.

    Closing an LMDB environment in a child of the process that opened it is unsafe in
    general -- with a lock file it could touch the reader table and mutexes shared with
    the parent -- but these are all opened by :func:`_acquire_env` with ``lock=False``
    and read-only: there is no lock file, reader table or shared mutex, and
    ``mdb_env_close`` only unmaps the child's copy of the mapping and closes the child's
    copies of the descriptors.  The parent's environment is untouched.  It is also the
    only way to take the file off py-lmdb's "already open" registry in the child."""
    for env in _INHERITED.pop((dev, ino), ()):
        try:
            env.close()
        except Exception:  # noqa: BLE001 -- a handle we only need gone
            pass


def _acquire_env(db_dir: PathLike) -> tuple[lmdb.Environment, tuple[int, int, int]]:
    """A read-only LMDB environment shared by every reader of ``db_dir`` in this process
    (LMDB allows one open environment per file and process), and the handle to release
    it with.  Keyed by the data file's inode, so a store replaced on disk gets a new one."""
    try:
        st = os.stat(Path(db_dir) / "data.mdb")
    except OSError as e:
        raise FeatureStoreError(f"feature store {str(db_dir)!r}: cannot open the LMDB ({e})", path=db_dir,
                                reason="store") from e
    key = (os.getpid(), st.st_dev, st.st_ino)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            _drop_inherited(st.st_dev, st.st_ino)
            try:
                env = lmdb.open(str(db_dir), **_LMDB_READ_ONLY)
            except lmdb.Error as e:
                raise FeatureStoreError(f"feature store {str(db_dir)!r}: cannot open the LMDB ({e})",
                                        path=db_dir, reason="store") from e
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0], key


def _release_env(key: tuple[int, int, int]) -> None:
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _ENVS[key]
                entry[0].close()


class _SharedEnvMixin:
    """close / pickling / finaliser of an object holding a per-process shared LMDB
    handle (``_env``, ``_env_key``): used by the LMDB feature stores and the text DB."""

    _env: Any
    _env_key: Any

    def close(self) -> None:
        if self._env is not None and self._env_key is not None and self._env_key[0] == os.getpid():
            _release_env(self._env_key)
        self._env, self._env_key = None, None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_env"], state["_env_key"] = None, None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finaliser
            pass


class _LmdbStore(_SharedEnvMixin, FeatureStore):
    """An LMDB opened read-only, lazily in each process (safe with DataLoader workers)."""

    def __init__(self, db_dir: Path) -> None:
        super().__init__()
        self._db_dir = db_dir
        self._env: Optional[lmdb.Environment] = None
        self._env_key: Optional[tuple[int, int, int]] = None

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._env_key is None or self._env_key[0] != os.getpid():
            self._env, self._env_key = _acquire_env(self._db_dir)
        return self._env

    def _get(self, raw_key: bytes) -> Optional[bytes]:
        with self._environment().begin(buffers=False) as txn:
            return txn.get(raw_key)

    def _lmdb_keys(self) -> list[bytes]:
        with self._environment().begin() as txn:
            return list(txn.cursor().iternext(keys=True, values=False))



# ----------------------------------------------------------------------------------
# UNITER: LMDB of npz / msgpack records
# ----------------------------------------------------------------------------------

def uniter_num_boxes(conf: np.ndarray, conf_th: float, max_bb: int, min_bb: int) -> int:
    """UNITER's rule: boxes with confidence above ``conf_th``, clamped to [min_bb, max_bb]."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def uniter_db_name(conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10, num_bb: int = 36,
                   compress: bool = True, keep_all: bool = False) -> str:
    """The LMDB folder name UNITER's convert_imgdir.py gives these settings."""
    if keep_all:
        name = "all"
    elif conf_th == -1:
        name = f"feat_numbb{num_bb}"
    else:
        name = f"feat_th{float(conf_th)}_max{max_bb}_min{min_bb}"  # UNITER parses conf_th as a float
    return name + ("_compressed" if compress else "")


def _uniter_nbb_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    return f"nbb_th{float(conf_th)}_max{max_bb}_min{min_bb}.json"


_UNITER_DB_RE = re.compile(r"^(?:feat_th(?P<th>[-+0-9.eE]+)_max(?P<max>\d+)_min(?P<min>\d+)"
                           r"|feat_numbb(?P<num>\d+)|(?P<all>all))(?P<c>_compressed)?$")


def _is_lmdb_dir(p: Path) -> bool:
    return p.is_dir() and (p / "data.mdb").is_file()


def _uniter_db_dirs(img_dir: Path) -> list[Path]:
    if not img_dir.is_dir():
        return []
    return sorted(p for p in img_dir.iterdir() if _UNITER_DB_RE.match(p.name) and _is_lmdb_dir(p))


def _uniter_params_from_name(name: str) -> dict[str, Any]:
    m = _UNITER_DB_RE.match(name)
    if m is None:
        return {}
    out: dict[str, Any] = {"compress": m.group("c") is not None}
    if m.group("th") is not None:
        out.update(conf_th=float(m.group("th")), max_bb=int(m.group("max")), min_bb=int(m.group("min")))
    elif m.group("num") is not None:
        out.update(conf_th=-1, num_bb=int(m.group("num")))
    return out


def _decode_uniter_record(path: PathLike, key: str, data: bytes,
                          names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """npz (zip) or msgpack bytes -> {name: array}, float16 arrays cast to float32.

    ``names`` limits an npz to those members (a msgpack record is decoded whole).
    """
    try:
        if data[:2] == b"PK":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                dump = {n: z[n] for n in z.files if names is None or n in names}
        else:
            dump = mp_loads(data)
            if not isinstance(dump, dict):
                raise ValueError(f"expected a msgpack map, got {type(dump).__name__}")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError,
            msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        raise _corrupt(path, key, e) from e
    out = {}
    for k, v in dump.items():
        k = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        out[k] = v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v
    return out


class UniterFeatureStore(_LmdbStore):
    """UNITER's image DB: an LMDB of npz (``compress=True``) or msgpack records.

    ``path`` is UNITER's image folder (holding ``feat_th..._compressed`` etc. and the
    ``nbb_th...json`` table); the LMDB is the one UNITER's DetectFeatLmdb opens for
    these arguments: ``feat_th{conf_th}_max{max_bb}_min{min_bb}`` (or
    ``feat_numbb{num_bb}`` when ``conf_th == -1``), with ``_compressed`` when
    ``compress``; when the nbb table is absent, ``all``/``all_compressed`` with the box
    counts computed from each record's ``conf``.  ``path`` may also be an LMDB folder
    itself.  Record encoding (npz or msgpack) is detected per record.

    A record has ``features`` (n, F), ``norm_bb`` (n, >= 4; UNITER's is 6-d), ``conf``
    (n,) and optionally ``soft_labels`` (n, C); ``store[key]`` keeps the first
    ``nbb = min(name2nbb[key], n)`` rows.  ``name2nbb`` is the nbb table when there is
    one; otherwise UNITER's rule (:func:`uniter_num_boxes`, the count of
    ``conf > conf_th`` clamped to [min_bb, max_bb]) capped at the stored rows (UNITER
    itself would report ``min_bb`` for an image with fewer boxes than that), or
    ``num_bb`` for every key when ``conf_th == -1`` (as UNITER).  Without a table the
    first ``name2nbb`` call decodes every record once.
    """

    def __init__(self, path: PathLike, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compress: bool = True) -> None:
        p = Path(path)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb, self.compress = conf_th, max_bb, min_bb, num_bb, compress
        if min_bb > max_bb:
            raise ValueError(f"UniterFeatureStore: min_bb ({min_bb}) must not exceed max_bb ({max_bb})")
        table: Optional[dict[str, int]] = None
        if _is_lmdb_dir(p):
            db_dir = p
            own = _uniter_params_from_name(p.name)
            nbb_file = p.parent / _uniter_nbb_name(conf_th, max_bb, min_bb)
            if conf_th != -1 and own.get("conf_th") == conf_th and own.get("max_bb") == max_bb \
                    and own.get("min_bb") == min_bb and nbb_file.is_file():
                table = self._load_table(nbb_file)
        elif p.is_dir():
            nbb_file = p / _uniter_nbb_name(conf_th, max_bb, min_bb)
            if conf_th == -1 or nbb_file.is_file():
                db_dir = p / uniter_db_name(conf_th, max_bb, min_bb, num_bb, compress)
                if conf_th != -1:
                    table = self._load_table(nbb_file)
            else:
                db_dir = p / uniter_db_name(compress=compress, keep_all=True)
            if not _is_lmdb_dir(db_dir):
                found = [d.name for d in _uniter_db_dirs(p)]
                raise FeatureStoreError(
                    f"UniterFeatureStore {str(p)!r}: no LMDB {db_dir.name!r} for conf_th={conf_th}, max_bb={max_bb}, "
                    f"min_bb={min_bb}, num_bb={num_bb}, compress={compress}; LMDB folders there: {found or 'none'} "
                    "(open_feature_store picks the arguments from a folder's name)", path=p, reason="store")
        else:
            raise FeatureStoreError(f"UniterFeatureStore: {str(p)!r} is not a folder", path=p, reason="store")
        super().__init__(db_dir)
        self.path = str(db_dir)
        self.img_dir = str(db_dir.parent)
        self._table = table
        raw = self._get(b"__keys__")
        if raw is not None:
            try:
                self._keys = [str(k) for k in json.loads(raw.decode("utf-8"))]
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
                raise FeatureStoreError(f"UniterFeatureStore {self.path!r}: the '__keys__' entry is not a JSON list "
                                        f"({e})", path=self.path, key="__keys__", reason="store") from e
        else:
            self._keys = [k.decode("utf-8") for k in self._lmdb_keys() if k != b"__keys__"]

    def _load_table(self, nbb_file: Path) -> dict[str, int]:
        try:
            with open(nbb_file) as f:
                return {str(k): int(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise FeatureStoreError(f"UniterFeatureStore: cannot read the box-count table {str(nbb_file)!r} ({e})",
                                    path=nbb_file, reason="store") from e

    def _dump(self, key: str, names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        data = self._get(key.encode("utf-8"))
        if data is None:
            raise _missing(self.path, key)
        return _decode_uniter_record(self.path, key, data, names)

    def _rule_nbb(self, key: str, dump: dict[str, np.ndarray]) -> int:
        if self.conf_th == -1:
            return self.num_bb
        if "conf" not in dump:
            raise _bad_field(self.path, key, "conf", "missing (needed for the confidence-threshold box count)")
        conf = _as_array(self.path, key, "conf", dump["conf"])
        if conf.ndim != 1:
            raise _bad_field(self.path, key, "conf", f"expected shape (N,), got {conf.shape}")
        return min(uniter_num_boxes(conf, self.conf_th, self.max_bb, self.min_bb), conf.shape[0])

    def _nbb_for(self, key: str, dump: Optional[dict[str, np.ndarray]]) -> int:
        if self._table is not None:
            if key not in self._table:
                raise FeatureStoreError(f"UniterFeatureStore {self.path!r}: record {key!r} is not in the box-count "
                                        "table", path=self.path, key=key, field="nbb", reason="field")
            return self._table[key]
        if self.conf_th == -1:
            return self.num_bb
        return self._rule_nbb(key, self._dump(key, ["conf"]) if dump is None else dump)

    def _count(self, key: str) -> int:
        return self._nbb_for(key, None)

    def _read(self, key: str) -> ImageRecord:
        dump = self._dump(key)
        for name in ("features", "norm_bb"):
            if name not in dump:
                raise _bad_field(self.path, key, name, f"missing (record has {sorted(dump)})")
        nbb = self._nbb_for(key, dump)
        feats = _as_array(self.path, key, "features", dump["features"])
        bb = _as_array(self.path, key, "norm_bb", dump["norm_bb"])
        if feats.ndim != 2:
            raise _bad_field(self.path, key, "features", f"expected shape (N, F), got {feats.shape}")
        if bb.ndim != 2 or bb.shape[1] < 4 or bb.shape[0] != feats.shape[0]:
            raise _bad_field(self.path, key, "norm_bb", f"expected shape ({feats.shape[0]}, 6) "
                             f"[x1, y1, x2, y2, w, h] (at least 4 columns), got {bb.shape}")
        if feats.shape[0] < nbb:
            raise _bad_field(self.path, key, "features", f"expected at least num_bb = {nbb} rows (the DB's nbb "
                             f"table / num_bb), got {feats.shape[0]}")
        conf, soft = dump.get("conf"), dump.get("soft_labels")
        return _make_record(self.path, key, feats[:nbb], bb[:nbb, :4],
                            conf=None if conf is None else _slice_rows(self.path, key, "conf", conf, nbb),
                            soft_labels=None if soft is None else _slice_rows(self.path, key, "soft_labels", soft, nbb))


def _slice_rows(path: PathLike, key: str, field: str, value: Any, n: int) -> np.ndarray:
    arr = _as_array(path, key, field, value)
    if arr.ndim == 0:
        raise _bad_field(path, key, field, "expected one row per box, got a scalar")
    if arr.shape[0] < n:
        raise _bad_field(path, key, field, f"expected at least num_bb = {n} rows, got {arr.shape[0]}")
    return arr[:n]


def write_uniter_lmdb(path: PathLike, records: Iterable[ImageRecord], *, conf_th: float = 0.2, max_bb: int = 100,
                      min_bb: int = 10, num_bb: int = 36, compress: bool = True, keep_all: bool = False,
                      fp16: bool = True, overwrite: bool = False) -> Path:
    """Write records in UNITER's image-DB layout, as scripts/convert_imgdir.py does.

    ``path`` is the image folder; the LMDB ``uniter_db_name(...)`` goes inside it with a
    ``__keys__`` entry, and (unless ``keep_all`` or ``conf_th == -1``) the table
    ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json``.  Each record keeps its first nbb
    rows (UNITER's rule on ``conf``; ``num_bb`` when ``conf_th == -1``; all when
    ``keep_all``) of ``features``, ``norm_bb`` (6-d ``[x1, y1, x2, y2, w, h]``), ``conf``
    and ``soft_labels``, float32 cast to float16 when ``fp16`` (as UNITER), encoded as
    ``np.savez_compressed`` (``compress``) or msgpack.  Keys are ``record.img_id``.
    Returns the LMDB folder.
    """
    img_dir = Path(path)
    db_dir = img_dir / uniter_db_name(conf_th, max_bb, min_bb, num_bb, compress, keep_all)
    name2nbb: dict[str, int] = {}

    def items() -> Iterator[tuple[bytes, bytes]]:
        for rec in records:
            key = _norm_key(rec.img_id)
            if key == "__keys__" or key in name2nbb:
                raise ValueError(f"write_uniter_lmdb: record key {key!r} is reserved or repeated")
            if keep_all:
                nbb = rec.num_boxes
            elif conf_th == -1:
                nbb = min(num_bb, rec.num_boxes)
            else:
                if rec.conf is None:
                    raise ValueError(f"write_uniter_lmdb: record {key!r} has no conf, needed for conf_th={conf_th} "
                                     "(pass keep_all=True or conf_th=-1 to write it without)")
                nbb = min(uniter_num_boxes(rec.conf, conf_th, max_bb, min_bb), rec.num_boxes)
            b = rec.boxes.astype(np.float32)
            dump = {"features": rec.features[:nbb],
                    "norm_bb": np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1)[:nbb]}
            if rec.conf is not None:
                dump["conf"] = rec.conf[:nbb]
            if rec.soft_labels is not None:
                dump["soft_labels"] = rec.soft_labels[:nbb]
            dump = {k: np.ascontiguousarray(v.astype(np.float16) if fp16 and v.dtype == np.float32 else v)
                    for k, v in dump.items()}
            if compress:
                with io.BytesIO() as buf:
                    np.savez_compressed(buf, **dump)
                    value = buf.getvalue()
            else:
                value = mp_dumps(dump)
            name2nbb[key] = nbb
            yield key.encode("utf-8"), value
        yield b"__keys__", json.dumps(list(name2nbb)).encode("utf-8")

    img_dir.mkdir(parents=True, exist_ok=True)
    with _atomic_path(db_dir, overwrite=overwrite, is_dir=True) as tmp:
        _write_lmdb(tmp, items())
    if not keep_all and conf_th != -1:
        _write_json_atomic(img_dir / _uniter_nbb_name(conf_th, max_bb, min_bb), name2nbb)
    return db_dir


# ----------------------------------------------------------------------------------
# ViLBERT: LMDB of pickled dicts
# ----------------------------------------------------------------------------------

def _b64_floats(path: PathLike, key: str, field: str, value: Any, dtype: Any = np.float32) -> np.ndarray:
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if isinstance(value, (bytes, bytearray)):
        v = bytes(value).strip()
        if v[:2] in (b"b'", b'b"') and v[-1:] in (b"'", b'"'):  # str(bytes) written by mistake
            v = v[2:-1]
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _corrupt(path, key, f"field {field!r}: invalid base64: {e}") from e
        itemsize = np.dtype(dtype).itemsize
        if len(raw) % itemsize:
            raise _corrupt(path, key, f"field {field!r}: {len(raw)} bytes is not a whole number of "
                                      f"{np.dtype(dtype).name} values (truncated?)")
        return np.frombuffer(raw, dtype=dtype)
    return _as_array(path, key, field, value)


class VilbertFeatureStore(_LmdbStore):
    """vilbert-multi-task's LMDB of pickled dicts (``path`` is the LMDB folder).

    A record: ``image_id``, ``image_h``, ``image_w``, ``num_boxes``, ``boxes`` (pixels
    ``[x1, y1, x2, y2]``), ``features`` and optionally ``cls_prob`` (N, C) and ``conf``
    (N,).  ``boxes``/``features`` are arrays (current ViLBERT; every row is a region,
    as its reader's ``reshape(-1, ...)``) or base64 float32 strings (older stores;
    ``num_boxes`` rows).  Boxes are divided by the image size; ``cls_prob`` becomes
    ``soft_labels``.  Keys come from the pickled list under ``b"keys"`` (else the LMDB's
    own keys).  ``num_boxes(key)`` decodes the record once and caches the count.
    """

    def __init__(self, path: PathLike) -> None:
        p = Path(path)
        if not _is_lmdb_dir(p):
            raise FeatureStoreError(f"VilbertFeatureStore: {str(p)!r} is not an LMDB folder (no data.mdb)",
                                    path=p, reason="store")
        super().__init__(p)
        self.path = str(p)
        raw = self._get(b"keys")
        if raw is not None:
            try:
                ids = _safe_pickle_loads(raw)
                self._keys = [_norm_key(k) for k in ids]
            except Exception as e:  # noqa: BLE001 -- any failure here means an unreadable key list
                raise FeatureStoreError(f"VilbertFeatureStore {self.path!r}: the 'keys' entry is not a pickled list "
                                        f"of ids ({type(e).__name__}: {e})", path=p, key="keys", reason="store") from e
        else:
            self._keys = [k.decode("utf-8") for k in self._lmdb_keys()]

    def _item(self, key: str) -> dict:
        data = self._get(key.encode("utf-8"))
        if data is None:
            raise _missing(self.path, key)
        try:
            item = _safe_pickle_loads(data)
        except Exception as e:  # noqa: BLE001 -- pickle raises many types on truncated input
            raise _corrupt(self.path, key, e) from e
        if not isinstance(item, dict):
            raise _corrupt(self.path, key, f"expected a pickled dict, got {type(item).__name__}")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in item.items()}

    def _arrays(self, key: str, item: dict) -> tuple[np.ndarray, np.ndarray]:
        for name in ("boxes", "features"):
            if name not in item:
                raise _bad_field(self.path, key, name, f"missing (record has {sorted(item)})")
        b64 = isinstance(item["boxes"], (bytes, bytearray, str))
        boxes = _b64_floats(self.path, key, "boxes", item["boxes"])
        feats = _b64_floats(self.path, key, "features", item["features"])
        if b64:
            if "num_boxes" not in item:
                raise _bad_field(self.path, key, "num_boxes", "missing (needed for base64 boxes/features)")
            n = int(_scalar_size(self.path, key, "num_boxes", item["num_boxes"]))
            if boxes.size != n * 4:
                raise _bad_field(self.path, key, "boxes", f"expected {n} x 4 floats (num_boxes={n}), got {boxes.size}")
        if boxes.size % 4:
            raise _bad_field(self.path, key, "boxes", f"expected (N, 4), got shape {boxes.shape}")
        boxes = boxes.reshape(-1, 4)
        n = boxes.shape[0]
        if n == 0 or feats.size % n:
            raise _bad_field(self.path, key, "features", f"expected ({n}, F) (one row per box), got shape "
                                                         f"{feats.shape}")
        return boxes, feats.reshape(n, -1)

    def _count(self, key: str) -> int:
        return self._arrays(key, self._item(key))[0].shape[0]

    def _read(self, key: str) -> ImageRecord:
        item = self._item(key)
        boxes, feats = self._arrays(key, item)
        for name in ("image_w", "image_h"):
            if name not in item:
                raise _bad_field(self.path, key, name, "missing (needed to normalise the pixel boxes)")
        w = _scalar_size(self.path, key, "image_w", item["image_w"])
        h = _scalar_size(self.path, key, "image_h", item["image_h"])
        soft = item.get("cls_prob")
        if soft is not None:
            soft = _b64_floats(self.path, key, "cls_prob", soft)
            if soft.ndim == 1 and soft.size % boxes.shape[0] == 0:
                soft = soft.reshape(boxes.shape[0], -1)
            if soft.ndim != 2 or soft.shape[0] != boxes.shape[0]:
                raise _bad_field(self.path, key, "cls_prob", f"expected ({boxes.shape[0]}, C), got {soft.shape}")
        conf = item.get("conf")
        return _make_record(self.path, key, feats, _normalise_pixel_boxes(self.path, key, boxes, w, h),
                            conf=conf, soft_labels=soft, width=w, height=h)


def write_vilbert_lmdb(path: PathLike, records: Iterable[ImageRecord], *, base64_fields: bool = False,
                       overwrite: bool = False) -> Path:
    """Write records as vilbert-multi-task's LMDB of pickled dicts (``path`` = the LMDB folder).

    Each value is ``pickle.dumps({image_id, image_h, image_w, num_boxes, boxes (pixels),
    features, [cls_prob = soft_labels], [conf]})`` under ``str(image_id).encode()``; the
    pickled list of keys is stored under ``b"keys"``.  ``base64_fields`` writes boxes and
    features as base64 float32 strings (the older, tsv-converted form).
    """
    dest = Path(path)
    keys: list[bytes] = []

    def items() -> Iterator[tuple[bytes, bytes]]:
        seen: set[bytes] = set()
        for rec in records:
            k = _norm_key(rec.img_id).encode("utf-8")
            if k == b"keys" or k in seen:
                raise ValueError(f"write_vilbert_lmdb: record key {k.decode()!r} is reserved or repeated")
            seen.add(k)
            scale = np.array([rec.width, rec.height, rec.width, rec.height], dtype=np.float32)
            boxes = np.ascontiguousarray(rec.boxes.astype(np.float32) * scale)
            feats = np.ascontiguousarray(rec.features.astype(np.float32))
            item: dict[str, Any] = {"image_id": _norm_key(rec.img_id), "image_h": int(rec.height),
                                    "image_w": int(rec.width), "num_boxes": int(rec.num_boxes)}
            if base64_fields:
                item["boxes"] = base64.b64encode(boxes.tobytes())
                item["features"] = base64.b64encode(feats.tobytes())
            else:
                item["boxes"], item["features"] = boxes, feats
            if rec.soft_labels is not None:
                item["cls_prob"] = np.ascontiguousarray(rec.soft_labels.astype(np.float32))
            if rec.conf is not None:
                item["conf"] = np.ascontiguousarray(rec.conf.astype(np.float32))
            keys.append(k)
            yield k, pickle.dumps(item, protocol=4)
        yield b"keys", pickle.dumps(keys, protocol=4)

    with _atomic_path(dest, overwrite=overwrite, is_dir=True) as tmp:
        _write_lmdb(tmp, items())
    return dest


# ----------------------------------------------------------------------------------
# bottom-up-attention tsv
# ----------------------------------------------------------------------------------

class TsvFeatureStore(FeatureStore):
    """bottom-up-attention ``.tsv`` (or several files): one line per image, base64 fields.

    Columns (no header): BUTD ``image_id, image_w, image_h, num_boxes, boxes, features``
    or LXMERT ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
    num_boxes, boxes, features``; told apart by the column count, or named by a header
    line.  Opening the store reads every file once and keeps, per image, the file, byte
    offset, line length and ``num_boxes`` in memory (tens of bytes per image); a record
    is then one ``pread`` of its line.  A key that appears twice is an error.
    """

    def __init__(self, path: Union[PathLike, Sequence[PathLike]]) -> None:
        super().__init__()
        files = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not files:
            raise ValueError("TsvFeatureStore: path: expected a file or a non-empty list of files, got []")
        for f in files:
            if not f.is_file():
                raise FeatureStoreError(f"TsvFeatureStore: {str(f)!r} is not a file", path=f, reason="store")
        self.files = [str(f) for f in files]
        self.path = self.files[0] if len(files) == 1 else ",".join(self.files)
        self._index: dict[str, tuple[int, int, int, int]] = {}  # key -> (file, offset, length, num_boxes)
        self._fields: list[tuple[str, ...]] = []
        self._keys = []
        for fi, f in enumerate(files):
            self._index_file(fi, f)
        self._fds: dict[int, int] = {}
        self._fd_pid: Optional[int] = None

    def _index_file(self, fi: int, f: Path) -> None:
        fields: Optional[tuple[str, ...]] = None
        offset = 0
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                start, offset = offset, offset + len(line)
                body = line.rstrip(b"\r\n")
                if not body.strip():
                    continue
                if fields is None:
                    names = tuple(x.decode("utf-8", "replace").strip() for x in body.split(b"\t"))
                    if set(names) in (set(TSV_FIELDS_BUTD), set(TSV_FIELDS_LXMERT)):
                        fields = names  # a header line
                        continue
                    ncol = len(names)
                    if ncol == len(TSV_FIELDS_BUTD):
                        fields = TSV_FIELDS_BUTD
                    elif ncol == len(TSV_FIELDS_LXMERT):
                        fields = TSV_FIELDS_LXMERT
                    else:
                        raise FeatureStoreError(
                            f"TsvFeatureStore {str(f)!r}: line {lineno} has {ncol} tab-separated columns; expected 6 "
                            f"{TSV_FIELDS_BUTD} or 10 {TSV_FIELDS_LXMERT}", path=f, reason="store")
                id_col = fields.index("image_id" if "image_id" in fields else "img_id")
                nb_col = fields.index("num_boxes")
                head = body.split(b"\t", max(id_col, nb_col) + 1)
                if len(head) <= max(id_col, nb_col):
                    raise FeatureStoreError(f"TsvFeatureStore {str(f)!r}: line {lineno} is truncated before its "
                                            "image id and box count", path=f, reason="store")
                key = head[id_col].decode("utf-8", "replace").strip()
                try:
                    nbb = int(head[nb_col])
                except ValueError:
                    nbb = -1  # reported when the record is read
                if key in self._index:
                    prev = self._index[key]
                    raise FeatureStoreError(f"TsvFeatureStore: key {key!r} appears twice ({self.files[prev[0]]} at "
                                            f"byte {prev[1]} and {f} line {lineno})", path=f, key=key, reason="store")
                self._index[key] = (fi, start, len(line), nbb)
                self._keys.append(key)
        self._fields.append(fields or TSV_FIELDS_BUTD)

    def _fd(self, fi: int) -> int:
        if self._fd_pid != os.getpid():
            self._fds, self._fd_pid = {}, os.getpid()
        fd = self._fds.get(fi)
        if fd is None:
            fd = self._fds[fi] = os.open(self.files[fi], os.O_RDONLY)
        return fd

    def _line(self, key: str) -> tuple[dict[str, bytes], int]:
        fi, off, length, nbb = self._index[key]
        if hasattr(os, "pread"):
            data = os.pread(self._fd(fi), length, off)
        else:  # pragma: no cover - Windows
            with open(self.files[fi], "rb") as fh:
                fh.seek(off)
                data = fh.read(length)
        fields = self._fields[fi]
        cols = data.rstrip(b"\r\n").split(b"\t")
        if len(cols) != len(fields):
            raise _corrupt(self.files[fi], key, f"expected {len(fields)} tab-separated columns {fields}, got "
                                                f"{len(cols)} (truncated line?)")
        return dict(zip(fields, cols)), fi

    def _count(self, key: str) -> int:
        fi, _, _, nbb = self._index[key]
        if nbb <= 0:
            raise _bad_field(self.files[fi], key, "num_boxes", "expected a positive integer")
        return nbb

    def _read(self, key: str) -> ImageRecord:
        row, fi = self._line(key)
        path = self.files[fi]
        n = self._count(key)
        lx = "img_w" in row
        w = _scalar_size(path, key, "image_w", _int_field(path, key, "image_w", row["img_w" if lx else "image_w"]))
        h = _scalar_size(path, key, "image_h", _int_field(path, key, "image_h", row["img_h" if lx else "image_h"]))
        boxes = _b64_floats(path, key, "boxes", row["boxes"])
        if boxes.size != n * 4:
            raise _bad_field(path, key, "boxes", f"expected {n} x 4 float32 (num_boxes={n}), got {boxes.size} values")
        feats = _b64_floats(path, key, "features", row["features"])
        if feats.size == 0 or feats.size % n:
            raise _bad_field(path, key, "features", f"expected {n} rows of float32 (num_boxes={n}), got "
                                                    f"{feats.size} values")
        conf = None
        if lx:
            conf = _b64_floats(path, key, "objects_conf", row["objects_conf"])
            if conf.size != n:
                raise _bad_field(path, key, "objects_conf", f"expected {n} float32, got {conf.size}")
        return _make_record(path, key, feats.reshape(n, -1),
                            _normalise_pixel_boxes(path, key, boxes.reshape(n, 4), w, h),
                            conf=conf, width=w, height=h)

    def close(self) -> None:
        if self._fd_pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_fd_pid"] = {}, None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _int_field(path: PathLike, key: str, field: str, raw: bytes) -> int:
    try:
        return int(float(raw))
    except ValueError as e:
        raise _bad_field(path, key, field, f"expected an integer, got {raw[:40]!r}") from e


def write_tsv(path: PathLike, records: Iterable[ImageRecord], *, variant: str = "butd",
              overwrite: bool = False) -> Path:
    """Write records as a bottom-up-attention tsv (no header; boxes in pixels; base64 float32).

    ``variant="butd"``: ``image_id, image_w, image_h, num_boxes, boxes, features``
    (generate_tsv.py).  ``variant="lxmert"``: ``img_id, img_h, img_w, objects_id,
    objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features`` with objects_conf =
    conf (required), objects_id = argmax of soft_labels (0 without them), attributes 0.
    """
    if variant not in ("butd", "lxmert"):
        raise ValueError(f"write_tsv: variant: expected 'butd' or 'lxmert', got {variant!r}")

    def b64(a: np.ndarray, dtype: Any) -> bytes:
        return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes())

    with _atomic_path(path, overwrite=overwrite, is_dir=False) as tmp, open(tmp, "wb") as out:
        seen: set[str] = set()
        for rec in records:
            key = _norm_key(rec.img_id)
            if not key or any(c in key for c in "\t\r\n") or key in seen:
                raise ValueError(f"write_tsv: image id {key!r} is empty, repeated or holds a tab/newline")
            seen.add(key)
            n = rec.num_boxes
            scale = np.array([rec.width, rec.height, rec.width, rec.height], dtype=np.float32)
            boxes = b64(rec.boxes.astype(np.float32) * scale, np.float32)
            feats = b64(rec.features, np.float32)
            if variant == "butd":
                cols = [key.encode(), str(rec.width).encode(), str(rec.height).encode(), str(n).encode(), boxes, feats]
            else:
                if rec.conf is None:
                    raise ValueError(f"write_tsv(variant='lxmert'): record {key!r} has no conf (objects_conf)")
                obj = (rec.soft_labels.argmax(1) if rec.soft_labels is not None else np.zeros(n)).astype(np.int64)
                cols = [key.encode(), str(rec.height).encode(), str(rec.width).encode(), b64(obj, np.int64),
                        b64(rec.conf, np.float32), b64(np.zeros(n), np.int64), b64(np.zeros(n), np.float32),
                        str(n).encode(), boxes, feats]
            out.write(b"\t".join(cols) + b"\n")
    return Path(path)


# ----------------------------------------------------------------------------------
# A folder of npz files
# ----------------------------------------------------------------------------------

class NpzFolderStore(FeatureStore):
    """A folder of ``<key>.npz``: ``features`` (N, F), ``boxes`` (N, 4) pixels,
    ``image_w``, ``image_h`` and optional ``conf`` (N,), ``soft_labels`` (N, C).

    The folder is listed once when the store is opened (keys sorted); files are read
    with ``allow_pickle=False``.
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        p = Path(path)
        if not p.is_dir():
            raise FeatureStoreError(f"NpzFolderStore: {str(p)!r} is not a folder", path=p, reason="store")
        self.path = str(p)
        self._dir = p
        self._keys = sorted(f.name[:-4] for f in p.iterdir() if f.name.endswith(".npz") and not f.name.startswith("."))

    def _load(self, key: str, names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        fname = self._dir / f"{key}.npz"
        try:
            with np.load(fname, allow_pickle=False) as z:
                return {k: z[k] for k in (z.files if names is None else [n for n in names if n in z.files])}
        except FileNotFoundError as e:
            raise _missing(self.path, key) from e
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise _corrupt(self.path, key, e) from e

    def _count(self, key: str) -> int:
        d = self._load(key, ["boxes"])
        if "boxes" not in d:
            raise _bad_field(self.path, key, "boxes", "missing")
        b = d["boxes"]
        if b.ndim != 2:
            raise _bad_field(self.path, key, "boxes", f"expected shape (N, 4), got {b.shape}")
        return int(b.shape[0])

    def _read(self, key: str) -> ImageRecord:
        d = self._load(key)
        for name in ("features", "boxes", "image_w", "image_h"):
            if name not in d:
                raise _bad_field(self.path, key, name, f"missing (file has {sorted(d)})")
        w = _scalar_size(self.path, key, "image_w", d["image_w"])
        h = _scalar_size(self.path, key, "image_h", d["image_h"])
        return _make_record(self.path, key, d["features"], _normalise_pixel_boxes(self.path, key, d["boxes"], w, h),
                            conf=d.get("conf"), soft_labels=d.get("soft_labels"), width=w, height=h)


def write_npz_folder(path: PathLike, records: Iterable[ImageRecord], *, compressed: bool = False,
                     overwrite: bool = False) -> Path:
    """Write one ``<img_id>.npz`` per record into the folder ``path`` (created if needed).

    Fields: ``features`` float32, ``boxes`` float32 pixels, ``image_w``/``image_h`` int64
    scalars, and ``conf``/``soft_labels`` when the record has them.  Each file is
    written to a temporary name and renamed; an existing file raises FileExistsError
    unless ``overwrite``.
    """
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    for rec in records:
        key = _norm_key(rec.img_id)
        if not key or "/" in key or os.sep in key or key.startswith("."):
            raise ValueError(f"write_npz_folder: image id {key!r} cannot be a file name")
        scale = np.array([rec.width, rec.height, rec.width, rec.height], dtype=np.float32)
        arrays: dict[str, np.ndarray] = {"features": rec.features.astype(np.float32),
                                         "boxes": rec.boxes.astype(np.float32) * scale,
                                         "image_w": np.int64(rec.width), "image_h": np.int64(rec.height)}
        if rec.conf is not None:
            arrays["conf"] = rec.conf.astype(np.float32)
        if rec.soft_labels is not None:
            arrays["soft_labels"] = rec.soft_labels.astype(np.float32)
        with _atomic_path(d / f"{key}.npz", overwrite=overwrite, is_dir=False) as tmp, open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return d


# ----------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------

def _lmdb_flavour(db_dir: Path) -> str:
    """'uniter' or 'vilbert' from an LMDB's key-list entry or its first record's bytes."""
    env, handle = _acquire_env(db_dir)
    try:
        with env.begin() as txn:
            if txn.get(b"__keys__") is not None:
                return "uniter"
            if txn.get(b"keys") is not None:
                return "vilbert"
            first = next(iter(txn.cursor().iternext(keys=False, values=True)), None)
    finally:
        _release_env(handle)
    if first is None:
        raise FeatureStoreError(f"open_feature_store: the LMDB {str(db_dir)!r} is empty", path=db_dir, reason="store")
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "vilbert"  # a pickle (PROTO opcode); an empty msgpack map is no UNITER record
    if first[:2] == b"PK" or (first[:1] and (0x81 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))):
        return "uniter"  # an npz (zip) or a msgpack map
    raise FeatureStoreError(f"open_feature_store: cannot tell the layout of the LMDB {str(db_dir)!r} (records are "
                            "neither npz/msgpack nor pickles)", path=db_dir, reason="store")


def open_feature_store(path: PathLike, **kwargs: Any) -> FeatureStore:
    """Open ``path`` with the reader its layout needs.

    * a file (``.tsv`` or any tab-separated file) -> :class:`TsvFeatureStore`;
    * an LMDB folder (``data.mdb``) -> :class:`UniterFeatureStore` when it has UNITER's
      ``__keys__`` entry or npz/msgpack records, :class:`VilbertFeatureStore` when it
      has ViLBERT's ``keys`` entry or pickled records;
    * a folder holding UNITER LMDB folders (``feat_th*``, ``feat_numbb*``, ``all*``) ->
      :class:`UniterFeatureStore` (with the settings parsed from the folder name when
      there is exactly one and no ``kwargs`` are given);
    * a folder of ``*.npz`` -> :class:`NpzFolderStore`.

    ``kwargs`` go to the chosen reader (UNITER's ``conf_th``, ``max_bb``, ...).
    """
    p = Path(path)
    if p.is_file():
        return TsvFeatureStore(p, **kwargs)
    if _is_lmdb_dir(p):
        if _lmdb_flavour(p) == "uniter":
            if not kwargs:
                kwargs = {k: v for k, v in _uniter_params_from_name(p.name).items() if k != "compress"}
            return UniterFeatureStore(p, **kwargs)
        return VilbertFeatureStore(p, **kwargs)
    if p.is_dir():
        dbs = _uniter_db_dirs(p)
        if dbs:
            if not kwargs and len(dbs) == 1:
                kwargs = _uniter_params_from_name(dbs[0].name)
            return UniterFeatureStore(p, **kwargs)
        if any(f.name.endswith(".npz") for f in p.iterdir()):
            return NpzFolderStore(p, **kwargs)
        raise FeatureStoreError(f"open_feature_store: cannot tell the layout of the folder {str(p)!r}: no data.mdb, "
                                "no UNITER LMDB folders (feat_th*, feat_numbb*, all*) and no *.npz files",
                                path=p, reason="store")
    raise FeatureStoreError(f"open_feature_store: {str(p)!r} does not exist", path=p, reason="missing")
