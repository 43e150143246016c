"""Metrics (vlfast.training.metrics) on hand-made examples, and the submission writers
(vlfast.training.submission): exact file contents, atomic replacement."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from vlfast.training import metrics as M
from vlfast.training import submission as S

# ----------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------


def test_vqa_answer_score_is_leave_one_out_average():
    # c of 10 humans: (c * min(1, (c-1)/3) + (10-c) * min(1, c/3)) / 10
    assert [round(M.vqa_answer_score(c), 10) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert M.vqa_answer_score(10) == 1.0
    # 3 of 3 humans: each sees 2 others -> 2/3
    assert M.vqa_answer_score(3, 3) == pytest.approx(2 / 3)


def test_vqa_accuracy_known_counts():
    gt = ["yes"] * 2 + ["no"] * 8
    # yes-annotators see 1 other "yes" (1/3), no-annotators see 2 (2/3): (2/3 + 16/3) / 10
    assert M.vqa_accuracy("yes", gt) == pytest.approx(0.6)
    assert M.vqa_accuracy("no", gt) == pytest.approx(1.0)
    assert M.vqa_accuracy("maybe", gt) == 0.0
    gt = ["2"] * 3 + ["3"] * 7
    assert M.vqa_accuracy("two", gt) == pytest.approx(0.9)          # normalised: annotators disagree
    assert M.vqa_accuracy("Two.", gt) == pytest.approx(0.9)
    assert M.vqa_accuracy("the 3", gt) == pytest.approx(1.0)
    # all 10 agree: the official script compares without normalisation
    assert M.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert M.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_normalize_vqa_answer():
    assert M.normalize_vqa_answer("A Dog!") == "dog"
    assert M.normalize_vqa_answer("1,000") == "1000"
    assert M.normalize_vqa_answer("3.5") == "3.5"
    assert M.normalize_vqa_answer("3.") == "3"
    assert M.normalize_vqa_answer("yes.") == "yes"
    assert M.normalize_vqa_answer("black/white") == "black white"
    assert M.normalize_vqa_answer("none") == "0"


def test_normalize_vqa_answer_contractions():
    # the official processDigitArticle: word by word, after number words / articles
    assert M.normalize_vqa_answer("dont") == "don't"
    assert M.normalize_vqa_answer("Isnt it?") == "isn't it"          # "?" -> space, lower-cased, then the table
    assert M.normalize_vqa_answer("whats") == "what's"
    assert M.normalize_vqa_answer("youll") == "you'll"
    assert M.normalize_vqa_answer("i dont have two dogs") == "i don't have 2 dogs"
    assert M.normalize_vqa_answer("The dog doesnt have a ball") == "dog doesn't have ball"
    assert M.normalize_vqa_answer("Don't") == "don't"                 # already contracted: unchanged
    # only whole words, and only what the table holds: "ill" is not in it, "Im" (capitalised key) never matches
    assert M.normalize_vqa_answer("ill") == "ill"
    assert M.normalize_vqa_answer("Im") == "im"
    assert M.normalize_vqa_answer("dontcare") == "dontcare"
    assert M.normalize_vqa_answer("somebody'd") == "somebodyd"       # the official table's own (reversed) entry


def test_contraction_table_is_the_official_one():
    import hashlib

    table = M._CONTRACTIONS
    assert len(table) == 120                                          # the official vqaEval.py count
    # pinned content: sha256 of the sorted (key, value) pairs of the official table
    digest = hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest()
    assert digest == "3e5960526f62912d3b70896069c43c13d7c21be38d50ca28efbb9095b499454f"
    assert {k: table[k] for k in ("aint", "couldn'tve", "couldnt've", "hadnt've", "let's", "oclock", "twas",
                                  "'ows'at", "y'all'dve", "youve")} == {
        "aint": "ain't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've",
        "let's": "let's", "oclock": "o'clock", "twas": "'twas", "'ows'at": "'ow's'at", "y'all'dve": "y'all'd've",
        "youve": "you've"}
    capitalised = {"Id've", "I'dve", "Im", "Ive"}
    assert {k for k in table if k != k.lower()} == capitalised
    for key, value in table.items():
        # every lower-case key maps to its value through the whole normalisation; the capitalised
        # keys are dead in the official script too (words are lower-cased before the look-up)
        assert M.normalize_vqa_answer(key) == (key.lower() if key in capitalised else value), key


def test_period_strip_count_quirk():
    # official periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is the count -> at most 32 periods go
    assert M.normalize_vqa_answer("x." * 40) == "x" * 32 + "x." * 8


def test_vqa_accuracy_credits_contractions():
    gt = ["don't"] * 2 + ["dont"] + ["no"] * 7
    # normalised (annotators disagree): 3 x "don't", 7 x "no".  A "don't" annotator sees 2 others
    # (2/3), a "no" annotator sees 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert M.vqa_accuracy("dont", gt) == pytest.approx(0.9)
    assert M.vqa_accuracy("don't", gt) == pytest.approx(0.9)
    assert M.vqa_accuracy("Dont.", gt) == pytest.approx(0.9)
    # 4 of 10 after normalisation: every annotator sees >= 3 others -> 1.0
    assert M.vqa_accuracy("whats", ["what's"] * 2 + ["whats"] * 2 + ["x"] * 6) == pytest.approx(1.0)
    # all 10 agree: no normalisation in the official script, so "dont" gets nothing
    assert M.vqa_accuracy("dont", ["don't"] * 10) == 0.0
    # soft targets: "dont" and "don't" are one answer (4 of 10 -> 1.0)
    t = M.vqa_targets(["dont"] * 2 + ["don't"] * 2 + ["no"] * 6, {"don't": 0, "no": 1, "dont": 2})
    torch.testing.assert_close(t, torch.tensor([1.0, 1.0, 0.0]))


def test_vqa_score_and_targets():
    gts = {1: ["yes"] * 10, 2: ["red"] * 4 + ["blue"] * 6, 3: ["2"] * 1 + ["4"] * 9}
    preds = {1: "yes", 2: "red", 3: "2"}
    assert M.vqa_score(preds, gts) == pytest.approx((1.0 + 1.0 + 0.3) / 3)
    with pytest.raises(ValueError, match="missing"):
        M.vqa_score({1: "yes"}, gts)
    a2l = {"red": 0, "blue": 1, "green": 2}
    t = M.vqa_targets(["Red"] * 2 + ["blue"] * 7 + ["pink"], a2l)
    torch.testing.assert_close(t, torch.tensor([0.6, 1.0, 0.0]))
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.9, 0.3], [0.3, 1.0, 0.0]])
    torch.testing.assert_close(M.vqa_soft_score(logits, targets), torch.tensor([0.9, 0.3]))


# ----------------------------------------------------------------------------------
# Accuracy, NLVR2, VCR, boxes
# ----------------------------------------------------------------------------------

def test_accuracy_consistency_vcr():
    assert M.accuracy(torch.tensor([1, 0, 1, 1]), [1, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="shape"):
        M.accuracy([1, 0], [1, 0, 1])
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-2-0-1", "dev-2-3-1", "dev-3-0-0"]
    # statements: dev-1-?-0 (both right), dev-2-?-1 (one wrong), dev-3-?-0 (right)
    assert M.nlvr2_consistency(ids, [True, True, True, False, True]) == pytest.approx(2 / 3)
    r = M.vcr_accuracy([0, 1, 2, 3], [0, 1, 0, 3], [1, 1, 1, 1], [1, 0, 1, 1])
    assert r == {"q2a": 0.75, "qa2r": 0.75, "q2ar": 0.5}


def test_box_iou_and_thresholds():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    torch.testing.assert_close(M.box_iou(a, b), torch.tensor([1 / 7, 0.5, 0.0]))
    # exactly 0.5: RefCOCO counts IoU > 0.5, grounding IoU >= 0.5
    assert M.refcoco_accuracy(a[1:2], b[1:2]) == 0.0
    assert M.grounding_accuracy(a[1:2], b[1:2]) == 1.0
    assert M.refcoco_accuracy(a, a) == 1.0
    pred = torch.stack([a, b])                     # (2, 3, 4) phrases
    gold = torch.stack([a, a])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: 2 real phrases, both hit; row 1: IoUs 1/7, 0.5, 0 -> 1 hit; 3 of 5
    assert M.grounding_accuracy(pred, gold, valid=valid) == pytest.approx(3 / 5)


def test_retrieval_recall_known_matrix():
    s = torch.tensor([[0.9, 0.1, 0.5],
                      [0.2, 0.8, 0.3],
                      [0.4, 0.6, 0.7],
                      [0.1, 0.3, 0.2]])
    txt2img = [0, 0, 1, 2]
    r = M.retrieval_recall(s, txt2img, ks=(1, 2, 3))
    # text -> image ranks: 0, 2, 1, 1
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == (0.25, 0.75, 1.0)
    # image -> text best ranks: img0 0 (t0), img1 1 (t2 below t1), img2 3 (t3 last)
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == pytest.approx(2 / 3)
    assert r["r_mean"] == pytest.approx(((0.25 + 0.75 + 1.0) / 3 + (1 / 3 + 2 / 3 + 2 / 3) / 3) / 2)
    with pytest.raises(ValueError, match="txt2img"):
        M.retrieval_recall(s, [0, 0, 1, 3])


# ----------------------------------------------------------------------------------
# Submission files
# ----------------------------------------------------------------------------------

def test_vqa_and_nlvr2_files(tmp_path):
    p = S.write_vqa_submission(tmp_path / "a" / "vqa.json", [5, 7], ["yes", "2"])
    assert json.loads(p.read_text()) == [{"question_id": 5, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    with pytest.raises(ValueError, match="distinct"):
        S.write_vqa_submission(tmp_path / "b.json", [5, 5], ["yes", "no"])
    p = S.write_nlvr2_predictions(tmp_path / "nlvr2.csv", ["dev-1-0-0", "dev-1-1-0", "dev-2-0-1"],
                                  [True, 0, "true"])
    assert p.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\ndev-2-0-1,True\n"


def test_vcr_file(tmp_path):
    ans = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    rat = torch.arange(32, dtype=torch.float64).view(2, 4, 4) / 32
    p = S.write_vcr_submission(tmp_path / "vcr.csv", ["test-0", "test-1"], ans, rat)
    rows = list(csv.reader(p.read_text().splitlines()))
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3",
                           "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3" and len(rows[0]) == 21
    assert rows[1][0] == "test-0" and [float(x) for x in rows[1][1:5]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # row 2: rationale given answer a, choice i = rat[1, a, i]
    assert [float(x) for x in rows[2][5:]] == pytest.approx(rat[1].flatten().tolist())
    with pytest.raises(ValueError, match="probabilities"):
        S.write_vcr_submission(tmp_path / "v2.csv", ["test-0"], [[2.0, 0, 0, 0]], torch.zeros(1, 4, 4))


def test_refcoco_and_retrieval_files(tmp_path):
    p = S.write_refcoco_predictions(tmp_path / "re.json", [3, "7"], torch.tensor([[10.0, 20.0, 50.0, 80.0],
                                                                                   [0.0, 0.0, 1.5, 2.5]]))
    assert json.loads(p.read_text()) == [{"ref_id": 3, "box": [10.0, 20.0, 40.0, 60.0]},
                                         {"ref_id": "7", "box": [0.0, 0.0, 1.5, 2.5]}]
    s = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    p = S.write_retrieval_rankings(tmp_path / "ret.json", s, ["t0", "t1"], [100, 200, 300], k=2)
    assert json.loads(p.read_text()) == {"text_to_image": {"t0": [100, 300], "t1": [200, 300]},
                                         "image_to_text": {"100": ["t1", "t0"][::-1], "200": ["t1", "t0"],
                                                           "300": ["t0", "t1"]}}


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "out.json"
    S.write_vqa_submission(target, [1], ["yes"])
    before = target.read_text()
    with pytest.raises(ValueError):                        # bad input: nothing written
        S.write_vqa_submission(target, [1, 2], ["yes"])
    with pytest.raises(TypeError):                         # failure inside the write
        S.atomic_write_text(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]
