"""AMP (``amp=bf16`` / ``amp=fp16``) on every model, objective and fine-tuning task.

Under ``torch.autocast`` the Linear outputs are half while the parameters stay fp32; the
fused ops follow autocast's rule at their boundary (``kernels/_common.py:autocast_op``):
they cast their float inputs to the autocast dtype, compute in it and keep statistics in
fp32.  These tests drive the real jobs (``VLJob``) and the real loop (``train``) with the
shipped configs, as ``python -m vlfast.train --config ... amp=bf16`` does:

* every (model, task) pair that ``python -m vlfast.train`` accepts runs one bf16 step,
  padded and padding-free, and its backbone computes in bf16;
* each model's full pretraining mix runs 3 steps of the loop under bf16 and under fp16
  (GradScaler), and the AMP loss is within 2x (+1e-3) of the gap that the reference
  backend shows against fp32;
* the same mix under ``vlfast.ops.backend("triton")`` (the Triton interpreter), so the
  kernels' AMP path runs too, within the same bound.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import vlfast.ops as ops
from vlfast.training.config import load_config
from vlfast.training.jobs import SyntheticSource, VLJob
from vlfast.training.loop import train
from vlfast.training.pretrain import MODEL_TASKS
from vlfast.training.tasks import HEADS

NO_DROPOUT = "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0"
TINY = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, " + NO_DROPOUT + "}"
SIZES = {"uniter": TINY, "visualbert": TINY, "vlbert": TINY,
         "vilbert": "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
                    "v_hidden_size: 32, v_num_hidden_layers: 1, v_num_attention_heads: 2, v_intermediate_size: 64, "
                    "bi_hidden_size: 32, bi_num_attention_heads: 2, t_biattention_id: [0], v_biattention_id: [0], "
                    "v_hidden_dropout_prob: 0.0, v_attention_probs_dropout_prob: 0.0, " + NO_DROPOUT + "}"}
SMALL = ["data.options.n_images=60", "data.batch_size=4", "data.eval_batch_size=8", "logging.progress=off",
         "checkpoint.every=0", "device=cpu", "logging.tensorboard=null", "optim.lr_multipliers={}"]
PRETRAIN_PAIRS = [(m, t) for m, tasks in MODEL_TASKS.items() for t in tasks]
FINETUNE_PAIRS = [(m, t) for t, per in HEADS.items() for m in per]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(load_config("default_pretrain", SMALL).data.options)


def _config(model: str, tasks: str, *extra: str, base: str = "default_pretrain"):
    return load_config(base, SMALL + [f"model.name={model}", f"tasks={tasks}", f"model.config={SIZES[model]}", *extra])


_JOBS: dict[tuple, VLJob] = {}


def _job(source: SyntheticSource, model: str, kind: str, task: str, padding_free: bool) -> VLJob:
    """One job per (model, pretraining mix or fine-tuning task, path), shared by the tests."""
    key = (model, kind, task if kind == "finetune" else None, padding_free)
    if key not in _JOBS:
        pf = f"model.padding_free={str(padding_free).lower()}"
        if kind == "pretrain":
            mix = "{" + ", ".join(f"{t}: 1.0" for t in MODEL_TASKS[model]) + "}"
            cfg = _config(model, mix, pf)
        else:
            cfg = _config(model, "{" + task + ": 1.0}", pf, base="default_vqa")
        _JOBS[key] = VLJob(cfg, source)
    return _JOBS[key]


def _step(job: VLJob, task: str, dtype, seen: list | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch step as the loop runs it: forward under autocast, backward outside.
    Returns the loss and the parameter gradients."""
    model = job.model
    model.zero_grad(set_to_none=True)
    batch = next(iter(job.train_batches(task, 0, 0)))
    hook = None
    if seen is not None:
        def grab(mod, args, out):
            seen.extend(t.dtype for t in (out if isinstance(out, tuple) else tuple(out)) if torch.is_tensor(t))
        hook = model.backbone.register_forward_hook(grab)
    torch.manual_seed(0)
    try:
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
            out = job.step(model, batch, task)
    finally:
        if hook is not None:
            hook.remove()
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("model,task", PRETRAIN_PAIRS + FINETUNE_PAIRS, ids=[f"{m}-{t}" for m, t in
                                                                             PRETRAIN_PAIRS + FINETUNE_PAIRS])
