"""Benchmark of vlfast.ops.layer_norm and dropout_add_layer_norm (BERT's
``LayerNorm(dropout(dense(h)) + residual)``) against eager PyTorch and torch.compile.

Providers: ``eager`` (``F.layer_norm`` / ``F.layer_norm(F.dropout(x) + residual)`` in
the input dtype), ``compile`` (torch.compile of the eager code; skipped with the
reason when Inductor cannot run) and ``vlfast`` (the op under ``auto``: Triton on GPU,
the reference on CPU -- the ``backend`` column says which).  Modes ``fwd`` (no grad),
``bwd`` (backward of one retained forward: for layer_norm this is "LayerNorm backward",
the issue's target against torch's) and ``fwd_bwd``.  ``dropout_add_layer_norm`` runs
with ``--dropout`` (default 0.1, as in training) and returns only ``out`` to the
timed graph, as the models use it.

``gbps`` = the bytes that must move at minimum / median time: layer_norm fwd reads x
and writes out (2 N E), bwd reads x and dy and writes dx (3 N E);
dropout_add_layer_norm fwd reads x and residual and writes out and prenorm (4 N E),
bwd reads dout and prenorm and writes dx and dresidual (4 N E); fwd_bwd is the sum
(element size times that; the (E,) parameters and (N,) statistics are left out).

    .venv/bin/python benchmarks/bench_layer_norm.py --quick          # CPU: 2048 tokens x 768, fp32
    .venv/bin/python benchmarks/bench_layer_norm.py                  # GPU: 8k-64k tokens x 768/1024, bf16
    .venv/bin/python benchmarks/bench_layer_norm.py --ops layer_norm --modes bwd --peak-gbs 3350
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, device_name, make_parser  # noqa: E402
from bench_attention import (DTYPES, MODES, choice_list, compile_fn, dtype_name, first_line,  # noqa: E402
                             free_memory, int_list, print_table, randn, reset_compile, time_mode)

import vlfast.ops as vops  # noqa: E402
from vlfast import _dispatch  # noqa: E402

NAME = "layer_norm"
PROVIDERS = ("eager", "compile", "vlfast")
Rows = list[dict[str, Any]]


# ----------------------------------------------------------------------------------
# The ops and their baselines
# ----------------------------------------------------------------------------------

def eager_layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def eager_dropout_add_layer_norm(x: Tensor, r: Tensor, w: Tensor, b: Tensor, p: float, eps: float) -> Tensor:
    """What a BERT layer does without fused ops: dropout, add, LayerNorm."""
    return F.layer_norm(F.dropout(x, p, True) + r, (x.shape[-1],), w, b, eps)


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: its dispatch name, eager code, vlfast call, the (N, E) inputs
    it takes (count of row tensors), and its minimum bytes per element of N x E per mode."""
    name: str
    n_rows_inputs: int
    bytes_per_elem: dict[str, int]
    eager: Callable[..., Tensor]
    vlfast: Callable[..., Tensor]


