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
         "model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.intermediate_size=128"]


@pytest.fixture(scope="module")
def source():
    cfg = load_config("default_pretrain", SMALL)
    return SyntheticSource(cfg.data.options)


def test_default_run_quick_losses_fall(tmp_path):
    """The shortened default (what CI runs): every stage's loss falls under a fixed seed."""
    from vlfast.training.default import run_default

    res = run_default(tmp_path / "run", quick=True, seed=0,
                      overrides=("logging.progress=off", "logging.tensorboard=null", "device=cpu"), verbose=False)
    assert res["pretrain_last_loss"] < res["pretrain_first_loss"]
    assert res["vqa_pretrained_last_loss"] < res["vqa_pretrained_first_loss"]
    assert res["vqa_scratch_last_loss"] < res["vqa_scratch_first_loss"]
    assert 0.0 <= res["vqa_scratch"] <= 1.0 and 0.0 <= res["vqa_pretrained"] <= 1.0
    for d in ("pretrain", "vqa_pretrained", "vqa_scratch"):
        assert (tmp_path / "run" / d / "config.yaml").is_file()


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
        cfg = load_config("default_pretrain", ov + [f"model.name={name}", f"tasks={tasks}", "optim.total_steps=3"])
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


def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")  # children must import the installed vlfast
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "vlfast.train", "--config", "default_pretrain", "--run-dir", str(run)] + SMALL + \
        ["optim.total_steps=3", "tasks={mlm: 1.0}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout + p.stderr
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "train" for r in recs)


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
