"""``python -m vlfast.export``: a run's checkpoint -> a shareable model directory.

A tiny VQA run (2 steps of default_vqa on a 30-image world, best.pt kept) and a tiny
pretraining run (1 step of default_pretrain) are trained in-process once per module;
their exports are checked to reload (TaskHead.from_pretrained, load_exported, the
vocabulary), to score as the run does (vlfast.evaluate --run-dir DIR), in the official
layout (from_official), and for the user's errors (one line, exit 2).  One test runs the
real command line in a subprocess, one the console script's --help.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["optim.warmup_steps=0", "eval.every=0", "checkpoint.every=0", "logging.every=1", "logging.progress=off",
        "logging.tensorboard=null", "device=cpu", "data.batch_size=4", "data.eval_batch_size=32",
        "data.options.n_images=30", "data.options.feat_dim=32"]
VQA = TINY + ["optim.total_steps=2", "eval.at_end=true", "data.options.max_train_examples=16"]
PRETRAIN = TINY + ["optim.total_steps=1", "eval.at_end=false"]


def _train(config: str, run: Path, overrides: list[str]) -> Path:
    from vlfast.train import main

    assert main(["--config", config, "--run-dir", str(run), *overrides]) == 0
    return run


def _call(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory) -> Path:
    run = _train("default_vqa", tmp_path_factory.mktemp("vqa") / "run", VQA)
    assert (run / "checkpoints" / "best.pt").is_file()
    return run


@pytest.fixture(scope="module")
def vqa_export(vqa_run, tmp_path_factory) -> Path:
    from vlfast.export import main

    out = tmp_path_factory.mktemp("vqa_export") / "exported" / "vqa"
    assert main(["--checkpoint", str(vqa_run / "checkpoints" / "best.pt"), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    return _train("default_pretrain", tmp_path_factory.mktemp("pretrain") / "run", PRETRAIN)


def _metrics(run_dir: Path, out: Path, capsys) -> tuple[dict, str]:
    from vlfast.evaluate import main

    code, _, err = _call(main, ["--run-dir", run_dir, "--out", out], capsys)
    assert code == 0, err
    res = json.loads((out / "metrics_val.json").read_text())
    pred = res.get("predictions")
    return res["metrics"], Path(pred).read_text() if pred else ""


# ----------------------------------------------------------------------------------------
# Fine-tuning runs
# ----------------------------------------------------------------------------------------

def test_task_head_reloads_with_the_checkpoints_weights(vqa_run, vqa_export):
    from vlfast.training.checkpoint import read_state_dict
    from vlfast.training.tasks import TaskHead, UniterForVQA

    assert sorted(p.name for p in vqa_export.iterdir()) == [
        "README.md", "answers.json", "config.json", "config.yaml", "export.json", "head.safetensors",
        "model.safetensors", "task.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    head = TaskHead.from_pretrained(vqa_export)
    assert isinstance(head, UniterForVQA)
    _same(head.state_dict(), read_state_dict(vqa_run / "checkpoints" / "best.pt"))
    assert (vqa_export / "config.yaml").read_bytes() == (vqa_run / "config.yaml").read_bytes()
    m = json.loads((vqa_export / "export.json").read_text())
    assert (m["kind"], m["layout"], m["model"], m["head_class"]) == ("finetune", "vlfast", "uniter", "UniterForVQA")
    assert m["source"]["step"] == 2 and m["source"]["best"]["metric"] == "vqa_score"
    readme = (vqa_export / "README.md").read_text()
    assert "TaskHead.from_pretrained(DIR)" in readme and "Uniter.from_pretrained(DIR)" in readme
    # nothing left next to it: the temporary folder was renamed into place
    assert sorted(p.name for p in vqa_export.parent.iterdir()) == ["vqa"]


def test_the_vocabulary_reloads_to_the_same_ids(vqa_run, vqa_export):
    from tokenizers import Tokenizer

    from vlfast.data.tokenization import VLTokenizer
    from vlfast.evaluate import prepare

    job, _ = prepare(vqa_run)
    tok = job.source.tokenizer
    again = VLTokenizer.from_dir(vqa_export)
    assert again.vocab == tok.vocab and again.lowercase == tok.lowercase
    fast = Tokenizer.from_file(str(vqa_export / "tokenizer.json"))
    texts = [e["question"] for e in job.source.world.vqa("val")][:20] + ["An unseen Wörd, and [MASK]!"]
    for text in texts:
        ids = tok.encode(text)
        assert again.encode(text) == ids and fast.encode(text).ids == ids, text
    # the job's examples were tokenized with the same vocabulary
    ex = job.source.examples("vqa", "val")[0]
    assert again.decode(ex["input_ids"]) == tok.decode(ex["input_ids"])


def test_evaluate_scores_the_exported_directory_as_the_run(vqa_run, vqa_export, tmp_path, capsys):
    run_metrics, run_pred = _metrics(vqa_run, tmp_path / "run", capsys)
    exp_metrics, exp_pred = _metrics(vqa_export, tmp_path / "exported", capsys)
    assert exp_metrics == run_metrics and "vqa_score" in exp_metrics
    assert exp_pred == run_pred and json.loads(exp_pred)  # the same answer for every question


def test_official_layout_loads_with_from_official(vqa_run, tmp_path, capsys):
    from vlfast.export import main
    from vlfast.models.uniter import Uniter, UniterConfig
    from vlfast.training.checkpoint import read_state_dict

    out = tmp_path / "official"
    code, _, err = _call(main, ["--run-dir", vqa_run, "--out", out, "--official"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "ans2label.json", "answers.json", "config.json", "config.yaml", "export.json",
        "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    ck = read_state_dict(vqa_run / "checkpoints" / "best.pt")  # --run-dir: best.pt
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith(("uniter.", "vqa_output.")) for k in sd)
    _same({k: v for k, v in sd.items() if k.startswith("vqa_output.")},
          {k: v for k, v in ck.items() if k.startswith("vqa_output.")})
    config = UniterConfig.from_dict(json.loads((out / "config.json").read_text()))
    backbone, report = Uniter.from_official(out / "pytorch_model.bin", config=config, output_loading_info=True)
    assert report.missing == [] and sorted(report.unexpected) == sorted(k for k in sd if k.startswith("vqa_output."))
    _same(backbone.state_dict(), {k[len("backbone."):]: v for k, v in ck.items() if k.startswith("backbone.")})
    answers = json.loads((out / "answers.json").read_text())
    assert json.loads((out / "ans2label.json").read_text()) == {a: i for i, a in enumerate(answers)}
    # vlfast.evaluate reads the official layout too
    assert _metrics(out, tmp_path / "eval", capsys)[1] == _metrics(vqa_run, tmp_path / "eval_run", capsys)[1]


# ----------------------------------------------------------------------------------------
# Pretraining runs
# ----------------------------------------------------------------------------------------

def test_pretraining_run_exports_backbone_and_heads(pretrain_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from vlfast.export import load_exported, main
    from vlfast.models import Uniter
    from vlfast.training.checkpoint import read_state_dict
    from vlfast.training.pretrain import PretrainModel

    out = tmp_path / "pretrained"
    code, _, err = _call(main, ["--run-dir", pretrain_run, "--out", out], capsys)  # no best.pt: the newest step
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "config.yaml", "export.json", "heads.safetensors", "model.safetensors",
        "pretrain.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    ck = read_state_dict(pretrain_run / "checkpoints" / "step_00000001.pt")
    _same(Uniter.from_pretrained(out).state_dict(),
          {k[len("backbone."):]: v for k, v in ck.items() if k.startswith("backbone.")})
    _same(load_file(str(out / "heads.safetensors")), {k: v for k, v in ck.items() if k.startswith("objectives.")})
    model = load_exported(out)
    assert isinstance(model, PretrainModel) and model.task_names == ["itm", "mlm", "mrfr", "mrc-kl"]
    _same(model.state_dict(), ck)
    assert "heads.safetensors" in (out / "README.md").read_text()
    assert _metrics(out, tmp_path / "eval", capsys)[0] == _metrics(pretrain_run, tmp_path / "eval_run", capsys)[0]

    official = tmp_path / "official"
    code, _, err = _call(main, ["--run-dir", pretrain_run, "--out", official, "--official"], capsys)
    assert code == 0, err
    sd = torch.load(official / "pytorch_model.bin", weights_only=True)
    heads = model.official_head_state_dict()
    assert {"itm_output.weight", "cls.predictions.bias", "feat_regress.bias", "region_classifier.net.3.weight"} \
        <= set(heads)
    _same({k: v for k, v in sd.items() if not k.startswith("uniter.")}, heads)
    _same(Uniter.from_official(sd).state_dict(), Uniter.from_pretrained(out).state_dict())


# ----------------------------------------------------------------------------------------
# Errors, atomic writes, the command line
# ----------------------------------------------------------------------------------------

def test_user_errors_are_one_line_exit_2(vqa_run, tmp_path, capsys):
    from vlfast.export import main

    out = tmp_path / "out"

    def err_of(*argv) -> str:
        code, stdout, err = _call(main, argv, capsys)
        assert (code, stdout) == (2, ""), err
        return _one_line(err)

    assert err_of("--checkpoint", tmp_path / "none.pt", "--out", out) == \
        f"vlfast.export: --checkpoint: {tmp_path / 'none.pt'} does not exist"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(vqa_run / "config.yaml", run / "config.yaml")
    (run / "checkpoints" / "junk.pt").write_text("not a checkpoint")
    assert err_of("--checkpoint", run / "checkpoints" / "junk.pt", "--out", out).startswith(
        f"vlfast.export: --checkpoint: cannot read {run / 'checkpoints' / 'junk.pt'}")
    assert err_of("--run-dir", run, "--out", out) == f"vlfast.export: --run-dir: {run} holds no checkpoint"
    assert err_of("--run-dir", tmp_path, "--out", out) == \
        f"vlfast.export: --run-dir: expected a run directory with config.yaml, got {tmp_path}"
    loose = tmp_path / "loose.pt"
    shutil.copy(vqa_run / "checkpoints" / "best.pt", loose)
    assert err_of("--checkpoint", loose, "--out", out) == (
        f"vlfast.export: --checkpoint: expected a checkpoint in RUN/checkpoints/ next to RUN/config.yaml, found "
        f"no {tmp_path / 'config.yaml'} (pass --run-dir RUN)")
    assert err_of("--out", out) == ("vlfast.export: expected --checkpoint PATH (a run's checkpoints/best.pt or step "
                                    "checkpoint) or --run-dir RUN (see --help)")
    assert err_of("--run-dir", vqa_run) == "vlfast.export: the following arguments are required: --out (see --help)"
    assert err_of("--run-dir", vqa_run, "--out", vqa_run.parent, "--overwrite") == \
        f"vlfast.export: --out: {vqa_run.parent} holds the run directory {vqa_run}; choose another directory"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert err_of("--run-dir", vqa_run, "--out", out) == \
        f"vlfast.export: --out: {out} exists and is not empty (pass --overwrite to replace it)"
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.pt", "out", "run"]  # nothing written
    code, _, err = _call(main, ["--run-dir", run, "--out", tmp_path / "out2", "--debug"], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == f"vlfast.export: --run-dir: {run} holds no checkpoint"
    # --overwrite replaces the directory as a whole
    code, _, err = _call(main, ["--run-dir", vqa_run, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "export.json").is_file()


def test_a_failed_export_leaves_the_previous_directory(vqa_run, tmp_path, capsys, monkeypatch):
    import vlfast.export as E

    out = tmp_path / "out"
    stale = tmp_path / ".out.interrupted.export-tmp"
    stale.mkdir()
    assert E.main(["--run-dir", str(vqa_run), "--out", str(out)]) == 0
    assert not stale.exists()  # an interrupted export's leftovers are cleaned up
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "save_tokenizer", broken)
    code, _, err = _call(E.main, ["--run-dir", vqa_run, "--out", out, "--overwrite", "--official"], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == "vlfast.export: failed: RuntimeError: disk full"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_command_line(vqa_run, tmp_path):
    """As a user types it: python -P -m vlfast.export."""
    out = tmp_path / "exported"
    best = vqa_run / "checkpoints" / "best.pt"
    p = subprocess.run([sys.executable, "-P", "-m", "vlfast.export", "--checkpoint", str(best), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith(f"wrote {out} (") and p.stdout.rstrip().endswith(f"from {best}")
    assert json.loads((out / "export.json").read_text())["source"]["checkpoint"] == str(best)


def test_console_script_help():
    here = Path(sys.executable).parent / "vlfast-export"
    script = str(here) if here.is_file() else shutil.which("vlfast-export")
    assert script, "console script vlfast-export is not installed (pip install -e .)"
    p = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: vlfast-export") and "--official" in p.stdout and "--overwrite" in p.stdout
