"""The jobs, the default run (shortened), python -m vlfast.train / vlfast.evaluate, and
training on real-format feature stores."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfast.training.config import load_config
from vlfast.training.jobs import SyntheticSource, VLJob
from vlfast.training.loop import train

SMALL = ["data.options.n_images=120", "data.batch_size=8", "data.eval_batch_size=32", "logging.every=2",
         "logging.progress=off", "checkpoint.every=0", "device=cpu", "logging.tensorboard=null",
         "model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.intermediate_size=128",
         "optim.lr_multipliers={}"]  # default_vqa's head multiplier names vqa_output; other tasks switch it off


@pytest.fixture(scope="module")
def source():
    cfg = load_config("default_pretrain", SMALL)
    return SyntheticSource(cfg.data.options)


def test_default_run_quick_losses_fall(tmp_path):
    """The shortened default (what CI runs): under a fixed seed the MLM loss of
    pretraining stage 2 and both VQA losses fall (stage 1's 40 ITM steps stay near
    chance), with the scratch run in its own process (its output in
    vqa_scratch/output.log)."""
    from vlfast.training.default import run_default

    res = run_default(tmp_path / "run", quick=True, seed=0,
                      overrides=("logging.progress=off", "logging.tensorboard=null", "device=cpu"), verbose=False)
    # 40 ITM steps stay at chance (the loss is ITM's cross-entropy plus the small WRA term)
    assert abs(res["itm_last_loss"] - math.log(2)) < 0.05 and abs(res["itm_first_loss"] - math.log(2)) < 0.05
    assert res["pretrain_last_loss"] < res["pretrain_first_loss"]
    assert res["vqa_pretrained_last_loss"] < res["vqa_pretrained_first_loss"]
    assert res["vqa_scratch_last_loss"] < res["vqa_scratch_first_loss"]
    assert 0.0 <= res["vqa_scratch"] <= 1.0 and 0.0 <= res["vqa_pretrained"] <= 1.0
    assert res["margin"] == pytest.approx(res["vqa_pretrained"] - res["vqa_scratch"])
    for d in ("pretrain_itm", "pretrain", "vqa_pretrained", "vqa_scratch"):
        assert (tmp_path / "run" / d / "config.yaml").is_file()
    assert "step 30/30" in (tmp_path / "run" / "vqa_scratch" / "output.log").read_text()
    # stage 2 starts from stage 1's weights: its config records the ITM-only stage before it
    assert load_config(str(tmp_path / "run" / "pretrain_itm" / "config.yaml")).tasks == {"itm": 1.0}


def test_default_run_scratch_in_a_process_equals_sequential(tmp_path):
    """The scratch fine-tuning gives the same numbers in the worker process as in this
    one (both on one thread here, so the arithmetic is the same)."""
    from vlfast.training.default import _finetune_scratch

    cfg = load_config("default_vqa", SMALL + ["optim.total_steps=6", "eval.every=0", "checkpoint.best_metric=null",
                                               "data.options.max_train_examples=64"])
    import multiprocessing as mp

    prev = torch.get_num_threads()
    try:
        here = _finetune_scratch(cfg, tmp_path / "here", 1, None)
    finally:
        torch.set_num_threads(prev)
    with mp.get_context("spawn").Pool(1) as pool:
        there = pool.apply(_finetune_scratch, (cfg, tmp_path / "there", 1, tmp_path / "there" / "output.log"))
    assert there.step == here.step == 6
    assert there.last_train["loss"] == pytest.approx(here.last_train["loss"], abs=1e-6)
    assert there.last_eval["vqa_score"] == pytest.approx(here.last_eval["vqa_score"], abs=1e-9)


@pytest.mark.parametrize("task", ["nlvr2", "vcr", "refcoco", "vqa"])
def test_finetune_tasks_train_and_write_predictions(task, source, tmp_path):
    cfg = load_config("default_vqa", SMALL + [f"tasks={{{task}: 1.0}}", "optim.total_steps=4", "eval.every=0",
                                               "checkpoint.best_metric=null"])
    job = VLJob(cfg, source)
    res = train(job, cfg, tmp_path / task)
    assert math.isfinite(res.last_train["loss"])
    metric = "vqa_score" if task == "vqa" else "accuracy"
    assert 0.0 <= res.last_eval[metric] <= 1.0
    path, metrics = job.write_predictions(job.model.eval(), "val", tmp_path / "pred")
    n = len(source.examples(task, "val"))
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        assert len(rows) == n
    else:
        with open(path) as f:
            rows = list(csv.reader(f))
        assert len(rows) in (n, n + 1)  # VCR's CSV has a header
    assert metrics[metric] == pytest.approx(res.last_eval[metric])


def test_pretraining_tasks_of_each_model(source, tmp_path):
    for name, tasks in (("visualbert", "{mlm: 1.0, sip: 1.0}"), ("vilbert", "{mlm: 1.0, masked_multimodal: 1.0, alignment: 1.0}"),
                        ("vlbert", "{mlm: 1.0, masked_roi: 1.0}")):
        ov = [o for o in SMALL if not o.startswith("model.config")]
        # model.config={}: the model's own small size (the default config's sizes are UNITER's)
        cfg = load_config("default_pretrain", ov + [f"model.name={name}", f"tasks={tasks}", "optim.total_steps=3",
                                                    "model.config={}"])
        job = VLJob(cfg, source)
        res = train(job, cfg, tmp_path / name)
        assert math.isfinite(res.last_train["loss"]), name
        assert all(math.isfinite(v) for v in res.last_eval.values()), name


def test_cli_config_run_resume_and_evaluate(tmp_path):
    run = tmp_path / "vqa"
    base = [sys.executable, "-P", "-m", "vlfast.train", "--config", "default_vqa", "--run-dir", str(run)] + SMALL
    p = subprocess.run(base + ["optim.total_steps=4", "checkpoint.every=2", "eval.every=0"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(base + ["optim.total_steps=6", "checkpoint.every=2", "eval.every=0", "--resume"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "done: step 6" in p.stdout
    p = subprocess.run([sys.executable, "-P", "-m", "vlfast.evaluate", "--run-dir", str(run)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert 0.0 <= out["metrics"]["vqa_score"] <= 1.0
    sub = json.loads(Path(out["predictions"]).read_text())
    assert {"question_id", "answer"} <= set(sub[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UNITER_MIX = "tasks={itm: 2.0, mlm: 1.0, mrfr: 1.0, mrc: 1.0, mrc-kl: 1.0}"


def test_torchrun_two_processes_equal_one_process_at_twice_the_batch(tmp_path, source):
    """2 gloo ranks x batch 4 on the full UNITER mix (ITM with WRA, MLM, MRFR, MRC,
    MRC-kl), logging every step, = 1 process x batch 8: the same samples per step, the
    same masks and ITM negatives (drawn per sample), each objective's mean taken over
    both ranks' masked words / regions; parameters within 1e-5 at step 20 (dropout is
    0 in this config).  Also: every rank all-reduces the same metrics whatever its
    batch holds (WRA's ot_pos/ot_neg exist only on batches with positives/negatives;
    this used to abort gloo at step 2)."""
    run = tmp_path / "ddp"
    common = SMALL + ["optim.total_steps=30", "logging.every=1", "eval.at_end=false", "checkpoint.every=20",
                      "checkpoint.keep_last=2", UNITER_MIX]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")  # children must import the installed vlfast
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "vlfast.train", "--config", "default_pretrain", "--run-dir", str(run)] + \
        common + ["data.batch_size=4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout + p.stderr
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("kind") == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) for r in train_recs)
    assert {k for r in train_recs for k in r if k.startswith("loss/")} == {
        "loss/itm", "loss/mlm", "loss/mrfr", "loss/mrc", "loss/mrc-kl"}

    cfg = load_config("default_pretrain", common + ["data.batch_size=8"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(VLJob(cfg, source), cfg, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    ddp20 = torch.load(run / "checkpoints" / "step_00000020.pt", weights_only=True)["model"]
    one20 = torch.load(tmp_path / "one" / "checkpoints" / "step_00000020.pt", weights_only=True)["model"]
    assert ddp20.keys() == one20.keys()
    diff = max(float((ddp20[k].double() - one20[k].double()).abs().max()) for k in one20)
    assert diff <= 1e-5, diff
    moved = max(float((one20[k].double() - v.double()).abs().max())
                for k, v in VLJob(cfg, source).model.state_dict().items())
    assert moved > 1e-3  # the runs trained
    # the logged losses are the single process's (each rank's mean rescaled to the global one)
    one_recs = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    one_train = {r["step"]: r for r in one_recs if r.get("kind") == "train"}
    for r in train_recs[:20]:
        assert r["loss"] == pytest.approx(one_train[r["step"]]["loss"], abs=1e-4), r["step"]
        assert r["samples"] == one_train[r["step"]]["samples"] == 8


def test_real_feature_store_and_text_db(tmp_path, source):
    """UNITER-format features (LMDB) + text DB drive pretraining like the synthetic world."""
    from vlfast.data.readers import write_uniter_lmdb
    from vlfast.data.textdb import write_txt_db

    ids = list(source.records.keys())[:40]
    recs = [source.records[i] for i in ids]
    feat_dir = tmp_path / "img_db"
    write_uniter_lmdb(feat_dir, recs, conf_th=-1, num_bb=int(min(r.num_boxes for r in recs)))
    tok = source.tokenizer
    examples = {}
    for k, (i, r) in enumerate(zip(ids, recs)):
        text = tok.encode(f"a scene number {k % 5}")[1:-1]
        examples[str(k)] = {"input_ids": text, "img_fname": i}
    txt_dir = tmp_path / "txt_db"
    write_txt_db(txt_dir, examples, meta={"v_range": [5, tok.vocab_size]})
    tok.save(tmp_path / "tok")
    cfg = load_config("default_pretrain", SMALL + [
        "data.source=uniter", f"data.path={feat_dir}", "optim.total_steps=3", "tasks={mlm: 1.0, itm: 1.0}",
        f"data.options={{txt_db: {txt_dir}, val_txt_db: {txt_dir}, vocab: {tmp_path / 'tok' / 'vocab.txt'}, "
        f"num_region_classes: {source.num_region_classes}}}"])
    job = VLJob(cfg)
    res = train(job, cfg, tmp_path / "real")
    assert math.isfinite(res.last_train["loss"])
    assert res.last_eval["loss/mlm"] > 0


def test_mlm_image_probe_matches_hand_computation(source):
    """Pretraining evaluation reports mlm/acc_shuffled_images (the same masked texts on
    images rolled by one along the batch) and mlm/image_gain = mlm/acc minus it."""
    cfg = load_config("default_pretrain", SMALL + ["tasks={mlm: 1.0}"])
    torch.manual_seed(0)
    job = VLJob(cfg, source)
    model = job.model.eval()
    with torch.no_grad():
        got = job.evaluate(model, "val")
        acc = shuf = 0.0
        n = 0
        for _, b in job._eval_batches("mlm", "val"):
            r = b.with_images_shuffled()
            assert torch.equal(r.visual_feats[1:], b.visual_feats[:-1])
            assert torch.equal(r.visual_feats[0], b.visual_feats[-1])
            assert torch.equal(r.visual_mask, b.visual_mask.roll(1, 0)) and r.input_ids is b.input_ids
            acc += float(model(b, "mlm").metrics["mlm/acc"]) * b.batch_size
            shuf += float(model(r, "mlm").metrics["mlm/acc"]) * b.batch_size
            n += b.batch_size
    assert got["mlm/acc"] == pytest.approx(acc / n, abs=1e-6)
    assert got["mlm/acc_shuffled_images"] == pytest.approx(shuf / n, abs=1e-6)
    assert got["mlm/image_gain"] == pytest.approx((acc - shuf) / n, abs=1e-6)


def test_with_images_shuffled_rejects_bad_shift_and_region_targets(source):
    cfg = load_config("default_pretrain", SMALL + ["tasks={mlm: 1.0, mrfr: 1.0}"])
    job = VLJob(cfg, source)
    b = next(iter(job._eval_batches("mlm", "val")))[1]
    with pytest.raises(ValueError, match="shift.*multiple of the batch size"):
        b.with_images_shuffled(b.batch_size)
    m = next(iter(job._eval_batches("mrfr", "val")))[1]
    with pytest.raises(ValueError, match="without masked regions"):
        m.with_images_shuffled()


def test_val_then_test_predictions_of_one_job_are_the_test_split(source):
    """Evaluation data is cached per (task, split): predicting test after evaluating val
    on the same job gives test's examples, as a fresh job does."""
    cfg = load_config("default_vqa", SMALL + ["eval.every=0", "checkpoint.best_metric=null"])
    torch.manual_seed(0)
    job = VLJob(cfg, source)
    model = job.model.eval()
    with torch.no_grad():
        val = job.predict(model, "val")
        test = job.predict(model, "test")
    assert val["ids"] == [e["id"] for e in source.examples("vqa", "val")]
    assert test["ids"] == [e["id"] for e in source.examples("vqa", "test")]
    assert set(val["ids"]).isdisjoint(test["ids"])


