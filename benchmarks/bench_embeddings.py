"""Benchmark of the fused embedding ops: text_embeddings and the four visual embedding ops.

Providers: ``eager`` (the plain-torch module formula: gathers, sums, LayerNorms and
``F.dropout``), ``compile`` (torch.compile of eager; skipped with the reason when
Inductor cannot run), ``vlfast`` (the public op under ``auto``: Triton on GPU, the
reference on CPU -- the ``backend`` column says which).  Modes ``fwd`` (no grad) and
``fwd_bwd`` (forward + backward into every float input, tables and LayerNorm
parameters included).  Training setting: dropout 0.1.

``gbps`` counts the bytes that must move at minimum: forward reads every dense (N,E)
input and one table row per gather per token and writes the (N,E) output;
forward+backward adds reading dout and the dense inputs again and writing one (N,E)
gradient per dense input and per gathered table (the scatter into the table).  Ids and
(E,) parameters are left out.

    .venv/bin/python benchmarks/bench_embeddings.py --quick
    .venv/bin/python benchmarks/bench_embeddings.py                     # GPU: E 768/1024, 8k-64k tokens, bf16
    .venv/bin/python benchmarks/bench_embeddings.py --ops text,uniter --providers eager,vlfast
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, make_parser, measure, peak_memory, print_rows

import vlfast  # noqa: F401  (the installed package)
import vlfast.ops as vops
from vlfast import _dispatch

NAME = "embeddings"
PROVIDERS = ("eager", "compile", "vlfast")
OPS = ("text", "uniter", "vilbert", "vlbert", "visualbert")
OP_NAMES = {"text": "text_embeddings", "uniter": "uniter_visual_embeddings",
            "vilbert": "vilbert_visual_embeddings", "vlbert": "vlbert_visual_embeddings",
            "visualbert": "visualbert_visual_embeddings"}
# (dense (N,E) inputs, gathered table rows per token)
TRAFFIC = {"text": (0, 3), "uniter": (2, 1), "vilbert": (2, 0), "vlbert": (1, 2), "visualbert": (1, 1 + 3)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
P_DROP = 0.1
VOCAB, MAX_POS, ALIGN = 30522, 512, 3


def eager_fn(op: str, p: float) -> Callable[..., Tensor]:
    """The plain-torch formula of each op (what the models computed before the fused op)."""
    def ln(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-12)

    if op == "text":
        def f(ids, tt, pos, W, P, T, g, b):
            return F.dropout(ln(F.embedding(ids, W, 0) + F.embedding(pos, P) + F.embedding(tt, T), g, b), p)
    elif op == "uniter":
        def f(img, pos, tid, T, g1, b1, g2, b2, g, b):
            return F.dropout(ln(ln(img, g1, b1) + ln(pos, g2, b2) + F.embedding(tid, T), g, b), p)
    elif op == "vilbert":
        def f(img, loc, g, b):
            return F.dropout(ln(img + loc, g, b), p)
    elif op == "vlbert":
        def f(h, mask, pid, tid, img, P, T, gv, bv, g, b):
            x = F.relu(h) * mask[..., None].to(h.dtype)
            e = img[0] + ln(x, gv, bv) + F.embedding(pid, P) + F.embedding(tid, T)
            return F.dropout(ln(e, g, b), p)
    else:
        def f(v, tid, al, VT, VP, P, g, b):
            w = (al != -1).to(v.dtype)
            words = F.embedding(al.clamp(min=0), P) * w[..., None]
            pos = words.sum(2) / w.sum(2).clamp(min=1.0)[..., None] + VP[0]
            return F.dropout(ln(v + pos + F.embedding(tid, VT), g, b), p)
    return f


def vlfast_fn(op: str, p: float) -> Callable[..., Tensor]:
    if op == "text":
        return lambda ids, tt, pos, *fl: vops.text_embeddings(ids, tt, pos, *fl, padding_idx=0, dropout_p=p)
    if op == "uniter":
        return lambda *a: vops.uniter_visual_embeddings(*a, dropout_p=p)
    if op == "vilbert":
        return lambda *a: vops.vilbert_visual_embeddings(*a, dropout_p=p)
    if op == "vlbert":
        return lambda h, mask, *a: vops.vlbert_visual_embeddings(h, *a, visual_mask=mask, dropout_p=p)
    return lambda *a: vops.visualbert_visual_embeddings(*a, dropout_p=p)


def make_inputs(op: str, B: int, L: int, E: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[list[Any], list[Tensor]]:
    """(positional arguments, the differentiable ones among them)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*s, generator=g)).to(device, dtype).requires_grad_(True)

    def ids(hi, *s):
        return torch.randint(0, hi, s or (B, L), generator=g).to(device)

    def lnp():
        return [r(E, scale=0.1, shift=1.0), r(E, scale=0.1)]

    if op == "text":
        fl = [r(VOCAB, E, scale=0.02), r(MAX_POS, E, scale=0.02), r(2, E, scale=0.02)] + lnp()
        pos = torch.arange(L, device=device)[None].expand(B, L)
        return [ids(VOCAB), ids(2), pos, *fl], fl
    if op == "uniter":
        fl = [r(B, L, E), r(B, L, E), r(2, E, scale=0.02)] + lnp() + lnp() + lnp()
        return [fl[0], fl[1], ids(2), *fl[2:]], fl
    if op == "vilbert":
        fl = [r(B, L, E), r(B, L, E)] + lnp()
        return fl, fl
    if op == "vlbert":
        fl = [r(B, L, E), r(1, E, scale=0.02), r(MAX_POS, E, scale=0.02), r(3, E, scale=0.02)] + lnp() + lnp()
        mask = torch.rand(B, L, generator=g).to(device) > 0.2
        return [fl[0], mask, ids(MAX_POS), ids(3), *fl[1:]], fl
    fl = [r(B, L, E), r(2, E, scale=0.02), r(MAX_POS, E, scale=0.02), r(MAX_POS, E, scale=0.02)] + lnp()
    al = ids(MAX_POS + 1, B, L, ALIGN) - 1
    return [fl[0], ids(2), al, *fl[1:]], fl