def _ln_vlfast(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return vops.layer_norm(x, w, b, eps=eps)


def _dal_vlfast(x: Tensor, r: Tensor, w: Tensor, b: Tensor, p: float, eps: float) -> Tensor:
    return vops.dropout_add_layer_norm(x, r, w, b, dropout_p=p, eps=eps)[0]


OPS = {
    "layer_norm": OpSpec("layer_norm", 1, {"fwd": 2, "bwd": 3, "fwd_bwd": 5}, eager_layer_norm, _ln_vlfast),
    "dropout_add_layer_norm": OpSpec("dropout_add_layer_norm", 2, {"fwd": 4, "bwd": 4, "fwd_bwd": 8},
                                     eager_dropout_add_layer_norm, _dal_vlfast),
}


# ----------------------------------------------------------------------------------
# Generic driver (also used by bench_bias_gelu.py)
# ----------------------------------------------------------------------------------

def vlfast_backend(op: str, device: torch.device, hidden: int, dtype: torch.dtype) -> tuple[str, Optional[str]]:
    """(backend ``op`` runs under auto, None) or ("", why it is not timed)."""
    try:
        b = _dispatch.select(op, device.type, hidden=hidden, dtypes=(dtype,))
    except _dispatch.BackendError as e:
        return "", str(e).splitlines()[0]
    if b == "triton" and device.type != "cuda":
        return "", "Triton on CPU is the interpreter: a correctness tool, never timed"
    return b, None


def make_inputs(n_row_tensors: int, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
                seed: int, param_hidden: Optional[int] = None) -> tuple[list[Tensor], list[Tensor]]:
    """(row tensors (tokens, hidden), parameters (E,)): the same values for every provider."""
    rows = [randn((tokens, hidden), seed + i, device, dtype) for i in range(n_row_tensors)]
    E = param_hidden or hidden
    params = [1 + 0.1 * randn((E,), seed + 10, device, dtype), 0.1 * randn((E,), seed + 11, device, dtype)]
    return rows, params


def result_row(op: str, provider: str, backend: str, mode: str, tokens: int, hidden: int, dtype: torch.dtype,
               t: dict[str, float], bytes_moved: float, quick: bool, extra: dict[str, Any]) -> dict[str, Any]:
    return {"op": op, "provider": provider, "backend": backend, "mode": mode, "tokens": tokens, "hidden": hidden,
            "dtype": dtype_name(dtype), **extra, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"],
            "p80_ms": t["p80_ms"], "gbps": bytes_moved / (t["median_ms"] / 1e3) / 1e9,
            "peak_mem_mb": t["peak_mem_mb"], "quick": int(quick)}


def run_case(op: str, provider: str, forward: Callable[[], Tensor], leaves: list[Tensor], backend: str,
             modes: Sequence[str], bytes_per_elem: dict[str, int], tokens: int, hidden: int, dtype: torch.dtype,
             device: torch.device, warmup: int, rep: int, quick: bool, extra: dict[str, Any],
             skipped: dict[str, str]) -> Rows:
    """Rows of one provider on one problem, one per mode.  A failing ``compile`` goes to
    ``skipped`` (and is not tried again); other failures skip that mode with the reason."""
    rows: Rows = []
    esize = torch.empty((), dtype=dtype).element_size()
    for mode in modes:
        try:
            t = time_mode(mode, forward, leaves, device, warmup, rep)
        except Exception as e:  # noqa: BLE001
            if provider == "compile":
                skipped["compile"] = f"torch.compile failed ({first_line(e)})"
                print(f"skip compile: {skipped['compile']}", file=sys.stderr)
                return rows
            print(f"skip {provider} {op} {mode} tokens={tokens} hidden={hidden}: {first_line(e)}", file=sys.stderr)
            continue
        rows.append(result_row(op, provider, backend, mode, tokens, hidden, dtype, t,
                               bytes_per_elem[mode] * tokens * hidden * esize, quick, extra))
    return rows


def find(rows: Rows, **match: Any) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def headlines(rows: Rows, peak_gbs: Optional[float], ln_bwd: bool) -> list[str]:
    """GPU targets: >= 1.5x eager fwd+bwd, >= 80 % of the bandwidth roofline (with
    ``--peak-gbs``), and (``ln_bwd``) layer_norm backward no slower than torch's."""
    out = []
    for r in rows:
        if r["provider"] != "vlfast":
            continue
        key = dict(op=r["op"], mode=r["mode"], tokens=r["tokens"], hidden=r["hidden"], dtype=r["dtype"])
        eager = find(rows, provider="eager", **key)
        comp = find(rows, provider="compile", **key)
        line = f"  {r['op']} {r['mode']:7s} N={r['tokens']} E={r['hidden']} {r['dtype']}: {r['median_ms']:.4f} ms " \
               f"{r['gbps']:.0f} GB/s"
        if peak_gbs:
            frac = r["gbps"] / peak_gbs
            line += f" ({100 * frac:.0f}% of {peak_gbs:.0f}: {'ok' if frac >= 0.8 else 'MISSED'})"
        if eager is not None:
            x = eager["median_ms"] / r["median_ms"]
            if r["mode"] == "fwd_bwd":
                line += f" | eager {x:.2f}x ({'ok' if x >= 1.5 else 'MISSED'} >= 1.5x)"
            elif r["mode"] == "bwd" and ln_bwd and r["op"] == "layer_norm":
                line += f" | torch's backward {x:.2f}x ({'ok' if x >= 1.0 else 'MISSED'} >= 1x)"
            else:
                line += f" | eager {x:.2f}x"
        if comp is not None:
            line += f" | compile {comp['median_ms'] / r['median_ms']:.2f}x"
        out.append(line)
    return out


def add_args(p: argparse.ArgumentParser, ops: Sequence[str]) -> None:
    p.add_argument("--ops", type=choice_list(tuple(ops)), default=list(ops), help=f"comma list of {','.join(ops)}")
    p.add_argument("--modes", type=choice_list(MODES), default=list(MODES),
                   help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--dtype", type=choice_list(tuple(DTYPES)), default=None,
                   help="comma list of bf16,fp16,fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tokens", type=int_list, default=None, help="comma list of token counts N")
    p.add_argument("--hidden", type=int_list, default=None, help="comma list of hidden sizes E")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="the device's memory bandwidth in GB/s, for the roofline headline (e.g. 3350 on H100 SXM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke test


def sizes(args: argparse.Namespace, on_gpu: bool, gpu_hidden: Sequence[int], cpu_hidden: Sequence[int],
          ) -> tuple[list[int], list[int], int, int]:
    """(tokens, hidden sizes, warmup, rep) of the run."""
    if args.tiny:
        tokens, hidden, warmup, rep = [64], [48], 1, 2
    elif on_gpu:
        tokens, hidden = ([8192, 32768] if args.quick else [8192, 32768, 65536]), list(gpu_hidden)
        warmup, rep = (5, 20) if args.quick else (10, 50)
    else:
        tokens, hidden = ([2048] if args.quick else [2048, 8192]), list(cpu_hidden)
        warmup, rep = (1, 5) if args.quick else (2, 10)
    return args.tokens or tokens, args.hidden or hidden, warmup, rep


def finish(name: str, rows: Rows, skipped: dict[str, str], device: torch.device, args: argparse.Namespace,
           lines: list[str]) -> int:
    print(f"# {name} on {device_name(device)}")
    print_table("", rows, ["op", "provider", "backend", "mode", "tokens", "hidden", "dtype", "median_ms", "p20_ms",
                           "p80_ms", "gbps", "peak_mem_mb"])
    for prov, why in skipped.items():
        print(f"skipped {prov}: {why}")
    if device.type == "cuda":
        print("== targets (GPU)")
        print("\n".join(lines))
    else:
        print("targets (>= 1.5x eager fwd+bwd, >= 80% of the roofline, LayerNorm backward vs torch's): GPU only "
              "(on CPU vlfast runs the reference: the backend column says so)")
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    add_args(parser, tuple(OPS))
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout_p of dropout_add_layer_norm (default 0.1)")
    parser.add_argument("--eps", type=float, default=1e-12)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens_list, hidden_list, warmup, rep = sizes(args, on_gpu, (768, 1024), (768,))
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    wanted = args.providers or list(PROVIDERS)

    rows: Rows = []
    skipped: dict[str, str] = {}
    for op in args.ops:
        spec = OPS[op]
        p_extra = {"dropout_p": args.dropout if op == "dropout_add_layer_norm" else 0.0}
        for dtype in dtypes:
            for E in hidden_list:
                for N in tokens_list:
                    reset_compile()
                    for prov in wanted:
                        if prov in skipped:
                            continue
                        rows_in, params = make_inputs(spec.n_rows_inputs, N, E, dtype, device, args.seed)
                        scalars = ((args.dropout,) if op == "dropout_add_layer_norm" else ()) + (args.eps,)
                        backend = {"eager": "eager", "compile": "inductor"}.get(prov, "")
                        if prov == "vlfast":
                            backend, why = vlfast_backend(op, device, E, dtype)
                            if why:
                                skipped[f"vlfast {op} ({dtype_name(dtype)})"] = why
                                continue
                            fn = spec.vlfast
                        elif prov == "compile":
                            fn = compile_fn(spec.eager)
                        else:
                            fn = spec.eager
                        leaves = rows_in + params
                        forward = (lambda f=fn, a=leaves, s=scalars: f(*a, *s))
                        rows += run_case(op, prov, forward, leaves, backend, args.modes, spec.bytes_per_elem, N, E,
                                         dtype, device, warmup, rep, args.quick or args.tiny, p_extra, skipped)
                        free_memory(device)
    return finish(NAME, rows, skipped, device, args, headlines(rows, args.peak_gbs, ln_bwd=True))


if __name__ == "__main__":
    raise SystemExit(main())