def test_max_train_examples_cuts_the_train_split_only(source):
    """data.options.max_train_examples=N trains on the first N train examples (every
    batch of an epoch comes from them) and leaves evaluation whole; a bad value names
    the key."""
    cfg = load_config("default_vqa", SMALL + ["data.options.max_train_examples=20", "data.batch_size=4"])
    job = VLJob(cfg, source)
    first = [e["id"] for e in source.examples("vqa", "train")[:20]]
    td = job._task_data("vqa", "train")
    assert [e["id"] for e in td.examples] == first
    seen = sorted(i for b in job._batches_of_epoch(td, "vqa", 0) for i in b)
    assert seen == list(range(20))  # 5 full batches of 4: every kept example, nothing past them
    assert len(job._task_data("vqa", "val").examples) == len(source.examples("vqa", "val"))
    full = VLJob(load_config("default_vqa", SMALL + ["data.batch_size=4"]), source)
    assert len(full._task_data("vqa", "train").examples) == len(source.examples("vqa", "train")) > 20
    for bad in ("0", "-3", "2.5", "true"):
        job = VLJob(load_config("default_vqa", SMALL + [f"data.options.max_train_examples={bad}"]), source)
        with pytest.raises(ValueError, match="data.options.max_train_examples: expected an int >= 1"):
            job._task_data("vqa", "train")