def min_bytes(op: str, N: int, E: int, elem: int, mode: str) -> float:
    dense, gathers = TRAFFIC[op]
    fwd = elem * N * E * (dense + gathers + 1)
    if mode == "fwd":
        return float(fwd)
    return float(fwd + elem * N * E * (1 + dense + dense + gathers))


def time_mode(fn: Callable[[], Tensor], leaves: list[Tensor], mode: str, device: torch.device, warmup: int,
              rep: int) -> dict[str, float]:
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
    else:
        def step():
            for t in leaves:
                t.grad = None
            out = fn()
            out.backward(torch.ones_like(out))
            return out
    t = measure(step, warmup=warmup, rep=rep, device=device)
    t["peak_mem_mb"] = peak_memory(step, device) / 2**20
    return t


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)} (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd,fwd_bwd")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's size
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    ops_ = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops_ if o not in OPS]
    if bad:
        parser.error(f"--ops: unknown {', '.join(bad)}; choose from {', '.join(OPS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.tiny:
        shapes, (warmup, rep) = [(2, 8, 32)], (1, 2)
    elif args.quick:
        shapes = [(16, 64, 768)] if not on_gpu else [(64, 128, 768)]
        warmup, rep = (1, 5) if not on_gpu else (5, 20)
    else:
        shapes = [(B, L, E) for E in (768, 1024) for (B, L) in ((64, 128), (128, 256), (128, 512))]
        warmup, rep = (2, 10) if not on_gpu else (10, 50)
    providers = args.providers or list(PROVIDERS)
    skipped: dict[str, str] = {}
    rows = []
    for op in ops_:
        for (B, L, E) in shapes:
            inputs, leaves = make_inputs(op, B, L, E, dtype, device)
            N = B * L
            for prov in providers:
                if prov in skipped:
                    continue
                if prov == "vlfast":
                    fn0 = vlfast_fn(op, P_DROP)
                    backend = _dispatch.select(OP_NAMES[op], device.type, dtype=dtype, hidden=E)
                elif prov == "compile":
                    fn0 = torch.compile(eager_fn(op, P_DROP))
                    backend = "inductor"
                else:
                    fn0 = eager_fn(op, P_DROP)
                    backend = "eager"
                for mode in modes:
                    try:
                        t = time_mode(lambda: fn0(*inputs), leaves, mode, device, warmup, rep)
                    except Exception as e:  # noqa: BLE001
                        if prov == "compile":
                            skipped[prov] = f"torch.compile failed ({_first_line(e)})"
                            print(f"skip compile: {skipped[prov]}", file=sys.stderr)
                            break
                        print(f"skip {prov} {op} {mode}: {_first_line(e)}", file=sys.stderr)
                        continue
                    gb = min_bytes(op, N, E, torch.empty((), dtype=dtype).element_size(), mode)
                    rows.append({"op": OP_NAMES[op], "provider": prov, "backend": backend, "mode": mode,
                                 "B": B, "L": L, "tokens": N, "E": E, "dtype": str(dtype).replace("torch.", ""),
                                 "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                                 "gbps": gb / (t["median_ms"] * 1e-3) / 1e9, "peak_mem_mb": t["peak_mem_mb"],
                                 "quick": int(args.quick or args.tiny)})
    print_rows(rows, ["op", "provider", "backend", "mode", "tokens", "E", "dtype", "median_ms", "gbps",
                      "peak_mem_mb"])
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
