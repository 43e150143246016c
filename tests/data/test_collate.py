"""Conditional masking (vlfast.data.masking) and the collators (vlfast.data.collate)."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch

from vlfast.data import masking
from vlfast.data.batch import ImageRecord, VLBatch
from vlfast.data.collate import (collate_mc, collate_nlvr2, collate_pretrain, collate_ref,
                                 collate_retrieval, collate_vqa, joint_packed_index, make_collator, pack_offsets,
                                 packed_index, vcr_samples, vqa_answer_score)
from vlfast.data.masking import box_iou, mask_regions, mask_regions_batch, mask_text, mask_text_batch

BACKENDS = ["numpy"] + (["numba"] if masking.HAVE_NUMBA else [])
CLS, SEP, MASK, PAD = 101, 102, 103, 0
SPECIALS = (PAD, CLS, SEP, MASK)
VOCAB = (1000, 31000)


def _within(count: int, n: int, p: float, z: float = 5.0) -> bool:
    """count ~ Binomial(n, p) within z standard deviations."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


# ----------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------

def _reference_mask_text(ids, seed, prob, lo, hi, mask_id, specials):
    """The rule written out token by token, from the documented draws."""
    g = np.random.default_rng(seed)
    u = g.random(len(ids))
    rnd = g.integers(lo, hi, size=len(ids), dtype=np.int64)
    out, lab = list(ids), [-100] * len(ids)
    for i, t in enumerate(ids):
        if t in specials or u[i] >= prob:
            continue
        lab[i] = t
        r = u[i] / prob
        out[i] = mask_id if r < 0.8 else (int(rnd[i]) if r < 0.9 else t)
    if all(x == -100 for x in lab):
        first = next(i for i, t in enumerate(ids) if t not in specials)
        out[first], lab[first] = mask_id, ids[first]
    return out, lab


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_text_matches_the_rule(backend):
    ids = [CLS, 5000, 6000, 7000, 8000, 9000, SEP, 2000, 2001, SEP]
    for seed in range(40):
        out, lab = mask_text(ids, np.random.default_rng(seed), VOCAB, MASK, SPECIALS, prob=0.3, backend=backend)
        ref_out, ref_lab = _reference_mask_text(ids, seed, 0.3, *VOCAB, MASK, SPECIALS)
        assert out.dtype == np.int64 and lab.dtype == np.int64
        assert out.tolist() == ref_out and lab.tolist() == ref_lab


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_text_rates(backend):
    # 200 samples x 200 words: 15% picked; of those 80% [MASK], 10% random, 10% kept
    rng = np.random.default_rng(0)
    seqs = [[CLS] + rng.integers(*VOCAB, size=200).tolist() + [SEP] for _ in range(200)]
    out = mask_text_batch(seqs, np.random.default_rng(1), VOCAB, MASK, SPECIALS, backend=backend)
    picked = n_mask = n_rand = n_keep = 0
    for s, (ids, lab) in zip(seqs, out):
        s = np.asarray(s)
        assert lab[0] == lab[-1] == -100 and ids[0] == CLS and ids[-1] == SEP   # specials never masked
        m = lab != -100
        assert np.array_equal(lab[m], s[m])                                       # labels = original ids
        assert np.array_equal(ids[~m], s[~m])                                     # the rest untouched
        picked += m.sum()
        n_mask += (ids[m] == MASK).sum()
        n_keep += (ids[m] == s[m]).sum()
        rnd = m & (ids != MASK) & (ids != s)
        n_rand += rnd.sum()
        assert np.all((ids[rnd] >= VOCAB[0]) & (ids[rnd] < VOCAB[1]))
    assert _within(picked, 200 * 200, 0.15)
    assert _within(n_mask, picked, 0.8) and _within(n_rand, picked, 0.1) and _within(n_keep, picked, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_text_at_least_one(backend):
    # UNITER's rule: nothing picked -> the first word becomes [MASK]
    ids = [CLS, 11_000, 12_000, SEP, 13_000, SEP]
    for seed in range(5):
        out, lab = mask_text(ids, np.random.default_rng(seed), VOCAB, MASK, SPECIALS, prob=1e-12, backend=backend)
        assert out.tolist() == [CLS, MASK, 12_000, SEP, 13_000, SEP]
        assert lab.tolist() == [-100, 11_000, -100, -100, -100, -100]
    # with the default rate every sample of a batch of short ones has >= 1 label
    seqs = [[CLS, 1500 + k, SEP] for k in range(300)]
    out = mask_text_batch(seqs, np.random.default_rng(0), VOCAB, MASK, SPECIALS, backend=backend)
    assert all((lab != -100).sum() == 1 and lab[1] == 1500 + k for k, (_, lab) in enumerate(out))


def test_mask_text_backends_agree_and_errors():
    rng = np.random.default_rng(3)
    seqs = [[CLS] + rng.integers(*VOCAB, size=rng.integers(1, 50)).tolist() + [SEP] for _ in range(64)]
    if masking.HAVE_NUMBA:
        a = mask_text_batch(seqs, np.random.default_rng(9), VOCAB, MASK, SPECIALS, backend="numba")
        b = mask_text_batch(seqs, np.random.default_rng(9), VOCAB, MASK, SPECIALS, backend="numpy")
        assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    for be in BACKENDS:
        with pytest.raises(ValueError, match="seqs\\[1\\]: no maskable token"):
            mask_text_batch([[CLS, 5000, SEP], [CLS, SEP]], np.random.default_rng(0), VOCAB, MASK, SPECIALS,
                            backend=be)
    with pytest.raises(TypeError, match="rng: expected a numpy.random.Generator"):
        mask_text([CLS, 5000, SEP], 0, VOCAB, MASK, SPECIALS)
    with pytest.raises(ValueError, match="vocab_range: expected 0 <= lo < hi"):
        mask_text([CLS, 5000, SEP], np.random.default_rng(0), (5, 5), MASK, SPECIALS)
    with pytest.raises(ValueError, match="backend: expected one of"):
        mask_text([CLS, 5000, SEP], np.random.default_rng(0), VOCAB, MASK, SPECIALS, backend="cuda")


# ----------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_regions_rate_and_at_least_one(backend):
    out = mask_regions_batch([40] * 500, np.random.default_rng(0), 0.15, backend=backend)
    total = sum(int(m.sum()) for m in out)
    # P(no pick) = 0.85^40 ~ 0.15%: the at-least-one rule adds ~0 on average
    assert _within(total, 500 * 40, 0.15) and all(m.dtype == bool and m.any() for m in out)
    # almost-zero rate: exactly one region, chosen uniformly (the documented second draw)
    counts = collections.Counter()
    for seed in range(2000):
        m = mask_regions(5, np.random.default_rng(seed), prob=1e-12, backend=backend)
        assert m.sum() == 1
        g = np.random.default_rng(seed)
        g.random(5)
        k = int(np.flatnonzero(m)[0])
        assert k == int(g.integers(0, [5])[0])
        counts[k] += 1
    assert all(_within(counts[k], 2000, 0.2) for k in range(5))


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [5, 5, 15, 15], [20, 20, 30, 30], [3, 3, 3, 3.0]])
    iou = box_iou(a)
    assert iou[0, 1] == pytest.approx(50 / 100)
    assert iou[0, 2] == pytest.approx(25 / 175)
    assert iou[0, 3] == 0 and iou[4, 4] == 0 and iou[0, 4] == 0       # empty box / empty union -> 0
    assert np.allclose(np.diag(iou)[:4], 1) and np.allclose(iou, iou.T)
    # vilbert-multi-task's pixel "+1" convention: [0,0,9,9] is 10x10
    p = box_iou(np.array([[0, 0, 9, 9], [0, 0, 9, 4.0]]), offset=1.0)
    assert p[0, 1] == pytest.approx(50 / 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vilbert_overlap_rule_by_hand(backend):
    # IoU with box 0: box 1 = 0.5 (> 0.4), box 2 = 0.4 exactly (not > 0.4),
    # box 3 = 0; box 1 vs 2: 40/50 = 0.8; box 3 overlaps nothing.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4], [20, 20, 30, 30]], dtype=np.float32)
    expected = {0: [0, 1], 1: [0, 1, 2], 2: [1, 2], 3: [3]}
    seen = set()
    for seed in range(60):
        m = mask_regions(4, np.random.default_rng(seed), prob=1e-12, boxes=boxes, iou_threshold=0.4,
                         backend=backend)
        g = np.random.default_rng(seed)
        g.random(4)
        k = int(g.integers(0, [4])[0])                    # the one picked region
        assert np.flatnonzero(m).tolist() == expected[k]
        seen.add(k)
    assert seen == {0, 1, 2, 3}
    # without a threshold: UNITER's rule only
    m = mask_regions(4, np.random.default_rng(0), prob=1e-12, boxes=boxes)
    assert m.sum() == 1


def test_overlap_backends_agree():
    assert masking.HAVE_NUMBA, "numba is a dependency of vlfast (install_requires)"
    rng = np.random.default_rng(0)
    nb = rng.integers(1, 60, size=64)
    boxes = []
    for n in nb:
        xy = rng.random((n, 2)) * 0.7
        boxes.append(np.concatenate([xy, xy + rng.random((n, 2)) * 0.3 + 0.01], 1))
    for seed in range(5):
        for off in (0.0, 1.0):
            a = mask_regions_batch(nb, np.random.default_rng(seed), 0.15, boxes, 0.4, off, backend="numba")
            b = mask_regions_batch(nb, np.random.default_rng(seed), 0.15, boxes, 0.4, off, backend="numpy")
            assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_mask_regions_errors():
    with pytest.raises(ValueError, match="num_boxes\\[1\\]: expected >= 1 regions, got 0"):
        mask_regions_batch([3, 0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="boxes: needed when iou_threshold is given"):
        mask_regions(3, np.random.default_rng(0), iou_threshold=0.4)
    with pytest.raises(ValueError, match="boxes\\[0\\]: expected shape \\(3, 4\\), got \\(2, 4\\)"):
        mask_regions(3, np.random.default_rng(0), boxes=np.zeros((2, 4)), iou_threshold=0.4)
    with pytest.raises(ValueError, match="prob: expected a probability in \\(0, 1\\]"):
        mask_regions(3, np.random.default_rng(0), prob=0.0)


# ----------------------------------------------------------------------------------
# A tiny hand-built world
# ----------------------------------------------------------------------------------

def _rec(img_id, n, F=4, C=3, w=640, h=480, soft=True):
    feats = (np.arange(n * F, dtype=np.float32).reshape(n, F) + 1) * (1 if img_id == "a" else -1)
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25], [0.6, 0.6, 0.9, 0.9]][:n], dtype=np.float32)
    sl = np.eye(C, dtype=np.float32)[np.arange(n) % C] if soft else None
    return ImageRecord(img_id, feats, boxes, conf=np.ones(n, np.float32), soft_labels=sl, width=w, height=h)


