"""``python -m vlfast.export --checkpoint RUN/checkpoints/best.pt --out DIR`` (or ``vlfast-export``): a shareable model.

Rebuilds the run's model from ``RUN/config.yaml`` (as ``python -m vlfast.evaluate``
does: :func:`vlfast.evaluate.prepare`), loads the checkpoint and writes a
``save_pretrained`` directory.  The source is ``--checkpoint PATH`` (a step checkpoint or
``best.pt``; the run directory is the parent of its ``checkpoints/`` folder), or
``--run-dir RUN`` (its ``best.pt`` when it kept one, else its newest step checkpoint), or
both (``--checkpoint`` then also takes ``best`` / ``latest``).

Layout of ``DIR`` (the default, vlfast's layout)::

    config.json, model.safetensors   the backbone (<Model>.from_pretrained(DIR); VisualBERT: an
                                     HF directory, transformers.AutoModel.from_pretrained(DIR))
    fine-tuning runs:   head.safetensors, task.json (+ answers.json for VQA): TaskHead.from_pretrained(DIR)
    pretraining runs:   heads.safetensors  the objective heads under PretrainModel's names
                                           (``objectives.<objective>.<param>``; heads tied to the
                                           backbone -- the MLM decoder -- are the backbone's)
                        pretrain.json      the build_pretrain_model arguments (tasks, region classes, ...)
                        -> vlfast.export.load_exported(DIR) rebuilds the PretrainModel
    vocab.txt, tokenizer_config.json     the run's WordPiece vocabulary (VLTokenizer.from_dir(DIR);
                                         HF's BertTokenizer layout)
    tokenizer.json                       the same tokenizer for ``tokenizers.Tokenizer.from_file``
                                         (adds [CLS] ... [SEP] as VLTokenizer.encode does)
    config.yaml                          the run's config: python -m vlfast.evaluate --run-dir DIR
    export.json, README.md               what was exported from where, and how to load it

``--official`` writes the original repositories' key layout instead of the model and
head files: ``pytorch_model.bin`` (``torch.save`` of one state_dict: the backbone through
its module's ``to_official`` -- ``uniter.*``, ``bert.*`` (ViLBERT), ``vlbert.*``,
``visual_bert.*`` -- plus the heads under their official names: fine-tuning heads'
parameter names are the official ones, pretraining heads through
``PretrainModel.official_head_state_dict()``) and ``config.json`` (HF's VisualBertConfig
for VisualBERT, else our config), with the vocabulary, config.yaml, the label map
(``answers.json`` and UNITER's ``ans2label.json``), export.json and README.md.

``DIR`` is written into a temporary folder next to it and renamed into place, so an
interrupted export never leaves a half directory.  A user error (a missing checkpoint,
a file that is no checkpoint, a run directory without config.yaml, an existing
non-empty ``--out`` without ``--overwrite``) prints one line ``vlfast.export: <message>``
on stderr and exits 2 (``--debug``: with the traceback).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]

MANIFEST_NAME = "export.json"
FORMAT = "vlfast-export"
VERSION = 1
PRETRAIN_HEADS_NAME = "heads.safetensors"
PRETRAIN_NAME = "pretrain.json"
OFFICIAL_WEIGHTS_NAME = "pytorch_model.bin"
TOKENIZER_JSON_NAME = "tokenizer.json"
RUN_CONFIG_NAME = "config.yaml"
README_NAME = "README.md"
_TMP_SUFFIX = ".export-tmp"

MODEL_MODULES = {"uniter": "vlfast.models.uniter", "vilbert": "vlfast.models.vilbert",
                 "visualbert": "vlfast.models.visualbert", "vlbert": "vlfast.models.vlbert"}


# ----------------------------------------------------------------------------------
# Reading an exported directory
# ----------------------------------------------------------------------------------

def is_export_dir(path: PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`export`."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(directory: PathLike) -> dict[str, Any]:
    """``export.json`` of an exported directory (format and version checked)."""
    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST_NAME} (not a python -m vlfast.export directory)")
    m = json.loads(p.read_text())
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{p}: expected format {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    if m.get("version") != VERSION:
        raise ValueError(f"{p}: version {m.get('version')!r}, this vlfast reads {VERSION}")
    return m


def _model_module(name: str):
    import importlib

    if name not in MODEL_MODULES:
        raise ValueError(f"model: expected one of {sorted(MODEL_MODULES)}, got {name!r}")
    return importlib.import_module(MODEL_MODULES[name])


def _check_heads(what: str, own: dict, given: dict) -> None:
    """``given`` must be exactly ``own``'s keys (keys aliasing another -- a head shared
    by two objectives -- may be absent), with the same shapes."""
    first: dict[tuple, str] = {}
    for k, v in own.items():
        if v.numel():
            first.setdefault((v.data_ptr(), tuple(v.shape)), k)
    missing = [k for k, v in own.items() if k not in given
               and not (v.numel() and first[(v.data_ptr(), tuple(v.shape))] in given)]
    unexpected = sorted(set(given) - set(own))
    mismatched = [k for k in given if k in own and tuple(given[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"{what}: expected the model's keys, got {len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(mismatched)} mismatched "
                         f"(e.g. {(missing + unexpected + mismatched)[0]})")


def load_exported(directory: PathLike, *, map_location: str = "cpu"):
    """The model of an exported directory in vlfast's layout: a
    :class:`~vlfast.training.tasks.TaskHead` (fine-tuning runs; as
    ``TaskHead.from_pretrained(DIR)``) or a
    :class:`~vlfast.training.pretrain.PretrainModel` (pretraining runs: the backbone
    from ``config.json`` + ``model.safetensors``, the objectives of ``pretrain.json``,
    their weights from ``heads.safetensors``)."""
    d = Path(directory)
    m = read_manifest(d)
    if m["layout"] != "vlfast":
        raise ValueError(f"{d}: an --official export ({OFFICIAL_WEIGHTS_NAME}); load it with "
                         f"<Model>.from_official(DIR / {OFFICIAL_WEIGHTS_NAME!r})")
    if m["kind"] == "finetune":
        from vlfast.training.tasks import TaskHead

        return TaskHead.from_pretrained(d, map_location=map_location)
    from safetensors.torch import load_file

    from vlfast.training.pretrain import build_pretrain_model

    spec = json.loads((d / PRETRAIN_NAME).read_text())
    name = spec["model_type"]
    backbone = _model_module(name).MODEL_CLASS.from_pretrained(d, map_location=map_location)
    model = build_pretrain_model(name, tasks=spec["tasks"], backbone=backbone,
                                 num_region_classes=int(spec["num_region_classes"]),
                                 padding_free=bool(spec.get("padding_free", False)), **spec.get("objectives", {}))
    heads = load_file(str(d / PRETRAIN_HEADS_NAME), device=str(map_location))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    _check_heads(str(d / PRETRAIN_HEADS_NAME), own, heads)
    model.load_state_dict(heads, strict=False)
    return model


def exported_state_dict(directory: PathLike, model) -> dict[str, Any]:
    """The weights of an exported directory (either layout) under ``model``'s own
    state_dict names (``model``: the run's TaskHead or PretrainModel, e.g. from
    ``VLJob(cfg).model``)."""
    import torch

    d = Path(directory)
    m = read_manifest(d)
    if m["layout"] == "vlfast":
        return load_exported(d).state_dict()
    obj = torch.load(d / OFFICIAL_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    own = model.state_dict()
    mod = _model_module(m["model"])
    sd = {f"backbone.{k}": v for k, v in mod.convert_official(obj).items() if f"backbone.{k}" in own}
    if m["kind"] == "pretrain":
        sd.update({ours: obj[off] for ours, off in model.official_head_keys().items() if off in obj})
    else:
        sd.update({k: obj[k] for k in model.head_state_dict() if k in obj})
    return sd


def load_exported_weights(model, directory: PathLike):
    """Load an exported directory into ``model`` (the run's model, rebuilt from its
    config.yaml) -> a :class:`~vlfast.training.checkpoint.LoadReport` (what
    ``vlfast.evaluate`` checks, as for a checkpoint)."""
    from vlfast.training.checkpoint import LoadReport

    sd = exported_state_dict(directory, model)
    own = model.state_dict()
    rep = LoadReport(source=str(directory))
    first: dict[tuple, str] = {}
    for k, v in own.items():
        if v.numel():
            first.setdefault((v.data_ptr(), tuple(v.shape)), k)
    rep.unexpected = sorted(k for k in sd if k not in own)
    rep.mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd
                      if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    rep.missing = [k for k, v in own.items() if k not in sd
                   and not (v.numel() and first[(v.data_ptr(), tuple(v.shape))] in sd)]
    usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)
    rep.loaded = sorted(usable)
    return rep


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------

def _resolve(run_dir: Optional[PathLike], checkpoint: Optional[str]) -> tuple[Path, str]:
    """(run directory, the checkpoint argument of vlfast.evaluate.prepare)."""
    from vlfast.training.config import UserError

    if run_dir is None and checkpoint is None:
        raise UserError("expected --checkpoint PATH (a run's checkpoints/best.pt or step checkpoint) "
                        "or --run-dir RUN (see --help)")
    if run_dir is not None:
        rd = Path(run_dir)
        if not (rd / RUN_CONFIG_NAME).is_file():
            raise UserError(f"--run-dir: expected a run directory with {RUN_CONFIG_NAME}, got {rd}")
        return rd, checkpoint if checkpoint is not None else "auto"
    ck = Path(checkpoint)
    if not ck.exists():
        raise UserError(f"--checkpoint: {ck} does not exist")
    rd = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    if not (rd / RUN_CONFIG_NAME).is_file():
        raise UserError(f"--checkpoint: expected a checkpoint in RUN/checkpoints/ next to RUN/{RUN_CONFIG_NAME}, "
                        f"found no {rd / RUN_CONFIG_NAME} (pass --run-dir RUN)")
    return rd, str(ck)


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or below it."""
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    from vlfast.training.config import UserError

    if _inside(run_dir, out):
        raise UserError(f"--out: {out} holds the run directory {run_dir}; choose another directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UserError(f"--out: {out} exists and is not a directory")
        if not overwrite and any(out.iterdir()):
            raise UserError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")


def _checkpoint_info(path: Path) -> dict[str, Any]:
    """Step and best metric of a vlfast checkpoint (read lazily; {} for other files)."""
    import torch

    if not path.is_file():
        return {}
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- informational only
        return {}
    if not isinstance(ck, dict):
        return {}
    info: dict[str, Any] = {}
    if isinstance(ck.get("step"), int):
        info["step"] = ck["step"]
    if isinstance(ck.get("metric"), str):
        info["best"] = {"metric": ck["metric"], "value": ck.get("value"), "mode": ck.get("mode")}
    return info


def save_tokenizer(tokenizer, directory: PathLike) -> list[str]:
    """``vocab.txt`` + ``tokenizer_config.json`` (:meth:`VLTokenizer.save`) and
    ``tokenizer.json`` (the ``tokenizers`` pipeline with BERT's [CLS]/[SEP]
    post-processor, so ``Tokenizer.from_file(...).encode(text).ids`` equals
    ``VLTokenizer.encode(text)``) -> the file names."""
    from tokenizers import Tokenizer, processors

    from vlfast.data.tokenization import CONFIG_NAME, VOCAB_NAME

    d = Path(directory)
    tokenizer.save(d)
    tok = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    tok.post_processor = processors.BertProcessing(("[SEP]", tokenizer.sep_id), ("[CLS]", tokenizer.cls_id))
    tok.save(str(d / TOKENIZER_JSON_NAME))
    return [VOCAB_NAME, CONFIG_NAME, TOKENIZER_JSON_NAME]


def _official_state_dict(model, name: str) -> dict[str, Any]:
    """The backbone through ``to_official`` plus the heads under their official names."""
    mod = _model_module(name)
    bb = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    sd = dict(mod.to_official(bb, prefix="visual_bert.") if name == "visualbert" else mod.to_official(bb))
    heads = model.official_head_state_dict() if hasattr(model, "official_head_state_dict") \
        else model.head_state_dict()
    clash = sorted(set(sd) & set(heads))
    if clash:
        raise RuntimeError(f"export --official: head keys collide with the backbone's official keys: {clash[:5]}")
    sd.update({k: v.detach().cpu() for k, v in heads.items()})
    return sd


def _readme(manifest: dict[str, Any], files: list[str]) -> str:
    kind, layout, name = manifest["kind"], manifest["layout"], manifest["model"]
    model_cls = {"uniter": "Uniter", "vilbert": "ViLBert", "visualbert": "VisualBert", "vlbert": "VLBert"}[name]
    src = manifest["source"]
    what = (f"the fine-tuned {manifest.get('head_class', 'task head')} ({', '.join(manifest['tasks'])})"
            if kind == "finetune" else f"a pretrained {model_cls} with its objective heads "
                                       f"({', '.join(manifest['tasks'])})")
    step = f" at step {src['step']}" if "step" in src else ""
    lines = [f"# {model_cls}: {', '.join(manifest['tasks'])}", "",
             f"Exported by `python -m vlfast.export` from `{src['checkpoint']}`{step}: {what}.", "",
             "Files:", ""]
    desc = {
        "config.json": "the backbone's config" + (" (HF's VisualBertConfig)" if name == "visualbert" else ""),
        "model.safetensors": "the backbone's weights" + (" (HF's key names)" if name == "visualbert" else ""),
        "head.safetensors": "the task head's weights (official parameter names)",
        "task.json": "the head's class and constructor arguments",
        "answers.json": "the VQA answers in label order",
        "ans2label.json": "the VQA label map, answer -> label (UNITER's format)",
        PRETRAIN_HEADS_NAME: "the objective heads, PretrainModel state_dict names (`objectives.<objective>.<param>`)",
        PRETRAIN_NAME: "the build_pretrain_model arguments of the run",
        OFFICIAL_WEIGHTS_NAME: "one state_dict in the original repository's key layout (backbone + heads)",
        "vocab.txt": "the WordPiece vocabulary (one token per line, id = line number)",
        "tokenizer_config.json": "do_lower_case and the special tokens (HF's BertTokenizer layout)",
        TOKENIZER_JSON_NAME: "the same tokenizer for `tokenizers.Tokenizer.from_file` (adds [CLS]/[SEP])",
        RUN_CONFIG_NAME: "the run's config (`python -m vlfast.evaluate --run-dir DIR` scores this directory)",
        MANIFEST_NAME: "what was exported, from where",
        README_NAME: "this file",
    }
    lines += [f"* `{f}`: {desc.get(f, '')}" for f in files] + ["", "Loading:", "", "```python"]
    lines.append("from vlfast.data.tokenization import VLTokenizer")
    lines.append("tokenizer = VLTokenizer.from_dir(DIR)")
    if layout == "official":
        lines.append(f"from vlfast.models.{name} import {model_cls}")
        lines.append(f"backbone = {model_cls}.from_official(DIR + '/{OFFICIAL_WEIGHTS_NAME}')  "
                     "# the heads are reported as unused keys")
        lines.append(f"state_dict = torch.load(DIR + '/{OFFICIAL_WEIGHTS_NAME}')  # for the original code")
    elif kind == "finetune":
        lines.append("from vlfast.training.tasks import TaskHead")
        lines.append("model = TaskHead.from_pretrained(DIR)       # backbone + head")
        lines.append(f"from vlfast.models import {model_cls}")
        lines.append(f"backbone = {model_cls}.from_pretrained(DIR)   # the backbone alone")
    else:
        lines.append("from vlfast.export import load_exported")
        lines.append("model = load_exported(DIR)                  # PretrainModel: backbone + objective heads")
        lines.append(f"from vlfast.models import {model_cls}")
        lines.append(f"backbone = {model_cls}.from_pretrained(DIR)   # the backbone alone")
    if name == "visualbert":
        lines.append("import transformers")
        lines.append("hf = transformers.AutoModel.from_pretrained(DIR)  # HF's VisualBertModel")
    lines += ["```", "", "Score it: `python -m vlfast.evaluate --run-dir DIR` (rebuilds the data from config.yaml).",
              ""]
    return "\n".join(lines)


def _write(tmp: Path, job, run_dir: Path, checkpoint: Path, official: bool) -> dict[str, Any]:
    import torch

    from vlfast.models.base import CONFIG_NAME, _atomic_write
    from vlfast.training.tasks import ANSWERS_NAME

    model = job.model.eval()
    name = job.model_name
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "kind": job.kind, "layout": "official" if official else "vlfast",
        "model": name, "tasks": list(job.tasks),
        "source": {"checkpoint": str(checkpoint), "run_dir": str(run_dir), **_checkpoint_info(checkpoint)}}
    if job.kind == "finetune":
        manifest["head_class"] = type(model).__name__
        manifest["head_config"] = model.head_config
    files: list[str] = []
    if official:
        sd = _official_state_dict(model, name)
        _atomic_write(tmp / OFFICIAL_WEIGHTS_NAME, lambda p: torch.save(sd, p))
        text = json.dumps(model.backbone._pretrained_config_dict(), indent=2, sort_keys=True)
        _atomic_write(tmp / CONFIG_NAME, lambda p: Path(p).write_text(text))
        files += [OFFICIAL_WEIGHTS_NAME, CONFIG_NAME]
        answers = getattr(model, "answers", None) if job.kind == "finetune" else None
        if answers is not None:
            (tmp / ANSWERS_NAME).write_text(json.dumps(answers, indent=0))
            (tmp / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(answers)}, indent=0))
            files += [ANSWERS_NAME, "ans2label.json"]
    elif job.kind == "finetune":
        model.save_pretrained(tmp)
        files += sorted(p.name for p in tmp.iterdir())
    else:
        from safetensors.torch import save_file

        model.backbone.save_pretrained(tmp)
        files += sorted(p.name for p in tmp.iterdir())
        seen: set[tuple] = set()
        heads = {}
        for k, v in model.state_dict().items():
            if k.startswith("backbone."):
                continue
            key = (v.data_ptr(), tuple(v.shape))
            if v.numel() and key in seen:
                continue  # a head shared by two objectives (UNITER's MRC and MRC-kl): saved once
            seen.add(key)
            heads[k] = v.detach().contiguous().cpu()
        _atomic_write(tmp / PRETRAIN_HEADS_NAME, lambda p: save_file(heads, p, metadata={"format": "pt"}))
        spec = {"model_type": name, "tasks": list(job.tasks), "task_objectives": {t: list(o) for t, o in
                                                                                 model.tasks.items()},
                "num_region_classes": int(job.source.num_region_classes),
                "padding_free": bool(job.cfg.model.padding_free), "objectives": dict(job.cfg.model.objectives)}
        (tmp / PRETRAIN_NAME).write_text(json.dumps(spec, indent=2, sort_keys=True))
        files += [PRETRAIN_HEADS_NAME, PRETRAIN_NAME]
    files += save_tokenizer(job.source.tokenizer, tmp)
    shutil.copyfile(run_dir / RUN_CONFIG_NAME, tmp / RUN_CONFIG_NAME)
    files += [RUN_CONFIG_NAME, MANIFEST_NAME, README_NAME]
    manifest["files"] = sorted(set(files))
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (tmp / README_NAME).write_text(_readme(manifest, files))
    return manifest


