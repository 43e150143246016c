"""Benchmark of vlfast.ops.linear_cross_entropy / linear_soft_cross_entropy: the MLM and
MRC losses from hidden states, against the plain-torch head.

Kinds: ``mlm`` (hard labels, the tied decoder over V = 30522 words), ``mrc`` (hard
labels over V = 1601 detector classes) and ``mrc_kl`` (soft targets, KL, V = 1601).
Providers: ``eager`` (``F.linear`` in the input dtype, ``.float()``, then
``F.cross_entropy`` / ``F.kl_div(F.log_softmax)`` -- what the objectives wrote before the
fused op), ``compile`` (torch.compile of eager; skipped with the reason when Inductor
cannot run) and ``vlfast`` (the op under ``auto``: Triton on GPU, the reference on CPU;
the ``backend`` column says which ran).  Modes ``fwd`` (no grad), ``bwd`` and ``fwd_bwd``;
gradients w.r.t. hidden, weight and bias.

``tflops`` counts the GEMMs (2*N*V*E for the forward's logits, 3x that with the
backward; vlfast computes the backward's two GEMMs inside its forward).  ``gbps``
counts the bytes that must move at minimum: the inputs (hidden, weight, bias, labels
or targets) and, with a backward, the gradients written.  ``peak_mem_mb`` is CUDA's
peak allocation during one call, inputs included (empty on CPU).

The issue's target (GPU): at 32k tokens x 30522 words, vlfast's fwd_bwd peak memory
<= 30% of eager's at <= 1.2x eager's time; printed as headlines on GPU.

    .venv/bin/python benchmarks/bench_linear_cross_entropy.py --quick     # CPU, seconds
    .venv/bin/python benchmarks/bench_linear_cross_entropy.py             # GPU: E 768/1024, 8k-64k rows, bf16
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, device_name, make_parser, measure, peak_memory
from bench_attention import (DTYPES, choice_list, dtype_name, find, first_line, free_memory, int_list, mode_fn,
                             print_table, randn, reset_compile, verdict)

import vlfast  # noqa: F401  (the installed package)
import vlfast.ops as vops
from vlfast import _dispatch

NAME = "linear_cross_entropy"
PROVIDERS = ("eager", "compile", "vlfast")
MODES = ("fwd", "bwd", "fwd_bwd")
KINDS = {"mlm": 30522, "mrc": 1601, "mrc_kl": 1601}   # kind -> classes V
GEMMS = {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}
GPU_ROWS = {"mlm": (8192, 16384, 32768, 65536), "mrc": (8192, 32768), "mrc_kl": (8192, 32768)}
GPU_HIDDEN = (768, 1024)
QUICK = {"mlm": ((128,), (256,)), "mrc": ((512,), (256,)), "mrc_kl": ((512,), (256,))}  # rows, hidden
TINY = {"mlm": ((16,), (32,)), "mrc": ((16,), (32,)), "mrc_kl": ((16,), (32,))}
TARGET = {"kind": "mlm", "N": 32768, "V": 30522, "mem": 0.30, "time": 1.2}
Rows = list[dict[str, Any]]


# ----------------------------------------------------------------------------------
# The baselines
# ----------------------------------------------------------------------------------

def eager_hard(hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """The objectives' MLM/MRC loss before the fused op: (N,V) logits in the input
    dtype, fp32 copy, cross-entropy (mean over the rows not labelled -100)."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)


