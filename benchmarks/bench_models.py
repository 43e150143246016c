"""Benchmark of a training step of the four models (VisualBERT, UNITER, ViLBERT, VL-BERT)
on ragged vision-language batches: vlfast vs the same model on the reference backend,
and vs HF ``VisualBertForPreTraining`` for VisualBERT.

The step is forward + backward (gradients set to None before each step; ``--adamw``
adds an AdamW update, off by default), in training mode (dropout on, as in
pretraining), of the encoder plus small pretraining heads written here (the real
objectives come with the training issue):

* MLM: transform (dense, GELU, LayerNorm) and a decoder tied to the word embeddings
  (30522 words at base size; UNITER's cased 28996), applied ONLY at the masked
  positions (15 % of the real text tokens), cross-entropy there;
* a 2-way head on the pooled output: VisualBERT sentence-image prediction, UNITER
  ITM, ViLBERT alignment (on the fused pooled pair ``pooled_t * pooled_v``); VL-BERT
  has MLM only.

Providers:

* ``vlfast_padded``: our model, ``padding_free=False``, default backend (``auto``);
* ``vlfast_packed``: our model, ``padding_free=True`` (the encoder runs on the packed
  real tokens through ``varlen_attention``);
* ``reference``: our model (padded) under ``with vlfast.ops.backend("reference")``:
  every op eager PyTorch.  On CPU ``auto`` also runs the reference attention math,
  but takes the dropout keep masks from the C++ driver; forced ``reference``
  generates them with Philox in eager integer ops, which is most of its time there
  (~1 s a step for the small models at batch 16, ~45 s for VisualBERT base);
* ``hf`` (VisualBERT only): HF ``transformers.VisualBertForPreTraining`` with the same
  sizes (``config_to_hf`` of our config: hidden, layers, heads, vocab,
  visual_embedding_dim), on the same batch padded to the batch max (text and
  regions), doing what HF does for pretraining: ``labels`` over every one of the
  Lt+Lv positions (-100 except the masked words) and ``sentence_image_labels``.
  **HF computes MLM logits at every position** -- B x (Lt+Lv) x 30522 scores, most of
  them on padding, regions and unmasked words -- **while our heads score only the
  masked positions**: that is one of the two CPU levers the models issue names
  (the other is the padding-free encoder).  The HF row therefore measures the HF
  recipe, not the same arithmetic.

Batches: per sample, text 8-60 tokens and 10-100 regions (uniform, inclusive),
seeded by ``--seed`` and the batch size only, so every model and provider sees the
same lengths and the same data; right padded to the batch max.  ``real_tokens`` =
real text tokens + real regions (VL-BERT's [END] slot is not counted); ``tokens_per_s`` = real_tokens / median step time.  Peak memory is
measured on GPU only (torch keeps no CPU peak: empty cells).

Sizes: base configs (VisualBERT with 2048-d regions, as its VQA/pretraining
checkpoints).  ``--quick`` (CPU): VisualBERT base with vlfast_padded, vlfast_packed
and hf (an HF base step takes ~12-16 s on a 2-core CPU: warmup 1, rep 2; ``reference``
is left out at base size on CPU: ~45 s a step, see above), plus small configs of the
other three with every provider; batch 16; about 2 minutes in all.  Default on GPU:
all four base models, batch 64 and 128, bf16 autocast (``--dtype fp32`` for fp32).

At the end it prints the targets: CPU, VisualBERT base real tokens/s of vlfast (best
of padded/packed) / HF >= 1.3x; GPU, per base model vlfast (best) vs reference time
>= 2x and peak memory <= 0.6x.  Rows go to ``benchmarks/results/models.csv``.

    .venv/bin/python benchmarks/bench_models.py --quick
    .venv/bin/python benchmarks/bench_models.py                          # GPU: 4 base models, B 64,128, bf16
    .venv/bin/python benchmarks/bench_models.py --models visualbert --providers vlfast_packed,hf --batch 32
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, device_name, make_parser, measure, peak_memory, print_rows

import vlfast  # noqa: F401  (the installed package)
import vlfast.ops as vops
from vlfast import _dispatch
from vlfast.models import (Uniter, UniterConfig, ViLBert, ViLBertConfig, VisualBert, VisualBertConfig, VLBert,
                           VLBertConfig)

NAME = "models"
PROVIDERS = ("vlfast_padded", "vlfast_packed", "reference", "hf")
VLFAST_PROVIDERS = ("vlfast_padded", "vlfast_packed")
MODELS = ("visualbert", "uniter", "vilbert", "vlbert")
SIZES = ("base", "small")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_LEN = (8, 60)  # tokens per caption, inclusive
REGIONS = (10, 100)  # detector regions per image, inclusive
MLM_PROB = 0.15
IMAGE_SIZE = (640.0, 480.0)  # VL-BERT's boxes are in pixels of an image this size
CPU_TARGET = 1.3  # VisualBERT base: vlfast / HF real tokens/s
GPU_SPEED_TARGET = 2.0  # vlfast vs reference time
GPU_MEMORY_TARGET = 0.6  # vlfast / reference peak memory

Rows = list[dict[str, Any]]

COLUMNS = ["model", "size", "provider", "backend", "step", "dtype", "B", "Lt", "Lv", "real_tokens", "real_frac",
           "params_m", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "peak_mem_mb"]


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------

def make_config(model: str, size: str) -> Any:
    """Our config of ``model`` at ``size`` (base: the published sizes; VisualBERT with
    2048-d region features)."""
    if model == "visualbert":
        return VisualBertConfig.base(visual_embedding_dim=2048) if size == "base" else VisualBertConfig.small()
    cls = {"uniter": UniterConfig, "vilbert": ViLBertConfig, "vlbert": VLBertConfig}[model]
    return cls.base() if size == "base" else cls.small()


MODEL_CLASSES = {"visualbert": VisualBert, "uniter": Uniter, "vilbert": ViLBert, "vlbert": VLBert}


FEATURE_FIELD = {"visualbert": "visual_embedding_dim", "uniter": "img_dim", "vilbert": "v_feature_size",
                 "vlbert": "visual_feat_dim"}


def feature_dim(model: str, config: Any) -> int:
    """Region feature size of ``model``'s config."""
    return getattr(config, FEATURE_FIELD[model])


