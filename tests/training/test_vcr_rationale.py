"""The ``vcr`` fine-tuning task with VCR's rationales: training mixes Q->A and QA->R
samples (deterministic, the same with DataLoader workers and from a mid-epoch start),
evaluation reports q2a / qa2r / q2ar as computed by hand from the predictions, the
submission CSV's rationale columns are the head's softmax over the rationales given
each answer, and ``python -m vlfast.evaluate`` scores a vcr run."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from vlfast.data.collate import collate_mc
from vlfast.training.config import load_config
from vlfast.training.jobs import SyntheticSource, VLJob
from vlfast.training.loop import train

TINY = ["tasks={vcr: 1.0}", "optim.lr_multipliers={}", "device=cpu",
        "logging.progress=off", "logging.tensorboard=null", "logging.every=2",
        "data.options.n_images=60", "data.options.feat_dim=32", "data.batch_size=8", "data.eval_batch_size=32",
        "model.config.hidden_size=32", "model.config.num_hidden_layers=1", "model.config.intermediate_size=64",
        "model.config.num_attention_heads=2", "optim.total_steps=4", "eval.every=0", "checkpoint.every=2",
        "checkpoint.best_metric=accuracy"]


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(load_config("default_vqa", TINY).data.options)


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    """A 4-step vcr run: (job, its result, the run directory)."""
    cfg = load_config("default_vqa", TINY)
    torch.manual_seed(0)
    job = VLJob(cfg, source)
    d = tmp_path_factory.mktemp("vcr") / "run"
    res = train(job, cfg, d)
    return job, res, d


def _by_hand(items: list[dict], answer_probs: torch.Tensor, rationale_probs: torch.Tensor) -> dict[str, float]:
    """q2a, qa2r (the rationale given the right answer), q2ar (both right)."""
    a_ok = [int(answer_probs[n].argmax()) == e["label"] for n, e in enumerate(items)]
    r_ok = [int(rationale_probs[n, e["label"]].argmax()) == e["rationale_label"] for n, e in enumerate(items)]
    n = len(items)
    return {"q2a": sum(a_ok) / n, "qa2r": sum(r_ok) / n, "q2ar": sum(a and r for a, r in zip(a_ok, r_ok)) / n}


def test_eval_reports_q2a_qa2r_q2ar_as_by_hand(run, source):
    job, res, _ = run
    ev = res.last_eval
    assert math.isfinite(res.last_train["loss"])
    for k in ("accuracy", "q2a", "qa2r", "q2ar"):
        assert 0.0 <= ev[k] <= 1.0, ev
    assert ev["accuracy"] == ev["q2a"]
    assert ev["q2ar"] <= min(ev["q2a"], ev["qa2r"])
    items = source.examples("vcr", "val")
    pred = job.predict(job.model.eval(), "val")
    assert pred["ids"] == [e["id"] for e in items]
    ap, rp = pred["answer_probs"], pred["rationale_probs"]
    assert ap.shape == (len(items), 4) and rp.shape == (len(items), 4, 4)
    hand = _by_hand(items, ap, rp)
    for k in ("q2a", "qa2r", "q2ar"):
        assert pred["metrics"][k] == pytest.approx(hand[k], abs=1e-6), k  # (float32 means)
        assert ev[k] == pytest.approx(hand[k], abs=1e-6), k
    assert pred["predictions"] == ap.argmax(-1).tolist()
    # the Q->AR output: the rationale given the predicted answer
    assert pred["rationale_predictions"] == [int(rp[n, a].argmax()) for n, a in enumerate(pred["predictions"])]


def test_rationale_probs_are_the_head_given_each_answer(run, source):
    """rationale_probs[n, j] = softmax of the head over the rationale rows of the
    text "question [SEP] answer j [SEP]", scored here by hand for a few items."""
    job, _, _ = run
    model = job.model.eval()
    items = source.examples("vcr", "val")
    pred = job.predict(model, "val")
    sep = source.tokenizer.sep_id
    for n in (0, len(items) - 1):
        e = items[n]
        samples = [{"id": f"x{j}", "input_ids": e["input_ids"] + e["choices"][j] + [sep], "img_id": e["img_id"],
                    "choices": e["rationale_choices"], "label": e["rationale_label"]} for j in range(4)]
        with torch.no_grad():
            p = torch.softmax(model(collate_mc(samples, source.records, sep_id=sep, pad_id=job.pad_id)).logits, -1)
        torch.testing.assert_close(pred["rationale_probs"][n], p, atol=1e-5, rtol=1e-4)
        q = [{"id": "q", "input_ids": e["input_ids"], "img_id": e["img_id"], "choices": e["choices"],
              "label": e["label"]}]
        with torch.no_grad():
            pa = torch.softmax(model(collate_mc(q, source.records, sep_id=sep, pad_id=job.pad_id)).logits, -1)
        torch.testing.assert_close(pred["answer_probs"][n], pa[0], atol=1e-5, rtol=1e-4)


def _check_csv(path, items) -> None:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "annot_id" and len(rows[0]) == 21
    assert [r[0] for r in rows[1:]] == [e["id"] for e in items]
    # (a 4-step tiny model scores the 4 rows of a sample nearly alike: its probabilities
    # sit within ~1e-4 of 0.25, but they are its own, not the constant 0.25 of a file
    # without a rationale model, and they change with the answer they are given)
    off, by_answer = 0.0, 0.0
    for r in rows[1:]:
        vals = [float(x) for x in r[1:]]
        assert sum(vals[:4]) == pytest.approx(1.0, abs=1e-5)
        groups = [vals[4 + 4 * j:8 + 4 * j] for j in range(4)]  # rationale_conditioned_on_a{j}_0..3
        for g in groups:
            assert sum(g) == pytest.approx(1.0, abs=1e-5)
            off = max(off, max(abs(v - 0.25) for v in g))
        by_answer = max(by_answer, max(abs(a - b) for g in groups[1:] for a, b in zip(groups[0], g)))
    assert off > 1e-6 and by_answer > 1e-7, (off, by_answer)


def test_submission_rationale_columns_are_softmax_given_each_answer(run, source, tmp_path):
    job, res, _ = run
    path, metrics = job.write_predictions(job.model.eval(), "val", tmp_path / "pred")
    items = source.examples("vcr", "val")
    _check_csv(path, items)
    pred = job.predict(job.model.eval(), "val")
    with open(path) as f:
        row = list(csv.reader(f))[1]
    # answer_j and rationale_conditioned_on_a{j}_{i} are the predicted probabilities
    assert [float(x) for x in row[1:5]] == pytest.approx(pred["answer_probs"][0].tolist(), abs=1e-6)
    assert [float(x) for x in row[5:]] == pytest.approx(pred["rationale_probs"][0].flatten().tolist(), abs=1e-6)
    for k in ("accuracy", "q2a", "qa2r", "q2ar"):
        assert metrics[k] == pytest.approx(res.last_eval[k])


def test_python_m_evaluate_scores_a_vcr_run(run, source, capsys):
    from vlfast.evaluate import main

    _, res, d = run
    assert main(["--run-dir", str(d), "--checkpoint", "latest", "--out", str(d / "eval")]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("accuracy", "q2a", "qa2r", "q2ar"):
        assert out["metrics"][k] == pytest.approx(res.last_eval[k], abs=1e-6), k
    _check_csv(out["predictions"], source.examples("vcr", "val"))


def test_training_mixes_q2a_and_qa2r_samples(source):
    """Every train item gives one Q->A and one QA->R sample (the right answer as the
    text, the rationales as the choices), shuffled together; a QA->R row reads
    "[CLS] question [SEP] right answer [SEP] rationale [SEP]"."""
    job = VLJob(load_config("default_vqa", TINY), source)
    items = source.examples("vcr", "train")
    world = {e["annot_id"]: e for e in source.world.multiple_choice("train")}
    td = job._task_data("vcr", "train")
    assert len(td.examples) == 2 * len(items)
    assert sorted(s["id"] for s in td.examples) == sorted(
        [f"{e['id']}/q2a" for e in items] + [f"{e['id']}/qa2r/{e['label']}" for e in items])
    tok = source.tokenizer
    kinds_per_batch, seen_qa2r = [], 0
    for batch in job.train_batches("vcr", 0, 0):
        ids = batch.meta["ids"]
        kinds = {i.split("/")[1] for i in ids}
        kinds_per_batch.append(kinds)
        assert batch.targets["pair_index"].tolist() == [b for b in range(len(ids)) for _ in range(4)]
        for b, sid in enumerate(ids):
            item_id, kind = sid.split("/")[:2]
            w = world[item_id]
            if kind != "qa2r":
                continue
            seen_qa2r += 1
            assert int(batch.targets["mc_labels"][b]) == w["rationale_label"]
            for k in range(4):
                toks = batch.input_ids[4 * b + k][batch.attention_mask[4 * b + k]].tolist()
                seps = [i for i, t in enumerate(toks) if t == tok.sep_id]
                assert len(seps) == 3, toks
                words = lambda text: tok.encode(text)[1:-1]  # noqa: E731
                assert toks[1:seps[0]] == words(w["question"])
                assert toks[seps[0] + 1:seps[1]] == words(w["choices"][w["label"]])  # the right answer
                assert toks[seps[1] + 1:seps[2]] == words(w["rationale_choices"][k])
                assert tok.decode(toks[seps[0] + 1:seps[1]]) == w["choices"][w["label"]]
                tt = batch.token_type_ids[4 * b + k][: len(toks)].tolist()
                if job.model_name == "uniter":  # UNITER's VCR types: question 0, answer 2, rationale 3
                    assert tt == [0] * seps[0] + [2] * (seps[1] - seps[0]) + [3] * (len(toks) - seps[1])
                else:
                    assert tt == [0] * (seps[1] + 1) + [1] * (len(toks) - seps[1] - 1)
    assert seen_qa2r > 0
    assert any(k == {"q2a", "qa2r"} for k in kinds_per_batch)  # mixed within batches


def _same(a, b) -> None:
    import dataclasses

    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
    assert sorted(a.targets) == sorted(b.targets) and a.meta == b.meta
    for k in a.targets:
        assert torch.equal(a.targets[k], b.targets[k]), k


def test_vcr_batches_same_with_workers_and_from_mid_epoch(source):
    jobs = {w: VLJob(load_config("default_vqa", TINY + [f"data.num_workers={w}"]), source) for w in (0, 2)}
    b0 = list(jobs[0].train_batches("vcr", 1, 0))
    b2 = list(jobs[2].train_batches("vcr", 1, 0))
    assert len(b0) == len(b2) > 2
    for x, y in zip(b0, b2):
        _same(x, y)
    tail = list(jobs[2].train_batches("vcr", 1, 2))
    assert len(tail) == len(b0) - 2
    for x, y in zip(b0[2:], tail):
        _same(x, y)
    # another epoch, another order
    assert [x.meta["ids"] for x in b0] != [x.meta["ids"] for x in jobs[0].train_batches("vcr", 2, 0)]
