"""Fault injection: training that meets bad numbers and broken files loses nothing.

* NaN/inf stops the run at the step where it appears, before that step's update and
  checkpoint; the good checkpoints are kept; the error names the task, the step and
  the batch's record keys.
* A corrupt newest checkpoint (truncated, empty, one byte flipped) is detected by its
  SHA-256 sidecar; resume warns and continues from the newest intact one.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from vlfast.training.checkpoint import (list_checkpoints, load_checkpoint, newest_intact_checkpoint, sha256_path,
                                        verify_checkpoint)
from vlfast.training.config import load_config
from vlfast.training.loop import StepOutput, train


def _load_toy():
    name = "vlfast_tests_toy_job"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("toy_job.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


toy = _load_toy()


def _cfg(*overrides: str):
    return load_config(toy.TOY_CONFIG, ["logging.tensorboard=null", "eval.every=0", "eval.at_end=false",
                                        *overrides])


class NaNAt(toy.ToyJob):
    """The toy job whose loss turns NaN at one step() call; its batches carry record
    keys (meta) like the collators' VLBatch."""

    def __init__(self, nan_at: int, value: float = float("nan"), **kw):
        super().__init__(**kw)
        self.nan_at, self.value = nan_at, value

    def train_batches(self, task, epoch, start):
        for b in super().train_batches(task, epoch, start):
            yield _WithMeta(b)

    def step(self, model, batch, task):
        out = super().step(model, dict(batch), task)
        if self.calls == self.nan_at:
            return StepOutput(out.loss * self.value, out.metrics, out.samples, out.tokens)
        return out


