"""Benchmark of vlfast.ops.attention / varlen_attention on ragged vision-language batches.

Providers: ``eager`` (matmul, masked softmax, matmul in the input dtype), ``compile``
(torch.compile of eager), ``sdpa`` (F.scaled_dot_product_attention with the key mask
as a bool (B,1,1,L) attn_mask), ``vlfast`` (padded kernel with key mask),
``vlfast_varlen`` (the same ragged batch packed, no padding) and ``flash_varlen``
(flash_attn.flash_attn_varlen_func, when flash-attn is installed).  Modes ``fwd``
(no grad), ``bwd`` (backward of one retained forward) and ``fwd_bwd``.

Real lengths are UNITER-like (5-60 words + 10-100 regions, clipped to L, right
padded), seeded and the same for every provider.  ``tflops`` counts the FLOPs of the
problem a provider computes (padded B*L*L for padded providers, the real tokens for
varlen ones); ``tflops_real`` counts only the real tokens' FLOPs for every provider,
so padded and varlen providers compare fairly.  The ``backend`` column says what
actually ran (on CPU ``vlfast`` runs the reference path: that is what ``auto`` picks).

    .venv/bin/python benchmarks/bench_attention.py --quick
    .venv/bin/python benchmarks/bench_attention.py                       # GPU: B 64-256, L 40-200, bf16
    .venv/bin/python benchmarks/bench_attention.py --dtype fp16 --modes fwd_bwd --providers sdpa,vlfast
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, device_name, make_parser, measure, peak_memory, print_rows

import vlfast  # noqa: F401  (the installed package)
import vlfast.ops as vops
from vlfast import _dispatch

NAME = "attention"
PROVIDERS = ("eager", "compile", "sdpa", "vlfast", "vlfast_varlen", "flash_varlen")
VARLEN_PROVIDERS = ("vlfast_varlen", "flash_varlen")
MODES = ("fwd", "bwd", "fwd_bwd")
# FLOPs of a mode relative to the forward's (backward: 5 matmuls vs the forward's 2,
# i.e. 2.5x; the usual flash-attention accounting).
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_LEN = (5, 60)  # words per caption, inclusive
REGIONS = (10, 100)  # detector regions per image, inclusive

Forward = Callable[[], Union[Tensor, tuple[Tensor, ...]]]
Rows = list[dict[str, Any]]


# ----------------------------------------------------------------------------------
# The baselines (also used by bench_co_attention.py)
# ----------------------------------------------------------------------------------

def eager_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """What a BERT does without fused kernels: matmul, masked softmax, matmul, all in the
    input dtype.  q (B,H,Lq,D), k/v (B,H,Lk,D), key_mask (B,Lk) bool, True = real key
    (every row needs one real key, or the softmax gives NaN)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B,H,Lq,Lk)
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """PyTorch's SDPA with the key mask as a bool (B,1,1,Lk) attn_mask (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=scale)


def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> str:
    """Which SDPA kernel runs these inputs, e.g. ``sdpa:efficient_attention`` (private
    torch API; ``sdpa`` when it is not there)."""
    try:
        from torch.nn.attention import SDPBackend

        idx = torch._fused_sdp_choice(q, k, v, key_mask[:, None, None, :])
        return "sdpa:" + SDPBackend(idx).name.lower()
    except Exception:  # noqa: BLE001
        return "sdpa"


def flash_attn_module() -> tuple[Any, Optional[str]]:
    """(flash_attn, None) when it imports, else (None, why)."""
    try:
        import flash_attn
    except Exception as e:  # noqa: BLE001
        return None, f"flash_attn is not importable ({type(e).__name__}: {e})"
    return flash_attn, None


def vlfast_backend(op: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> tuple[str, Optional[str]]:
    """(backend that ``op`` runs, None) or ("", why it is not timed here)."""
    try:
        b = _dispatch.select(op, device.type, head_dim=head_dim, dtype=dtype)
    except _dispatch.BackendError as e:
        return "", str(e).splitlines()[0]
    if b == "triton" and device.type != "cuda":
        return "", "Triton on CPU is the interpreter: a correctness tool, never timed"
    return b, None


# ----------------------------------------------------------------------------------
# Ragged batches
# ----------------------------------------------------------------------------------

def ragged_lengths(batch: int, max_len: int, parts: Sequence[tuple[int, int]], seed: int) -> list[int]:
    """Real lengths of ``batch`` samples: the sum of one uniform draw per (lo, hi) part
    (inclusive), clipped to [1, max_len].  Seeded by (seed, batch) only, so every
    provider and every L sees the same samples (clipped differently)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    total = torch.zeros(batch, dtype=torch.int64)
    for lo, hi in parts:
        total += torch.randint(lo, hi + 1, (batch,), generator=g)
    return total.clamp(1, max_len).tolist()


