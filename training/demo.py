"""A short, real training run on vlfast's attention ops (the default job of
``python -m vlfast.train`` until the full training stack lands).

Task ("retrieval"): a ragged sequence holds items, each a (key, value) pair embedded at
one position, followed by a query key; the model must output the value stored with
that key.  It cannot be solved without attending to the right item (chance is
1/16), so the accuracy shows the attention op and its backward doing their job.  Sequences are padded and masked with a key mask;
after training, the same batch through ``varlen_attention`` (packed, no padding)
must give the same predictions, and ``co_attention`` is checked against two
``attention`` calls.

Runs on a 2-core CPU in well under a minute.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops

N_KEYS = 16  # key tokens 0..15
N_VALUES = 16  # value tokens 16..31
QUERY = 32  # marker before the query key
PAD = 33
VOCAB = 34


@dataclass
class DemoConfig:
    hidden: int = 64
    heads: int = 2
    layers: int = 2
    min_pairs: int = 2
    max_pairs: int = 12
    batch: int = 64
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0


def make_batch(cfg: DemoConfig, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """tokens (B,L,2) = (key or QUERY, value or query key) per position, PAD-padded;
    mask (B,L) bool; target (B,) value class in [0, N_VALUES)."""
    B = cfg.batch
    n_items = torch.randint(cfg.min_pairs, cfg.max_pairs + 1, (B,), generator=g)
    L = cfg.max_pairs + 1
    tokens = torch.full((B, L, 2), PAD, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    target = torch.empty(B, dtype=torch.long)
    for b in range(B):
        n = int(n_items[b])
        keys = torch.randperm(N_KEYS, generator=g)[:n]
        vals = torch.randint(N_KEYS, N_KEYS + N_VALUES, (n,), generator=g)
        pick = int(torch.randint(0, n, (1,), generator=g))
        tokens[b, :n, 0] = keys
        tokens[b, :n, 1] = vals
        tokens[b, n] = torch.tensor([QUERY, int(keys[pick])])
        mask[b, : n + 1] = True
        target[b] = vals[pick] - N_KEYS
    return tokens, mask, target


class Block(nn.Module):
    """Pre-LN transformer block whose attention is ``vlfast.ops.attention``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def attend(self, x: Tensor, mask: Tensor, varlen: bool) -> Tensor:
        B, L, E = x.shape
        H = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, H, E // H).unbind(2)  # (B,L,H,D) each
        if not varlen:
            ctx = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
            return ctx.transpose(1, 2).reshape(B, L, E)
        lens = mask.sum(1)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        packed = [t[mask] for t in (q, k, v)]  # (total,H,D); real tokens are a prefix of each row
        ctx = ops.varlen_attention(*packed, cu, cu, int(lens.max()), int(lens.max()))
        out = x.new_zeros(B, L, H, E // H)
        out[mask] = ctx
        return out.reshape(B, L, E)

    def forward(self, x: Tensor, mask: Tensor, varlen: bool = False) -> Tensor:
        x = x + self.proj(self.attend(x, mask, varlen))
        return x + self.mlp(self.ln2(x))


class RetrievalModel(nn.Module):
    def __init__(self, cfg: DemoConfig):
        super().__init__()
        L = cfg.max_pairs + 1
        self.tok = nn.Embedding(VOCAB, cfg.hidden)
        self.pos = nn.Embedding(L, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, N_VALUES)

    def forward(self, tokens: Tensor, mask: Tensor, varlen: bool = False) -> Tensor:
        """tokens (B,L,2), mask (B,L) -> logits over values (B, N_VALUES), read at the
        last real position (the query)."""
        B, L, _ = tokens.shape
        x = self.tok(tokens).sum(2) + self.pos(torch.arange(L))[None]
        for blk in self.blocks:
            x = blk(x, mask, varlen)
        last = mask.sum(1) - 1
        return self.head(self.ln(x[torch.arange(B), last]))


def co_attention_check(seed: int = 0) -> float:
    """Max |co_attention - two attention calls| on a ViLBERT-shaped toy input."""
    g = torch.Generator().manual_seed(seed)
    B, H, Lt, Lv, D = 2, 2, 7, 11, 32
    qt, kt, vt = (torch.randn(B, H, Lt, D, generator=g) for _ in range(3))
    qv, kv, vv = (torch.randn(B, H, Lv, D, generator=g) for _ in range(3))
    tm = torch.rand(B, Lt, generator=g) > 0.2
    vm = torch.rand(B, Lv, generator=g) > 0.2
    ct, cv = ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm)
    return max(float((ct - ops.attention(qt, kv, vv, vm)).abs().max()),
               float((cv - ops.attention(qv, kt, vt, tm)).abs().max()))


def run(cfg: Optional[DemoConfig] = None, log_every: int = 50, quiet: bool = False) -> dict[str, float]:
    """Train and evaluate; returns the metrics (also printed)."""
    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = RetrievalModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    say = (lambda *a: None) if quiet else print
    say(f"vlfast demo: {cfg.layers}-layer attention encoder, retrieval task, {cfg.steps} steps of "
        f"batch {cfg.batch} (attention backend: {ops.requested_backend()})")
    t0 = time.time()
    first = last = math.nan
    for step in range(1, cfg.steps + 1):
        tokens, mask, target = make_batch(cfg, g)
        loss = F.cross_entropy(model(tokens, mask), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        if step == 1:
            first = last
        if step % log_every == 0 or step == 1:
            say(f"  step {step:4d}  loss {last:.3f}")
    model.eval()
    eval_g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        tokens, mask, target = make_batch(DemoConfig(**{**cfg.__dict__, "batch": 512}), eval_g)
        logits = model(tokens, mask)
        logits_varlen = model(tokens, mask, varlen=True)
    acc = float((logits.argmax(-1) == target).float().mean())
    varlen_diff = float((logits - logits_varlen).abs().max())
    co_diff = co_attention_check(cfg.seed)
    res = {"first_loss": first, "final_loss": last, "accuracy": acc, "chance": 1.0 / N_VALUES,
           "varlen_vs_padded_max_diff": varlen_diff, "co_attention_max_diff": co_diff,
           "seconds": time.time() - t0}
    say("")
    say(f"  {'metric':28s} value")
    for k, v in res.items():
        say(f"  {k:28s} {v:.4g}")
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlfast.train", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps: expected an int >= 1, got {args.steps}")
    res = run(DemoConfig(steps=args.steps, seed=args.seed))
    return 0 if res["final_loss"] < res["first_loss"] else 1
