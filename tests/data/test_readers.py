"""Feature-store readers and writers on small stores written in each official layout.

Each reader reads back what its writer wrote (features exact, or fp16-rounded for
UNITER, which stores float16; boxes normalised by the image size), UNITER's box-count
rule, layout detection, and errors that name the key, the field and the store for
missing, truncated and malformed records.  Some fixtures are built by hand, byte for
byte as the official converters write them (UNITER's convert_imgdir.py with numpy 1.x's
``allow_pickle`` member, ViLBERT's base64 records, an LXMERT tsv with a header).
"""
from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import numpy as np
import pytest

from vlfast.data.batch import ImageRecord
from vlfast.data.readers import (FeatureStore, FeatureStoreError, NpzFolderStore, TsvFeatureStore,
                                 UniterFeatureStore, VilbertFeatureStore, mp_dumps, mp_loads, open_feature_store,
                                 uniter_db_name, uniter_num_boxes, write_npz_folder, write_tsv, write_uniter_lmdb,
                                 write_vilbert_lmdb, _acquire_env, _release_env)
from vlfast.data.textdb import TxtDb, write_txt_db

F, C = 16, 5


def make_records(n: int = 5, seed: int = 0, nboxes=(3, 14, 25, 7, 12)) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nb = nboxes[i % len(nboxes)]
        w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        xy = rng.uniform(0, 0.5, (nb, 2)).astype(np.float32)
        wh = rng.uniform(0.05, 0.5, (nb, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        soft = rng.dirichlet(np.ones(C), nb).astype(np.float32)
        out.append(ImageRecord(img_id=f"img_{i:03d}.npz", features=rng.normal(size=(nb, F)).astype(np.float32),
                               boxes=boxes, conf=rng.uniform(0, 1, nb).astype(np.float32), soft_labels=soft,
                               width=w, height=h))
    return out


def lmdb_put(db_dir: Path, key: bytes, value: bytes | None, *readers) -> None:
    """Edit one entry; readers open on db_dir are closed first (LMDB allows one open
    environment per file and process) and reopen on their next read."""
    for r in readers:
        r.close()
    env = lmdb.open(str(db_dir), map_size=1 << 26, lock=False)
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


def lmdb_get(db_dir: Path, key: bytes) -> bytes:
    env, handle = _acquire_env(db_dir)  # the environment the readers share (one per file and process)
    try:
        with env.begin() as txn:
            return txn.get(key)
    finally:
        _release_env(handle)


def check_error(excinfo, *, key, path, field=None, reason=None, words=()):
    err = excinfo.value
    assert isinstance(err, KeyError)
    msg = str(err)
    assert repr(key) in msg and str(path) in msg, msg
    assert err.key == key
    if field is not None:
        assert err.field == field and repr(field) in msg, msg
    if reason is not None:
        assert err.reason == reason, (err.reason, msg)
    for w in words:
        assert w in msg, msg


# ----------------------------------------------------------------------------------
# UNITER
# ----------------------------------------------------------------------------------

def fp16(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("compress", [True, False])
def test_uniter_roundtrip_fp16_and_nbb_rule(tmp_path, compress):
    recs = make_records()
    recs[1].conf[:] = np.linspace(0.0, 0.95, 14)           # 9 above 0.3 -> clamped up to min_bb 10
    recs[2].conf[:] = 0.9                                  # 25 above -> clamped down to max_bb 20
    recs[3].conf[:] = [0.1, 0.5, 0.31, 0.3, 0.9, 0.2, 0.6]  # 4 strictly above 0.3; fewer rows than min_bb
    db = write_uniter_lmdb(tmp_path, recs, conf_th=0.3, max_bb=20, min_bb=10, compress=compress)
    assert db.name == ("feat_th0.3_max20_min10" + ("_compressed" if compress else ""))
    table = json.loads((tmp_path / "nbb_th0.3_max20_min10.json").read_text())
    expect = {r.img_id: min(max(10, int((r.conf > 0.3).sum())), 20, r.num_boxes) for r in recs}
    assert expect["img_001.npz"] == 10 and expect["img_002.npz"] == 20 and expect["img_003.npz"] == 7
    assert table == expect
    # the stored record is truncated to nbb and float16, as convert_imgdir.py writes it
    raw = lmdb_get(db, b"img_002.npz")
    dump = dict(np.load(io.BytesIO(raw))) if compress else mp_loads(raw)
    assert dump["features"].dtype == np.float16 and dump["features"].shape == (20, F)
    assert dump["norm_bb"].shape == (20, 6)
    assert (raw[:2] == b"PK") == compress

    store = UniterFeatureStore(tmp_path, conf_th=0.3, max_bb=20, min_bb=10, compress=compress)
    assert list(store.keys()) == [r.img_id for r in recs] and len(store) == 5
    assert store.name2nbb == expect
    for r in recs:
        got = store[r.img_id]
        n = expect[r.img_id]
        assert got.num_boxes == n == store.num_boxes(r.img_id)
        np.testing.assert_array_equal(got.features, fp16(r.features[:n]))
        np.testing.assert_array_equal(got.boxes, fp16(r.boxes[:n]))
        np.testing.assert_array_equal(got.conf, fp16(r.conf[:n]))
        np.testing.assert_array_equal(got.soft_labels, fp16(r.soft_labels[:n]))
        assert got.features.dtype == np.float32 and (got.width, got.height) == (1, 1)
    # norm_bb's w, h columns
    nb = dump["norm_bb"].astype(np.float32)
    np.testing.assert_allclose(nb[:, 4], nb[:, 2] - nb[:, 0], atol=2e-3)


def test_uniter_all_db_computes_nbb_like_detectfeatlmdb(tmp_path):
    """No nbb table: the 'all' DB, box counts from conf with the rule (capped at stored rows)."""
    recs = make_records()
    write_uniter_lmdb(tmp_path, recs, keep_all=True, fp16=False)
    assert (tmp_path / "all_compressed" / "data.mdb").is_file()
    assert not list(tmp_path.glob("nbb_*.json"))
    store = UniterFeatureStore(tmp_path, conf_th=0.5, max_bb=8, min_bb=4)
    for r in recs:
        rule = uniter_num_boxes(r.conf, 0.5, 8, 4)
        assert rule == min(8, max(4, int((r.conf > 0.5).sum())))
        n = min(rule, r.num_boxes)
        assert store.num_boxes(r.img_id) == n
        got = store[r.img_id]
        np.testing.assert_array_equal(got.features, r.features[:n])  # fp16=False: exact float32
        np.testing.assert_array_equal(got.boxes, r.boxes[:n])
    assert store.name2nbb["img_000.npz"] == 3  # 3 stored rows, rule says >= min_bb 4
    # conf_th == -1: a fixed num_bb for every key (UNITER's name2nbb), the first num_bb rows
    fixed = UniterFeatureStore(tmp_path / "all_compressed", conf_th=-1, num_bb=6)
    assert fixed.num_boxes("img_001.npz") == 6 and fixed["img_001.npz"].num_boxes == 6
    # a record with fewer rows than the num_bb it is counted with is a bad record (it used
    # to be cut silently, while num_boxes() still said 6)
    with pytest.raises(FeatureStoreError, match=r"record 'img_000\.npz': field 'features': expected at least "
                                                r"num_bb = 6 rows"):
        fixed["img_000.npz"]


def test_uniter_official_bytes_allow_pickle_member_and_msgpack_numpy(tmp_path):
    """Records exactly as convert_imgdir.py writes them: np.savez_compressed(w, **dump,
    allow_pickle=True) under numpy 1.x stores an extra 0-d 'allow_pickle' member; the
    msgpack variant uses msgpack-numpy's {b'nd', b'type', b'kind', b'shape', b'data'}."""
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(12, F)).astype(np.float16)
    bb = rng.uniform(0, 1, (12, 6)).astype(np.float16)
    conf = np.linspace(0, 1, 12).astype(np.float16)
    for name, compressed in (("feat_th0.2_max100_min10_compressed", True), ("feat_th0.2_max100_min10", False)):
        d = tmp_path / name
        if compressed:
            buf = io.BytesIO()
            np.savez_compressed(buf, features=feats, norm_bb=bb, conf=conf, allow_pickle=np.array(True))
            value = buf.getvalue()
        else:
            def enc(a):
                return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": a.shape, b"data": a.tobytes()}
            value = msgpack.packb({"features": enc(feats), "norm_bb": enc(bb), "conf": enc(conf)}, use_bin_type=True)
        lmdb_put(d, b"x.npz", value)
        lmdb_put(d, b"__keys__", json.dumps(["x.npz"]).encode())
    (tmp_path / "nbb_th0.2_max100_min10.json").write_text(json.dumps({"x.npz": 10}))
    for compress in (True, False):
        rec = UniterFeatureStore(tmp_path, compress=compress)["x.npz"]
        np.testing.assert_array_equal(rec.features, feats[:10].astype(np.float32))
        np.testing.assert_array_equal(rec.boxes, bb[:10, :4].astype(np.float32))
        assert rec.soft_labels is None
    assert mp_loads(mp_dumps({"a": feats}))["a"].tobytes() == feats.tobytes()


def test_uniter_errors(tmp_path):
    recs = make_records()
    db = write_uniter_lmdb(tmp_path, recs, conf_th=0.2)
    store = UniterFeatureStore(tmp_path)
    with pytest.raises(FeatureStoreError) as ei:
        store["nope.npz"]
    check_error(ei, key="nope.npz", path=db, reason="missing")
    assert "nope.npz" not in store and store.get("nope.npz") is None

    good = lmdb_get(db, b"img_001.npz")
    lmdb_put(db, b"img_001.npz", good[: len(good) // 2], store)               # truncated npz
    with pytest.raises(FeatureStoreError) as ei:
        store["img_001.npz"]
    check_error(ei, key="img_001.npz", path=db, reason="corrupt", words=("cannot be decoded",))
    assert "img_001.npz" in store
    with pytest.raises(FeatureStoreError):
        store.get("img_001.npz")                                       # corrupt is not "missing"

    lmdb_put(db, b"img_002.npz", mp_dumps({"features": np.zeros((3, F), np.float16)})[:-5], store)  # truncated msgpack
    with pytest.raises(FeatureStoreError) as ei:
        store["img_002.npz"]
    check_error(ei, key="img_002.npz", path=db, reason="corrupt", words=("incomplete",))

    buf = io.BytesIO()
    np.savez_compressed(buf, features=np.zeros((25, F), np.float16), norm_bb=np.zeros((24, 6), np.float16),
                        conf=np.ones(25, np.float16))
    lmdb_put(db, b"img_003.npz", buf.getvalue(), store)                       # wrong norm_bb rows
    with pytest.raises(FeatureStoreError) as ei:
        store["img_003.npz"]
    check_error(ei, key="img_003.npz", path=db, field="norm_bb", reason="field")

    lmdb_put(db, b"img_004.npz", mp_dumps({"norm_bb": np.zeros((3, 6), np.float16)}), store)  # no features
    with pytest.raises(FeatureStoreError) as ei:
        store["img_004.npz"]
    check_error(ei, key="img_004.npz", path=db, field="features")

    lmdb_put(db, b"img_000.npz", None, store)                                 # listed in __keys__, record gone
    with pytest.raises(FeatureStoreError) as ei:
        store["img_000.npz"]
    check_error(ei, key="img_000.npz", path=db, reason="missing")

    with pytest.raises(FeatureStoreError, match="feat_th0.5_max100_min10_compressed"):
        (tmp_path / "nbb_th0.5_max100_min10.json").write_text("{}")
        UniterFeatureStore(tmp_path, conf_th=0.5)


# ----------------------------------------------------------------------------------
# ViLBERT
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("b64", [False, True])
def test_vilbert_roundtrip(tmp_path, b64):
    recs = make_records()
    db = write_vilbert_lmdb(tmp_path / "feats.lmdb", recs, base64_fields=b64)
    raw = pickle.loads(lmdb_get(db, b"img_002.npz"))
    assert raw["image_w"] == recs[2].width and raw["num_boxes"] == 25
    boxes_px = np.frombuffer(base64.b64decode(raw["boxes"]), np.float32).reshape(25, 4) if b64 else raw["boxes"]
    np.testing.assert_allclose(boxes_px[:, 0], recs[2].boxes[:, 0] * recs[2].width, rtol=1e-6)
    assert pickle.loads(lmdb_get(db, b"keys")) == [r.img_id.encode() for r in recs]

    store = VilbertFeatureStore(db)
    assert list(store) == [r.img_id for r in recs]
    for r in recs:
        got = store[r.img_id]
        np.testing.assert_array_equal(got.features, r.features)
        np.testing.assert_allclose(got.boxes, r.boxes, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got.soft_labels, r.soft_labels)
        np.testing.assert_array_equal(got.conf, r.conf)
        assert (got.width, got.height) == (r.width, r.height)
        assert store.num_boxes(r.img_id) == r.num_boxes


def test_vilbert_official_record_by_hand(tmp_path):
    """convert_to_lmdb.py's record: numpy scalars from the extractor, int image id, no
    conf; boxes (x1,y1,x2,y2) pixels -> divided by (w, h, w, h)."""
    db = tmp_path / "coco.lmdb"
    boxes = np.array([[0, 0, 640, 480], [64, 48, 320, 240]], np.float32)
    feats = np.arange(2 * 2048, dtype=np.float32).reshape(2, 2048)
    item = {"image_id": 42, "image_h": np.int64(480), "image_w": np.int64(640), "num_boxes": np.int64(2),
            "boxes": boxes, "features": feats, "objects": np.array([3, 7])}
    lmdb_put(db, b"42", pickle.dumps(item, protocol=2))
    lmdb_put(db, b"keys", pickle.dumps([b"42"]))
    store = open_feature_store(db)
    assert isinstance(store, VilbertFeatureStore)
    rec = store[42]
    np.testing.assert_array_equal(rec.boxes, np.array([[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]], np.float32))
    np.testing.assert_array_equal(rec.features, feats)
    assert rec.conf is None and rec.soft_labels is None and rec.img_id == "42"


def test_vilbert_errors(tmp_path):
    db = write_vilbert_lmdb(tmp_path / "v", make_records())
    store = VilbertFeatureStore(db)
    with pytest.raises(FeatureStoreError) as ei:
        store["zzz"]
    check_error(ei, key="zzz", path=db, reason="missing")
    good = lmdb_get(db, b"img_001.npz")
    lmdb_put(db, b"img_001.npz", good[:100], store)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_001.npz"]
    check_error(ei, key="img_001.npz", path=db, reason="corrupt")
    item = pickle.loads(lmdb_get(db, b"img_002.npz"))
    item["boxes"] = item["boxes"][:, :3].copy()
    lmdb_put(db, b"img_002.npz", pickle.dumps(item), store)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_002.npz"]
    check_error(ei, key="img_002.npz", path=db, field="boxes")
    item = pickle.loads(lmdb_get(db, b"img_003.npz"))
    item["features"] = item["features"].ravel()[:-1].copy()
    lmdb_put(db, b"img_003.npz", pickle.dumps(item), store)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_003.npz"]
    check_error(ei, key="img_003.npz", path=db, field="features")
    item = pickle.loads(lmdb_get(db, b"img_004.npz"))
    del item["image_w"]
    lmdb_put(db, b"img_004.npz", pickle.dumps(item), store)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_004.npz"]
    check_error(ei, key="img_004.npz", path=db, field="image_w")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    lmdb_put(db, b"img_000.npz", pickle.dumps({"boxes": Evil()}), store)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_000.npz"]
    check_error(ei, key="img_000.npz", path=db, reason="corrupt", words=("builtins.print",))


# ----------------------------------------------------------------------------------
# bottom-up-attention tsv
# ----------------------------------------------------------------------------------

def test_tsv_butd_roundtrip_and_line_format(tmp_path):
    recs = make_records()
    path = write_tsv(tmp_path / "feats.tsv", recs)
    lines = path.read_bytes().split(b"\n")
    cols = lines[1].split(b"\t")
    assert len(lines) == 6 and lines[-1] == b"" and len(cols) == 6
    assert cols[:4] == [b"img_001.npz", str(recs[1].width).encode(), str(recs[1].height).encode(), b"14"]
    px = np.frombuffer(base64.b64decode(cols[4]), np.float32).reshape(14, 4)
    np.testing.assert_allclose(px[:, 3], recs[1].boxes[:, 3] * recs[1].height, rtol=1e-6)

    store = TsvFeatureStore(path)
    assert list(store) == [r.img_id for r in recs]
    assert store.name2nbb == {r.img_id: r.num_boxes for r in recs}
    for r in reversed(recs):  # random access by offset
        got = store[r.img_id]
        np.testing.assert_array_equal(got.features, r.features)
        np.testing.assert_allclose(got.boxes, r.boxes, rtol=1e-6, atol=1e-7)
        assert got.conf is None and (got.width, got.height) == (r.width, r.height)
    assert isinstance(open_feature_store(path), TsvFeatureStore)

    # two files (the trainval .tsv.0 ... .tsv.3 split), keys across both
    extra = ImageRecord("extra", np.ones((2, F), np.float32), np.zeros((2, 4), np.float32), width=5, height=5)
    p2 = write_tsv(tmp_path / "more.tsv", [extra])
    both = TsvFeatureStore([path, p2])
    assert len(both) == 6 and both["extra"].num_boxes == 2
    np.testing.assert_array_equal(both["img_004.npz"].features, recs[4].features)


def test_tsv_lxmert_with_header(tmp_path):
    recs = make_records(3)
    path = write_tsv(tmp_path / "lx.tsv", recs, variant="lxmert")
    header = "\t".join(["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                        "num_boxes", "boxes", "features"]).encode()
    with_header = tmp_path / "lx_header.tsv"
    with_header.write_bytes(header + b"\n" + path.read_bytes().replace(b"\n", b"\r\n"))
    for p in (path, with_header):
        store = TsvFeatureStore(p)
        assert len(store) == 3
        for r in recs:
            got = store[r.img_id]
            np.testing.assert_array_equal(got.features, r.features)
            np.testing.assert_array_equal(got.conf, r.conf)
            np.testing.assert_allclose(got.boxes, r.boxes, rtol=1e-6, atol=1e-7)
            assert (got.width, got.height) == (r.width, r.height)


def test_tsv_errors(tmp_path):
    recs = make_records()
    path = write_tsv(tmp_path / "f.tsv", recs)
    lines = path.read_bytes().split(b"\n")
    c1 = lines[1].split(b"\t")
    lines[1] = b"\t".join(c1[:5] + [c1[5][: len(c1[5]) // 2]])          # features cut mid-way
    c2 = lines[2].split(b"\t")
    lines[2] = b"\t".join(c2[:3] + [b"13"] + c2[4:])                    # num_boxes disagrees with boxes
    lines[3] = b"\t".join(lines[3].split(b"\t")[:4])                    # line cut after num_boxes
    c4 = lines[4].split(b"\t")
    lines[4] = b"\t".join(c4[:4] + [c4[4][:-8] + b"!!!!!!!!", c4[5]])   # not base64
    path.write_bytes(b"\n".join(lines))
    store = TsvFeatureStore(path)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_001.npz"]
    check_error(ei, key="img_001.npz", path=path)
    assert ei.value.reason in ("corrupt", "field")
    with pytest.raises(FeatureStoreError) as ei:
        store["img_002.npz"]
    check_error(ei, key="img_002.npz", path=path, field="boxes")
    with pytest.raises(FeatureStoreError) as ei:
        store["img_003.npz"]
    check_error(ei, key="img_003.npz", path=path, reason="corrupt", words=("columns",))
    with pytest.raises(FeatureStoreError) as ei:
        store["img_004.npz"]
    check_error(ei, key="img_004.npz", path=path, reason="corrupt", words=("base64",))
    with pytest.raises(FeatureStoreError) as ei:
        store["img_009"]
    check_error(ei, key="img_009", path=path, reason="missing")
    np.testing.assert_array_equal(store["img_000.npz"].features, recs[0].features)  # the rest still reads

    dup = tmp_path / "dup.tsv"
    dup.write_bytes(lines[0] + b"\n" + lines[0] + b"\n")
    with pytest.raises(FeatureStoreError, match="appears twice"):
        TsvFeatureStore(dup)


# ----------------------------------------------------------------------------------
# npz folder
# ----------------------------------------------------------------------------------

def test_npz_folder_roundtrip(tmp_path):
    recs = make_records()
    for r in recs:
        r.img_id = r.img_id[:-4]
    recs[0].conf = None
    recs[0].soft_labels = None
    d = write_npz_folder(tmp_path / "npz", recs)
    z = np.load(d / "img_001.npz")
    assert sorted(z.files) == ["boxes", "conf", "features", "image_h", "image_w", "soft_labels"]
    np.testing.assert_allclose(z["boxes"], recs[1].boxes * np.array([recs[1].width, recs[1].height] * 2), rtol=1e-6)
    store = NpzFolderStore(d)
    assert list(store) == [r.img_id for r in recs]
    for r in recs:
        got = store[r.img_id]
        np.testing.assert_array_equal(got.features, r.features)
        np.testing.assert_allclose(got.boxes, r.boxes, rtol=1e-6, atol=1e-7)
        assert (got.conf is None) == (r.conf is None) and store.num_boxes(r.img_id) == r.num_boxes
        assert (got.width, got.height) == (r.width, r.height)
    np.testing.assert_array_equal(store["img_002"].soft_labels, recs[2].soft_labels)
    with pytest.raises(FileExistsError):
        write_npz_folder(d, recs[:1])
    assert isinstance(open_feature_store(d), NpzFolderStore)


def test_npz_folder_errors(tmp_path):
    d = tmp_path / "npz"
    recs = make_records(3)
    write_npz_folder(d, recs)
    store = NpzFolderStore(d)
    with pytest.raises(FeatureStoreError) as ei:
        store["nothere"]
    check_error(ei, key="nothere", path=d, reason="missing")
    raw = (d / "img_000.npz.npz").read_bytes()
    (d / "img_000.npz.npz").write_bytes(raw[:300])
    with pytest.raises(FeatureStoreError) as ei:
        store["img_000.npz"]
    check_error(ei, key="img_000.npz", path=d, reason="corrupt")
    np.savez(d / "img_001.npz.npz", features=np.zeros((3, F), np.float32), boxes=np.zeros((3, 5), np.float32),
             image_w=10, image_h=10)
    with pytest.raises(FeatureStoreError) as ei:
        store["img_001.npz"]
    check_error(ei, key="img_001.npz", path=d, field="boxes")
    np.savez(d / "img_002.npz.npz", features=np.zeros((3, F), np.float32), boxes=np.zeros((3, 4), np.float32))
    with pytest.raises(FeatureStoreError) as ei:
        store["img_002.npz"]
    check_error(ei, key="img_002.npz", path=d, field="image_w")


# ----------------------------------------------------------------------------------
# Detection, the shared interface, atomic writes
# ----------------------------------------------------------------------------------

def test_open_feature_store_detects_each_layout(tmp_path):
    recs = make_records(3)
    write_uniter_lmdb(tmp_path / "uniter", recs, conf_th=0.3, max_bb=20, min_bb=2, compress=False)
    s = open_feature_store(tmp_path / "uniter")
    assert isinstance(s, UniterFeatureStore) and (s.conf_th, s.max_bb, s.min_bb, s.compress) == (0.3, 20, 2, False)
    assert s.name2nbb == {r.img_id: min(max(2, int((r.conf > 0.3).sum())), 20, r.num_boxes) for r in recs}
    s2 = open_feature_store(tmp_path / "uniter" / "feat_th0.3_max20_min2")
    assert isinstance(s2, UniterFeatureStore) and s2.name2nbb == s.name2nbb
    write_vilbert_lmdb(tmp_path / "vil", recs)
    assert isinstance(open_feature_store(tmp_path / "vil"), VilbertFeatureStore)
    # without the key-list entries, the first record's bytes tell (npz zip / msgpack map / pickle)
    for name, value, cls in (("u_npz", lmdb_get(tmp_path / "uniter" / "feat_th0.3_max20_min2", b"img_000.npz"),
                              UniterFeatureStore),
                             ("v_pkl", lmdb_get(tmp_path / "vil", b"img_000.npz"), VilbertFeatureStore)):
        lmdb_put(tmp_path / name, b"img_000.npz", value)
        s3 = open_feature_store(tmp_path / name)
        assert isinstance(s3, cls) and list(s3) == ["img_000.npz"]
        np.testing.assert_allclose(s3["img_000.npz"].features, recs[0].features, atol=2e-3)
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FeatureStoreError, match=str(bad)):
            open_feature_store(bad)


def test_shared_interface_and_atomic_writes(tmp_path):
    recs = make_records(3)
    stores: list[FeatureStore] = [
        UniterFeatureStore(write_uniter_lmdb(tmp_path / "u", recs, keep_all=True), conf_th=0.0, min_bb=1),
        VilbertFeatureStore(write_vilbert_lmdb(tmp_path / "v", recs)),
        TsvFeatureStore(write_tsv(tmp_path / "t.tsv", recs)),
        NpzFolderStore(write_npz_folder(tmp_path / "n", recs)),
    ]
    for s in stores:
        assert len(s) == 3 and list(s.keys()) == [r.img_id for r in recs]
        assert recs[1].img_id in s and "x" not in s and 5 not in s
        assert s.lengths() == [r.num_boxes for r in recs] and s.num_boxes(recs[1].img_id) == recs[1].num_boxes
        assert s.get("x", "default") == "default"
        restored = pickle.loads(pickle.dumps(s))  # DataLoader workers get a copy that reopens its files
        np.testing.assert_array_equal(restored[recs[2].img_id].features, s[recs[2].img_id].features)
        with pytest.raises(TypeError):
            s[1.5]
    with pytest.raises(FileExistsError):
        write_vilbert_lmdb(tmp_path / "v", recs)
    with pytest.raises(FileExistsError):
        write_tsv(tmp_path / "t.tsv", recs)
    # a failing write leaves the old store whole and no temporary behind
    bad = recs[:1] + [ImageRecord(recs[0].img_id, recs[0].features, recs[0].boxes)]  # repeated key
    with pytest.raises(ValueError, match="repeated"):
        write_vilbert_lmdb(tmp_path / "v", bad, overwrite=True)
    assert len(VilbertFeatureStore(tmp_path / "v")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n", "t.tsv", "u", "v"]
    write_vilbert_lmdb(tmp_path / "v", recs[:2], overwrite=True)
    assert len(VilbertFeatureStore(tmp_path / "v")) == 2


# ----------------------------------------------------------------------------------
# Text DB
# ----------------------------------------------------------------------------------

def test_txt_db_roundtrip_official_bytes_and_errors(tmp_path):
    examples = {
        "q1": {"input_ids": [101, 7, 8, 9], "img_fname": "coco_1.npz", "question_id": 1,
               "target": {"labels": [3, 17], "scores": [1.0, 0.3]}},
        "q2": {"input_ids": [101] + list(range(70)), "img_fname": "coco_2.npz", "target": {"labels": [],
                                                                                            "scores": []}},
        "n1": {"input_ids": [5, 6], "img_fname": ["nlvr2_a-img0.npz", "nlvr2_a-img1.npz"], "target": 1},
    }
    db = write_txt_db(tmp_path / "txt", examples, meta={"CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, 28996]})
    # the official value encoding: lz4.frame(msgpack(example, use_bin_type=True))
    assert msgpack.unpackb(lz4.frame.decompress(lmdb_get(db, b"q1")), raw=False) == examples["q1"]
    t = TxtDb(db)
    assert list(t) == ["q1", "q2", "n1"] and t.lengths() == [4, 71, 2]
    assert t["q1"] == examples["q1"] and t["n1"]["img_fname"] == ["nlvr2_a-img0.npz", "nlvr2_a-img1.npz"]
    assert t.txt2img == {"q1": "coco_1.npz", "q2": "coco_2.npz", "n1": ["nlvr2_a-img0.npz", "nlvr2_a-img1.npz"]}
    assert t.img2txts["coco_1.npz"] == ["q1"] and t.meta["MASK"] == 103
    nbb = {"coco_1.npz": 10, "coco_2.npz": 36, "nlvr2_a-img0.npz": 12, "nlvr2_a-img1.npz": 20}
    assert t.joint_lengths(nbb) == [4 + 10, 71 + 36, 2 + 12 + 20]
    assert list(TxtDb(db, max_txt_len=60)) == ["q1", "n1"]  # UNITER's TxtTokLmdb filter
    with pytest.raises(FeatureStoreError) as ei:
        t["q9"]
    check_error(ei, key="q9", path=db, reason="missing")
    lmdb_put(db, b"q2", lmdb_get(db, b"q2")[:-6], t)
    with pytest.raises(FeatureStoreError) as ei:
        t["q2"]
    check_error(ei, key="q2", path=db, reason="corrupt")
    with pytest.raises(FileExistsError):
        write_txt_db(tmp_path / "txt", examples)
    with pytest.raises(FeatureStoreError, match="id2len.json"):
        (tmp_path / "nojson").mkdir()
        lmdb_put(tmp_path / "nojson", b"a", b"b")
        TxtDb(tmp_path / "nojson")


def test_uniter_db_name_matches_convert_imgdir():
    assert uniter_db_name(0.2, 100, 10) == "feat_th0.2_max100_min10_compressed"
    assert uniter_db_name(-1, num_bb=36, compress=False) == "feat_numbb36"
    assert uniter_db_name(0, 50, 5, compress=False) == "feat_th0.0_max50_min5"  # argparse type=float
    assert uniter_db_name(keep_all=True) == "all_compressed"
