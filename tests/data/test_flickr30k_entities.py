"""Flickr30k Entities -> phrase-grounding text DB, on a tiny fake dataset written here.

Three train images (one absent from the feature store) and one val image: sentences
with multi-type phrases, an entity with two boxes, one box naming two entities, a
nobndbox, a scene, a notvisual and an unannotated entity, and a phrase no region
overlaps enough.  Positions, regions and counts are checked against hand computations;
the DB then drives the phrase_grounding job (VisualBERT and ViLBERT) for two steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vlfast.data.batch import ImageRecord
from vlfast.data.flickr30k_entities import (DROP_REASONS, EntityPhrase, build_grounding_txt_db, grounding_db_stats,
                                            main, parse_annotation, parse_sentence, parse_sentences_file)
from vlfast.data.readers import write_npz_folder, write_uniter_lmdb
from vlfast.data.textdb import TxtDb
from vlfast.data.tokenization import VLTokenizer, build_vocab

SENTENCES = {
    "1001": ["[/EN#18/people A child] in [/EN#19/clothing/other a pink sweater] is climbing [/EN#22/other a wall] .",
             "[/EN#20/bodyparts Her hands] touch [/EN#21/scene the sky] .",
             "[/EN#0/notvisual Nobody] sees [/EN#23/animals two dogs] and [/EN#24/animals/other a cat] .",
             "A child climbs .",
             "[/EN#18/people The little girl] is outside near [/EN#25/other a fence] ."],
    "1002": ["[/EN#5/people A man] sleeps on [/EN#6/other a bench] .",
             "[/EN#5/people The man] is tired ."],
    "1003": ["[/EN#1/people A woman] runs ."],
}
# (width, height), objects: (names, 1-based [xmin, ymin, xmax, ymax] or "nobox" / "scene")
ANNOTATIONS = {
    "1001": ((200, 100), [(["18"], [1, 1, 101, 51]), (["18"], [101, 51, 201, 101]), (["19"], [21, 11, 61, 91]),
                          (["20"], "nobox"), (["21"], "scene"), (["22"], [151, 1, 191, 21]),
                          (["23", "24"], [1, 61, 41, 101])]),
    "1002": ((300, 300), [(["5"], [31, 31, 151, 151]), (["6"], [181, 181, 271, 271])]),
    "1003": ((100, 100), [(["1"], [1, 1, 51, 51])]),
}
# feature-store regions, normalised xyxy (1003 is left out of the store)
REGIONS = {
    "1001": [[0, 0, .5, .5], [.5, .5, 1, 1], [0, 0, .5, .4], [.1, .1, .3, .8], [0, .6, .2, 1], [.3, .3, .7, .7]],
    "1002": [[.1, .1, .5, .5], [.6, .6, .9, .9], [.4, .4, .6, .6]],
}
SPLITS = {"train": ["1001", "1002", "1003"], "val": ["1002"]}
F = 8


def _xml(size, objects) -> str:
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
             "<depth>3</depth></size>"]
    for names, box in objects:
        obj = "".join(f"<name>{n}</name>" for n in names)
        if box == "nobox":
            obj += "<nobndbox>1</nobndbox><scene>0</scene>"
        elif box == "scene":
            obj += "<nobndbox>0</nobndbox><scene>1</scene>"
        else:
            obj += "<bndbox>" + "".join(f"<{c}>{v}</{c}>" for c, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) \
                   + "</bndbox>"
        parts.append(f"<object>{obj}</object>")
    return "\n".join(parts + ["</annotation>"])


def write_dataset(root: Path) -> Path:
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for img, lines in SENTENCES.items():
        (root / "Sentences" / f"{img}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for img, (size, objs) in ANNOTATIONS.items():
        (root / "Annotations" / f"{img}.xml").write_text(_xml(size, objs), encoding="utf-8")
    for split, ids in SPLITS.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def records(key_format: str = "{}", size_1002=(600, 600)) -> list[ImageRecord]:
    """1002's record says 600x600 (its XML: 300x300, the same aspect): normalised boxes agree."""
    rng = np.random.default_rng(0)
    out = []
    for img, boxes in REGIONS.items():
        n = len(boxes)
        size = size_1002 if img == "1002" else ANNOTATIONS[img][0]
        out.append(ImageRecord(key_format.format(img), rng.normal(size=(n, F)).astype(np.float32),
                               np.asarray(boxes, np.float32), conf=np.ones(n, np.float32), width=size[0],
                               height=size[1]))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("f30k")
    root = write_dataset(base / "flickr30k_entities")
    store = write_npz_folder(base / "feats", records())
    # the vocab lacks "sweater" (split into characters) and "climbing" ("climb" + "##ing")
    plain = [" ".join(parse_sentence(s)[0]) for lines in SENTENCES.values() for s in lines]
    vocab = build_vocab([t.replace("sweater", "").replace("climbing", "climb") for t in plain]) + ["##ing"]
    tok = VLTokenizer(vocab)
    tok.save(base / "tok")
    db = build_grounding_txt_db(root, str(store), tok, base / "train_db", "train")
    val = build_grounding_txt_db(root, str(store), tok, base / "val_db", "val")
    return {"base": base, "root": root, "store": store, "tok": tok, "db": db, "val": val}