def eager_kl(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
    """UNITER's MRC-kl before the fused op: the mean of the (N,V) KL terms."""
    logits = F.linear(hidden, weight, bias).float()
    return F.kl_div(F.log_softmax(logits, -1), targets, reduction="none").mean()


def vlfast_hard(hidden: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    return vops.linear_cross_entropy(hidden, weight, bias, labels)


def vlfast_kl(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> Tensor:
    return vops.linear_soft_cross_entropy(hidden, weight, bias, targets, reduction="sum", kl=True) / targets.numel()


# ----------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    kind: str
    rows: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0

    @property
    def classes(self) -> int:
        return KINDS[self.kind]

    @property
    def soft(self) -> bool:
        return self.kind == "mrc_kl"

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """hidden (N,E), weight (V,E), bias (V,) in the dtype; labels (N,) int64 (one in
        seven -100, as unmasked rows would be) or targets (N,V) fp32 distributions."""
        N, E, V = self.rows, self.hidden, self.classes
        h = randn((N, E), self.seed, self.device, self.dtype)
        w = randn((V, E), self.seed + 1, self.device, torch.float32).mul_(E ** -0.5).to(self.dtype)
        b = randn((V,), self.seed + 2, self.device, torch.float32).mul_(0.1).to(self.dtype)
        g = torch.Generator(device=self.device).manual_seed(self.seed + 3)
        if self.soft:
            y = torch.softmax(torch.randn(N, V, generator=g, device=self.device) * 3, -1)
        else:
            y = torch.randint(0, V, (N,), generator=g, device=self.device)
            y[::7] = -100
        return h, w, b, y

    def flops(self, mode: str) -> float:
        return 2.0 * self.rows * self.classes * self.hidden * GEMMS[mode]

    def min_bytes(self, mode: str) -> float:
        s = torch.finfo(self.dtype).bits // 8
        N, E, V = self.rows, self.hidden, self.classes
        inputs = (N * E + V * E + V) * s + (N * V * 4 if self.soft else N * 8)
        grads = (N * E + V * E + V) * s
        return float(inputs + (grads if mode != "fwd" else 0))


def vlfast_backend(case: Case) -> tuple[str, Optional[str]]:
    """(backend the op runs, None) or ("", why it is not timed here)."""
    op = "linear_soft_cross_entropy" if case.soft else "linear_cross_entropy"
    try:
        b = _dispatch.select(op, case.device.type, dtype=case.dtype)
    except _dispatch.BackendError as e:
        return "", str(e).splitlines()[0]
    if b == "triton" and case.device.type != "cuda":
        return "", "Triton on CPU is the interpreter: a correctness tool, never timed"
    return b, None


def build(provider: str, case: Case, compiled: Callable[..., Any]) -> tuple[Callable[[], Tensor], list[Tensor], str]:
    h, w, b, y = case.tensors()
    eager = eager_kl if case.soft else eager_hard
    if provider == "eager":
        return (lambda: eager(h, w, b, y)), [h, w, b], "eager"
    if provider == "compile":
        return (lambda: compiled(h, w, b, y)), [h, w, b], "inductor"
    if provider == "vlfast":
        backend, why = vlfast_backend(case)
        if why is not None:
            raise RuntimeError(why)
        fn = vlfast_kl if case.soft else vlfast_hard
        return (lambda: fn(h, w, b, y)), [h, w, b], backend
    raise ValueError(f"unknown provider {provider!r}")


def compile_skip() -> Optional[str]:
    """Why torch.compile (Inductor) cannot run here, or None."""
    try:
        fn = torch.compile(lambda x: x * 2, dynamic=False)
        fn(torch.ones(2))
    except Exception as e:  # noqa: BLE001
        return f"torch.compile failed ({first_line(e)})"
    return None


# ----------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------

def run_case(case: Case, providers: list[str], modes: list[str], warmup: int, rep: int, quick: bool,
             skipped: dict[str, str]) -> Rows:
    rows: Rows = []
    compiled = torch.compile(eager_kl if case.soft else eager_hard, dynamic=False) if "compile" in providers else None
    for prov in providers:
        if prov in skipped:
            continue
        where = f"{case.kind} N={case.rows} E={case.hidden}"
        try:
            forward, leaves, backend = build(prov, case, compiled)
        except Exception as e:  # noqa: BLE001
            print(f"skip {prov} {where}: {first_line(e)}", file=sys.stderr)
            continue
        for mode in modes:
            try:
                fn = mode_fn(mode, forward, leaves)
                t = measure(fn, warmup=max(1, warmup), rep=rep, device=case.device)
                mem = peak_memory(fn, case.device) / 2**20
                del fn
            except Exception as e:  # noqa: BLE001
                if prov == "compile":
                    skipped[prov] = f"torch.compile failed ({first_line(e)})"
                    print(f"skip compile: {skipped[prov]}", file=sys.stderr)
                    break
                print(f"skip {prov} {mode} {where}: {first_line(e)}", file=sys.stderr)
                continue
            sec = t["median_ms"] / 1e3
            rows.append({"op": NAME, "kind": case.kind, "provider": prov, "backend": backend, "mode": mode,
                         "N": case.rows, "E": case.hidden, "V": case.classes, "dtype": dtype_name(case.dtype),
                         "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                         "gbps": case.min_bytes(mode) / sec / 1e9, "tflops": case.flops(mode) / sec / 1e12,
                         "peak_mem_mb": mem, "quick": int(quick)})
        del leaves
        free_memory(case.device)
    return rows


def headlines(rows: Rows) -> list[str]:
    """The issue's target on the GPU rows: mlm, N=32768, fwd_bwd, per E and dtype."""
    out = []
    for r in rows:
        if (r["provider"] != "vlfast" or r["kind"] != TARGET["kind"] or r["N"] != TARGET["N"]
                or r["mode"] != "fwd_bwd"):
            continue
        e = find(rows, provider="eager", kind=r["kind"], N=r["N"], E=r["E"], mode="fwd_bwd", dtype=r["dtype"])
        if e is None:
            continue
        mem = r["peak_mem_mb"] / e["peak_mem_mb"]
        tim = r["median_ms"] / e["median_ms"]
        out.append(f"mlm N={r['N']} V={r['V']} E={r['E']} {r['dtype']} fwd_bwd: peak memory "
                   f"{r['peak_mem_mb']:.0f} MiB vs eager {e['peak_mem_mb']:.0f} MiB = {mem:.1%} "
                   f"(target <= {TARGET['mem']:.0%}: {verdict(mem <= TARGET['mem'])}); time "
                   f"{r['median_ms']:.2f} ms vs eager {e['median_ms']:.2f} ms = {tim:.2f}x "
                   f"(target <= {TARGET['time']}x: {verdict(tim <= TARGET['time'])})")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = make_parser(NAME, PROVIDERS, __doc__.split("\n\n")[0])
    p.add_argument("--modes", type=choice_list(MODES), default=list(MODES),
                   help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--kinds", type=choice_list(tuple(KINDS)), default=list(KINDS),
                   help=f"comma list of {','.join(KINDS)} (default: all)")
    p.add_argument("--dtype", type=choice_list(tuple(DTYPES)), default=None,
                   help="comma list of bf16,fp16,fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--rows", type=int_list, default=None, help="comma list of row counts N (overrides the set)")
    p.add_argument("--hidden", type=int_list, default=None, help="comma list of hidden sizes E (overrides the set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke test
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    quick = args.quick or args.tiny or not on_gpu
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    warmup, rep = (1, 3) if args.tiny else (2, 5) if quick else (3, 10)
    providers = args.providers or list(PROVIDERS)
    skipped: dict[str, str] = {}
    if "compile" in providers:
        why = compile_skip()
        if why:
            skipped["compile"] = why

    rows: Rows = []
    for kind in args.kinds:
        n_set, e_set = (TINY if args.tiny else QUICK)[kind] if quick else (GPU_ROWS[kind], GPU_HIDDEN)
        for E in args.hidden or e_set:
            for N in args.rows or n_set:
                for dtype in dtypes:
                    case = Case(kind, N, E, dtype, device, args.seed)
                    if "compile" in providers and "compile" not in skipped:
                        reset_compile()
                    rows += run_case(case, providers, args.modes, warmup, rep, quick, skipped)

    print(f"# {NAME} on {device_name(device)}")
    print_table("", rows, ["kind", "provider", "backend", "mode", "N", "E", "V", "dtype", "median_ms", "p20_ms",
                           "p80_ms", "gbps", "tflops", "peak_mem_mb"])
    for prov, why in skipped.items():
        print(f"skipped {prov}: {why}")
    if on_gpu:
        print("\n".join(headlines(rows)) or "no mlm N=32768 fwd_bwd rows of both eager and vlfast: no headline")
    else:
        print("headline (peak memory <= 30% of eager at <= 1.2x its time, mlm 32k x 30522): GPU only")
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
