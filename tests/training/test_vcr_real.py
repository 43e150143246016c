"""VCR on real data in UNITER's layout: the VCR text DB (id2len_qa/qar.json, question /
answers / rationales / targets, img_fname = [gt key, detected key]), the ground-truth and
detected feature stores concatenated (gt regions first), truncation, the vocab check, and a
short train + evaluate + submission with UNITER."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlfast.data.batch import ImageRecord
from vlfast.data.readers import FeatureStoreError, open_feature_store, write_npz_folder, write_uniter_lmdb
from vlfast.data.textdb import TxtDb, write_txt_db
from vlfast.data.tokenization import VLTokenizer, build_vocab
from vlfast.training.config import load_config
from vlfast.training.jobs import FeatureStoreSource, VcrImages, VLJob
from vlfast.training.loop import train

F = 16
N_IMG = 4
WORDS = ("what is the person doing why is he running she walks to the shop because it rains he is late "
         "they are happy a dog sits on the grass yes no maybe")
QUESTIONS = ["what is the person doing", "why is he running", "is she happy", "what sits on the grass"]
ANSWERS = ["he is running", "she walks", "a dog sits", "they are happy"]
RATIONALES = ["because it rains", "he is late", "the dog is happy", "the grass is on the shop"]
SMALL = ["data.batch_size=4", "data.eval_batch_size=8", "logging.every=1", "logging.progress=off",
         "checkpoint.every=0", "device=cpu", "logging.tensorboard=null", "model.config.hidden_size=64",
         "model.config.num_hidden_layers=2", "model.config.intermediate_size=128", "eval.every=0",
         "checkpoint.best_metric=null", "tasks={vcr: 1.0}", "optim.lr_multipliers={}"]


def _records(prefix: str, n_regions: int, seed: int, sized: bool) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N_IMG):
        xy = rng.uniform(0, 0.5, size=(n_regions, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, size=(n_regions, 2))], 1).astype(np.float32)
        out.append(ImageRecord(f"{prefix}{i}", rng.normal(size=(n_regions, F)).astype(np.float32), boxes,
                               conf=rng.uniform(0.5, 1, n_regions).astype(np.float32),
                               width=640 if sized else 1, height=480 if sized else 1))
    return out


def _vcr_example(tok: VLTokenizer, k: int, labelled: bool, question: str | None = None) -> dict:
    enc = lambda t: tok.encode(t)[1:-1]  # noqa: E731 -- word pieces without [CLS]/[SEP]
    ex = {"input_ids": enc(question or QUESTIONS[k % 4]),
          "input_ids_as": [enc(ANSWERS[(k + j) % 4]) for j in range(4)],
          "input_ids_rs": [enc(RATIONALES[(k + j) % 4]) for j in range(4)],
          "img_fname": [f"g{k % N_IMG}", f"d{k % N_IMG}"]}
    if labelled:
        ex["qa_target"], ex["qar_target"] = k % 4, (k + 1) % 4
    elif k % 2:
        ex["qa_target"], ex["qar_target"] = -1, -1  # UNITER's test DB; the other half has no targets at all
    return ex


def write_vcr_db(path: Path, examples: dict[str, dict]) -> Path:
    """A text DB in UNITER's VCR layout: id2len_qa.json (question + longest answer) and
    id2len_qar.json (+ longest rationale) instead of id2len.json."""
    write_txt_db(path, examples, meta={"CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 100]})
    (path / "id2len.json").unlink()
    qa = {k: len(e["input_ids"]) + max(map(len, e["input_ids_as"])) for k, e in examples.items()}
    qar = {k: qa[k] + max(map(len, e["input_ids_rs"])) for k, e in examples.items()}
    (path / "id2len_qa.json").write_text(json.dumps(qa))
    (path / "id2len_qar.json").write_text(json.dumps(qar))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("vcr")
    tok = VLTokenizer(build_vocab([WORDS]))
    tok.save(base / "tok")
    gt = write_npz_folder(base / "gt_npz", _records("g", 2, 0, sized=True))
    write_uniter_lmdb(base / "det_img", _records("d", 3, 1, sized=False), conf_th=-1, num_bb=3)
    ex = {"train": {f"train-{k}": _vcr_example(tok, k, True) for k in range(8)},
          "val": {f"val-{k}": _vcr_example(tok, k + 1, True) for k in range(4)},
          "test": {f"test-{k}": _vcr_example(tok, k + 2, False) for k in range(4)}}
    dbs = {s: write_vcr_db(base / f"vcr_{s}", e) for s, e in ex.items()}
    opts = {"txt_db": str(dbs["train"]), "val_txt_db": str(dbs["val"]), "test_txt_db": str(dbs["test"]),
            "vocab": str(base / "tok" / "vocab.txt"), "gt_img_db": str(gt)}
    return {"base": base, "tok": tok, "gt": str(gt), "det": str(base / "det_img"), "ex": ex, "dbs": dbs,
            "opts": opts}


def test_txt_db_opens_vcr_layout_and_names_missing_length_files(world, tmp_path):
    path = world["dbs"]["train"]
    qar = json.loads((path / "id2len_qar.json").read_text())
    qa = json.loads((path / "id2len_qa.json").read_text())
    db = TxtDb(path)
    assert db.id2len_file == "id2len_qar.json" and db.id2len == qar and list(db) == list(qar)
    assert db["train-3"]["input_ids_rs"] == world["ex"]["train"]["train-3"]["input_ids_rs"]
    assert TxtDb(path, id2len="qa").id2len == qa and TxtDb(path, id2len="qa,qar").id2len == qar
    with pytest.raises(ValueError, match="id2len: expected None or one of"):
        TxtDb(path, id2len="qra")
    # only id2len_qa.json: read; none at all: an error naming the DB and the files
    only_qa = shutil.copytree(path, tmp_path / "only_qa")
    (only_qa / "id2len_qar.json").unlink()
    assert TxtDb(only_qa).id2len_file == "id2len_qa.json" and TxtDb(only_qa).id2len == qa
    with pytest.raises(FeatureStoreError, match="id2len_qar.json"):
        TxtDb(only_qa, id2len="qar")
    (only_qa / "id2len_qa.json").unlink()
    with pytest.raises(FeatureStoreError, match=r"only_qa.*id2len\.json is missing.*id2len_qar\.json"):
        TxtDb(only_qa)
    # a normal DB is read from id2len.json as before
    plain = write_txt_db(tmp_path / "plain", {"a": {"input_ids": [5, 6], "img_fname": "d0"}})
    assert TxtDb(plain).id2len_file == "id2len.json" and TxtDb(plain).id2len == {"a": 2}


def test_vcr_items_and_combined_images_by_hand(world):
    tok = world["tok"]
    src = FeatureStoreSource(world["det"], world["opts"])
    assert isinstance(src.records, VcrImages)
    items = src.examples("vcr", "train")
    assert [it["id"] for it in items] == list(world["ex"]["train"])
    gt_store, det_store = open_feature_store(world["gt"]), open_feature_store(world["det"])
    for it in items:
        ex = world["ex"]["train"][it["id"]]
        assert it["input_ids"] == [tok.cls_id] + ex["input_ids"] + [tok.sep_id]
        assert it["choices"] == ex["input_ids_as"] and it["rationale_choices"] == ex["input_ids_rs"]
        assert (it["label"], it["rationale_label"]) == (ex["qa_target"], ex["qar_target"])
        g, d = ex["img_fname"]
        assert it["img_id"] == f"{g}+{d}"
        rec, rg, rd = src.records[it["img_id"]], gt_store[g], det_store[d]
        assert rec.num_boxes == 5 == src.records.num_boxes(it["img_id"])
        np.testing.assert_array_equal(rec.features[:2], rg.features)  # gt regions first
        np.testing.assert_array_equal(rec.features[2:], rd.features)
        np.testing.assert_array_equal(rec.boxes, np.concatenate([rg.boxes, rd.boxes]))
        np.testing.assert_array_equal(rec.conf, np.concatenate([rg.conf, rd.conf]))
        assert (rec.width, rec.height) == (rd.width, rd.height) == (1, 1)  # the detected (UNITER) record's
    assert "g0+d0" in src.records and "d0" in src.records and len(src.records) == N_IMG + N_IMG
    # the test DB: no labels (-1 or absent targets)
    test = src.examples("vcr", "test")
    assert len(test) == 4 and not any("label" in it or "rationale_label" in it for it in test)
    # without gt_img_db: the detected image only
    opts = {k: v for k, v in world["opts"].items() if k != "gt_img_db"}
    plain = FeatureStoreSource(world["det"], opts)
    it = plain.examples("vcr", "val")[0]
    assert it["img_id"] == "d1" and plain.records.num_boxes("d1") == 3
    np.testing.assert_array_equal(plain.records["d1"].features, det_store["d1"].features)


def test_vcr_rows_truncated_question_first(world, tmp_path):
    tok = world["tok"]
    long_q = "what is the person doing and why is he running to the shop because it rains"
    ex = {"long": _vcr_example(tok, 0, True, question=long_q)}
    path = write_vcr_db(tmp_path / "long", ex)
    q, A, R = ex["long"]["input_ids"], ex["long"]["input_ids_as"], ex["long"]["input_ids_rs"]
    ma, mr = max(map(len, A)), max(map(len, R))
    opts = {**world["opts"], "txt_db": str(path)}
    # a budget that only the question pays for
    L = 4 + 3 + ma + mr
    with pytest.warns(UserWarning, match="1 VCR item"):
        it = FeatureStoreSource(world["det"], opts, max_len=L).examples("vcr", "train")[0]
    assert it["input_ids"] == [tok.cls_id] + q[:3] + [tok.sep_id]
    assert it["choices"] == A and it["rationale_choices"] == R
    # a tighter one (the model's positions): the question down to one word piece, then the longer caps
    with pytest.warns(UserWarning):
        it = FeatureStoreSource(world["det"], opts, max_len=60, max_positions=9).examples("vcr", "train")[0]
    assert it["input_ids"] == [tok.cls_id] + q[:1] + [tok.sep_id]
    assert all(len(it["input_ids"]) + len(a) + len(r) + 2 <= 9 for a in it["choices"]
               for r in it["rationale_choices"])
    assert all(a == full[:len(a)] for a, full in zip(it["choices"], A))
    assert max(map(len, it["choices"])) + max(map(len, it["rationale_choices"])) == 9 - 5
    with pytest.raises(ValueError, match="at least 7 tokens"):
        FeatureStoreSource(world["det"], opts, max_len=6).examples("vcr", "train")


def test_word_ids_past_the_vocab_need_model_vocab_size(world, tmp_path):
    tok = world["tok"]
    ex = {"tag": _vcr_example(tok, 1, True)}
    ex["tag"]["input_ids_rs"][2] = ex["tag"]["input_ids_rs"][2] + [tok.vocab_size + 3]  # an object tag
    path = write_vcr_db(tmp_path / "tags", ex)
    opts = {**world["opts"], "txt_db": str(path)}
    with pytest.raises(ValueError, match=rf"tags.*'tag'.*word id {tok.vocab_size + 3}.*vocab size "
                                         rf"{tok.vocab_size}.*model\.config\.vocab_size to at least "
                                         rf"{tok.vocab_size + 4}"):
        FeatureStoreSource(world["det"], opts).examples("vcr", "train")
    it = FeatureStoreSource(world["det"], opts, model_vocab_size=tok.vocab_size + 4).examples("vcr", "train")[0]
    assert it["rationale_choices"][2][-1] == tok.vocab_size + 3
    # through the config: model.config.vocab_size reaches the source and the model's embedding
    cfg = load_config("default_vqa", SMALL + [
        "data.source=uniter", f"data.path={world['det']}", f"model.config.vocab_size={tok.vocab_size + 10}",
        f"data.options={{txt_db: {path}, vocab: {opts['vocab']}, gt_img_db: {world['gt']}}}"])
    job = VLJob(cfg)
    assert job.model.backbone.embeddings.word_embeddings.num_embeddings == tok.vocab_size + 10
    assert len(job._task_data("vcr", "train").examples) == 2  # Q->A + QA->R


def test_vcr_train_evaluate_and_submission_with_uniter(world, tmp_path):
    o = world["opts"]
    cfg = load_config("default_vqa", SMALL + [
        "data.source=uniter", f"data.path={world['det']}", "optim.total_steps=2",
        f"data.options={{txt_db: {o['txt_db']}, val_txt_db: {o['val_txt_db']}, test_txt_db: {o['test_txt_db']}, "
        f"vocab: {o['vocab']}, gt_img_db: {o['gt_img_db']}}}"])
    job = VLJob(cfg)
    res = train(job, cfg, tmp_path / "run")
    assert math.isfinite(res.last_train["loss"])
    for k in ("accuracy", "q2a", "qa2r", "q2ar"):
        assert 0.0 <= res.last_eval[k] <= 1.0
    # the rows hold the gt + detected regions: 5 per row
    _, batch = next(iter(job._eval_batches("vcr", "val")))
    assert batch.visual_feats.shape[-2] == 5
    model = job.model.eval()
    path, metrics = job.write_predictions(model, "val", tmp_path / "pred")
    assert set(metrics) == {"accuracy", "q2a", "qa2r", "q2ar"}
    rows = list(csv.reader(path.open()))
    assert path.name == "vcr_val.csv" and len(rows) == 1 + 4 and rows[0][0] == "annot_id"
    assert [r[0] for r in rows[1:]] == list(world["ex"]["val"])
    # the test split: predictions, no metrics (a fresh job on the same source: VLJob caches
    # evaluation data per task, not per split)
    test_job = VLJob(cfg, source=job.source)
    r = test_job.predict(model, "test")
    assert r["metrics"] == {} and r["ids"] == list(world["ex"]["test"])
    assert r["answer_probs"].shape == (4, 4) and r["rationale_probs"].shape == (4, 4, 4)
    path, metrics = test_job.write_predictions(model, "test", tmp_path / "pred")
    assert metrics == {} and len(list(csv.reader(path.open()))) == 1 + 4


def test_bad_vcr_records_name_the_db_and_record(world, tmp_path):
    tok = world["tok"]
    ex = {"half": {**_vcr_example(tok, 0, True), "qar_target": -1}}
    opts = {**world["opts"], "txt_db": str(write_vcr_db(tmp_path / "half", ex))}
    with pytest.raises(ValueError, match=r"half.*'half'.*qa_target/qar_target.*both labels"):
        FeatureStoreSource(world["det"], opts).examples("vcr", "train")
    ex = {"gone": {**_vcr_example(tok, 0, True), "img_fname": ["g0", "d9"]}}
    opts = {**world["opts"], "txt_db": str(write_vcr_db(tmp_path / "gone", ex))}
    with pytest.raises(FeatureStoreError, match=r"data\.path.*'d9'"):
        FeatureStoreSource(world["det"], opts).examples("vcr", "train")
