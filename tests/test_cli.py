"""The command-line tools: python -m vlfast.train / vlfast.evaluate / vlfast.convert and
the console scripts (vlfast-train, vlfast-evaluate, vlfast-convert, vlfast-info).

* a flag applies or is rejected (``--seed`` with ``--config`` sets the config's seed;
  combinations that would be silently ignored are one-line errors naming the flag);
* user errors (unknown model / task / config names, missing files, bad keys and values)
  print ONE line on stderr, exit 2, before anything is built; ``--debug`` adds the
  traceback;
* ``--print-config`` prints the resolved config;
* every shipped config (training/configs/*.yaml, schema.yaml included: it is a complete
  config of its own) runs one optimizer step from the command line.

End-to-end cases run ``python -P -m ...`` in a subprocess; the many small error cases
call the same ``main(argv)`` in-process (each subprocess pays ~3 s of torch import on
a 2-core machine), asserting its return value -- the exit code the console scripts
and ``python -m`` pass to ``sys.exit`` -- and the exact stderr line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlfast.training.config import CONFIG_DIR

MODELS = "['uniter', 'vilbert', 'visualbert', 'vlbert']"
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
UNITER_TASKS = ("tasks: expected pretraining tasks of uniter ['itm', 'mlm', 'mrc', 'mrc-kl', 'mrfr'] or one "
                "fine-tuning task of ['nlvr2', 'refcoco', 'retrieval', 'vcr', 'vqa'], got")


def _py(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def _call(main, argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------
# End to end (subprocess)
# ----------------------------------------------------------------------------------------

def test_seed_applies_to_print_config(capsys):
    from vlfast.train import main

    code, out, err = _call(main, ["--seed", "3", "--config", "tiny_test", "--print-config"], capsys)
    assert (code, err) == (0, "")
    cfg = yaml.safe_load(out)
    assert cfg["seed"] == 3 and cfg["model"]["name"] == "uniter"
    assert "seed: 3" in out.splitlines()


def test_unknown_model_is_one_line_before_anything_is_built(tmp_path, capsys):
    """As a user types it (a subprocess): one line on stderr, exit 2, nothing built."""
    p = _py("vlfast.train", "--config", "tiny_test", "--run-dir", tmp_path / "run", "model.name=uniterr")
    assert p.returncode == 2, p.stdout + p.stderr
    assert _one_line(p.stderr) == f"vlfast.train: model.name: expected one of {MODELS}, got 'uniterr'"
    assert p.stdout == "" and not (tmp_path / "run").exists()
    from vlfast.train import main

    code, _, err = _call(main, ["--config", "tiny_test", "--run-dir", tmp_path / "run", "model.name=uniterr",
                                "--debug"], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "check_names" in err
    assert err.strip().splitlines()[-1] == f"vlfast.train: model.name: expected one of {MODELS}, got 'uniterr'"


def test_missing_config_file_and_evaluate_and_convert_errors(tmp_path, capsys):
    p = _py("vlfast.train", "--config", "/nonexistent.yaml")
    assert p.returncode == 2
    assert _one_line(p.stderr) == "vlfast.train: config file '/nonexistent.yaml' does not exist"
    from vlfast.convert import main as convert
    from vlfast.evaluate import main as evaluate

    code, _, err = _call(evaluate, ["--run-dir", tmp_path / "none"], capsys)
    assert code == 2
    assert _one_line(err) == f"vlfast.evaluate: --run-dir: expected a run directory with config.yaml, got " \
                             f"{tmp_path / 'none'}"
    code, _, err = _call(convert, ["--model", "uniter", "--src", tmp_path / "none.pt", "--out", tmp_path / "out"],
                         capsys)
    assert code == 2
    assert _one_line(err) == f"vlfast.convert: --src: expected an existing file, got {tmp_path / 'none.pt'}"


def _script(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


def test_console_scripts():
    p = subprocess.run([_script("vlfast-info"), "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "versions" in json.loads(p.stdout)
    p = subprocess.run([_script("vlfast-train"), "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: vlfast-train") and "--print-config" in p.stdout
    for name in ("vlfast-evaluate", "vlfast-convert"):
        assert _script(name)


# every shipped config: one step, eval off, a checkpoint at the end, a small world
FAST = ["optim.total_steps=1", "optim.warmup_steps=0", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
        "logging.every=1", "logging.progress=off", "logging.tensorboard=null", "device=cpu", "data.batch_size=4",
        "data.options.n_images=30", "data.options.feat_dim=32"]


def _check_run(run: Path, steps: int, seed: int) -> list[dict]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["seed"] == seed  # --seed applied to the run
    assert cfg["optim"]["total_steps"] == steps
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train and train[-1]["step"] == steps and all(math.isfinite(r["loss"]) for r in train), recs
    assert (run / "checkpoints" / f"step_{steps:08d}.pt").is_file()
    return recs


def test_tiny_test_runs_as_shipped_from_the_command_line(tmp_path):
    """The smoke-test config as a user types it (a subprocess): 8 steps and an evaluation."""
    run = tmp_path / "run"
    p = _py("vlfast.train", "--config", "tiny_test", "--run-dir", run, "--seed", "3", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: step 8" in p.stdout
    recs = _check_run(run, 8, 3)
    assert math.isfinite([r for r in recs if r["kind"] == "eval"][-1]["eval/loss"])


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "tiny_test"])
def test_every_shipped_config_runs_one_step(name, tmp_path, capsys):
    """One step of each shipped config through the CLI's main (in-process: the same
    parsing, checks and job as the command; tiny_test runs as a subprocess above)."""
    from vlfast.train import main

    run = tmp_path / "run"
    code, out, err = _call(main, ["--config", name, "--run-dir", run, "--seed", "3", *FAST], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "done: step 1" in out
    _check_run(run, 1, 3)


def test_tiny_test_is_a_vljob_config():
    """tiny_test is a real (few-second) run of the CLI; the loop tests' toy config lives
    next to toy_job.py, not among the shipped configs."""
    from vlfast.training.config import load_config

    cfg = load_config("tiny_test")
    assert cfg.model.name == "uniter" and set(cfg.tasks) <= {"mlm", "itm"} and cfg.optim.total_steps <= 10
    assert not set(cfg.tasks) & {"reg", "cls"}
    assert (Path(__file__).parent / "training" / "toy.yaml").is_file()


# ----------------------------------------------------------------------------------------
# User errors and flag checks (in-process: main(argv) -> exit code, stderr)
# ----------------------------------------------------------------------------------------

TRAIN_ERRORS = [
    # unknown names
    (["--config", "tiny_test", "tasks={vqaa: 1}"], f"{UNITER_TASKS} 'vqaa' (did you mean 'vqa'?)"),
    (["--config", "tiny_test", "tasks={sip: 1}"], f"{UNITER_TASKS} 'sip' ('sip' is a task of visualbert)"),
    (["--config", "tiny_retrieval", "model.name=visualbert"],
     "tasks: 'retrieval' needs model.name among ['uniter', 'vilbert'] (the models whose official code has a "
     "retrieval head), got 'visualbert'"),
    (["--config", "tiny_test", "tasks={vqa: 1, mlm: 1}"],
     "tasks: expected pretraining tasks, or exactly one fine-tuning task, got ['vqa', 'mlm']"),
    (["--config", "tiny_test", "data.source=hdf5"],
     "data.source: expected one of ['synthetic', 'uniter', 'vilbert', 'tsv', 'npz'], got 'hdf5'"),
    (["--config", "nope"], f"config 'nope': no such packaged config (have: {', '.join(SHIPPED)}) and no file of "
                           "that name"),
    (["model.name=uniterr"], f"model.name: expected one of {MODELS}, got 'uniterr'"),  # the default run, too
    # missing files
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["--config", "tiny_test", "--init-checkpoint", "/nonexistent"], "--init-checkpoint: /nonexistent does not exist"),
    (["--eval-only", "--run-dir", "/nonexistent"],
     "--run-dir: expected a run directory with config.yaml, got /nonexistent"),
    # bad keys and values
    (["--config", "tiny_test", "optim.lrr=1"],
     "override: unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid keys of optim: lr, betas, eps, "
     "weight_decay, no_decay_1d, warmup_steps, warmup_ratio, total_steps, lr_multipliers, grad_accum_steps, "
     "clip_grad_norm"),
    (["--config", "tiny_test", "optim.lr=abc"], "config key 'optim.lr': expected a float, got 'abc'"),
    (["--config", "tiny_test", "amp=fp8"], "config key 'amp': expected one of ('off', 'bf16', 'fp16'), got 'fp8'"),
    (["--config", "tiny_test", "optim.lr"], "overrides: expected key=value, got 'optim.lr'"),
    (["--config", "tiny_test", "--bogus"], "unrecognized arguments: --bogus (see --help)"),
    # --seed and a seed= override that disagree
    (["--config", "tiny_test", "--seed", "3", "seed=4"], "--seed 3: disagrees with the override 'seed=4' (give one "
                                                         "of them)"),
    (["--seed", "3", "seed=4"], "--seed 3: disagrees with the override 'seed=4' (give one of them)"),
    # flags that would be ignored
    (["--config", "tiny_test", "--quick"], "--quick: not with --config; only the default run has a quick form; "
                                           "shorten a --config run with optim.total_steps=N"),
    (["--config", "tiny_test", "--sequential"],
     "--sequential: not with --config; only the default run has a second process"),
    (["--config", "tiny_test", "--split", "test"], "--split: not with --config; only --eval-only takes a split"),
    (["--split", "test"], "--split: not in the default run (no --config); only --eval-only takes a split"),
    (["--config", "tiny_test", "--steps", "3"],
     "--steps: not with --config; only --demo takes --steps (use optim.total_steps=N with --config)"),
    (["--resume"], "--resume: not in the default run (no --config); only a --config run resumes (the default run "
                   "always starts fresh)"),
    (["--config", "tiny_test", "--resume"], "--resume: needs --run-dir (the run to continue)"),
    (["--eval-only"], "--eval-only: needs --run-dir (the run to score)"),
    (["--eval-only", "--run-dir", "r", "optim.lr=1"], "key=value overrides ('optim.lr=1'...): not with --eval-only; "
                                                      "key=value overrides apply to a --config run or the default "
                                                      "run"),
    (["--eval-only", "--run-dir", "r", "--config", "tiny_test"],
     "--config: not with --eval-only; --eval-only reads RUN_DIR/config.yaml, --demo has no config"),
    (["--eval-only", "--run-dir", "r", "--seed", "1"],
     "--seed: not with --eval-only; the evaluated run's config.yaml fixes its seed"),
    (["--eval-only", "--run-dir", "r", "--print-config"], "--print-config: not with --eval-only; only a --config "
                                                          "run or the default run has a config to print"),
    (["--demo", "--config", "tiny_test"],
     "--config: not with --demo; --eval-only reads RUN_DIR/config.yaml, --demo has no config"),
    (["--demo", "--run-dir", "r"], "--run-dir: not with --demo; it applies to --config, --eval-only and the default "
                                   "run"),
    (["--demo", "--steps", "0"], "--steps: expected an int >= 1, got 0"),
]


@pytest.mark.parametrize("argv, line", TRAIN_ERRORS, ids=[" ".join(a) for a, _ in TRAIN_ERRORS])
def test_train_user_errors_are_one_line_exit_2(argv, line, capsys):
    from vlfast.train import main

    code, out, err = _call(main, argv, capsys)
    assert (code, out) == (2, ""), err
    assert _one_line(err) == f"vlfast.train: {line}"


def test_an_existing_run_needs_resume(tmp_path, capsys):
    from vlfast.train import main

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    code, _, err = _call(main, ["--config", "tiny_test", "--run-dir", tmp_path], capsys)
    assert code == 2
    assert _one_line(err) == (f"vlfast.train: --run-dir: {tmp_path} already holds checkpoints "
                              f"({tmp_path / 'checkpoints'}); pass --resume to continue that run, or choose another "
                              "run directory")


def test_print_config_applies_overrides_and_seed(capsys):
    from vlfast.train import main

    code, out, err = _call(main, ["--config", "tiny_test", "--print-config", "seed=5", "optim.lr=1e-3"], capsys)
    assert (code, err) == (0, "")
    cfg = yaml.safe_load(out)
    assert cfg["seed"] == 5 and cfg["optim"]["lr"] == 1e-3
    # --seed and an override that agree are fine
    code, out, _ = _call(main, ["--config", "tiny_test", "--print-config", "--seed", "5", "seed=5"], capsys)
    assert code == 0 and yaml.safe_load(out)["seed"] == 5
    # the default run prints its three stages; --seed applies to each
    code, out, err = _call(main, ["--quick", "--seed", "2", "--print-config"], capsys)
    assert (code, err) == (0, "")
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 3 and {d["seed"] for d in docs} == {2}
    assert [d["tasks"] for d in docs][-1] == {"vqa": 1.0}
    assert {d["data"]["options"]["n_images"] for d in docs} == {300}  # --quick


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    from vlfast.train import main

    code, _, err = _call(main, ["--config", "tiny_test", "optim.lr=abc", "--debug"], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "vlfast.train: config key 'optim.lr': expected a float, got 'abc'"


@pytest.mark.parametrize("argv, line", [
    (["--run-dir", "/nonexistent"], "--run-dir: expected a run directory with config.yaml, got /nonexistent"),
    ([], "the following arguments are required: --run-dir (see --help)"),
    (["--run-dir", "r", "--split", "dev"], "argument --split: invalid choice: 'dev' (choose from 'train', 'val', "
                                           "'test') (see --help)"),
])
def test_evaluate_user_errors(argv, line, capsys):
    from vlfast.evaluate import main

    code, out, err = _call(main, argv, capsys)
    assert (code, out) == (2, "")
    assert _one_line(err) == f"vlfast.evaluate: {line}"


def test_evaluate_checkpoint_errors(tmp_path, capsys):
    """A run directory whose config names an unknown model, a checkpoint path that does
    not exist, and a file that is no checkpoint: one line each, before the world is built
    where it can be."""
    from vlfast.evaluate import main
    from vlfast.training.config import load_config, save_config

    save_config(load_config("tiny_test", ["data.options.n_images=20"]), tmp_path / "config.yaml")
    code, _, err = _call(main, ["--run-dir", tmp_path], capsys)
    assert code == 2 and _one_line(err) == f"vlfast.evaluate: --run-dir: {tmp_path} holds no checkpoint"
    code, _, err = _call(main, ["--run-dir", tmp_path, "--checkpoint", tmp_path / "x.pt"], capsys)
    assert code == 2 and _one_line(err) == f"vlfast.evaluate: --checkpoint: {tmp_path / 'x.pt'} does not exist"
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    code, _, err = _call(main, ["--run-dir", tmp_path, "--checkpoint", tmp_path / "junk.pt"], capsys)
    assert code == 2 and _one_line(err).startswith(f"vlfast.evaluate: --checkpoint: cannot read {tmp_path / 'junk.pt'}")
    text = (tmp_path / "config.yaml").read_text().replace("name: uniter", "name: uniterr")
    (tmp_path / "config.yaml").write_text(text)
    code, _, err = _call(main, ["--run-dir", tmp_path], capsys)
    assert code == 2 and _one_line(err) == f"vlfast.evaluate: model.name: expected one of {MODELS}, got 'uniterr'"


def test_convert_user_errors(tmp_path, capsys):
    from vlfast.convert import main

    out = tmp_path / "out"
    code, _, err = _call(main, ["--model", "uniter", "--src", tmp_path / "none.pt", "--out", out], capsys)
    assert code == 2 and _one_line(err) == f"vlfast.convert: --src: expected an existing file, got {tmp_path / 'none.pt'}"
    code, _, err = _call(main, ["--model", "uniterr", "--src", "x", "--out", out], capsys)
    assert code == 2 and _one_line(err) == ("vlfast.convert: argument --model: invalid choice: 'uniterr' (choose from "
                                            "'uniter', 'vilbert', 'visualbert', 'vlbert') (see --help)")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    code, _, err = _call(main, ["--model", "uniter", "--src", tmp_path / "junk.pt", "--out", out], capsys)
    assert code == 2 and _one_line(err).startswith(f"vlfast.convert: --src: cannot read {tmp_path / 'junk.pt'}")
    (tmp_path / "src.pt").write_text("")
    code, _, err = _call(main, ["--model", "uniter", "--src", tmp_path / "src.pt", "--out", out,
                                "--config", tmp_path / "none.json"], capsys)
    assert code == 2 and _one_line(err) == f"vlfast.convert: --config: expected an existing JSON file, got " \
                                           f"{tmp_path / 'none.json'}"


def test_a_failure_while_training_keeps_its_traceback_and_exits_1(tmp_path, capsys, monkeypatch):
    """Not a user error: the traceback, then a one-line summary, exit code 1."""
    from vlfast import train as cli
    from vlfast.training import loop

    def boom(*a, **k):
        raise ValueError("a bug in the loop")

    monkeypatch.setattr(loop, "train", boom)
    code, _, err = _call(cli.main, ["--config", "tiny_test", "--run-dir", tmp_path / "r",
                                    "data.options.n_images=20"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "a bug in the loop" in err
    assert err.strip().splitlines()[-1] == "vlfast.train: failed: ValueError: a bug in the loop"


def test_a_worker_error_is_summed_up_by_its_own_message():
    """An exception raised in a DataLoader worker comes back as "Caught KeyError in
    DataLoader worker process 0." plus the worker's traceback; the one-line summary is
    the worker's own message (it used to be the "Caught ..." line)."""
    from torch._utils import ExceptionWrapper

    from vlfast.train import one_line

    try:
        try:
            raise KeyError("collate_pretrain[itm]: image record 'img7': field 'features': finite values expected")
        except KeyError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()
    except KeyError as e:
        assert str(e).startswith('Caught KeyError in DataLoader worker process 0.')
        assert one_line(e, first=True) == ("collate_pretrain[itm]: image record 'img7': field 'features': "
                                           "finite values expected")