def length_mask(lengths: Sequence[int], max_len: int, device: torch.device) -> Tensor:
    """(B, max_len) bool, True on the first ``lengths[b]`` positions (right padding)."""
    lens = torch.tensor(list(lengths), device=device)
    return torch.arange(max_len, device=device)[None, :] < lens[:, None]


def cu_seqlens(lengths: Sequence[int], device: torch.device) -> Tensor:
    """(B+1,) int32 offsets of sequences packed back to back."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def randn(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, device=device, dtype=dtype)


@dataclass(frozen=True)
class Case:
    """One self-attention problem: (B,H,L,D) padded, ``lengths`` real tokens per sample."""
    batch: int
    heads: int
    length: int
    head_dim: int
    dtype: torch.dtype
    lengths: tuple[int, ...]
    device: torch.device
    seed: int = 0

    @property
    def real_frac(self) -> float:
        return sum(self.lengths) / (self.batch * self.length)

    def flops(self, mode: str) -> float:
        """FLOPs of the padded problem."""
        return 4.0 * self.batch * self.heads * self.length ** 2 * self.head_dim * FLOP_FACTOR[mode]

    def real_flops(self, mode: str) -> float:
        """FLOPs of the real tokens only: sum over samples of 4*H*len^2*D."""
        return 4.0 * self.heads * self.head_dim * sum(n * n for n in self.lengths) * FLOP_FACTOR[mode]

    def padded(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B,H,L,D) and key mask (B,L); the same values on every call."""
        shape = (self.batch, self.heads, self.length, self.head_dim)
        q, k, v = (randn(shape, self.seed + i, self.device, self.dtype) for i in range(3))
        return q, k, v, length_mask(self.lengths, self.length, self.device)

    def packed(self) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """The real rows of :meth:`padded` packed: q, k, v (total,H,D), cu_seqlens, max_seqlen."""
        q, k, v, mask = self.padded()
        q, k, v = (t.transpose(1, 2)[mask].contiguous() for t in (q, k, v))  # (total,H,D)
        return q, k, v, cu_seqlens(self.lengths, self.device), max(self.lengths)


# ----------------------------------------------------------------------------------
# Modes and measurement (also used by bench_co_attention.py)
# ----------------------------------------------------------------------------------