def head_dim(model: str, config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------------
# Ragged batches
# ----------------------------------------------------------------------------------

def ragged_lengths(batch: int, lo_hi: tuple[int, int], seed: int, salt: int) -> list[int]:
    """``batch`` uniform draws in [lo, hi] (inclusive), seeded by (seed, batch, salt)
    only: every model and provider sees the same lengths."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + salt)
    lo, hi = lo_hi
    return torch.randint(lo, hi + 1, (batch,), generator=g).tolist()


@dataclass
class Batch:
    """One ragged batch, right padded to the batch max.  Masks bool (True = real)."""
    input_ids: Tensor  # (B, Lt); masked words replaced by [MASK]
    t_mask: Tensor  # (B, Lt)
    token_type_ids: Tensor  # (B, Lt)
    feats: Tensor  # (B, Lv, F)
    v_mask: Tensor  # (B, Lv)
    boxes: Optional[Tensor]  # model-specific: UNITER (B,Lv,7), ViLBERT (B,Lv,5), VL-BERT (B,Lv,4) pixels
    image_size: Optional[Tensor]  # VL-BERT (B, 2)
    mlm_mask: Tensor  # (B, Lt) bool: words to predict
    mlm_labels: Tensor  # (n_masked,) their original ids, row-major order of mlm_mask
    pair_labels: Tensor  # (B,) 0/1: matched / aligned

    @property
    def t_lens(self) -> list[int]:
        return self.t_mask.sum(1).tolist()

    @property
    def v_lens(self) -> list[int]:
        return self.v_mask.sum(1).tolist()

    @property
    def real_tokens(self) -> int:
        return int(self.t_mask.sum()) + int(self.v_mask.sum())

    @property
    def real_frac(self) -> float:
        B, Lt = self.t_mask.shape
        return self.real_tokens / (B * (Lt + self.v_mask.shape[1]))

    def hf_labels(self) -> Tensor:
        """(B, Lt+Lv) MLM labels as HF takes them: -100 except the masked words."""
        B, Lt = self.t_mask.shape
        lab = torch.full((B, Lt + self.v_mask.shape[1]), -100, dtype=torch.long, device=self.input_ids.device)
        lab[:, :Lt][self.mlm_mask] = self.mlm_labels
        return lab


def _boxes(B: int, Lv: int, g: torch.Generator) -> Tensor:
    """(B, Lv, 4) normalised [x1, y1, x2, y2] with positive width and height."""
    xy = torch.rand(B, Lv, 2, generator=g) * 0.8
    wh = 0.05 + torch.rand(B, Lv, 2, generator=g) * (0.95 - xy)
    return torch.cat([xy, xy + wh], -1)


def make_batch(model: str, config: Any, batch: int, seed: int, device: torch.device) -> Batch:
    """The ragged batch of ``model`` for (batch, seed): lengths and ids are the same for
    every model (ids folded into each vocabulary); features, boxes and masking seeded."""
    t_lens = ragged_lengths(batch, TEXT_LEN, seed, 1)
    v_lens = ragged_lengths(batch, REGIONS, seed, 2)
    B, Lt, Lv = batch, max(t_lens), max(v_lens)
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    vocab, pad = config.vocab_size, config.pad_token_id
    t_mask = torch.arange(Lt)[None] < torch.tensor(t_lens)[:, None]
    v_mask = torch.arange(Lv)[None] < torch.tensor(v_lens)[:, None]
    low = 1000 if vocab > 2000 else 4  # BERT's vocab: plain words after the special tokens
    ids = torch.randint(low, vocab, (B, Lt), generator=g)
    cls_id, sep_id, mask_id = (101, 102, 103) if vocab > 2000 else (2, 3, 1)
    ids[:, 0] = cls_id
    ids[torch.arange(B), torch.tensor(t_lens) - 1] = sep_id
    ids = torch.where(t_mask, ids, torch.full_like(ids, pad))
    # MLM: 15 % of the real words (never [CLS]/[SEP]), at least one per sample
    mlm_mask = torch.zeros(B, Lt, dtype=torch.bool)
    for b, n in enumerate(t_lens):
        inner = n - 2
        k = max(1, round(MLM_PROB * n))
        pos = 1 + torch.randperm(inner, generator=g)[:k]
        mlm_mask[b, pos] = True
    labels = ids[mlm_mask]
    ids = ids.masked_fill(mlm_mask, mask_id)
    fd = feature_dim(model, config)
    feats = torch.randn(B, Lv, fd, generator=g).abs() * v_mask[..., None]  # detector features are ReLU outputs
    nb = _boxes(B, Lv, g)
    boxes = image_size = None
    if model == "uniter":
        w, h = nb[..., 2] - nb[..., 0], nb[..., 3] - nb[..., 1]
        boxes = torch.cat([nb, w[..., None], h[..., None], (w * h)[..., None]], -1)
    elif model == "vilbert":
        area = (nb[..., 2] - nb[..., 0]) * (nb[..., 3] - nb[..., 1])
        boxes = torch.cat([nb, area[..., None]], -1)
    elif model == "vlbert":
        size = torch.tensor(IMAGE_SIZE)
        boxes = nb * size.repeat(2)
        image_size = size.expand(B, 2).clone()
    pair = torch.randint(0, 2, (B,), generator=g)
    to = (lambda t: None if t is None else t.to(device))
    return Batch(input_ids=to(ids), t_mask=to(t_mask), token_type_ids=to(torch.zeros(B, Lt, dtype=torch.long)),
                 feats=to(feats), v_mask=to(v_mask), boxes=to(boxes), image_size=to(image_size),
                 mlm_mask=to(mlm_mask), mlm_labels=to(labels), pair_labels=to(pair))


# ----------------------------------------------------------------------------------
# Pretraining heads (ours: only where the loss needs them)
# ----------------------------------------------------------------------------------

class MlmHead(nn.Module):
    """BERT's MLM head (HF names: transform.dense, transform.LayerNorm, bias), the
    decoder tied to ``word_embeddings``; called on the masked positions only."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden, hidden)
        self.transform.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.word_embeddings = [word_embeddings]  # tied, not a submodule (no double registration)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: Tensor) -> Tensor:
        """h (n, hidden) -> logits (n, vocab)."""
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)