class _WithMeta(dict):
    @property
    def meta(self):
        return {"ids": [f"rec-{int(i)}" for i in self["idx"]]}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_stops_at_its_step_before_any_checkpoint_of_it(tmp_path, value):
    """The issue's case: logging.every=6, checkpoint.every=1 used to write NaN
    checkpoints and prune the good ones before stopping at the next logging step."""
    job = NaNAt(nan_at=9, value=value)  # grad_accum_steps=2: call 9 is in optimizer step 5
    cfg = _cfg("logging.every=6", "checkpoint.every=1", "checkpoint.keep_last=2", "optim.total_steps=12")
    with pytest.raises(FloatingPointError) as e:
        train(job, cfg, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("step 5: the ")
    assert "loss is not finite (micro-batch 0: ids=['rec-" in msg
    assert "stopped before this step's update and checkpoint" in msg and "step_00000004.pt" in msg
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [3, 4]  # nothing of step 5; the last good ones kept
    for _, p in list_checkpoints(tmp_path / "run"):
        ck = load_checkpoint(p)
        assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _four_steps(run: Path) -> None:
    cfg = _cfg("checkpoint.every=1", "checkpoint.keep_last=3", "optim.total_steps=4", "logging.every=1")
    train(toy.ToyJob(), cfg, run)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    run = tmp_path / "run"
    _four_steps(run)
    newest = list_checkpoints(run)[-1][1]
    assert sha256_path(newest).is_file() and verify_checkpoint(newest) is None
    data = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        i = len(data) // 3
        newest.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    why = verify_checkpoint(newest)
    assert why is not None and ("SHA-256" in why or "empty" in why)
    path, skipped = newest_intact_checkpoint(run)
    assert path == list_checkpoints(run)[-2][1] and len(skipped) == 1 and "is corrupt" in skipped[0]
    with pytest.raises(RuntimeError, match="is corrupt"):
        load_checkpoint(newest)
    cfg = _cfg("checkpoint.every=1", "checkpoint.keep_last=3", "optim.total_steps=6", "logging.every=1")
    with pytest.warns(RuntimeWarning, match=r"resume: .*step_00000004\.pt is corrupt: .*resuming from "
                                            r".*step_00000003\.pt instead"):
        res = train(toy.ToyJob(), cfg, run, resume=True)
    assert res.step == 6 and math.isfinite(res.last_train["loss"])
    assert verify_checkpoint(list_checkpoints(run)[-1][1]) is None


def test_resume_with_every_checkpoint_corrupt_is_an_error(tmp_path):
    run = tmp_path / "run"
    _four_steps(run)
    for _, p in list_checkpoints(run):
        p.write_bytes(b"")
    cfg = _cfg("checkpoint.every=1", "optim.total_steps=6")
    with pytest.raises(RuntimeError, match="every checkpoint in .* is corrupt"), pytest.warns(RuntimeWarning):
        train(toy.ToyJob(), cfg, run, resume=True)


def test_resume_with_a_config_of_another_model_says_which_keys_differ(tmp_path, capsys):
    """--resume with a changed model.config.hidden_size used to give torch's raw
    size-mismatch error."""
    from vlfast.train import main

    base = ["--config", "tiny_test", "--run-dir", str(tmp_path / "run"), "optim.total_steps=2", "eval.at_end=false",
            "data.options.n_images=30", "checkpoint.every=1"]
    assert main(base) == 0
    capsys.readouterr()
    code = main([*base, "--resume", "optim.total_steps=4", "model.config.hidden_size=32",
                 "model.config.num_attention_heads=2"])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("vlfast.train: --resume: the model of this config does not fit ")
    assert "keys that differ from the run's config: model.config: " in line and "'hidden_size': 32" in line


def test_unknown_data_option_names_the_valid_keys(capsys):
    from vlfast.train import main

    code = main(["--config", "tiny_test", "--print-config", "data.options.n_imagez=40"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        "vlfast.train: data.options.n_imagez: not an option of data.source='synthetic' (did you mean 'n_images'?); "
        "valid keys: " + ", ".join(__import__("vlfast.training.jobs", fromlist=["x"]).source_option_keys("synthetic")))


def test_convert_says_what_kind_of_file_it_was_given(tmp_path, capsys):
    """A vlfast training checkpoint given to vlfast.convert used to say "got 0 keys"."""
    from vlfast.convert import main as convert
    from vlfast.training.checkpoint import FORMAT, VERSION

    torch.save({"format": FORMAT, "version": VERSION, "step": 12, "model": {"backbone.x": torch.ones(1)},
                "config": {"model": {"name": "uniter"}}}, tmp_path / "step_00000012.pt")
    code = convert(["--model", "uniter", "--src", str(tmp_path / "step_00000012.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"vlfast.convert: --src: {tmp_path / 'step_00000012.pt'} is a vlfast training checkpoint "
                          "(step 12, model uniter), not an official uniter checkpoint: it needs no conversion")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_soft_target_loss_rejects_non_finite_and_negative_targets(bad):
    import vlfast.ops as ops

    h, w = torch.randn(3, 4), torch.randn(5, 4)
    t = torch.softmax(torch.randn(3, 5), -1)
    t[1, 2] = bad
    with pytest.raises(ValueError, match=r"vlfast\.ops\.linear_soft_cross_entropy: targets: expected finite "
                                         r"probabilities >= 0, got .* at index \(1, 2\)"):
        ops.linear_soft_cross_entropy(h, w, None, t)


def test_evaluate_says_a_checkpoint_is_corrupt_and_scores_the_newest_intact_one(tmp_path, capsys):
    """python -m vlfast.evaluate on a run whose newest checkpoint is truncated used to
    show torch's raw zip error."""
    from vlfast.evaluate import main as evaluate
    from vlfast.train import main

    run = tmp_path / "run"
    assert main(["--config", "tiny_test", "--run-dir", str(run), "optim.total_steps=2", "eval.at_end=false",
                 "data.options.n_images=30", "checkpoint.every=1", "checkpoint.keep_last=2"]) == 0
    newest = list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"step_00000002\.pt is corrupt: its SHA-256 .* differs from the one "
                                            r"recorded when it was written.*scoring .*step_00000001\.pt instead"):
        code = evaluate(["--run-dir", str(run)])
    out, err = capsys.readouterr()
    assert code == 0 and "step_00000001.pt" in out, err
    code = evaluate(["--run-dir", str(run), "--checkpoint", str(newest)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"vlfast.evaluate: --checkpoint: {newest} is corrupt: its SHA-256")


def _bad_records(kind: str):
    import numpy as np

    from vlfast.data.batch import ImageRecord

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 8)).astype(np.float32)
    boxes = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (6, 1))
    good = ImageRecord(img_id="good", features=rng.normal(size=(6, 8)).astype(np.float32), boxes=boxes.copy())
    if kind == "nan_feature":
        feats[2, 3] = np.nan
    elif kind == "inf_feature":
        feats[4, 0] = np.inf
    else:
        boxes[1, 2] = np.nan
    return [good, ImageRecord(img_id="bad", features=feats, boxes=boxes)]


@pytest.mark.parametrize("layout", ["uniter", "vilbert", "tsv", "npz"])
@pytest.mark.parametrize("kind", ["nan_feature", "inf_feature", "nan_box"])
def test_readers_reject_non_finite_features_and_boxes(tmp_path, layout, kind):
    """The readers used to accept NaN/inf features and NaN boxes silently; now the error
    names the record and the field."""
    from vlfast.data import readers as R

    recs = _bad_records(kind)
    write = {"uniter": lambda p: R.write_uniter_lmdb(p, recs, conf_th=-1, num_bb=6),
             "vilbert": lambda p: R.write_vilbert_lmdb(p, recs), "tsv": lambda p: R.write_tsv(p / "f.tsv", recs),
             "npz": lambda p: R.write_npz_folder(p, recs)}[layout]
    out = write(tmp_path / "store")
    store = R.open_feature_store(out if out is not None else tmp_path / "store")
    key = next(k for k in store if "bad" in str(k))
    good = next(k for k in store if "good" in str(k))
    assert store[good].features.shape == (6, 8)
    field = "boxes" if kind == "nan_box" else "features"
    with pytest.raises(R.FeatureStoreError, match=rf"record '{key}': field '{field}': finite values expected, got "
                                                  r"(nan|inf) at index"):
        store[key]


def test_reader_rejects_fewer_rows_than_num_bb(tmp_path):
    """A UNITER record with fewer feature rows than its num_bb used to train silently."""
    import numpy as np

    from vlfast.data import readers as R
    from vlfast.data.batch import ImageRecord

    rec = ImageRecord(img_id="short", features=np.ones((4, 8), np.float32), boxes=np.full((4, 4), 0.2, np.float32))
    out = R.write_uniter_lmdb(tmp_path / "db", [rec], conf_th=-1, num_bb=4)
    store = R.open_feature_store(out if out is not None else tmp_path / "db")
    store.num_bb = 6  # as a DB whose nbb promises more rows than the record holds
    with pytest.raises(R.FeatureStoreError, match=r"record 'short': field 'features': expected at least num_bb = 6 "
                                                  r"rows .*, got 4"):
        store["short"]


def _uniter_tiny():
    from vlfast.models import Uniter, UniterConfig

    torch.manual_seed(0)
    return Uniter(UniterConfig.small(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, img_dim=16, vocab_size=50))


MALFORMED = [
    ("attention key_mask of ints", lambda ops: ops.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8),
                                                             torch.randn(1, 2, 4, 8), torch.ones(1, 4)),
     r"vlfast\.ops\.attention: key_mask: expected dtype bool"),
    ("attention head dims differ", lambda ops: ops.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 6),
                                                             torch.randn(1, 2, 4, 8)),
     r"vlfast\.ops\.attention: k: expected"),
    ("layer_norm weight of another size", lambda ops: ops.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8)),
     r"vlfast\.ops\.layer_norm: weight: expected shape \(E=8,\)"),
    ("ipot masks of another length", lambda ops: ops.ipot(torch.rand(1, 3, 4), torch.ones(1, 2, dtype=torch.bool),
                                                          torch.ones(1, 4, dtype=torch.bool)),
     r"vlfast\.ops\.ipot: x_mask: expected"),
    ("model: visual features of another width",
     lambda ops: _uniter_tiny()(torch.randint(5, 50, (2, 6)), visual_feats=torch.randn(2, 3, 12),
                                visual_boxes=torch.rand(2, 3, 7)),
     r"visual_feats"),
]