RECORDS = {"a": _rec("a", 3), "b": _rec("b", 2, w=100, h=50), "c": _rec("c", 1, w=10, h=20)}
S0 = {"input_ids": [CLS, 5001, 5002, SEP], "img_id": "a", "id": "q0"}
S1 = {"input_ids": [CLS, 5003, SEP], "img_id": "b", "id": "q1", "token_type_ids": [0, 1, 1]}
MLM = dict(mask_id=MASK, vocab_range=VOCAB, special_ids=SPECIALS)


def _check_common(batch: VLBatch, ids, types, img_ids, check_ids=True):
    B = len(ids)
    Lt = max(map(len, ids))
    exp_ids = torch.zeros(B, Lt, dtype=torch.long)
    exp_types = torch.zeros(B, Lt, dtype=torch.long)
    for b, (i, t) in enumerate(zip(ids, types)):
        exp_ids[b, :len(i)] = torch.tensor(i)
        exp_types[b, :len(t)] = torch.tensor(t)
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (B, Lt)
    assert not check_ids or torch.equal(batch.input_ids, exp_ids)
    assert torch.equal(batch.token_type_ids, exp_types)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.sum(1).tolist() == [len(i) for i in ids]
    recs = [RECORDS[i] for i in img_ids]
    Lv = max(r.num_boxes for r in recs)
    assert batch.visual_feats.shape == (B, Lv, 4) and batch.visual_feats.dtype == torch.float32
    assert batch.boxes.shape == (B, Lv, 4) and batch.visual_mask.dtype == torch.bool
    assert batch.visual_mask.sum(1).tolist() == [r.num_boxes for r in recs]
    assert batch.image_size.tolist() == [[r.width, r.height] for r in recs]
    for b, r in enumerate(recs):
        n = r.num_boxes
        assert torch.equal(batch.boxes[b, :n], torch.from_numpy(r.boxes))
        assert not batch.boxes[b, n:].any() and not batch.visual_feats[b, n:].any()
        assert torch.equal(batch.soft_labels[b, :n], torch.from_numpy(r.soft_labels))