def _tuple(x: Union[Tensor, tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def mode_fn(mode: str, forward: Forward, leaves: Sequence[Tensor], seed: int = 1234) -> Callable[[], Any]:
    """The function to time for ``mode``.

    ``fwd``: ``forward()`` under no_grad.  ``bwd``: one forward with grad now, then each
    call is ``autograd.grad`` of its outputs w.r.t. ``leaves`` (graph retained).
    ``fwd_bwd``: forward and ``autograd.grad`` in every call.  Output gradients are
    seeded random tensors.  ``forward`` runs once here for bwd/fwd_bwd (compiles, if
    it is compiled)."""
    for t in leaves:
        t.requires_grad_(mode != "fwd")
    if mode == "fwd":
        def fwd() -> Any:
            with torch.no_grad():
                return forward()
        return fwd
    outs = _tuple(forward())
    douts = tuple(randn(o.shape, seed + i, o.device, o.dtype) for i, o in enumerate(outs))
    if mode == "bwd":
        def bwd() -> Any:
            return torch.autograd.grad(outs, leaves, douts, retain_graph=True)
        return bwd
    if mode != "fwd_bwd":
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    del outs

    def fwd_bwd() -> Any:
        return torch.autograd.grad(_tuple(forward()), leaves, douts)
    return fwd_bwd


def time_mode(mode: str, forward: Forward, leaves: Sequence[Tensor], device: torch.device, warmup: int,
              rep: int) -> dict[str, float]:
    """median/p20/p80 ms and peak_mem_mb (NaN on CPU) of ``mode``."""
    fn = mode_fn(mode, forward, leaves)
    t = measure(fn, warmup=max(1, warmup), rep=rep, device=device)
    t["peak_mem_mb"] = peak_memory(fn, device) / 2**20
    return t


def result_row(op: str, provider: str, backend: str, mode: str, dtype: torch.dtype, t: dict[str, float],
               flops: float, real_flops: float, shape: dict[str, Any], real_frac: float, quick: bool) -> dict:
    sec = t["median_ms"] / 1e3
    return {"op": op, "provider": provider, "backend": backend, "mode": mode, **shape,
            "dtype": dtype_name(dtype), "real_frac": real_frac,
            "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "tflops": flops / sec / 1e12, "tflops_real": real_flops / sec / 1e12,
            "peak_mem_mb": t["peak_mem_mb"], "quick": int(quick)}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype) if dtype in DTYPES.values() else str(dtype)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return out


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
        return out
    return parse


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--modes, --dtype, --batch, --seed and the hidden --tiny (smoke tests)."""
    p.add_argument("--modes", type=choice_list(MODES), default=list(MODES),
                   help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--dtype", type=choice_list(tuple(DTYPES)), default=None,
                   help="comma list of bf16,fp16,fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int_list, default=None, help="comma list of batch sizes (overrides the set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the real lengths and the data (default: 0)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke test


def compile_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile with static shapes; call :func:`reset_compile` between shapes so the
    recompile limit never sends a shape back to eager."""
    return torch.compile(fn, dynamic=False)


def reset_compile() -> None:
    torch._dynamo.reset()


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def sig(x: float, digits: int = 4) -> str:
    return "" if x != x else f"{x:.{digits}g}"  # NaN -> ""


def print_table(title: str, rows: Rows, columns: Sequence[str]) -> None:
    """The rows with floats at 4 significant digits."""
    shown = [{c: (sig(r[c]) if isinstance(r.get(c), float) else r.get(c, "")) for c in columns} for r in rows]
    print(title)
    print_rows(shown, columns)


def find(rows: Rows, **match: Any) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# ----------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------

def build(provider: str, case: Case, compiled: Callable[..., Any]) -> tuple[Forward, list[Tensor], str]:
    """(forward closure, leaf tensors, backend label) of ``provider`` on ``case``; inputs
    are made here so each provider holds only its own (peak memory)."""
    scale = 1.0 / math.sqrt(case.head_dim)
    if provider in VARLEN_PROVIDERS:
        q, k, v, cu, max_len = case.packed()
        if provider == "vlfast_varlen":
            backend, _ = vlfast_backend("varlen_attention", case.device, case.head_dim, case.dtype)
            return (lambda: vops.varlen_attention(q, k, v, cu, cu, max_len, max_len, scale=scale)), [q, k, v], backend
        fa, _ = flash_attn_module()
        from flash_attn import flash_attn_varlen_func

        return ((lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0,
                                                softmax_scale=scale, causal=False)),
                [q, k, v], f"flash_attn {getattr(fa, '__version__', '')}".strip())
    q, k, v, mask = case.padded()
    if provider == "eager":
        return (lambda: eager_attention(q, k, v, mask, scale)), [q, k, v], "eager"
    if provider == "compile":
        return (lambda: compiled(q, k, v, mask, scale)), [q, k, v], "inductor"
    if provider == "sdpa":
        return (lambda: sdpa_attention(q, k, v, mask, scale)), [q, k, v], sdpa_backend(q, k, v, mask)
    if provider == "vlfast":
        backend, _ = vlfast_backend("attention", case.device, case.head_dim, case.dtype)
        return (lambda: vops.attention(q, k, v, mask, scale=scale)), [q, k, v], backend
    raise ValueError(f"unknown provider {provider!r}")