class Heads(nn.Module):
    """MLM head and the 2-way pair head (``seq_relationship``) of one model."""

    def __init__(self, model: str, net: nn.Module):
        super().__init__()
        c = net.config
        words = net.word_embeddings if model == "vlbert" else net.embeddings.word_embeddings
        self.mlm = MlmHead(c.hidden_size, words, c.layer_norm_eps)
        self.seq_relationship: Optional[nn.Linear] = None
        if model != "vlbert":
            pooled = c.bi_hidden_size if model == "vilbert" else c.hidden_size
            self.seq_relationship = nn.Linear(pooled, 2)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=c.initializer_range)
                nn.init.zeros_(m.bias)


def model_inputs(model: str, b: Batch) -> dict[str, Any]:
    kw: dict[str, Any] = dict(attention_mask=b.t_mask, token_type_ids=b.token_type_ids, visual_feats=b.feats,
                              visual_mask=b.v_mask)
    if b.boxes is not None:
        kw["visual_boxes"] = b.boxes
    if b.image_size is not None:
        kw["image_size"] = b.image_size
    return kw


def vlfast_loss(model: str, net: nn.Module, heads: Heads, b: Batch, padding_free: bool) -> Tensor:
    """MLM at the masked words + the pair loss (not VL-BERT) of our model."""
    out = net(b.input_ids, padding_free=padding_free, **model_inputs(model, b))
    Lt = b.input_ids.shape[1]
    seq_t = out.seq_t if model == "vilbert" else out.last_hidden_state[:, :Lt]
    logits = heads.mlm(seq_t[b.mlm_mask])  # (n_masked, vocab): the only positions the loss needs
    loss = F.cross_entropy(logits.float(), b.mlm_labels)
    if heads.seq_relationship is not None:
        loss = loss + F.cross_entropy(heads.seq_relationship(out.pooler_output).float(), b.pair_labels)
    return loss