def test_collate_mlm_hand_batch():
    batch = collate_pretrain([S0, S1], "mlm", RECORDS, rng=0, **MLM)
    _check_common(batch, [S0["input_ids"], S1["input_ids"]], [[0] * 4, [0, 1, 1]], ["a", "b"], check_ids=False)
    lab = batch.targets["mlm_labels"]
    assert set(batch.targets) == {"mlm_labels"} and lab.shape == (2, 4) and lab.dtype == torch.long
    orig = torch.tensor([[CLS, 5001, 5002, SEP], [CLS, 5003, SEP, PAD]])
    m = lab != -100
    assert torch.equal(lab[m], orig[m])
    assert not m[:, 0].any() and not m[0, 3] and not m[1, 2:].any()     # specials and padding
    assert m[1, 1]                                                      # the only word of S1
    assert torch.equal(batch.input_ids[~m], orig[~m])
    # regions are untouched under MLM (conditional masking)
    assert torch.equal(batch.visual_feats[0, :3], torch.from_numpy(RECORDS["a"].features))
    assert batch.meta == {"task": "mlm", "ids": ["q0", "q1"], "img_ids": ["a", "b"]}


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrc-kl", "mrm-vilbert"])
def test_collate_region_tasks_hand_batch(task):
    batch = collate_pretrain([S0, S1], task, RECORDS, rng=5)
    _check_common(batch, [S0["input_ids"], S1["input_ids"]], [[0] * 4, [0, 1, 1]], ["a", "b"])
    t = batch.targets
    assert set(t) == {"img_masks", "masked_feats", "masked_soft_labels"}
    im = t["img_masks"]
    assert im.dtype == torch.bool and im.shape == (2, 3)
    assert not im[1, 2] and im[0].any() and im[1].any()                 # real regions only, >= 1 each
    orig = torch.zeros(2, 3, 4)
    orig[0] = torch.from_numpy(RECORDS["a"].features)
    orig[1, :2] = torch.from_numpy(RECORDS["b"].features)
    soft = torch.zeros(2, 3, 3)
    soft[0] = torch.from_numpy(RECORDS["a"].soft_labels)
    soft[1, :2] = torch.from_numpy(RECORDS["b"].soft_labels)
    assert torch.equal(t["masked_feats"], orig[im])                      # img_masks.nonzero() order
    assert torch.equal(t["masked_soft_labels"], soft[im])
    assert not batch.visual_feats[im].any()                              # masked features zeroed
    assert torch.equal(batch.visual_feats[~im], orig[~im])               # the rest untouched
    assert batch.input_ids.tolist() == [[CLS, 5001, 5002, SEP], [CLS, 5003, SEP, PAD]]   # text untouched