# ----------------------------------------------------------------------------------
# Hand computations
# ----------------------------------------------------------------------------------

def hand_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hand_regions(img: str, entity: str, thr: float = 0.5) -> list[int]:
    (w, h), objs = ANNOTATIONS[img]
    gts = [[(b[0] - 1) / w, (b[1] - 1) / h, (b[2] - 1) / w, (b[3] - 1) / h]
           for names, b in objs if entity in names and isinstance(b, list)]
    return [r for r, box in enumerate(REGIONS[img]) if any(hand_iou(box, g) >= thr - 1e-9 for g in gts)]


def hand_position(tok: VLTokenizer, words: list[str], end: int) -> int:
    """[CLS] + the wordpieces of words[:end]: the index of the last one."""
    return sum(len(tok.tokenizer.encode(w, add_special_tokens=False).ids) for w in words[:end])


# ----------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------

def test_parse_sentence():
    words, phrases = parse_sentence(SENTENCES["1001"][0])
    assert words == ["A", "child", "in", "a", "pink", "sweater", "is", "climbing", "a", "wall", "."]
    assert phrases == [EntityPhrase("18", ("people",), 0, 2, "A child"),
                       EntityPhrase("19", ("clothing", "other"), 3, 6, "a pink sweater"),
                       EntityPhrase("22", ("other",), 8, 10, "a wall")]
    assert parse_sentence("A child climbs .") == (["A", "child", "climbs", "."], [])
    for bad, match in [("[/EN#7/people a man waves .", "not closed"),
                       ("[/EN#x/people a man] .", "phrase opening"),
                       ("[/EN#7 a man] .", "phrase opening"),
                       ("a man] waves .", "closes no phrase"),
                       ("[/EN#7/people Man] waves ]", "closes no phrase"),
                       ("[/EN#7/people a [/EN#8/other b] c] .", "inside the unclosed"),
                       ("[/EN#7/people] waves .", "no words"),
                       ("[/EN#7/people ] waves .", "no words")]:
        with pytest.raises(ValueError, match=match) as e:
            parse_sentence(bad, where="S/1.txt, line 2")
        assert "S/1.txt, line 2" in str(e.value)
    # a lone ']' closes the open phrase
    assert parse_sentence("[/EN#7/people Man ] waves") == (["Man", "waves"],
                                                           [EntityPhrase("7", ("people",), 0, 1, "Man")])


def test_parse_sentences_file_names_the_line(tmp_path):
    f = tmp_path / "42.txt"
    f.write_text("[/EN#1/people A man] runs .\n\n[/EN#2/people A dog barks .\n")
    with pytest.raises(ValueError, match=r"42\.txt, line 3: .*not closed"):
        parse_sentences_file(f)
    f.write_text("[/EN#1/people A man] runs .\r\n\r\nA dog .\r\n")
    assert [w for w, _ in parse_sentences_file(f)] == [["A", "man", "runs", "."], ["A", "dog", "."]]