def test_every_model_task_pair_runs_a_bf16_step(source, model, task, padding_free):
    kind = "pretrain" if (model, task) in PRETRAIN_PAIRS else "finetune"
    job = _job(source, model, kind, task, padding_free)
    torch.manual_seed(0)
    if kind == "finetune":  # the fine-tuning configs keep dropout: compare with it off
        job.model.eval()
    loss32, g32 = _step(job, task, None)
    seen: list = []
    loss16, g16 = _step(job, task, torch.bfloat16, seen)
    job.model.train()
    # the backbone computed in bf16 (its outputs are the autocast dtype, not upcast)
    assert torch.bfloat16 in seen and torch.float32 not in [d for d in seen if d.is_floating_point], seen
    assert math.isfinite(loss16)
    assert abs(loss16 - loss32) <= 0.02 * max(1.0, abs(loss32)), (loss16, loss32)
    # every parameter that gets a gradient in fp32 gets a finite fp32 one under bf16
    assert set(g16) == set(g32)
    for n, g in g16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in recs if r.get("kind") == "train"]


def _mix_run(source, model: str, run_dir: Path, amp: str, backend: str = "auto") -> list[float]:
    mix = "{" + ", ".join(f"{t}: 1.0" for t in MODEL_TASKS[model]) + "}"
    extra = ["optim.total_steps=3", "logging.every=1", "eval.every=0", "eval.at_end=false",
             "checkpoint.best_metric=null", f"amp={amp}",
             "data.batch_size=2", "model.padding_free=true", "logging.jsonl=metrics.jsonl"]
    cfg = _config(model, mix, *extra)
    with ops.backend(backend):
        res = train(VLJob(cfg, source), cfg, run_dir)
    assert res.step == 3
    losses = _losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    return losses


def _within_reference_gap(amp: list[float], ref: list[float], fp32: list[float]) -> None:
    for a, r, f in zip(amp, ref, fp32):
        assert abs(a - f) <= 2 * abs(r - f) + 1e-3, (amp, ref, fp32)


@pytest.mark.parametrize("model", list(MODEL_TASKS))
def test_full_pretraining_mix_three_steps_bf16_and_fp16(source, model, tmp_path):
    """The loop's own AMP (autocast + GradScaler for fp16) on the whole mix; the AMP
    losses stay within 2x of the reference backend's gap against fp32, plus 1e-3."""
    fp32 = _mix_run(source, model, tmp_path / "fp32", "off")
    for amp in ("bf16", "fp16"):
        ref = _mix_run(source, model, tmp_path / f"{amp}-ref", amp, backend="reference")
        got = _mix_run(source, model, tmp_path / amp, amp)
        _within_reference_gap(got, ref, fp32)
        assert ref != fp32  # the AMP run really ran in half precision


@pytest.mark.parametrize("model", list(MODEL_TASKS))
def test_full_pretraining_mix_under_the_triton_kernels(source, model):
    """The Triton kernels' AMP path (interpreter): one bf16 step of every task of the
    mix, as the loop runs it, within 2x (+1e-3) of the reference backend's bf16 gap
    against fp32, with gradients within the same kind of bound.  UNITER's WRA runs IPOT,
    which has no Triton kernel (cpp/cuda), so its ITM runs without WRA here (WRA under
    AMP is covered above)."""
    mix = "{" + ", ".join(f"{t}: 1.0" for t in MODEL_TASKS[model]) + "}"
    extra = ["data.batch_size=2", "model.padding_free=true"] + (["model.objectives={wra: false}"]
                                                                if model == "uniter" else [])
    job = VLJob(_config(model, mix, *extra), source)
    for task in MODEL_TASKS[model]:
        with ops.backend("reference"):
            f32, g32 = _step(job, task, None)
            ref, gref = _step(job, task, torch.bfloat16)
        with ops.backend("triton"):
            got, gtri = _step(job, task, torch.bfloat16)
        _within_reference_gap([got], [ref], [f32])
        assert set(gtri) == set(g32), task
        num = sum(float((gtri[n] - g32[n]).norm() ** 2) for n in g32) ** 0.5
        den = sum(float((gref[n] - g32[n]).norm() ** 2) for n in g32) ** 0.5
        scale = sum(float(g.norm() ** 2) for g in g32.values()) ** 0.5
        assert num <= 2 * den + 1e-3 * scale, (task, num, den, scale)