def test_collate_mrm_vilbert_overlap():
    # image "a": box 0 [0,0,.5,.5] and box 1 [0,0,.5,.25] overlap by IoU 0.5; box 2 is apart
    for seed in range(30):
        batch = collate_pretrain([S0], "mrm-vilbert", RECORDS, rng=seed, mask_prob=1e-12)
        m = batch.targets["img_masks"][0].tolist()
        assert m in ([True, True, False], [False, False, True])
        batch = collate_pretrain([S0], "mrfr", RECORDS, rng=seed, mask_prob=1e-12)
        assert sum(batch.targets["img_masks"][0].tolist()) == 1


def test_collate_itm_negatives():
    recs = {**RECORDS, "d": _rec("d", 2)}
    samples = [dict(S0, id=f"s{k}", img_id="abcd"[k % 4]) for k in range(8)]
    for seed in range(50):
        batch = collate_pretrain(samples, "itm", recs, rng=seed, itm_neg_prob=1.0)
        assert batch.targets["itm_labels"].tolist() == [0] * 8
        assert all(n != p for n, p in zip(batch.meta["img_ids"], batch.meta["pos_img_ids"]))
        # the row shows the negative image's regions
        for b, i in enumerate(batch.meta["img_ids"]):
            n = recs[i].num_boxes
            assert torch.equal(batch.visual_feats[b, :n], torch.from_numpy(recs[i].features))
    batch = collate_pretrain(samples, "itm", recs, rng=0, itm_neg_prob=0.0)
    assert batch.targets["itm_labels"].tolist() == [1] * 8 and batch.meta["img_ids"] == list("abcdabcd")
    # the rate at 0.5, and negatives only from the given pool
    neg = 0
    for seed in range(100):
        batch = collate_pretrain(samples, "itm", recs, rng=seed, image_pool=["c", "d"])
        lab = batch.targets["itm_labels"]
        neg += int((lab == 0).sum())
        assert all(i in ("c", "d") for i, l in zip(batch.meta["img_ids"], lab.tolist()) if l == 0)
    assert _within(neg, 800, 0.5)
    with pytest.raises(ValueError, match="no image other than 'c'"):
        collate_pretrain([dict(S0, img_id="c")], "itm", recs, rng=0, itm_neg_prob=1.0, image_pool=["c"])