def test_parse_annotation(world):
    ann = parse_annotation(world["root"] / "Annotations" / "1001.xml")
    assert (ann["width"], ann["height"]) == (200, 100)
    assert ann["boxes"]["18"] == [[0, 0, 100, 50], [100, 50, 200, 100]]  # two boxes, 0-based
    assert ann["boxes"]["23"] == ann["boxes"]["24"] == [[0, 60, 40, 100]]  # one box, two names
    assert ann["nobox"] == {"20"} and ann["scene"] == {"21"}
    assert set(ann["boxes"]) == {"18", "19", "22", "23", "24"}


@pytest.mark.parametrize("xml,match", [
    ("<annotation><size><width>10</width>", "not well-formed"),
    ("<annotation><object><name>1</name><nobndbox>1</nobndbox></object></annotation>", "<size>"),
    ("<annotation><size><width>10</width><height>0</height></size></annotation>", "positive"),
    ("<annotation><size><width>10</width><height>9</height></size><object><name>1</name><bndbox><xmin>1</xmin>"
     "<ymin>1</ymin><xmax>5</xmax></bndbox></object></annotation>", "ymax"),
    ("<annotation><size><width>10</width><height>9</height></size><object><name>1</name><bndbox><xmin>a</xmin>"
     "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>", "expected a number"),
    ("<annotation><size><width>10</width><height>9</height></size><object><name>1</name><bndbox><xmin>6</xmin>"
     "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>", "xmin <= xmax"),
    ("<annotation><size><width>10</width><height>9</height></size><object><nobndbox>1</nobndbox></object>"
     "</annotation>", "<name>"),
    ("<annotation><size><width>10</width><height>9</height></size><object><name>3</name></object>"
     "</annotation>", "neither"),
])
def test_parse_annotation_errors_name_the_file(tmp_path, xml, match):
    f = tmp_path / "77.xml"
    f.write_text(xml)
    with pytest.raises(ValueError, match=match) as e:
        parse_annotation(f)
    assert str(f) in str(e.value)


# ----------------------------------------------------------------------------------
# The converter
# ----------------------------------------------------------------------------------

def test_db_examples_by_hand(world):
    tok, db = world["tok"], TxtDb(world["db"])
    assert sorted(db.keys()) == ["1001_0", "1001_2", "1001_4", "1002_0", "1002_1"]
    assert db.txt2img["1001_0"] == "1001" and db.meta["CLS"] == tok.cls_id and db.meta["SEP"] == tok.sep_id
    kept_entities = {"1001_0": ["18", "19"], "1001_2": ["23", "24"], "1001_4": ["18"], "1002_0": ["5", "6"],
                     "1002_1": ["5"]}
    for sid in db.keys():
        img, k = sid.split("_")
        ex = db[sid]
        words, phrases = parse_sentence(SENTENCES[img][int(k)])
        assert ex["sentence"] == " ".join(words) and ex["sentence_id"] == sid and ex["img_fname"] == img
        assert list(ex["input_ids"]) == tok.encode(" ".join(words))[1:-1]  # no [CLS]/[SEP]
        assert ex["entity_ids"] == kept_entities[sid]
        by_entity = {p.entity_id: p for p in phrases}
        for ph in ex["phrases"]:
            src = by_entity[ph["entity_id"]]
            assert ph["text"] == src.text and ph["types"] == list(src.types)
            pos = ph["position"]
            assert pos == hand_position(tok, words, src.end)
            # the token at the position ([CLS] counted) is the last wordpiece of the phrase's last word
            last = tok.tokenizer.encode(words[src.end - 1], add_special_tokens=False).ids[-1]
            assert ([tok.cls_id] + list(ex["input_ids"]))[pos] == last
            assert ph["regions"] == hand_regions(img, ph["entity_id"])
    # the fixture exercises what it means to: two boxes, a multi-piece word, a box shared by two names
    ex = db["1001_0"]
    assert [p["regions"] for p in ex["phrases"]] == [[0, 1, 2], [3]]
    assert tok.convert_ids_to_tokens([ex["input_ids"][ex["phrases"][1]["position"] - 1]]) == ["##r"]  # sweater
    assert "##ing" in tok.convert_ids_to_tokens(ex["input_ids"])  # climb ##ing
    assert [p["regions"] for p in db["1001_2"]["phrases"]] == [[4], [4]]
    assert db["1001_0"]["phrases"][0]["gt_boxes"] == [[0, 0, .5, .5], [.5, .5, 1, 1]]


