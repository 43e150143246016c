"""Benchmark of vlfast.kernels.dropout_mask.keep_mask: Philox keep masks of 1M-64M elements.

Providers: ``reference`` (PyTorch int64 emulation), ``cpp`` (OpenMP driver, CPU),
``cuda`` (vlfast._C kernel) and ``triton`` (GPU only: the interpreter is not timed).
Throughput is reported as GB/s of mask written (1 byte per element) and G elements/s.

    .venv/bin/python benchmarks/bench_dropout_mask.py --quick
    .venv/bin/python benchmarks/bench_dropout_mask.py --providers cpp,reference
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import append_rows, device_name, make_parser, measure, peak_memory, print_rows

import vlfast  # noqa: F401  (the installed package)
from vlfast import _dispatch
from vlfast.kernels.dropout_mask import keep_mask

NAME = "dropout_mask"
PROVIDERS = ("reference", "cpp", "cuda", "triton")
P = 0.1
SEED, OFFSET = 0x5EED, 2**32 - 7  # an offset that crosses the 32-bit boundary


def _runnable(provider: str, device: torch.device) -> str | None:
    """None when ``provider`` can run on ``device`` in a benchmark, else why not."""
    if provider == "triton" and device.type != "cuda":
        return "triton is timed on GPU only (the CPU interpreter is a correctness tool)"
    return dict(_dispatch.explain("keep_mask", device.type))[provider]


def main(argv: list[str] | None = None) -> int:
    args = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        sizes = [1 << 20] if not on_gpu else [1 << 20, 1 << 24]
        warmup, rep = (1, 3) if not on_gpu else (5, 20)
    else:
        sizes = [1 << 20, 1 << 22, 1 << 24, 1 << 26]
        warmup, rep = (2, 7) if not on_gpu else (10, 50)
    wanted = args.providers or list(PROVIDERS)

    rows = []
    for prov in wanted:
        why = _runnable(prov, device)
        if why is not None:
            print(f"skip {prov}: {why}", file=sys.stderr)
            continue
        for n in sizes:
            if prov == "reference" and not on_gpu and n > (1 << 24) and not args.providers:
                print(f"skip reference n={n}: > 16M elements on CPU takes minutes (ask with --providers)",
                      file=sys.stderr)
                continue

            def fn(prov=prov, n=n):
                with _dispatch.backend(prov):
                    return keep_mask(n, P, SEED, OFFSET, device=device)

            t = measure(fn, warmup=warmup, rep=rep, device=device)
            sec = t["median_ms"] / 1e3
            rows.append({"op": NAME, "provider": prov, "n": n, "p": P, "dtype": "bool",
                         "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                         "gbps": n / sec / 1e9,  # 1 byte per element: also G elements/s
                         "peak_mem_bytes": peak_memory(fn, device), "quick": int(args.quick)})

    print(f"# {NAME} on {device_name(device)}")
    print_rows(rows, ["provider", "n", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mem_bytes"])
    if rows and not args.no_save:
        path = append_rows(args.out, rows, device=device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