def test_collate_determinism():
    a = collate_pretrain([S0, S1], "mrfr", RECORDS, rng=7)
    b = collate_pretrain([S0, S1], "mrfr", RECORDS, rng=np.random.default_rng(7))
    assert torch.equal(a.targets["img_masks"], b.targets["img_masks"])
    c = make_collator("mlm", RECORDS, seed=3, **MLM)
    x, y = c([S0, S1]), c([S0, S1])
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets["mlm_labels"], y.targets["mlm_labels"])
    # a fresh collator (another worker, a resumed run) gives the same batch
    z = make_collator("mlm", RECORDS, seed=3, **MLM)([S0, S1])
    assert torch.equal(x.targets["mlm_labels"], z.targets["mlm_labels"])
    # the epoch and the seed change the draws
    samples = [dict(S0, id=k, input_ids=[CLS] + list(range(2000, 2030)) + [SEP]) for k in range(4)]
    base = c(samples).targets["mlm_labels"]
    c.set_epoch(1)
    assert not torch.equal(c(samples).targets["mlm_labels"], base)
    assert not torch.equal(make_collator("mlm", RECORDS, seed=4, **MLM)(samples).targets["mlm_labels"], base)
    # picklable (DataLoader workers)
    import pickle
    c2 = pickle.loads(pickle.dumps(c))
    assert torch.equal(c2(samples).targets["mlm_labels"], c(samples).targets["mlm_labels"])


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrm-vilbert", "itm"])
def test_collator_draws_per_sample(task):
    """A sample's masks / ITM negative come from (seed, epoch, its id) alone: the batch
    [s0..s5] equals [s0..s2] + [s3..s5] row by row (what makes 2 ranks x B equal 1
    process x 2B), and a per-sample draw is that sample's own generator's."""
    recs = {**RECORDS, "d": _rec("d", 3)}
    samples = [dict(S0, id=f"s{k}", img_id="abd"[k % 3], input_ids=[CLS] + list(range(2000 + k, 2012 + k)) + [SEP])
               for k in range(6)]
    opts = MLM if task == "mlm" else {}
    c = make_collator(task, recs, seed=11, **opts)
    whole, halves = c(samples), [c(samples[:3]), c(samples[3:])]
    if task == "mlm":
        key = "mlm_labels"
        got = torch.cat([torch.nn.functional.pad(h.targets[key], (0, whole.targets[key].shape[1] - h.targets[key].shape[1]),
                                                 value=-100) for h in halves])
        assert torch.equal(got, whole.targets[key])
        assert (whole.targets[key] != -100).any(1).all()
    elif task == "itm":
        assert whole.meta["img_ids"] == halves[0].meta["img_ids"] + halves[1].meta["img_ids"]
        assert whole.targets["itm_labels"].tolist() == sum((h.targets["itm_labels"].tolist() for h in halves), [])
    else:
        rows = [m for h in halves for m in h.targets["img_masks"]]
        got = [m[:recs[s["img_id"]].num_boxes].tolist() for s, m in zip(samples, rows)]
        assert got == [m[:recs[s["img_id"]].num_boxes].tolist() for s, m in zip(samples, whole.targets["img_masks"])]
    # the same sample alone, by hand from its own generator
    one = collate_pretrain(samples[4:5], task, recs, rng=[c.sample_rngs(samples[4:5])[0]], **opts)
    if task == "mlm":
        assert torch.equal(one.targets["mlm_labels"][0], whole.targets["mlm_labels"][4, :one.targets["mlm_labels"].shape[1]])
    with pytest.raises(ValueError, match=r"rng: expected one Generator per sample \(2\), got 1"):
        collate_pretrain(samples[:2], task, recs, rng=[np.random.default_rng(0)], **opts)
    with pytest.raises(TypeError, match=r"rng\[1\]: expected a numpy.random.Generator"):
        collate_pretrain(samples[:2], task, recs, rng=[np.random.default_rng(0), 3], **opts)


def test_collate_pretrain_errors():
    with pytest.raises(KeyError, match="image record 'zz': not found"):
        collate_pretrain([dict(S0, img_id="zz")], "mrfr", RECORDS, rng=0)
    with pytest.raises(ValueError, match="mask_id, vocab_range and special_ids are needed"):
        collate_pretrain([S0], "mlm", RECORDS, rng=0)
    with pytest.raises(ValueError, match="task: expected one of"):
        collate_pretrain([S0], "mlm2", RECORDS, rng=0)
    with pytest.raises(KeyError, match="samples\\[0\\]: missing field 'img_id'"):
        collate_pretrain([{"input_ids": [CLS, 5, SEP]}], "mrfr", RECORDS, rng=0)
    nosoft = {"a": _rec("a", 3, soft=False)}
    with pytest.raises(ValueError, match="image record 'a': soft_labels: needed by this task"):
        collate_pretrain([S0], "mrc-kl", nosoft, rng=0)
    assert "masked_soft_labels" not in collate_pretrain([S0], "mrfr", nosoft, rng=0).targets
    wide = {"a": RECORDS["a"], "b": ImageRecord("b", np.zeros((2, 5), np.float32), np.zeros((2, 4), np.float32))}
    with pytest.raises(ValueError, match="image record 'b': features: expected width 4"):
        collate_pretrain([S0, S1], "mrfr", wide, rng=0)
    with pytest.raises(ValueError, match="token_type_ids'\\]: expected 4 entries"):
        collate_pretrain([dict(S0, token_type_ids=[0])], "mrfr", RECORDS, rng=0)
    with pytest.raises(ValueError, match="unknown options \\['answer_map'\\]"):
        make_collator("mlm", RECORDS, answer_map={})


# ----------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------