def hf_model(config: VisualBertConfig) -> nn.Module:
    """HF VisualBertForPreTraining with our config's sizes."""
    from transformers import VisualBertConfig as HFConfig, VisualBertForPreTraining

    from vlfast.models.visualbert import config_to_hf

    return VisualBertForPreTraining(HFConfig(**config_to_hf(config)))


def hf_loss(net: nn.Module, b: Batch) -> Tensor:
    """HF's pretraining loss: MLM logits at all Lt+Lv positions, labels -100 except the
    masked words, plus sentence-image prediction."""
    B, Lv = b.v_mask.shape
    out = net(input_ids=b.input_ids, attention_mask=b.t_mask.long(), token_type_ids=b.token_type_ids,
              visual_embeds=b.feats, visual_attention_mask=b.v_mask.long(),
              visual_token_type_ids=torch.ones(B, Lv, dtype=torch.long, device=b.feats.device),
              labels=b.hf_labels(), sentence_image_labels=b.pair_labels)
    return out.loss


# ----------------------------------------------------------------------------------
# One provider
# ----------------------------------------------------------------------------------

def backend_label(provider: str, model: str, config: Any, device: torch.device, dtype: torch.dtype) -> str:
    """What runs the attention of ``provider``: e.g. ``attention=triton`` or, for
    ViLBERT, ``attention=..,co_attention=..``."""
    if provider == "hf":
        import transformers

        return f"transformers {transformers.__version__}"
    if provider == "reference":
        return "reference"
    ops = ["varlen_attention" if provider == "vlfast_packed" else "attention"]
    if model == "vilbert":
        ops.append("co_attention")
    parts = []
    for op in ops:
        try:
            parts.append(f"{op}={_dispatch.select(op, device.type, head_dim=head_dim(model, config), dtype=dtype)}")
        except _dispatch.BackendError as e:
            parts.append(f"{op}=? ({str(e).splitlines()[0][:60]})")
    return ",".join(parts)