def _publish(folder: Path) -> None:
    """Permissions as the umask gives new files (the atomic writers' temporary files are
    private), then fsync every file and the folder."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [*folder.iterdir(), folder]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    _fsync_tree(folder)


def _fsync_tree(folder: Path) -> None:
    from vlfast.training.checkpoint import _fsync_dir  # fsync of one path, errors ignored

    for p in [*folder.iterdir(), folder]:
        _fsync_dir(p)


def _prepare_out(out: Path) -> None:
    """Create ``out``'s parent and remove temporary folders of interrupted exports to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in out.parent.glob(f".{out.name}.*{_TMP_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)


def export(out: PathLike, *, run_dir: Optional[PathLike] = None, checkpoint: Optional[str] = None,
           official: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Export a run's checkpoint into ``out`` (see the module docstring) -> the manifest
    (``export.json``).  ``checkpoint``: a path (the run directory is the parent of its
    ``checkpoints/``), or with ``run_dir`` also ``best`` / ``latest`` (default: best, else
    the newest step checkpoint).  User errors raise UserError / ValueError / OSError
    before anything is written."""
    from vlfast.evaluate import prepare
    from vlfast.train import user_errors

    out = Path(out)
    with user_errors():
        rd, ck = _resolve(run_dir, checkpoint)
        _check_out(out, rd, overwrite)
        job, path = prepare(rd, ck)
        if _inside(path, out):
            from vlfast.training.config import UserError

            raise UserError(f"--out: {out} holds the checkpoint {path}; choose another directory")
        _prepare_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_TMP_SUFFIX, dir=out.parent))
    old: Optional[Path] = None
    try:
        manifest = _write(tmp, job, rd, path, official)
        _publish(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old{_TMP_SUFFIX}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)  # put the previous export back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_tree(out.parent)
    return manifest


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    from vlfast.train import ArgParser, prog_name

    ap = ArgParser(prog=prog_name("vlfast.export", "vlfast-export"),
                   description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--checkpoint", help="a checkpoint (RUN/checkpoints/best.pt or step_N.pt); with --run-dir "
                                         "also best | latest")
    ap.add_argument("--run-dir", help="a training run directory (with config.yaml): its best.pt, else its newest "
                                      "step checkpoint")
    ap.add_argument("--out", required=True, help="the directory to write")
    ap.add_argument("--official", action="store_true",
                    help="the original repository's key layout (pytorch_model.bin) instead of vlfast's")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = ap.parse_args(argv)
    m = export(args.out, run_dir=args.run_dir, checkpoint=args.checkpoint, official=args.official,
               overwrite=args.overwrite)
    print(f"wrote {args.out} ({', '.join(m['files'])}) from {m['source']['checkpoint']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command line -> the exit code: 0 done, 1 a failure while writing, 2 a user
    error (one line on stderr; ``--debug`` adds the traceback)."""
    from vlfast.train import run_cli

    return run_cli("vlfast.export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