def test_collate_vqa():
    amap = {"red": 0, "blue": 1, "two": 2, "3": 3}
    s0 = dict(S0, answers=["red"] * 3 + ["blue"] + ["green"] * 6)          # green: not in the map
    s1 = dict(S1, answers=["two"] * 4 + ["3"] * 2 + ["red"] * 4)
    batch = collate_vqa([s0, s1], RECORDS, amap)
    _check_common(batch, [S0["input_ids"], S1["input_ids"]], [[0] * 4, [0, 1, 1]], ["a", "b"])
    t = batch.targets["vqa_targets"]
    assert t.dtype == torch.float32
    assert torch.allclose(t, torch.tensor([[0.9, 0.3, 0, 0], [1.0, 0, 1.0, 0.6]]))
    assert [vqa_answer_score(c) for c in range(6)] == [0, 0.3, 0.6, 0.9, 1.0, 1.0]
    batch = collate_vqa([dict(S0, answer_scores={"blue": 0.6, "x": 1.0})], RECORDS, amap)
    assert torch.allclose(batch.targets["vqa_targets"], torch.tensor([[0, 0.6, 0, 0]]))
    # test split: no answers, no target
    assert "vqa_targets" not in collate_vqa([S0, S1], RECORDS, amap).targets
    with pytest.raises(ValueError, match="mixes samples with and without"):
        collate_vqa([s0, S1], RECORDS, amap)


def test_collate_nlvr2():
    s0 = {"input_ids": [CLS, 7001, SEP], "img_ids": ["a", "b"], "label": 1, "id": "n0"}
    s1 = {"input_ids": [CLS, 7002, 7003, SEP], "img_ids": ["c", "a"], "label": False, "id": "n1"}
    batch = collate_nlvr2([s0, s1], RECORDS)
    _check_common(batch, [s0["input_ids"]] * 2 + [s1["input_ids"]] * 2, [[0] * 3] * 2 + [[0] * 4] * 2,
                  ["a", "b", "c", "a"])
    assert batch.targets["pair_index"].tolist() == [0, 0, 1, 1]
    assert batch.targets["nlvr2_labels"].tolist() == [1, 0]
    assert batch.meta["ids"] == ["n0", "n1"] and batch.meta["img_ids"] == ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="expected two image ids"):
        collate_nlvr2([dict(s0, img_ids=["a"])], RECORDS)
    with pytest.raises(ValueError, match="label'\\]: expected an int in \\[0, 2\\), got 2"):
        collate_nlvr2([dict(s0, label=2)], RECORDS)


def test_collate_mc():
    s0 = {"input_ids": [CLS, 10, 11, SEP], "img_id": "a", "choices": [[20], [21, 22], [23]], "label": 2}
    s1 = {"input_ids": [CLS, 12, SEP], "img_id": "b", "choices": [[24, 25, 26], [27], [28]], "label": 0}
    batch = collate_mc([s0, s1], RECORDS, sep_id=SEP)
    rows = [[CLS, 10, 11, SEP, 20, SEP], [CLS, 10, 11, SEP, 21, 22, SEP], [CLS, 10, 11, SEP, 23, SEP],
            [CLS, 12, SEP, 24, 25, 26, SEP], [CLS, 12, SEP, 27, SEP], [CLS, 12, SEP, 28, SEP]]
    types = [[0] * 4 + [1] * 2, [0] * 4 + [1] * 3, [0] * 4 + [1] * 2, [0] * 3 + [1] * 4, [0] * 3 + [1] * 2,
             [0] * 3 + [1] * 2]
    _check_common(batch, rows, types, ["a"] * 3 + ["b"] * 3)
    assert batch.targets["pair_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.targets["mc_labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="expected 3 choices \\(as samples\\[0\\]\\), got 2"):
        collate_mc([s0, dict(s1, choices=[[1], [2]])], RECORDS)


