"""Benchmark of vlfast.ops.co_attention: ViLBERT's co-attention, 23 words x 101 regions, 8x128.

Providers: ``eager`` (two separate eager attentions), ``sdpa_x2`` (two SDPA calls with
bool key masks), ``compile`` (torch.compile of the two eager attentions), ``vlfast``
(co_attention: both directions in one launch) and ``vlfast_x2`` (two
vlfast.ops.attention calls: separates the fusion's gain from the kernel's).  Modes
``fwd``, ``bwd``, ``fwd_bwd`` as in bench_attention.py, same columns with ``Lt``/``Lv``
in place of ``L``; ``tflops_real`` counts the real words x real regions only.

Real lengths: 5-23 words; 10-100 regions + the global image feature, clipped to 101;
seeded, the same for every provider.

    .venv/bin/python benchmarks/bench_co_attention.py --quick
    .venv/bin/python benchmarks/bench_co_attention.py                    # GPU: B 64-256, bf16
    .venv/bin/python benchmarks/bench_co_attention.py --modes fwd_bwd --providers sdpa_x2,vlfast
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and bench_attention, also under python -P
from _common import append_rows, device_name, make_parser
from bench_attention import (DTYPES, FLOP_FACTOR, Forward, Rows, add_common_args, compile_fn, dtype_name,
                             eager_attention, find, free_memory, length_mask, print_table, ragged_lengths,
                             randn, reset_compile, run_modes, sdpa_attention, sdpa_backend, verdict,
                             vlfast_backend)

import vlfast  # noqa: F401  (the installed package)
import vlfast.ops as vops

NAME = "co_attention"
PROVIDERS = ("eager", "sdpa_x2", "compile", "vlfast", "vlfast_x2")
LEN_T, LEN_V, HEADS, HEAD_DIM = 23, 101, 8, 128  # ViLBERT's VQA co-attention


def eager_co_attention(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Tensor, q_v: Tensor, k_v: Tensor,
                       v_v: Tensor, v_mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Text queries over regions, region queries over words: two eager attentions."""
    return eager_attention(q_t, k_v, v_v, v_mask, scale), eager_attention(q_v, k_t, v_t, t_mask, scale)