def test_ops_follow_the_autocast_rule():
    """Each op under autocast: fp32 parameters with half activations are accepted, the
    output is in the autocast dtype (the OT ops: fp32), and outside autocast a dtype mix
    is still rejected."""
    torch.manual_seed(0)
    E = 16
    x = torch.randn(2, 5, E)
    w, b = torch.ones(E), torch.zeros(E)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            h = torch.nn.functional.linear(x, torch.eye(E))
            assert h.dtype == dt
            ln = ops.layer_norm(h, w, b)
            out, pre = ops.dropout_add_layer_norm(h, x, w, b)
            g = ops.bias_gelu(h, b)
            att = ops.attention(h.view(2, 5, 2, 8).transpose(1, 2), h.view(2, 5, 2, 8).transpose(1, 2),
                                h.view(2, 5, 2, 8).transpose(1, 2))
            loss = ops.linear_cross_entropy(h.reshape(-1, E), torch.randn(7, E), None, torch.randint(0, 7, (10,)))
            mask = torch.ones(2, 5, dtype=torch.bool)
            d = ops.wra_distance(h, h, mask, mask)
        for t in (ln, out, pre, g, att):
            assert t.dtype == dt
        assert loss.dtype == torch.float32 and d.dtype == torch.float32
        ref = torch.nn.functional.layer_norm(h.float(), (E,), w, b, eps=1e-12)
        assert (ln.float() - ref).abs().max() < 2e-2
    with pytest.raises(ValueError, match="type_weight: expected dtype bfloat16"):
        ops.uniter_visual_embeddings(x.bfloat16(), x.bfloat16(), None, torch.randn(2, E), w.bfloat16(), b.bfloat16(),
                                     w.bfloat16(), b.bfloat16(), w.bfloat16(), b.bfloat16())


def test_the_autocast_rule_traces_under_torch_compile():
    """torch.compile(fullgraph=True) traces the rule (the cast and the autocast-off
    body) inside an autocast region, with the same numbers as eager."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)

    def f(x, w, b):
        h = torch.nn.functional.linear(x, torch.eye(8))
        return ops.layer_norm(h, w, b), ops.attention(*(h.view(1, 1, 4, 8),) * 3)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x, w, b), f(x, w, b)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == torch.bfloat16
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    got[0].float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("model,task", [("uniter", "retrieval"), ("vilbert", "retrieval"), ("uniter", "refcoco"),
                                        ("vilbert", "refcoco"), ("vlbert", "refcoco"),
                                        ("vilbert", "phrase_grounding")])
def test_ranking_scores_are_fp32_under_amp(source, model, task):
    """Retrieval and region scores are ranked (recall@k, argmax): under bf16 they come
    out of an fp32 projection, so near-equal candidates do not round into ties that the
    tie rule would then decide (retrieval_recall ranks ties optimistically)."""
    job = _job(source, model, "finetune", task, False)
    m = job.model.eval()
    batch = next(iter(job.train_batches(task, 0, 0)))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(batch).logits
        full = m(batch).logits
    assert low.dtype == torch.float32
    real = torch.isfinite(full)
    assert torch.equal(torch.isfinite(low), real)
    torch.testing.assert_close(low[real], full[real], atol=0.05, rtol=0.05)
    vals = low[real]
    assert vals.unique().numel() == full[real].unique().numel()  # no ties that fp32 does not have