def test_vcr_samples_q2a_and_qa2r():
    item = {"id": "v-0", "input_ids": [CLS, 10, 11, SEP], "img_id": "a", "choices": [[20], [21, 22], [23]],
            "label": 1, "rationale_choices": [[30, 31], [32], [33]], "rationale_label": 2}
    tr = vcr_samples([item], sep_id=SEP, mode="train")
    assert [s["id"] for s in tr] == ["v-0/q2a", "v-0/qa2r/1"]
    assert [s["vcr"] for s in tr] == ["q2a", "qa2r"] and [s["answer"] for s in tr] == [None, 1]
    assert tr[0]["input_ids"] == [CLS, 10, 11, SEP] and tr[0]["choices"] == item["choices"] and tr[0]["label"] == 1
    # QA->R: the right answer joins the question's segment; the rationales are the choices
    assert tr[1]["input_ids"] == [CLS, 10, 11, SEP, 21, 22, SEP]
    assert tr[1]["choices"] == item["rationale_choices"] and tr[1]["label"] == 2
    assert all(s["img_id"] == "a" and s["item"] == 0 and s["item_id"] == "v-0" for s in tr)
    batch = collate_mc(tr, RECORDS, sep_id=SEP)
    rows = [[CLS, 10, 11, SEP, 20, SEP], [CLS, 10, 11, SEP, 21, 22, SEP], [CLS, 10, 11, SEP, 23, SEP],
            [CLS, 10, 11, SEP, 21, 22, SEP, 30, 31, SEP], [CLS, 10, 11, SEP, 21, 22, SEP, 32, SEP],
            [CLS, 10, 11, SEP, 21, 22, SEP, 33, SEP]]
    types = [[0] * 4 + [1] * 2, [0] * 4 + [1] * 3, [0] * 4 + [1] * 2, [0] * 7 + [1] * 3, [0] * 7 + [1] * 2,
             [0] * 7 + [1] * 2]
    _check_common(batch, rows, types, ["a"] * 6)
    assert batch.targets["mc_labels"].tolist() == [1, 2]
    # evaluation: QA->R given every answer (the labels are the right rationale's throughout)
    ev = vcr_samples([item, dict(item, id="v-1", img_id="b")], sep_id=SEP, mode="eval")
    assert [s["id"] for s in ev] == ["v-0/q2a", "v-0/qa2r/0", "v-0/qa2r/1", "v-0/qa2r/2",
                                     "v-1/q2a", "v-1/qa2r/0", "v-1/qa2r/1", "v-1/qa2r/2"]
    assert [s["input_ids"][4:] for s in ev[1:4]] == [[20, SEP], [21, 22, SEP], [23, SEP]]
    assert [s["label"] for s in ev[1:4]] == [2, 2, 2] and ev[4]["item"] == 1
    # unlabelled items (a test split): evaluation samples without labels; training refuses
    bare = {k: v for k, v in item.items() if k not in ("label", "rationale_label")}
    assert all("label" not in s for s in vcr_samples([bare], sep_id=SEP, mode="eval"))
    with pytest.raises(ValueError, match="mode 'train' needs 'label' and 'rationale_label'"):
        vcr_samples([bare], sep_id=SEP, mode="train")
    with pytest.raises(ValueError, match="mode: expected one of \\('train', 'eval'\\), got 'test'"):
        vcr_samples([item], sep_id=SEP, mode="test")
    with pytest.raises(ValueError, match="sep_id: expected a token id"):
        vcr_samples([item], sep_id=None, mode="eval")
    with pytest.raises(KeyError, match="missing field 'rationale_choices'"):
        vcr_samples([{k: v for k, v in item.items() if k != "rationale_choices"}], sep_id=SEP, mode="eval")
    with pytest.raises(ValueError, match="expected K >= 2 answers and K rationales, got 3 answers and 2"):
        vcr_samples([dict(item, rationale_choices=[[30], [31]])], sep_id=SEP, mode="eval")
    with pytest.raises(ValueError, match="rationale_label'\\]: expected an int in \\[0, 3\\), got 3"):
        vcr_samples([dict(item, rationale_label=3)], sep_id=SEP, mode="train")


def test_collate_ref():
    batch = collate_ref([dict(S0, target_region=2), dict(S1, target_region=0)], RECORDS)
    _check_common(batch, [S0["input_ids"], S1["input_ids"]], [[0] * 4, [0, 1, 1]], ["a", "b"])
    assert batch.targets["ref_targets"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="target_region'\\]: expected a region index in \\[0, 2\\) \\(image 'b'\\)"):
        collate_ref([dict(S1, target_region=2)], RECORDS)


def test_collate_retrieval():
    # explicit negatives (hard negatives / evaluation) and a negative text
    s0 = dict(S0, neg_img_ids=["b", "c"], neg_input_ids=[[CLS, 9000, SEP]])
    batch = collate_retrieval([s0], RECORDS)
    _check_common(batch, [S0["input_ids"]] * 3 + [[CLS, 9000, SEP]], [[0] * 4] * 3 + [[0] * 3],
                  ["a", "b", "c", "a"])
    assert batch.targets["itm_labels"].tolist() == [1, 0, 0, 0]
    assert batch.targets["pair_index"].tolist() == [0, 0, 0, 0]
    # sampled negatives are never the positive
    for seed in range(30):
        batch = collate_retrieval([S0, S1], RECORDS, rng=seed, num_negatives=2)
        assert batch.targets["itm_labels"].tolist() == [1, 0, 0] * 2
        assert batch.targets["pair_index"].tolist() == [0, 0, 0, 1, 1, 1]
        ids = batch.meta["img_ids"]
        assert ids[0] == "a" and ids[3] == "b" and "a" not in ids[1:3] and "b" not in ids[4:6]
    with pytest.raises(ValueError, match="contains the positive image 'a'"):
        collate_retrieval([dict(S0, neg_img_ids=["a"])], RECORDS)