def test_model_objectives_reach_the_objectives(source):
    """model.objectives sets the pretraining objectives' options (UNITER's WRA weight
    here): the WRA loss is itm_ot_lambda times the OT term; unknown keys name the key."""
    losses = {}
    for lam in (0.1, 1.0):
        cfg = load_config("default_pretrain",
                          SMALL + ["tasks={itm: 1.0}", f"model.objectives={{itm_ot_lambda: {lam}}}"])
        torch.manual_seed(0)
        job = VLJob(cfg, source)
        assert job.model.objectives["wra"].lam == lam
        b = next(iter(job._eval_batches("itm", "val")))[1]
        with torch.no_grad():
            m = job.model.eval()(b, "itm").metrics
        losses[lam] = (float(m["wra/loss"]), float(m["wra/ot"]))
    assert losses[0.1][1] == pytest.approx(losses[1.0][1], abs=1e-6)  # same weights (seeded), same OT term
    assert losses[1.0][0] == pytest.approx(1.0 * losses[1.0][1], rel=1e-5)
    assert losses[0.1][0] == pytest.approx(0.1 * losses[0.1][1], rel=1e-5)
    cfg = load_config("default_pretrain", SMALL + ["tasks={itm: 1.0}", "model.objectives={ot_lambda: 1.0}"])
    with pytest.raises(ValueError, match=r"model.objectives.ot_lambda: expected one of \('itm_ot_lambda'"):
        VLJob(cfg, source)


