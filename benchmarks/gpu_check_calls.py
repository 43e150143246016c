"""Tiny, seeded kernel calls for ``make gpu-check``'s compute-sanitizer and ncu steps.

    python3 benchmarks/gpu_check_calls.py ipot                      # CUDA IPOT (+ Sinkhorn) vs the reference
    python3 benchmarks/gpu_check_calls.py attention                 # Triton attention fwd + bwd vs the reference
    python3 benchmarks/gpu_check_calls.py attention --forward-only --iters 3 --no-check   # for ncu

``ipot`` runs ``vlfast.ops.ipot`` on the ``cuda`` backend (the kernel of csrc/ot/ot.cu)
on two ragged batches: a small one (each problem's tile in shared memory) and one
300 x 400 problem too large for shared memory (the global-memory path), then
``vlfast.ops.sinkhorn`` on the small batch.  ``attention`` runs ``vlfast.ops.attention``
on the ``triton`` backend: bf16, B=2, H=2, L=77 (not a multiple of a block), D=64, a
key mask with padding, and its backward.

With the default ``--check``, the first iteration's results are compared with the
reference backend computed on the CPU (so that the sanitizer instruments only the
kernels under test, and few of PyTorch's own); a mismatch exits 1.  ``--device cpu``
runs the same calls on CPU tensors (IPOT on the ``cpp`` backend, attention on the
Triton interpreter): the CPU smoke test of this script.

The calls are kept small: under ``compute-sanitizer`` every launch is instrumented.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

IPOT_KW = dict(beta=0.5, n_iters=20, k=1)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check_calls", description=__doc__.splitlines()[0])
    p.add_argument("call", choices=("ipot", "attention"), help="which kernel call to make")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda; cpu = smoke test)")
    p.add_argument("--iters", type=int, default=1, help="repeat the calls this many times (default: 1)")
    p.add_argument("--forward-only", action="store_true", help="attention: no backward")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the comparison with the reference")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters: expected >= 1, got {args.iters}")
    return args


def rel_err(got: "torch.Tensor", want: "torch.Tensor") -> float:
    """max |got - want| / max(max |want|, 1e-30), in fp64 on the CPU."""
    import torch

    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if g.shape != w.shape:
        raise AssertionError(f"shape {tuple(g.shape)} != reference {tuple(w.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise AssertionError("non-finite values")
    return float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30) if g.numel() else 0.0


def _ragged(B: int, Lx: int, Ly: int, seed: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Costs uniform in [0, 2), right-padded ragged masks (True = real), 0 on padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    nx = torch.randint(1, Lx + 1, (B,), generator=g)
    ny = torch.randint(1, Ly + 1, (B,), generator=g)
    nx[0], ny[0] = Lx, Ly  # one full problem
    xm = torch.arange(Lx)[None, :] < nx[:, None]
    ym = torch.arange(Ly)[None, :] < ny[:, None]
    cost = (2.0 * torch.rand(B, Lx, Ly, generator=g)).masked_fill(~(xm[:, :, None] & ym[:, None, :]), 0.0)
    return cost, xm, ym


def run_ipot(device: str, iters: int, check: bool) -> list[str]:
    """IPOT (small batch, large problem) and Sinkhorn on the compiled backend; returns report lines."""
    import torch
    from vlfast import ops

    kernel_backend = "cuda" if device.startswith("cuda") else "cpp"
    small = _ragged(6, 37, 53, seed=1)
    large = _ragged(1, 300, 400, seed=2)
    calls: list[tuple[str, Callable[..., torch.Tensor], tuple[torch.Tensor, ...], dict]] = [
        ("ipot 6x37x53", ops.ipot, small, IPOT_KW),
        ("ipot 1x300x400 (global memory)", ops.ipot, large, dict(IPOT_KW, n_iters=5)),
        ("sinkhorn 6x37x53", ops.sinkhorn, small, dict(eps=0.1, n_iters=20)),
    ]
    lines = []
    for it in range(iters):
        for name, fn, args, kw in calls:
            dev_args = tuple(a.to(device) for a in args)
            with ops.backend(kernel_backend):
                got = fn(*dev_args, **kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if check and it == 0:
                with ops.backend("reference"):
                    want = fn(*args, **kw)
                err = rel_err(got, want)
                ok = err <= 1e-4
                lines.append(f"{'ok  ' if ok else 'FAIL'} {name} [{kernel_backend}] rel err {err:.2e} (tol 1e-4)")
    return lines


def run_attention(device: str, iters: int, check: bool, forward_only: bool) -> list[str]:
    """One padded, masked bf16 attention (and its backward) on the Triton backend."""
    import torch
    from vlfast import ops

    B, H, L, D = 2, 2, 77, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    do = torch.randn(B, H, L, D, generator=g)
    key_mask = torch.arange(L)[None, :] < torch.tensor([[L], [40]])
    lines = []
    for it in range(iters):
        leaves = [t.to(device=device, dtype=torch.bfloat16).requires_grad_(not forward_only) for t in (q, k, v)]
        with ops.backend("triton"):
            out = ops.attention(*leaves, key_mask.to(device))
            grads = ([] if forward_only else
                     torch.autograd.grad(out, leaves, do.to(device=device, dtype=torch.bfloat16)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if check and it == 0:
            ref_leaves = [t.to(torch.bfloat16).float().requires_grad_(not forward_only) for t in (q, k, v)]
            with ops.backend("reference"):
                want = ops.attention(*ref_leaves, key_mask)
                want_grads = ([] if forward_only else
                              torch.autograd.grad(want, ref_leaves, do.to(torch.bfloat16).float()))
            for name, a, b in [("out", out, want)] + list(zip(("dq", "dk", "dv"), grads, want_grads)):
                err = rel_err(a, b)
                ok = err <= 3e-2
                lines.append(f"{'ok  ' if ok else 'FAIL'} attention {name} bf16 {B}x{H}x{L}x{D} [triton] "
                             f"rel err {err:.2e} (tol 3e-2, vs fp32 reference)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check_calls: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.call == "ipot":
        lines = run_ipot(args.device, args.iters, args.check)
    else:
        lines = run_attention(args.device, args.iters, args.check, args.forward_only)
    for line in lines:
        print(line)
    bad = [line for line in lines if line.startswith("FAIL")]
    print(f"gpu_check_calls {args.call} on {args.device}: {args.iters} iteration(s), "
          + (f"{len(bad)} mismatch(es)" if bad else ("results match the reference" if args.check else "no check")))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