def test_collated_batch_runs_the_model():
    from vlfast.models import Uniter, UniterConfig
    F = 8
    recs = {k: ImageRecord(k, np.random.default_rng(i).standard_normal((n, F)).astype(np.float32),
                           RECORDS[k].boxes, soft_labels=RECORDS[k].soft_labels)
            for i, (k, n) in enumerate((("a", 3), ("b", 2)))}
    torch.manual_seed(0)
    model = Uniter(UniterConfig.small(img_dim=F, vocab_size=200, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).eval()
    s0 = {"input_ids": [1, 50, 51, 2], "img_id": "a"}
    s1 = {"input_ids": [1, 52, 2], "img_id": "b"}
    batch = collate_pretrain([s0, s1], "mrfr", recs, rng=0)
    with torch.no_grad():
        out = model(**batch.model_inputs(model))
        packed = model(**batch.model_inputs(model, padding_free=True))
    assert out.last_hidden_state.shape == (2, 4 + 3, 64)
    m = torch.cat([batch.attention_mask, batch.visual_mask], 1)
    assert torch.allclose(out.last_hidden_state[m], packed.last_hidden_state[m], atol=1e-5)


# ----------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_packing(backend):
    from vlfast.models.layers import Packed
    lens = [3, 1, 0, 4]
    assert pack_offsets(lens).dtype == torch.int32 and pack_offsets(lens).tolist() == [0, 3, 4, 4, 8]
    assert pack_offsets(torch.tensor([2, 2])).tolist() == [0, 2, 4]
    mask = torch.arange(5)[None, :] < torch.tensor(lens)[:, None]
    assert torch.equal(packed_index(lens, 5, backend=backend), Packed.from_mask(mask).index)
    assert packed_index([2, 1], 3, backend=backend).tolist() == [0, 1, 3]
    nb = [2, 3, 1, 1]
    vmask = torch.arange(3)[None, :] < torch.tensor(nb)[:, None]
    joint = torch.cat([mask, vmask], 1)
    assert torch.equal(joint_packed_index(lens, nb, 5, 3, backend=backend), Packed.from_mask(joint).index)
    # by hand: row 0 -> words 0..2 then regions at 5, 6; row 1 -> word 8, regions 13..15
    assert joint_packed_index([3, 1], [2, 3], 5, 3, backend=backend).tolist() == [0, 1, 2, 5, 6, 8, 13, 14, 15]
    with pytest.raises(ValueError, match="exceeds the padded width 2"):
        packed_index([3], 2, backend=backend)
    with pytest.raises(ValueError, match="lengths: expected lengths >= 0"):
        pack_offsets([1, -1])


def test_vcr_samples_uniter_token_types():
    """UNITER's VCR types (its data/vcr.py): [CLS] and the question 0, the answer 2, the
    rationale 3, each separator typed with the segment it opens."""
    item = {"id": "v-0", "input_ids": [CLS, 10, 11, SEP], "img_id": "a", "choices": [[20], [21, 22], [23]],
            "label": 1, "rationale_choices": [[30, 31], [32], [33]], "rationale_label": 2}
    tr = vcr_samples([item], sep_id=SEP, mode="train", type_ids="uniter")
    batch = collate_mc(tr, RECORDS, sep_id=SEP)
    rows = [[CLS, 10, 11, SEP, 20, SEP], [CLS, 10, 11, SEP, 21, 22, SEP], [CLS, 10, 11, SEP, 23, SEP],
            [CLS, 10, 11, SEP, 21, 22, SEP, 30, 31, SEP], [CLS, 10, 11, SEP, 21, 22, SEP, 32, SEP],
            [CLS, 10, 11, SEP, 21, 22, SEP, 33, SEP]]
    types = [[0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2, 2], [0, 0, 0, 2, 2, 2],
             [0, 0, 0, 2, 2, 2, 3, 3, 3, 3], [0, 0, 0, 2, 2, 2, 3, 3, 3], [0, 0, 0, 2, 2, 2, 3, 3, 3]]
    _check_common(batch, rows, types, ["a"] * 6)
    ev = vcr_samples([item], sep_id=SEP, mode="eval", type_ids="uniter")
    assert ev[1]["token_type_ids"] == [0, 0, 0, 2, 2, 3] and ev[1]["choice_type_id"] == 3
    with pytest.raises(ValueError, match="type_ids: expected one of \\('bert', 'uniter'\\), got 'vl'"):
        vcr_samples([item], sep_id=SEP, mode="eval", type_ids="vl")
    with pytest.raises(ValueError, match="choice_type_id'\\]: expected a token type"):
        collate_mc([dict(tr[0], choice_type_id=-1)], RECORDS)