def test_stats(world):
    st = grounding_db_stats(world["db"])
    assert {k: st[k] for k in ("images_in_split", "images", "images_missing", "images_without_examples",
                               "images_size_mismatch")} == {"images_in_split": 3, "images": 2, "images_missing": 1,
                                                            "images_without_examples": 0,
                                                            "images_size_mismatch": 1}
    assert (st["sentences"], st["sentences_kept"], st["sentences_skipped"]) == (7, 5, 2)
    assert (st["phrases"], st["phrases_kept"]) == (13, 8)
    assert st["phrases_dropped"] == {**{r: 0 for r in DROP_REASONS}, "below_iou": 1, "nobox": 1, "scene": 1,
                                     "notvisual": 1, "unannotated": 1}
    db = TxtDb(world["db"])
    n_regions = sum(len(p["regions"]) for k in db.keys() for p in db[k]["phrases"])
    assert st["regions_per_phrase"] == pytest.approx(n_regions / 8)
    assert TxtDb(world["db"]).meta["stats"] == st
    assert grounding_db_stats(world["val"])["images"] == 1 and sorted(TxtDb(world["val"]).keys()) == ["1002_0",
                                                                                                       "1002_1"]


def test_threshold_truncation_and_uniter_store(world, tmp_path):
    tok, root = world["tok"], world["root"]
    strict = TxtDb(build_grounding_txt_db(root, str(world["store"]), tok, tmp_path / "strict", "train",
                                          iou_threshold=0.85))
    assert [p["regions"] for p in strict["1001_0"]["phrases"]] == [hand_regions("1001", "18", 0.85),
                                                                   hand_regions("1001", "19", 0.85)] == [[0, 1], [3]]
    # max_txt_len=6: 4 wordpieces survive; phrases whose last piece is past them are dropped
    full = TxtDb(world["db"])
    short_path = build_grounding_txt_db(root, str(world["store"]), tok, tmp_path / "short", "train", max_txt_len=6)
    short = TxtDb(short_path)
    cut = sum(p["position"] > 4 for k in full.keys() for p in full[k]["phrases"])
    assert grounding_db_stats(short_path)["phrases_dropped"]["truncated"] == cut > 0
    for k in short.keys():
        assert list(short[k]["input_ids"]) == list(full[k]["input_ids"])[:4]
        assert short[k]["phrases"] == [p for p in full[k]["phrases"] if p["position"] <= 4]
    assert set(short.keys()) == {k for k in full.keys() if any(p["position"] <= 4 for p in full[k]["phrases"])}
    # a UNITER store (normalised boxes, no image size) keyed by npz names: the same regions
    uni = write_uniter_lmdb(tmp_path / "uniter", records("flickr30k_{}.npz"), keep_all=True, fp16=False)
    u = TxtDb(build_grounding_txt_db(root, str(uni), tok, tmp_path / "u", "train", key_format="flickr30k_{}.npz"))
    assert u["1001_0"]["img_fname"] == "flickr30k_1001.npz"
    for k in full.keys():
        assert u[k]["phrases"] == full[k]["phrases"]
    assert grounding_db_stats(tmp_path / "u")["images_size_mismatch"] == 0