def test_model_initialisation_is_a_function_of_the_seed(source):
    """A job's model starts from the same weights whatever the global RNG state (torch
    seeds it randomly per process), different ones for another config.seed, and building
    the job leaves the global RNG where it was."""
    def weights(seed: int, task: str = "vqa") -> list[torch.Tensor]:
        base = "default_vqa" if task == "vqa" else "default_pretrain"
        cfg = load_config(base, SMALL + [f"seed={seed}"] + ([] if task == "vqa" else [f"tasks={{{task}: 1.0}}"]))
        return [p.detach().clone() for p in VLJob(cfg, source).model.parameters()]

    for task in ("vqa", "itm"):
        torch.manual_seed(123)
        a = weights(0, task)
        torch.manual_seed(456)
        b = weights(0, task)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        c = weights(1, task)
        assert not all(torch.equal(x, y) for x, y in zip(a, c))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    weights(0)
    assert torch.equal(torch.rand(3), expected)


def test_a_fresh_run_repeats_in_another_process(tmp_path):
    """The same config in two fresh processes gives the same first losses (the model's
    initialisation does not depend on the process's random torch seed)."""
    losses = []
    for k in range(2):
        run = tmp_path / f"r{k}"
        cmd = [sys.executable, "-P", "-m", "vlfast.train", "--config", "default_vqa", "--run-dir", str(run)] + SMALL + \
              ["optim.total_steps=2", "logging.every=1", "eval.every=0", "eval.at_end=false"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in recs if r.get("kind") == "train"])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