def static_skip(provider: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why ``provider`` cannot be timed here (None: it can)."""
    if provider == "flash_varlen":
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn takes fp16/bf16, not {dtype_name(dtype)}"
        return flash_attn_module()[1]
    if provider == "vlfast":
        return vlfast_backend("attention", device, head_dim, dtype)[1]
    if provider == "vlfast_varlen":
        return vlfast_backend("varlen_attention", device, head_dim, dtype)[1]
    return None


# ----------------------------------------------------------------------------------
# Headlines
# ----------------------------------------------------------------------------------

def headlines(rows: Rows, lengths: Sequence[int]) -> list[str]:
    """The ratios the project targets (GPU): vlfast fwd+bwd vs SDPA (>= 1.3x) and eager
    (>= 3x) at L=128, 12x64; vlfast_varlen vs flash_varlen (within 15%); peak memory vs L."""
    out: list[str] = []
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    dt = "bf16" if "bf16" in dtypes else (dtypes[0] if dtypes else "bf16")
    mode = "fwd_bwd" if any(r["mode"] == "fwd_bwd" for r in rows) else None
    if mode is None:
        return ["headline ratios need --modes with fwd_bwd"]
    sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
    batches = sorted({r["B"] for r in sel})
    L0 = 128 if 128 in lengths else max(lengths)
    out.append(f"== vlfast {mode} speedup at L={L0}, H=12, D=64, {dt} (targets: >= 1.3x sdpa, >= 3x eager)")
    for B in batches:
        mine = find(sel, provider="vlfast", B=B, L=L0, H=12, D=64)
        if mine is None:
            continue
        parts = [f"B={B}: vlfast {mine['median_ms']:.3f} ms"]
        for prov, target in (("sdpa", 1.3), ("eager", 3.0), ("compile", None)):
            other = find(sel, provider=prov, B=B, L=L0, H=12, D=64)
            if other is not None:
                x = other["median_ms"] / mine["median_ms"]
                tail = f" ({verdict(x >= target)})" if target else ""
                parts.append(f"{prov} {other['median_ms']:.3f} ms -> {x:.2f}x{tail}")
        out.append("  " + " | ".join(parts))
    out.append(f"== vlfast_varlen vs flash_varlen, {mode}, {dt} (target: within 15%, ratio <= 1.15)")
    for B in batches:
        for L in sorted(lengths):
            mine = find(sel, provider="vlfast_varlen", B=B, L=L)
            fa = find(sel, provider="flash_varlen", B=B, L=L)
            pad = find(sel, provider="vlfast", B=B, L=L)
            if mine is None:
                continue
            line = f"  B={B} L={L} (real {mine['real_frac']:.2f}): vlfast_varlen {mine['median_ms']:.3f} ms"
            if fa is not None:
                x = mine["median_ms"] / fa["median_ms"]
                line += f" | flash_varlen {fa['median_ms']:.3f} ms -> vlfast/flash {x:.2f} ({verdict(x <= 1.15)})"
            else:
                line += " | flash_varlen: not run"
            if pad is not None:
                line += f" | padded vlfast {pad['median_ms']:.3f} ms"
            out.append(line)
    out.append(f"== peak memory vs L, {mode}, {dt} (exponent: ~1 linear, ~2 quadratic)")
    for B in batches:
        for prov in ("vlfast", "vlfast_varlen", "sdpa", "eager"):
            pts = [(L, r["peak_mem_mb"]) for L in sorted(lengths)
                   if (r := find(sel, provider=prov, B=B, L=L)) is not None and r["peak_mem_mb"] == r["peak_mem_mb"]]
            if len(pts) < 2:
                continue
            (l1, m1), (l2, m2) = pts[0], pts[-1]
            expo = math.log(m2 / m1) / math.log(l2 / l1) if m1 > 0 and m2 > 0 else float("nan")
            mems = ", ".join(f"L={L}: {m:.0f} MB" for L, m in pts)
            out.append(f"  B={B} {prov:13s} {mems}; exponent {expo:.2f}")
    return out


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--lengths", type=int_list, default=None, help="comma list of padded lengths L")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    heads, head_dim = 12, 64
    if args.tiny:
        batches, lengths, heads, head_dim, warmup, rep = [4], [80], 2, 16, 1, 2
    elif args.quick:
        batches, lengths = ([4], [40, 128]) if not on_gpu else ([64], [40, 128])
        warmup, rep = (1, 3) if not on_gpu else (5, 20)
    else:
        batches, lengths = ([64, 128, 256], [40, 128, 200]) if on_gpu else ([16, 64], [40, 128, 200])
        warmup, rep = (10, 50) if on_gpu else (1, 5)
    batches = args.batch or batches
    lengths = args.lengths or lengths
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    wanted = args.providers or list(PROVIDERS)

    rows: Rows = []
    skipped: dict[str, str] = {}  # "provider (dtype)" or "compile" -> why
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
            for L in lengths:
                case = Case(B, heads, L, head_dim, dtype,
                            tuple(ragged_lengths(B, L, (TEXT_LEN, REGIONS), args.seed)), device, args.seed)
                reset_compile()
                compiled = compile_fn(eager_attention) if "compile" in runnable else eager_attention
                for prov in runnable:
                    if prov not in skipped:  # a failed compile skips the rest of the run
                        rows += run_provider(prov, case, compiled, args, warmup, rep, skipped)
                    free_memory(device)

    print(f"# {NAME} on {device_name(device)}")
    print_table("", rows, ["provider", "backend", "mode", "B", "H", "L", "D", "dtype", "real_frac", "median_ms",
                           "p20_ms", "p80_ms", "tflops", "tflops_real", "peak_mem_mb"])
    for prov, why in skipped.items():
        print(f"skipped {prov}: {why}")
    if on_gpu:
        print("\n".join(headlines(rows, lengths)))
    else:
        print("headline ratios (vs SDPA/eager/flash, memory vs L): GPU only "
              "(the backend column says what vlfast ran here)")
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


def run_provider(prov: str, case: Case, compiled: Callable[..., Any], args: argparse.Namespace, warmup: int,
                 rep: int, skipped: dict[str, str]) -> Rows:
    varlen = prov in VARLEN_PROVIDERS
    return run_modes(NAME, prov, lambda: build(prov, case, compiled), args=args, device=case.device,
                     dtype=case.dtype, warmup=warmup, rep=rep,
                     flops=case.real_flops if varlen else case.flops, real_flops=case.real_flops,
                     shape={"B": case.batch, "H": case.heads, "L": case.length, "D": case.head_dim},
                     real_frac=case.real_frac, skipped=skipped)


def run_modes(op: str, prov: str, make: Callable[[], tuple[Forward, list[Tensor], str]], *,
              args: argparse.Namespace, device: torch.device, dtype: torch.dtype, warmup: int, rep: int,
              flops: Callable[[str], float], real_flops: Callable[[str], float], shape: dict[str, Any],
              real_frac: float, skipped: dict[str, str]) -> Rows:
    """Rows of one provider on one problem, one per mode in ``args.modes``.

    ``make()`` builds (forward, leaves, backend label); ``flops(mode)`` counts the
    provider's own problem, ``real_flops(mode)`` the real tokens only.  A failure of
    ``compile`` puts it in ``skipped`` (skipped from then on); any other failure skips
    this (provider, mode) with the reason on stderr, so one broken provider never hides
    the others' rows."""
    rows: Rows = []
    where = " ".join(f"{k}={v}" for k, v in shape.items())
    try:
        forward, leaves, backend = make()
    except Exception as e:  # noqa: BLE001
        print(f"skip {prov} {where}: {first_line(e)}", file=sys.stderr)
        return rows
    for mode in args.modes:
        try:
            t = time_mode(mode, forward, leaves, device, warmup, rep)
        except Exception as e:  # noqa: BLE001
            if prov == "compile":
                skipped[prov] = f"torch.compile failed ({first_line(e)})"
                print(f"skip compile: {skipped[prov]}", file=sys.stderr)
                return rows
            print(f"skip {prov} {mode} {where}: {first_line(e)}", file=sys.stderr)
            continue
        rows.append(result_row(op, prov, backend, mode, dtype, t, flops(mode), real_flops(mode), shape,
                               real_frac, args.quick or args.tiny))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