def test_converter_errors(world, tmp_path):
    tok, root, store = world["tok"], world["root"], str(world["store"])
    with pytest.raises(FileExistsError):
        build_grounding_txt_db(root, store, tok, world["db"], "train")
    with pytest.raises(ValueError, match="key_format") as e:
        build_grounding_txt_db(root, store, tok, tmp_path / "x", "train", key_format="img_{}")
    assert "img_1001" in str(e.value) and not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        build_grounding_txt_db(root, store, tok, tmp_path / "x", "test")
    with pytest.raises(ValueError, match="iou_threshold"):
        build_grounding_txt_db(root, store, tok, tmp_path / "x", "train", iou_threshold=0)
    bad = tmp_path / "bad"
    write_dataset(bad)
    (bad / "Sentences" / "1002.txt").write_text("[/EN#5/people A man sleeps .\n")
    with pytest.raises(ValueError, match=r"1002\.txt, line 1"):
        build_grounding_txt_db(bad, store, tok, tmp_path / "y", "train")
    (bad / "Sentences" / "1002.txt").write_text("\n".join(SENTENCES["1002"]) + "\n")
    (bad / "Annotations" / "1001.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match=r"1001\.xml: not well-formed"):
        build_grounding_txt_db(bad, store, tok, tmp_path / "y", "train")
    assert not (tmp_path / "y").exists()


def test_cli(world, tmp_path, capsys):
    args = ["--root", str(world["root"]), "--features", str(world["store"]), "--vocab",
            str(world["base"] / "tok" / "vocab.txt"), "--split", "train", "--out", str(tmp_path / "cli")]
    assert main(args + ["--source", "npz"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out"] == str(tmp_path / "cli") and out["phrases_kept"] == 8
    assert {k: TxtDb(tmp_path / "cli")[k] for k in TxtDb(world["db"]).keys()} == \
        {k: TxtDb(world["db"])[k] for k in TxtDb(world["db"]).keys()}
    assert main(args + ["--source", "uniter", "--overwrite"]) == 2
    assert "NpzFolderStore" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# The grounding job reads the DB
# ----------------------------------------------------------------------------------

TINY = ["device=cpu", "logging.progress=off", "logging.tensorboard=null", "logging.every=1", "checkpoint.every=0",
        "checkpoint.best_metric=null", "data.batch_size=2", "data.eval_batch_size=4", "optim.total_steps=2"]
VILBERT = ["model.name=vilbert", "model.config={hidden_size: 32, num_hidden_layers: 2, intermediate_size: 64, "
           "v_hidden_size: 32, v_num_hidden_layers: 1, v_intermediate_size: 64, bi_hidden_size: 32, "
           "v_biattention_id: [0], t_biattention_id: [1]}"]


@pytest.mark.parametrize("model", ["visualbert", "vilbert"])
def test_grounding_job_trains_on_the_db(world, tmp_path, model):
    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob
    from vlfast.training.loop import train

    cfg = load_config("tiny_grounding", TINY + (VILBERT if model == "vilbert" else []) + [
        "data.source=npz", f"data.path={world['store']}",
        f"data.options={{txt_db: {world['db']}, val_txt_db: {world['val']}, "
        f"vocab: {world['base'] / 'tok' / 'vocab.txt'}, grounding_iou: 0.5}}"])
    job = VLJob(cfg)
    res = train(job, cfg, tmp_path / "run")
    assert math.isfinite(res.last_train["loss"])
    assert 0.0 <= res.last_eval["accuracy"] <= 1.0
    r = job.predict(job.model.eval(), "val")
    val = TxtDb(world["val"])
    assert len(r["predictions"]) == sum(len(val[k]["phrases"]) for k in val.keys())
    assert r["metrics"]["accuracy"] == pytest.approx(res.last_eval["accuracy"])


@pytest.mark.parametrize("model", ["visualbert", "vilbert"])
def test_grounding_accuracy_uses_the_dataset_boxes(world, tmp_path, model):
    """With gt_boxes in the DB, a phrase is right when the predicted region's box has
    IoU >= 0.5 with any of its entity's boxes (the benchmark's metric), checked by hand."""
    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob

    cfg = load_config("tiny_grounding", TINY + (VILBERT if model == "vilbert" else []) + [
        "data.source=npz", f"data.path={world['store']}",
        f"data.options={{txt_db: {world['db']}, val_txt_db: {world['val']}, "
        f"vocab: {world['base'] / 'tok' / 'vocab.txt'}, grounding_iou: 0.5}}"])
    job = VLJob(cfg)
    r = job.predict(job.model.eval(), "val")
    val = TxtDb(world["val"])
    gts = {f"{k}#{i}": ph["gt_boxes"] for k in val.keys() for i, ph in enumerate(val[k]["phrases"])}
    hits = [max(hand_iou(box, g) for g in gts[i]) >= 0.5 for i, box in zip(r["ids"], r["boxes"])]
    assert r["metrics"]["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_phrases_past_the_text_cut_are_dropped_with_a_warning(world, tmp_path):
    from vlfast.training.jobs import FeatureStoreSource

    opts = {"txt_db": str(world["db"]), "val_txt_db": str(world["val"]),
            "vocab": str(world["base"] / "tok" / "vocab.txt")}
    full = FeatureStoreSource(str(world["store"]), opts).examples("phrase_grounding", "train")
    n_full = sum(len(e["phrases"]) for e in full)
    # the text DB keeps sentences of up to max_len wordpieces but [CLS]/[SEP] leave room for
    # max_len - 2: a kept sentence of max_len wordpieces loses its last two
    db = TxtDb(world["db"])
    # a sentence whose last phrase ends at one of its last two wordpieces, kept whole by the DB at L = its length
    L = max(n for k, n in db.id2len.items() if max(ph["position"] for ph in db[k]["phrases"]) > n - 2)
    src = FeatureStoreSource(str(world["store"]), opts, max_len=L)
    with pytest.warns(UserWarning, match=rf"phrase\(s\) lie past the first {L - 2} wordpieces"):
        short = src.examples("phrase_grounding", "train")
    for e in short:
        assert all(0 < ph["position"] < len(e["input_ids"]) - 1 for ph in e["phrases"]) and e["phrases"]
    assert sum(len(e["phrases"]) for e in short) < n_full


def test_grounding_submission_on_a_store_without_image_sizes_warns(world, tmp_path):
    """UNITER's layout keeps no image size: the submission's boxes stay normalised and a
    warning says so (instead of passing [0, 1] boxes off as pixels)."""
    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob

    tok, root = world["tok"], world["root"]
    uni = write_uniter_lmdb(tmp_path / "uniter", records(), keep_all=True, fp16=False)
    tr = build_grounding_txt_db(root, str(uni), tok, tmp_path / "tr", "train")
    va = build_grounding_txt_db(root, str(uni), tok, tmp_path / "va", "val")
    cfg = load_config("tiny_grounding", TINY + [
        "data.source=uniter", f"data.path={uni}",
        f"data.options={{txt_db: {tr}, val_txt_db: {va}, vocab: {world['base'] / 'tok' / 'vocab.txt'}}}"])
    job = VLJob(cfg)
    with pytest.warns(UserWarning, match="no image sizes.*normalised to \\[0, 1\\]"):
        path, _ = job.write_predictions(job.model.eval(), "val", tmp_path / "pred")
    rows = json.loads(path.read_text())
    boxes = [v for row in rows for v in row["box"]]  # [x, y, w, h]
    assert len(rows) > 0 and all(-1e-6 <= v <= 1 + 1e-6 for v in boxes)


def test_max_txt_len_option_sets_the_text_budget(world):
    from vlfast.training.jobs import FeatureStoreSource

    opts = {"txt_db": str(world["db"]), "val_txt_db": str(world["val"]),
            "vocab": str(world["base"] / "tok" / "vocab.txt")}
    L = max(TxtDb(world["db"]).id2len.values())
    a = FeatureStoreSource(str(world["store"]), {**opts, "max_txt_len": L + 2}).examples("phrase_grounding", "train")
    b = FeatureStoreSource(str(world["store"]), opts, max_len=L + 2).examples("phrase_grounding", "train")
    assert a == b and max(len(e["input_ids"]) for e in a) == L + 2
    with pytest.raises(ValueError, match="data.options.max_txt_len: expected an int >= 3"):
        FeatureStoreSource(str(world["store"]), {**opts, "max_txt_len": 2})