def build_step(provider: str, model: str, config: Any, b: Batch, device: torch.device, dtype: torch.dtype,
               adamw: bool, seed: int) -> tuple[Callable[[], Tensor], int]:
    """(step function, parameter count).  Weights seeded by ``seed``: every vlfast
    provider trains the same model."""
    torch.manual_seed(seed)
    if provider == "hf":
        if model != "visualbert":
            raise ValueError(f"hf: VisualBERT only, not {model}")
        net = hf_model(config).to(device).train()
        params = list(net.parameters())
        loss_fn: Callable[[], Tensor] = lambda: hf_loss(net, b)  # noqa: E731
    else:
        net = MODEL_CLASSES[model](config).to(device).train()
        heads = Heads(model, net).to(device).train()
        params = list(net.parameters()) + list(heads.parameters())
        packed = provider == "vlfast_packed"
        loss_fn = lambda: vlfast_loss(model, net, heads, b, packed)  # noqa: E731
    n_params = sum(p.numel() for p in {id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=1e-5) if adamw else None
    amp = dtype != torch.float32

    def step() -> Tensor:
        for p in params:
            p.grad = None
        ctx = vops.backend("reference") if provider == "reference" else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = loss_fn()
            loss.backward()
        if opt is not None:
            opt.step()
        return loss

    return step, n_params


def run_provider(provider: str, model: str, size: str, config: Any, b: Batch, args: argparse.Namespace,
                 device: torch.device, dtype: torch.dtype, warmup: int, rep: int) -> Optional[dict[str, Any]]:
    try:
        step, n_params = build_step(provider, model, config, b, device, dtype, args.adamw, args.seed)
        t = measure(step, warmup=warmup, rep=rep, device=device)
        mem = peak_memory(step, device) / 2**20
    except Exception as e:  # noqa: BLE001  one broken provider never hides the others' rows
        print(f"skip {model} {size} {provider}: {first_line(e)}", file=sys.stderr)
        return None
    finally:
        free_memory(device)
    B, Lt = b.input_ids.shape
    return {"model": model, "size": size, "provider": provider,
            "backend": backend_label(provider, model, config, device, dtype),
            "step": "fwd_bwd_adamw" if args.adamw else "fwd_bwd", "dtype": dtype_name(dtype), "B": B, "Lt": Lt,
            "Lv": b.v_mask.shape[1], "real_tokens": b.real_tokens, "real_frac": b.real_frac,
            "params_m": n_params / 1e6, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "tokens_per_s": b.real_tokens / (t["median_ms"] / 1e3), "peak_mem_mb": mem,
            "quick": int(args.quick or args.tiny)}


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
        return out
    return parse


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return out


def find(rows: Rows, **match: Any) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def best_vlfast(rows: Rows, **match: Any) -> Optional[dict]:
    """The faster of vlfast_padded / vlfast_packed among the rows matching ``match``."""
    mine = [r for p in VLFAST_PROVIDERS if (r := find(rows, provider=p, **match)) is not None]
    return min(mine, key=lambda r: r["median_ms"]) if mine else None


def headlines(rows: Rows, on_gpu: bool) -> list[str]:
    """The issue's targets: CPU, VisualBERT base vlfast (best) / HF real tokens/s >= 1.3x;
    GPU, per base model vlfast (best) vs reference >= 2x time and <= 0.6x peak memory."""
    out: list[str] = []
    keys = list(dict.fromkeys((r["B"], r["dtype"]) for r in rows))
    out.append(f"== VisualBERT base training step, real tokens/s: vlfast (best of padded/packed) / HF "
               f"(target >= {CPU_TARGET}x{' on CPU' if on_gpu else ''})")
    for B, dt in keys:
        sel = dict(model="visualbert", size="base", B=B, dtype=dt)
        mine, hf = best_vlfast(rows, **sel), find(rows, provider="hf", **sel)
        if mine is None or hf is None:
            continue
        x = mine["tokens_per_s"] / hf["tokens_per_s"]
        line = (f"  B={B} {dt}: {mine['provider']} {mine['tokens_per_s']:.0f} tok/s ({mine['median_ms']:.0f} ms) | "
                f"hf {hf['tokens_per_s']:.0f} tok/s ({hf['median_ms']:.0f} ms) -> {x:.2f}x")
        if not on_gpu:
            line += f" ({verdict(x >= CPU_TARGET)})"
        others = [r for p in VLFAST_PROVIDERS if p != mine["provider"] and (r := find(rows, provider=p, **sel))]
        for r in others:
            line += f" | {r['provider']} {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_s'] / hf['tokens_per_s']:.2f}x)"
        out.append(line)
    if len(out) == 1:
        out.append("  not measured (needs visualbert base with hf and a vlfast provider)")
    if on_gpu:
        out.append(f"== vlfast (best of padded/packed) vs reference, base models (targets: >= {GPU_SPEED_TARGET}x "
                   f"speed, <= {GPU_MEMORY_TARGET}x peak memory)")
        for B, dt in keys:
            for model in MODELS:
                sel = dict(model=model, size="base", B=B, dtype=dt)
                mine, ref = best_vlfast(rows, **sel), find(rows, provider="reference", **sel)
                if mine is None or ref is None:
                    continue
                x = ref["median_ms"] / mine["median_ms"]
                m = mine["peak_mem_mb"] / ref["peak_mem_mb"] if ref["peak_mem_mb"] > 0 else float("nan")
                out.append(f"  {model} B={B} {dt}: {mine['provider']} {mine['median_ms']:.1f} ms vs reference "
                           f"{ref['median_ms']:.1f} ms -> {x:.2f}x ({verdict(x >= GPU_SPEED_TARGET)}); peak "
                           f"{mine['peak_mem_mb']:.0f} / {ref['peak_mem_mb']:.0f} MB -> {m:.2f}x "
                           f"({verdict(m <= GPU_MEMORY_TARGET)})")
    else:
        out.append("vlfast vs reference (targets >= 2x, <= 0.6x memory): GPU only (on CPU `auto` runs the reference "
                   "attention too; forced `reference` differs by its eager dropout-mask generator)")
    return out


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    model: str
    size: str
    providers: tuple[str, ...]
    warmup: int
    rep: int


def plan(args: argparse.Namespace, on_gpu: bool) -> list[Plan]:
    wanted = tuple(args.providers or PROVIDERS)
    models = args.models or list(MODELS)

    def provs(model: str, skip: Sequence[str] = ()) -> tuple[str, ...]:
        return tuple(p for p in wanted if (p != "hf" or model == "visualbert") and p not in skip)

    if args.tiny:
        return [Plan(m, "small", provs(m), 0, 1) for m in models]
    sizes = [args.size] if args.size else None
    if args.quick and not on_gpu:
        out = []
        for m in models:
            for size in sizes or (["base"] if m == "visualbert" else ["small"]):
                if size == "base":  # ~5-16 s a step on 2 cores; reference == vlfast_padded on CPU
                    out.append(Plan(m, size, provs(m, () if args.providers else ("reference",)), 1, 2))
                else:
                    out.append(Plan(m, size, provs(m), 1, 5))
        return out
    warmup, rep = (3, 10) if (on_gpu and args.quick) else ((5, 20) if on_gpu else (1, 3))
    return [Plan(m, size, provs(m), warmup, rep) for m in models for size in (sizes or ["base"])]


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    parser.add_argument("--models", type=choice_list(MODELS), default=None,
                        help=f"comma list of {','.join(MODELS)} (default: all)")
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="config size for every model (default: base; --quick on CPU: VisualBERT base, "
                             "the others small)")
    parser.add_argument("--batch", type=int_list, default=None,
                        help="comma list of batch sizes (default: 64,128 on GPU, 16 on CPU; --quick GPU: 64)")
    parser.add_argument("--dtype", type=choice_list(tuple(DTYPES)), default=None,
                        help="comma list of fp32,bf16 (bf16 = autocast; default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--adamw", action="store_true", help="add an AdamW update to the step (default: fwd+bwd)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, data and weights (default: 0)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke test
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.tiny:
        batches = [2]
    elif on_gpu:
        batches = [64] if args.quick else [64, 128]
    else:
        batches = [16]
    batches = args.batch or batches
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    if args.providers and "hf" in args.providers and args.models and "visualbert" not in args.models:
        print("skip hf: VisualBERT only", file=sys.stderr)

    rows: Rows = []
    for p in plan(args, on_gpu):
        config = make_config(p.model, p.size)
        for B in batches:
            b = make_batch(p.model, config, B, args.seed, device)
            for dtype in dtypes:
                for prov in p.providers:
                    row = run_provider(prov, p.model, p.size, config, b, args, device, dtype, p.warmup, p.rep)
                    if row is not None:
                        rows.append(row)
                        print(f"  {p.model} {p.size} {prov} B={B} {dtype_name(dtype)}: {row['median_ms']:.1f} ms, "
                              f"{row['tokens_per_s']:.0f} real tok/s", file=sys.stderr, flush=True)
            del b

    print(f"# {NAME}: training step ({'fwd+bwd+AdamW' if args.adamw else 'fwd+bwd'}) on {device_name(device)}")
    shown = [{c: (f"{r[c]:.4g}" if isinstance(r.get(c), float) and r[c] == r[c] else
                  ("" if isinstance(r.get(c), float) else r.get(c, ""))) for c in COLUMNS} for r in rows]
    print_rows(shown, COLUMNS)
    print("\n".join(headlines(rows, on_gpu)))
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