@pytest.mark.parametrize("what,call,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_inputs_name_what_is_wrong(what, call, message):
    import vlfast.ops as ops

    with pytest.raises((ValueError, TypeError), match=message):
        call(ops)


# ----------------------------------------------------------------------------------
# data.on_bad_record: error | skip, on a real feature store
# ----------------------------------------------------------------------------------

_SMALL = ["data.options.n_images=60", "data.batch_size=4", "data.eval_batch_size=16", "logging.every=1",
          "logging.progress=off", "checkpoint.every=0", "device=cpu", "logging.tensorboard=null",
          "model.config.hidden_size=32", "model.config.num_hidden_layers=1", "model.config.intermediate_size=64",
          "optim.lr_multipliers={}", "optim.total_steps=4"]


def _store_with_a_nan_record(tmp_path):
    """A UNITER LMDB of 30 synthetic images, one of them ('poisoned') with a NaN
    feature, and a text DB whose captions 0-2 read it."""
    import numpy as np

    from vlfast.data.batch import ImageRecord
    from vlfast.data.readers import write_uniter_lmdb
    from vlfast.data.textdb import write_txt_db
    from vlfast.training.jobs import SyntheticSource

    src = SyntheticSource(load_config("default_pretrain", _SMALL).data.options)
    ids = list(src.records.keys())[:30]
    recs = [src.records[i] for i in ids]
    n = int(min(r.num_boxes for r in recs))
    feats = recs[0].features.copy()
    feats[0, 1] = np.nan
    recs[0] = ImageRecord(img_id="poisoned", features=feats, boxes=recs[0].boxes, conf=recs[0].conf,
                          soft_labels=recs[0].soft_labels, width=recs[0].width, height=recs[0].height)
    write_uniter_lmdb(tmp_path / "img_db", recs, conf_th=-1, num_bb=n)
    tok = src.tokenizer
    names = ["poisoned"] + ids[1:]
    examples = {str(k): {"input_ids": tok.encode(f"a scene number {k % 5}")[1:-1], "img_fname": names[k % 30]}
                for k in range(60)}
    write_txt_db(tmp_path / "txt_db", examples, meta={"v_range": [5, tok.vocab_size]})
    tok.save(tmp_path / "tok")
    return _SMALL + ["data.source=uniter", f"data.path={tmp_path / 'img_db'}", "tasks={mlm: 1.0, mrfr: 1.0}",
                     f"data.options={{txt_db: {tmp_path / 'txt_db'}, val_txt_db: {tmp_path / 'txt_db'}, "
                     f"vocab: {tmp_path / 'tok' / 'vocab.txt'}, num_region_classes: {src.num_region_classes}}}"]


@pytest.mark.parametrize("workers", [0, 1])
def test_on_bad_record_error_names_it_and_skip_drops_logs_and_counts_it(tmp_path, capfd, workers):
    """data.on_bad_record=error (the default) stops at the NaN record naming store, key
    and field; =skip drops the samples that read it from their batches (train and
    evaluation), logs the record once with the count, and trains to the end."""
    from vlfast.training.jobs import VLJob

    over = _store_with_a_nan_record(tmp_path) + [f"data.num_workers={workers}"]
    cfg = load_config("default_pretrain", over)
    with pytest.raises(KeyError, match=r"record .poisoned.: field .features.: finite values expected"):
        train(VLJob(cfg), cfg, tmp_path / "err")
    cfg = load_config("default_pretrain", over + ["data.on_bad_record=skip"])
    job = VLJob(cfg)
    capfd.readouterr()
    res = train(job, cfg, tmp_path / "skip")
    err = capfd.readouterr().err
    assert res.step == 4 and math.isfinite(res.last_train["loss"]) and math.isfinite(res.last_eval["loss"])
    assert [(Path(p).parent, k) for p, k in job.bad_records] == [(tmp_path / "img_db", "poisoned")]
    assert job.skipped_samples >= 3  # the evaluation alone drops captions 0, 30 (and any training sample)
    lines = [l for l in err.splitlines() if "data.on_bad_record=skip" in l]
    assert len(lines) == 1 and "record 'poisoned'" in lines[0] and "(1 bad record(s) so far)" in lines[0], err
    with pytest.raises(Exception, match=r"config key 'data.on_bad_record': expected 'error' or 'skip', got 'drop'"):
        load_config("default_pretrain", over + ["data.on_bad_record=drop"])
