"""vlfast.training.loop / optim / config: resume equivalence, gradient accumulation,
LR schedule and multipliers by hand, AMP, logged metrics, NVTX ranges, init checkpoints,
config files and overrides.  Driven by the toy job in toy_job.py (a tiny MLP)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlfast.training import loop as loop_mod
from vlfast.training.checkpoint import list_checkpoints, load_checkpoint, load_model_weights
from vlfast.training.config import (CONFIG_DIR, ConfigError, TrainConfig, config_diff, load_config,
                                    save_config)
from vlfast.training.loop import task_for_step, train
from vlfast.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups

import importlib.util
import sys


def _load_toy():
    name = "vlfast_tests_toy_job"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("toy_job.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


toy = _load_toy()
QUIET = ["logging.tensorboard=null"]


def tiny(*overrides: str) -> TrainConfig:
    return load_config(toy.TOY_CONFIG, [*QUIET, *overrides])


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ----------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------

def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    """12 steps straight == crash inside step 11 (last checkpoint: step 8), resume to 12.
    The job draws from torch's, Python's and NumPy's RNGs every step, so every RNG state,
    the data position and the optimizer/scheduler states must round-trip."""
    cfg = tiny("checkpoint.every=4")
    straight = toy.ToyJob(rng_noise=True)
    train(straight, cfg, tmp_path / "a")

    crashing = toy.ToyJob(rng_noise=True, crash_after=21)  # step 11 = calls 21, 22
    with pytest.raises(RuntimeError, match="toy crash"):
        train(crashing, cfg, tmp_path / "b")
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4, 8]
    assert [r["step"] for r in records(tmp_path / "b")][-1] == 10  # logged after the last checkpoint

    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a different process state
    torch.rand(7), random.random(), np.random.rand()
    resumed = toy.ToyJob(rng_noise=True)
    res = train(resumed, cfg, tmp_path / "b", resume=True)
    assert res.step == 12

    diff = toy.max_param_diff(toy.params_of(straight.model), toy.params_of(resumed.model))
    assert diff <= 1e-6, diff
    # The resumed job saw exactly the batches and losses of steps 9-12 of the straight run.
    assert resumed.calls == straight.calls == 24
    assert resumed.batches == straight.batches[16:]
    np.testing.assert_allclose([l for _, l in resumed.losses], [l for _, l in straight.losses[16:]], atol=1e-6)
    # The jsonl reads as one run: steps 2..12 once, equal to the straight run's records.
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-6)
    assert [r["step"] for r in records(tmp_path / "b", "eval")] == [4, 8, 12]
    # The final checkpoints agree too (optimizer moments included).
    ca = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000012.pt")
    cb = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000012.pt")
    for k, st in ca["optimizer"]["state"].items():
        torch.testing.assert_close(st["exp_avg"], cb["optimizer"]["state"][k]["exp_avg"], atol=1e-6, rtol=0)
    assert ca["data"][0]["streams"] == cb["data"][0]["streams"]


def test_existing_run_needs_resume_and_a_finished_run_resumes_to_itself(tmp_path, capsys):
    cfg = tiny("optim.total_steps=4", "checkpoint.every=2")
    train(toy.ToyJob(), cfg, tmp_path)
    before = toy.params_of(load_model_state(tmp_path / "checkpoints" / "step_00000004.pt"))
    with pytest.raises(FileExistsError, match="resume=True"):
        train(toy.ToyJob(), cfg, tmp_path)
    res = train(toy.ToyJob(), cfg, tmp_path, resume=True)
    assert res.step == 4 and "already complete" in capsys.readouterr().out
    after = toy.params_of(load_model_state(tmp_path / "checkpoints" / "step_00000004.pt"))
    assert toy.max_param_diff(before, after) == 0.0


def load_model_state(path: Path) -> nn.Module:
    m = toy.ToyModel()
    m.load_state_dict(load_checkpoint(path)["model"])
    return m


def test_resume_with_a_changed_config_keeps_the_old_config_and_applies_the_new_one(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="toy crash"):
        train(toy.ToyJob(crash_after=10), tiny(), tmp_path)  # checkpoint at step 4, crash in step 6
    changed = tiny("optim.total_steps=14", "optim.lr=0.02", "optim.weight_decay=0.5", "checkpoint.keep_last=5")
    train(toy.ToyJob(), changed, tmp_path, resume=True)
    out = capsys.readouterr().out
    assert "optim.lr: 0.01 -> 0.02" in out and "optim.total_steps: 12 -> 14" in out
    assert load_config(tmp_path / "config.step00000004.yaml").optim.total_steps == 12
    assert load_config(tmp_path / "config.yaml").optim.total_steps == 14
    groups = load_checkpoint(tmp_path / "checkpoints" / "step_00000008.pt")["optimizer"]["param_groups"]
    for g in groups:  # the new lr, schedule and weight decay, from the first resumed step on
        assert g["initial_lr"] == 0.02 and g["lr"] == pytest.approx(0.02 * lr_factor(9, 2, 14), rel=1e-12)
        assert g["weight_decay"] in (0.5, 0.0)
    with pytest.raises(ValueError, match="optimizer parameter groups .* differ"):
        train(toy.ToyJob(), tiny("optim.total_steps=14", "optim.lr_multipliers.heads=2"), tmp_path, resume=True)


# ----------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------

def test_grad_accumulation_equals_a_bigger_batch(tmp_path):
    """2 micro-batches of 4 per step == 1 batch of 8 (same samples, mean losses)."""
    common = ["tasks={reg: 1.0, cls: 0.5}", "optim.total_steps=6", "optim.clip_grad_norm=0.5"]
    small = toy.ToyJob(batch_size=4)
    train(small, tiny(*common, "data.batch_size=4", "optim.grad_accum_steps=2"), tmp_path / "a")
    big = toy.ToyJob(batch_size=8)
    train(big, tiny(*common, "data.batch_size=8", "optim.grad_accum_steps=1"), tmp_path / "b")
    assert [sorted(a + b) for a, b in zip(small.batches[::2], small.batches[1::2])] == [sorted(x) for x in big.batches]
    assert toy.max_param_diff(toy.params_of(small.model), toy.params_of(big.model)) <= 1e-6


def test_lr_schedule_values_by_hand():
    # W = 2, T = 6: 1/2, 2/2, then (6 - n + 1) / 4 for n = 3..6.
    assert [lr_factor(n, 2, 6) for n in range(1, 7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(n, 0, 4) for n in range(1, 5)] == [1.0, 0.75, 0.5, 0.25]
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1, "lr_mult": 1.0}], lr=0.1)
    sched = build_scheduler(opt, 2, 6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])  # the LR the next optimizer step uses
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0.05, 0.1, 0.1, 0.075, 0.05, 0.025], rtol=1e-12)
    assert tiny("optim.warmup_steps=0", "optim.warmup_ratio=0.25", "optim.total_steps=8").warmup_steps == 2
    assert tiny("optim.warmup_steps=3", "optim.warmup_ratio=0.25").warmup_steps == 3
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_factor(1, 7, 6)


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(11))
        self.norm = nn.LayerNorm(2)


def test_lr_multipliers_and_no_decay_groups():
    m = Layers()
    groups = param_groups(m, base_lr=0.1, weight_decay=0.01,
                          lr_multipliers={"layers": 0.5, "layers.1": 4.0, "norm": 2.0})
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["layers.1.weight"] == (0.4, 0.01)        # longest prefix wins
    assert by_name["layers.1.bias"] == (0.4, 0.0)           # 1-d: no decay
    assert by_name["layers.10.weight"] == (0.05, 0.01)      # "layers.1" stops at a module boundary
    assert by_name["norm.weight"] == (0.2, 0.0)
    assert len(by_name) == 24
    with pytest.raises(ValueError, match=r"\['layer\.3'\] match no trainable parameter.*layers"):
        param_groups(m, 0.1, 0.0, {"layer.3": 2.0})


def test_lr_multipliers_scale_the_first_adamw_update():
    """AdamW's first update of a parameter is lr * g / (|g| + eps) (bias-corrected moments
    m = g, v = g^2), so each group moves by its own lr * mult."""
    torch.manual_seed(0)
    m = toy.ToyModel()
    opt = build_optimizer(m, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0,
                          lr_multipliers={"heads": 10.0, "enc.0": 0.5})
    batch = {k: v[:8] for k, v in toy.make_data(8, 0).items()}
    before = toy.params_of(m)
    m(batch, "reg")[0].backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    opt.step()
    mult = {"heads.reg.weight": 10.0, "heads.reg.bias": 10.0, "enc.0.weight": 0.5, "enc.0.bias": 0.5,
            "enc.2.weight": 1.0, "norm.weight": 1.0}
    for name, k in mult.items():
        g = grads[name]
        expected = before[name] - 1e-2 * k * g / (g.abs() + 1e-6)
        torch.testing.assert_close(m.state_dict()[name], expected, atol=1e-7, rtol=0)
    assert torch.equal(m.state_dict()["heads.cls.weight"], before["heads.cls.weight"])  # no grad, no move


def test_amp_bf16_on_cpu_runs_in_bf16_and_the_loss_falls(tmp_path):
    job = toy.ToyJob(n=64, batch_size=8)
    train(job, tiny("amp=bf16", "tasks={reg: 1.0}", "optim.total_steps=40", "optim.grad_accum_steps=1",
                    "data.batch_size=8", "logging.every=8", "optim.lr=3e-2"), tmp_path)
    assert job.model.seen_dtype == torch.bfloat16
    losses = [r["loss"] for r in records(tmp_path)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_amp_fp16_uses_a_grad_scaler(tmp_path):
    job = toy.ToyJob()
    train(job, tiny("amp=fp16", "optim.total_steps=4"), tmp_path)
    assert job.model.seen_dtype == torch.float16
    scaler = load_checkpoint(tmp_path / "checkpoints" / "step_00000004.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 1.0


# ----------------------------------------------------------------------------------------
# Logging, evaluation, best checkpoint
# ----------------------------------------------------------------------------------------

def test_jsonl_tensorboard_and_best_checkpoint(tmp_path):
    job = toy.ToyJob(eval_scores=[0.1, 0.5, 0.3])
    cfg = load_config(toy.TOY_CONFIG, ["checkpoint.best_metric=score", "checkpoint.best_mode=max"])
    res = train(job, cfg, tmp_path)
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12]
    per_step = 2 * 2  # log interval 2 steps x 2 micro-batches
    for i, r in enumerate(recs):
        window = job.losses[i * per_step:(i + 1) * per_step]
        assert r["loss"] == pytest.approx(np.mean([l for _, l in window]), abs=1e-6)
        for task in {t for t, _ in window}:
            mine = [l for t, l in window if t == task]
            assert r[f"loss/{task}"] == pytest.approx(np.mean(mine), abs=1e-6)
            assert r[f"{task}/abs_loss"] == pytest.approx(np.mean(mine), abs=1e-6)
        assert r["lr"] == pytest.approx(1e-2 * lr_factor(r["step"], 2, 12), rel=1e-12)
        assert r["samples"] == 16 and r["tokens"] == 96
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(6 * r["samples_per_s"])
        assert r["grad_norm"] > 0
    evals = records(tmp_path, "eval")
    assert [(e["step"], e["eval/score"]) for e in evals] == [(4, 0.1), (8, 0.5), (12, 0.3)]
    assert res.best == {"metric": "score", "mode": "max", "value": 0.5, "step": 8}
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 8 and best["value"] == 0.5
    ck8 = torch.load(tmp_path / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert toy.max_param_diff(best["model"], ck8["model"]) == 0.0
    # keep_last = 2: steps 8 and 12 remain, plus best.pt, each with its SHA-256 sidecar.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt", "best.pt.sha256", "step_00000008.pt", "step_00000008.pt.sha256", "step_00000012.pt",
        "step_00000012.pt.sha256"]
    assert load_config(tmp_path / "config.yaml") == cfg

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tb = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in tb] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([v for _, v in tb], [r["loss"] for r in recs], rtol=1e-6)
    assert [e.value for e in ea.Scalars("eval/score")] == pytest.approx([0.1, 0.5, 0.3])


def test_progress_bar_shows_loss_and_throughput_and_plain_lines_replace_it(tmp_path, capsys):
    train(toy.ToyJob(), tiny("logging.progress=on", "optim.total_steps=4", "eval.at_end=false"), tmp_path / "a")
    cap = capsys.readouterr()
    assert "4/4" in cap.err and "loss=" in cap.err and "samples_s=" in cap.err and "tok_s=" in cap.err
    assert "step 2/4 | loss" not in cap.out
    train(toy.ToyJob(), tiny("logging.progress=off", "optim.total_steps=4", "eval.at_end=false"), tmp_path / "b")
    cap = capsys.readouterr()
    assert "step 2/4 | loss " in cap.out and "samples/s" in cap.out and "tokens/s" in cap.out and cap.err == ""


def test_evaluation_does_not_change_the_training_trajectory(tmp_path):
    class NoisyEval(toy.ToyJob):
        def evaluate(self, model):
            torch.rand(100), random.random(), np.random.rand(3)  # draws from every RNG
            assert not model.training and not torch.is_grad_enabled()
            return super().evaluate(model)

    a, b = toy.ToyJob(rng_noise=True), NoisyEval(rng_noise=True)
    train(a, tiny("eval.every=0", "eval.at_end=false"), tmp_path / "a")
    train(b, tiny("eval.every=1"), tmp_path / "b")
    assert b.n_evals == 12 and b.model.training
    assert toy.max_param_diff(toy.params_of(a.model), toy.params_of(b.model)) == 0.0


def test_best_metric_must_be_an_evaluation_metric(tmp_path):
    with pytest.raises(KeyError, match=r"best_metric='acc'.*\['val_mse'\]"):
        train(toy.ToyJob(), tiny("checkpoint.best_metric=acc"), tmp_path)


def test_nvtx_ranges_around_data_forward_backward_optimizer(tmp_path, monkeypatch):
    import contextlib
    names = []

    @contextlib.contextmanager
    def recorder(name):
        names.append(name)
        yield

    monkeypatch.setattr(loop_mod, "nvtx_range", recorder)
    train(toy.ToyJob(), tiny("optim.total_steps=2", "eval.at_end=false"), tmp_path)
    one_step = ["data", "forward", "backward", "data", "forward", "backward", "optimizer"]
    assert names == one_step * 2


def test_task_mixing_by_ratio_is_a_pure_function_of_seed_and_step():
    tasks = {"mlm": 3.0, "itm": 1.0, "wra": 0.0}
    seq = [task_for_step(tasks, 7, s) for s in range(1, 4001)]
    assert seq == [task_for_step(tasks, 7, s) for s in range(1, 4001)]
    assert "wra" not in seq
    assert abs(seq.count("mlm") / len(seq) - 0.75) < 0.03
    assert seq != [task_for_step(tasks, 8, s) for s in range(1, 4001)]
    assert task_for_step({"vqa": 1.0}, 0, 5) == "vqa"


def test_a_job_may_bring_its_own_task_schedule(tmp_path):
    class OwnSchedule(toy.ToyJob):
        def task_for_step(self, step):
            return "cls" if step % 3 == 0 else "reg"

    job = OwnSchedule()
    train(job, tiny("optim.total_steps=6", "eval.at_end=false"), tmp_path)
    assert [t for t, _ in job.losses[::2]] == ["reg", "reg", "cls", "reg", "reg", "cls"]


# ----------------------------------------------------------------------------------------
# Init checkpoint, flags, job contract
# ----------------------------------------------------------------------------------------

def test_init_checkpoint_loads_weights_non_strictly_with_a_report(tmp_path, capsys):
    torch.manual_seed(99)
    src = toy.ToyModel()
    sd = src.state_dict()
    sd.pop("heads.cls.bias")
    sd["extra.weight"] = torch.ones(2)
    sd["heads.reg.weight"] = torch.zeros(1, 9)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "init.pt")  # a saved DDP wrapper

    m = toy.ToyModel()
    rep = load_model_weights(m, tmp_path / "init.pt")
    assert rep.missing == ["heads.cls.bias"] and rep.unexpected == ["extra.weight"]
    assert rep.mismatched == [("heads.reg.weight", (1, 9), (1, 8))]
    assert torch.equal(m.enc[0].weight, src.enc[0].weight)
    assert not torch.equal(m.heads.reg.weight, src.heads.reg.weight)

    job = toy.ToyJob()
    train(job, tiny("optim.total_steps=2", "optim.lr=1e-3"), tmp_path / "run", init_checkpoint=tmp_path / "init.pt")
    out = capsys.readouterr().out
    assert "unexpected in the checkpoint (1, ignored): extra.weight" in out and "heads.reg.weight (1, 9)" in out
    # Two Adam steps move each weight by at most ~2 * lr from the loaded value.
    assert float((job.model.enc[0].weight - src.enc[0].weight).detach().abs().max()) < 2.5e-3


def test_init_checkpoint_into_a_grown_vocabulary_loads_the_old_rows(tmp_path):
    """UNITER's VCR adds word rows for its object tags after pretraining: a pretrained
    checkpoint with fewer rows fills the first rows of the grown table, the new rows keep
    their initialisation, and the report says so; other shape mismatches stay skipped."""
    from vlfast.models.uniter import Uniter, UniterConfig

    cfg = UniterConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, img_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    src = Uniter(cfg)
    sd = dict(src.state_dict())
    sd["embeddings.position_embeddings.weight"] = torch.zeros(16, 16)  # fewer rows, but not a vocabulary
    torch.save(sd, tmp_path / "pre.pt")
    torch.manual_seed(1)
    dst = Uniter(cfg.replace(vocab_size=53, max_position_embeddings=40))
    fresh = dst.embeddings.word_embeddings.weight.detach().clone()
    rep = load_model_weights(dst, tmp_path / "pre.pt")
    w = dst.embeddings.word_embeddings.weight
    assert rep.grown == [("embeddings.word_embeddings.weight", 50, 53)]
    assert torch.equal(w[:50], src.embeddings.word_embeddings.weight) and torch.equal(w[50:], fresh[50:])
    assert ("embeddings.word_embeddings.weight", (50, 16), (53, 16)) not in rep.mismatched
    assert ("embeddings.position_embeddings.weight", (16, 16), (40, 16)) in rep.mismatched
    assert "embedding tables grown (1, the checkpoint's rows loaded" in str(rep)


def test_determinism_flag_is_on_during_the_run_and_restored_after(tmp_path):
    seen = []

    class Spy(toy.ToyJob):
        def step(self, model, batch, task):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().step(model, batch, task)

    assert not torch.are_deterministic_algorithms_enabled()
    train(Spy(), tiny("deterministic=true", "optim.total_steps=2"), tmp_path)
    assert seen == [True] * 4 and not torch.are_deterministic_algorithms_enabled()


def test_grad_checkpointing_flag_calls_the_model_hook(tmp_path):
    class Ckpt(toy.ToyModel):
        enabled = False

        def gradient_checkpointing_enable(self):
            self.enabled = True

    job = toy.ToyJob()
    job.model = Ckpt()
    train(job, tiny("grad_checkpointing=true", "optim.total_steps=1"), tmp_path / "a")
    assert job.model.enabled
    with pytest.raises(ValueError, match="ToyModel has no gradient_checkpointing_enable"):
        train(toy.ToyJob(), tiny("grad_checkpointing=true"), tmp_path / "b")


def test_job_contract_errors(tmp_path):
    class NoEval:
        model = nn.Linear(2, 2)

        def train_batches(self, task, epoch, start):
            return iter(())

        def step(self, model, batch, task):
            raise AssertionError

        def data_state(self):
            return {}

        def load_data_state(self, state):
            pass

    with pytest.raises(TypeError, match="NoEval lacks evaluate"):
        train(NoEval(), tiny(), tmp_path)

    class Empty(toy.ToyJob):
        def train_batches(self, task, epoch, start):
            return iter(())

    with pytest.raises(RuntimeError, match=r"train_batches\(task='(reg|cls)', epoch=0, start=0\) yielded no batch"):
        train(Empty(), tiny(), tmp_path / "e")


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

def test_config_file_overrides_and_round_trip(tmp_path):
    cfg = load_config(toy.TOY_CONFIG, ["optim.lr=1e-4", "optim.total_steps=20", "tasks.mlm=2",
                                    "optim.lr_multipliers.uniter.img_embeddings=2", "amp=bf16",
                                    "optim.betas=[0.8, 0.9]", "checkpoint.best_metric=vqa_score",
                                    "data.path=null", "model={name: vilbert, size: base}",
                                    "model.config.num_hidden_layers=2", "logging.progress=off"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)      # "1e-4" is a str to PyYAML
    assert cfg.optim.total_steps == 20 and cfg.warmup_steps == 2         # from toy.yaml
    assert cfg.tasks == {"reg": 1.0, "cls": 1.0, "mlm": 2.0}
    assert cfg.optim.lr_multipliers == {"uniter.img_embeddings": 2.0}
    assert cfg.amp == "bf16" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.name == "vilbert" and cfg.model.size == "base" and cfg.model.config == {"num_hidden_layers": 2}
    assert cfg.logging.progress == "off" and cfg.data.path is None
    assert cfg.data.batch_size == 4 and cfg.seed == 0                   # toy.yaml values
    assert cfg.distributed.timeout_s == 1800                            # a schema default
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_diff(cfg, cfg.with_overrides(["seed=3"])) == ["seed: 0 -> 3"]
    # every packaged config loads; the schema file holds exactly the defaults
    assert load_config(CONFIG_DIR / "schema.yaml") == TrainConfig()
    assert load_config("schema", ["amp=off"]).amp == "off"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid keys of optim: lr, betas,"),
    ("lr=1", "unknown config key 'lr'; valid keys of the top level: seed, device, amp,"),
    ("optim.lr=fast", "config key 'optim.lr': expected a float, got 'fast'"),
    ("optim.total_steps=1.5", "config key 'optim.total_steps': expected an int, got 1.5"),
    ("deterministic=maybe", "config key 'deterministic': expected a bool (true/false), got 'maybe'"),
    ("amp=fp8", "config key 'amp': expected one of ('off', 'bf16', 'fp16'), got 'fp8'"),
    ("optim.betas=[0.9]", "config key 'optim.betas': expected a list of 2"),
    ("optim.lr=-1", "config key 'optim.lr': expected a float > 0, got -1.0"),
    ("optim.lr.x=1", "'optim.lr' is a float, it has no sub-key 'x'"),
    ("tasks={}", "config key 'tasks': expected at least one task"),
    ("seed", "override 'seed': expected key=value"),
    ("model={name: x, sise: base}", "unknown config key 'model.sise' (did you mean 'model.size'?)"),
])
def test_config_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(toy.TOY_CONFIG, [override])
    assert message in str(e.value)


def test_config_file_errors_and_extends(tmp_path):
    (tmp_path / "base.yaml").write_text(f"extends: {toy.TOY_CONFIG}\noptim: {{lr: 0.5}}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntasks: {vqa: 1}\noptim: {total_steps: 7}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.tasks == {"vqa": 1.0}  # a file's tasks replace the base's mixture
    assert (cfg.optim.lr, cfg.optim.total_steps, cfg.optim.warmup_steps) == (0.5, 7, 2)
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 0.1\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.warmup'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends` cycle"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="no such packaged config"):
        load_config("nope")