def sdpa_co_attention(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Tensor, q_v: Tensor, k_v: Tensor,
                      v_v: Tensor, v_mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return sdpa_attention(q_t, k_v, v_v, v_mask, scale), sdpa_attention(q_v, k_t, v_t, t_mask, scale)


def vlfast_x2(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Tensor, q_v: Tensor, k_v: Tensor,
              v_v: Tensor, v_mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return (vops.attention(q_t, k_v, v_v, v_mask, scale=scale),
            vops.attention(q_v, k_t, v_t, t_mask, scale=scale))


@dataclass(frozen=True)
class CoCase:
    """Text stream (B,H,Lt,D) with ``t_lens`` real words, visual (B,H,Lv,D) with ``v_lens``."""
    batch: int
    heads: int
    len_t: int
    len_v: int
    head_dim: int
    dtype: torch.dtype
    t_lens: tuple[int, ...]
    v_lens: tuple[int, ...]
    device: torch.device
    seed: int = 0

    @property
    def real_frac(self) -> float:
        return (sum(self.t_lens) + sum(self.v_lens)) / (self.batch * (self.len_t + self.len_v))

    def flops(self, mode: str) -> float:
        """Both directions of the padded problem: 2 x 4*B*H*Lt*Lv*D."""
        return 8.0 * self.batch * self.heads * self.len_t * self.len_v * self.head_dim * FLOP_FACTOR[mode]

    def real_flops(self, mode: str) -> float:
        """Real words x real regions only: sum over samples of 8*H*lt*lv*D."""
        pairs = sum(a * b for a, b in zip(self.t_lens, self.v_lens))
        return 8.0 * self.heads * self.head_dim * pairs * FLOP_FACTOR[mode]

    def inputs(self) -> tuple[list[Tensor], Tensor, Tensor]:
        """[q_t, k_t, v_t, q_v, k_v, v_v], t_mask, v_mask; the same values on every call."""
        st = (self.batch, self.heads, self.len_t, self.head_dim)
        sv = (self.batch, self.heads, self.len_v, self.head_dim)
        ts = [randn(st, self.seed + i, self.device, self.dtype) for i in range(3)]
        vs = [randn(sv, self.seed + 3 + i, self.device, self.dtype) for i in range(3)]
        return (ts + vs, length_mask(self.t_lens, self.len_t, self.device),
                length_mask(self.v_lens, self.len_v, self.device))


def make_case(batch: int, heads: int, len_t: int, len_v: int, head_dim: int, dtype: torch.dtype,
              device: torch.device, seed: int) -> CoCase:
    t_lens = ragged_lengths(batch, len_t, [(min(5, len_t), len_t)], seed)
    # detector regions plus ViLBERT's global image feature
    v_lens = ragged_lengths(batch, len_v, [(min(10, len_v - 1), len_v - 1), (1, 1)], seed + 1)
    return CoCase(batch, heads, len_t, len_v, head_dim, dtype, tuple(t_lens), tuple(v_lens), device, seed)


def build(provider: str, case: CoCase, compiled: Callable[..., Any]) -> tuple[Forward, list[Tensor], str]:
    """(forward closure, leaves, backend label); inputs are made per provider."""
    scale = 1.0 / math.sqrt(case.head_dim)
    leaves, t_mask, v_mask = case.inputs()
    q_t, k_t, v_t, q_v, k_v, v_v = leaves
    args = (q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask)
    if provider == "eager":
        return (lambda: eager_co_attention(*args, scale)), leaves, "eager"
    if provider == "compile":
        return (lambda: compiled(*args, scale)), leaves, "inductor"
    if provider == "sdpa_x2":
        return (lambda: sdpa_co_attention(*args, scale)), leaves, sdpa_backend(q_t, k_v, v_v, v_mask)
    if provider == "vlfast":
        backend, _ = vlfast_backend("co_attention", case.device, case.head_dim, case.dtype)
        return (lambda: vops.co_attention(*args, scale=scale)), leaves, backend
    if provider == "vlfast_x2":
        backend, _ = vlfast_backend("attention", case.device, case.head_dim, case.dtype)
        return (lambda: vlfast_x2(*args, scale)), leaves, backend
    raise ValueError(f"unknown provider {provider!r}")


def static_skip(provider: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    if provider == "vlfast":
        return vlfast_backend("co_attention", device, head_dim, dtype)[1]
    if provider == "vlfast_x2":
        return vlfast_backend("attention", device, head_dim, dtype)[1]
    return None


def headlines(rows: Rows) -> list[str]:
    """vlfast (one launch) vs two SDPA calls (target >= 1.5x), eager, compile, vlfast_x2."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    dt = "bf16" if "bf16" in dtypes else (dtypes[0] if dtypes else "bf16")
    out: list[str] = []
    for mode in ("fwd_bwd", "fwd", "bwd"):
        sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
        mine_rows = [r for r in sel if r["provider"] == "vlfast"]
        if not mine_rows:
            continue
        target = " (target: >= 1.5x sdpa_x2)" if mode == "fwd_bwd" else ""
        out.append(f"== co_attention {mode} speedup of vlfast, {dt}{target}")
        for mine in mine_rows:
            parts = [f"B={mine['B']} {mine['Lt']}x{mine['Lv']}: vlfast {mine['median_ms']:.3f} ms"]
            for prov in ("sdpa_x2", "eager", "compile", "vlfast_x2"):
                other = find(sel, provider=prov, B=mine["B"], Lt=mine["Lt"], Lv=mine["Lv"])
                if other is not None:
                    x = other["median_ms"] / mine["median_ms"]
                    tail = f" ({verdict(x >= 1.5)})" if prov == "sdpa_x2" and mode == "fwd_bwd" else ""
                    parts.append(f"{prov} {other['median_ms']:.3f} ms -> {x:.2f}x{tail}")
            out.append("  " + " | ".join(parts))
    return out or ["headline ratios need vlfast rows"]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    len_t, len_v, heads, head_dim = LEN_T, LEN_V, HEADS, HEAD_DIM
    if args.tiny:
        batches, len_t, len_v, heads, head_dim, warmup, rep = [3], 7, 19, 2, 16, 1, 2
    elif args.quick:
        batches = [4] if not on_gpu else [64]
        warmup, rep = (1, 3) if not on_gpu else (5, 20)
    else:
        batches = [64, 128, 256] if on_gpu else [16, 64]
        warmup, rep = (10, 50) if on_gpu else (1, 5)
    batches = args.batch or batches
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    wanted = args.providers or list(PROVIDERS)

    rows: Rows = []
    skipped: dict[str, str] = {}
    for dtype in dtypes:
        runnable = []
        for prov in wanted:
            why = static_skip(prov, device, head_dim, dtype)
            if why is None:
                runnable.append(prov)
            else:
                skipped[f"{prov} ({dtype_name(dtype)})"] = why
                print(f"skip {prov} ({dtype_name(dtype)}): {why}", file=sys.stderr)
        for B in batches:
            case = make_case(B, heads, len_t, len_v, head_dim, dtype, device, args.seed)
            reset_compile()
            compiled = compile_fn(eager_co_attention) if "compile" in runnable else eager_co_attention
            shape = {"B": B, "H": heads, "Lt": len_t, "Lv": len_v, "D": head_dim}
            for prov in runnable:
                if prov not in skipped:  # a failed compile skips the rest of the run
                    rows += run_modes(NAME, prov, lambda prov=prov: build(prov, case, compiled), args=args,
                                      device=device, dtype=dtype, warmup=warmup, rep=rep, flops=case.flops,
                                      real_flops=case.real_flops, shape=shape, real_frac=case.real_frac,
                                      skipped=skipped)
                free_memory(device)

    print(f"# {NAME} on {device_name(device)}")
    print_table("", rows, ["provider", "backend", "mode", "B", "H", "Lt", "Lv", "D", "dtype", "real_frac",
                           "median_ms", "p20_ms", "p80_ms", "tflops", "tflops_real", "peak_mem_mb"])
    for prov, why in skipped.items():
        print(f"skipped {prov}: {why}")
    if on_gpu:
        print("\n".join(headlines(rows)))
    else:
        print("headline ratios (vlfast vs two SDPA calls): GPU only (the backend column says what vlfast ran here)")
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
