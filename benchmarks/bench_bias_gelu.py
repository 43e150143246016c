"""Benchmark of vlfast.ops.bias_gelu (BERT's intermediate activation, ``gelu(x + bias)``
after a bias-free matmul) against eager PyTorch and torch.compile.

Providers: ``eager`` (``F.gelu(x + bias)`` in the input dtype), ``compile``
(torch.compile of it; skipped with the reason when Inductor cannot run) and
``vlfast`` (the op under ``auto``: Triton on GPU, the reference on CPU -- the
``backend`` column says which).  Modes ``fwd``, ``bwd`` (dx and dbias) and ``fwd_bwd``.
The width is the intermediate size: ``--hidden`` 768/1024 means x of 4 x hidden
columns (3072/4096), as in BERT.

``gbps`` = minimum bytes / median time: fwd reads x and writes out (2 N I), bwd reads
dy and x and writes dx (3 N I), fwd_bwd the sum (times the element size; bias left out).

    .venv/bin/python benchmarks/bench_bias_gelu.py --quick          # CPU: 2048 tokens x 3072, fp32
    .venv/bin/python benchmarks/bench_bias_gelu.py                  # GPU: 8k-64k tokens x 3072/4096, bf16
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under python -P
from _common import make_parser  # noqa: E402
from bench_attention import DTYPES, compile_fn, dtype_name, free_memory, reset_compile  # noqa: E402
from bench_layer_norm import add_args, finish, headlines, make_inputs, run_case, sizes, vlfast_backend  # noqa: E402

import vlfast.ops as vops  # noqa: E402

NAME = "bias_gelu"
PROVIDERS = ("eager", "compile", "vlfast")
BYTES_PER_ELEM = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}
EXPANSION = 4  # intermediate = 4 x hidden


def eager_bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return F.gelu(x + bias)


def vlfast_bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return vops.bias_gelu(x, bias)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(NAME, PROVIDERS, __doc__.splitlines()[0])
    add_args(parser, ("bias_gelu",))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens_list, hidden_list, warmup, rep = sizes(args, on_gpu, (768, 1024), (768,))
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    wanted = args.providers or list(PROVIDERS)

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for dtype in dtypes:
        for hidden in hidden_list:
            inter = EXPANSION * hidden
            for N in tokens_list:
                reset_compile()
                for prov in wanted:
                    if prov in skipped:
                        continue
                    (x,), (_, bias) = make_inputs(1, N, inter, dtype, device, args.seed)
                    if prov == "vlfast":
                        backend, why = vlfast_backend("bias_gelu", device, inter, dtype)
                        if why:
                            skipped[f"vlfast ({dtype_name(dtype)})"] = why
                            continue
                        fn = vlfast_bias_gelu
                    elif prov == "compile":
                        backend, fn = "inductor", compile_fn(eager_bias_gelu)
                    else:
                        backend, fn = "eager", eager_bias_gelu
                    forward = (lambda f=fn, a=x, b=bias: f(a, b))
                    rows += run_case("bias_gelu", prov, forward, [x, bias], backend, args.modes, BYTES_PER_ELEM,
                                     N, inter, dtype, device, warmup, rep, args.quick or args.tiny, {}, skipped)
                    free_memory(device)
    return finish(NAME, rows, skipped, device, args, headlines(rows, args.peak_gbs, ln_bwd=False))


if __name__ == "__main__":
    raise SystemExit(main())
