"""vlfast.ops.varlen_attention: packed sequences equal each sequence run alone."""
from __future__ import annotations

import math

import pytest
import torch

from vlfast import ops
from vlfast.kernels.attention import op as aop
from vlfast.kernels.attention import reference as ref
from vlfast.testing import assert_close_to_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def make(lq, lk, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=g).to(DEV, dtype)
    k = torch.randn(sum(lk), H, D, generator=g).to(DEV, dtype)
    v = torch.randn(sum(lk), H, D, generator=g).to(DEV, dtype)
    do = torch.randn(sum(lq), H, D, generator=g).to(DEV, dtype)
    return q, k, v, do


def grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), do)


def per_sequence(q, k, v, do, lq, lk):
    """Each sequence alone through the padded op (reference backend), in fp64."""
    outs, dqs, dks, dvs = [], [], [], []
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for b in range(len(lq)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        sub = [t.double().transpose(0, 1)[None] for t in (q[qs], k[ks], v[ks], do[qs])]
        with ops.backend("reference"):
            o, dq, dk, dv = grads(lambda a, b_, c: ops.attention(a, b_, c), *sub)
        outs.append(o[0].transpose(0, 1))
        dqs.append(dq[0].transpose(0, 1))
        dks.append(dk[0].transpose(0, 1))
        dvs.append(dv[0].transpose(0, 1))
    return tuple(torch.cat(x) for x in (outs, dqs, dks, dvs))


CASES = [  # lens_q, lens_k, H, D
    ([1], [1], 2, 32),
    ([5, 0, 37, 1], [7, 3, 40, 0], 2, 32),
    ([7, 37, 129], [7, 37, 129], 2, 64),
    ([23, 11], [101, 60], 1, 128),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])))
def test_varlen_equals_each_sequence_alone(case):
    lq, lk, H, D = case
    q, k, v, do = make(lq, lk, H, D)
    with ops.backend("triton"):
        got = grads(lambda a, b, c: ops.varlen_attention(a, b, c, cu(lq), cu(lk), max(lq), max(lk)), q, k, v, do)
    want = per_sequence(q, k, v, do, lq, lk)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    with ops.backend("reference"):
        r = grads(lambda a, b, c: ops.varlen_attention(a, b, c, cu(lq), cu(lk), max(lq), max(lk)), q, k, v, do)
    for a, b in zip(r, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_varlen_half_precision(dtype):
    lq, lk = [9, 40, 3], [20, 61, 5]
    q, k, v, do = make(lq, lk, 2, 64, dtype=dtype, seed=1)
    with ops.backend("triton"):
        got = grads(lambda a, b, c: ops.varlen_attention(a, b, c, cu(lq), cu(lk), max(lq), max(lk)), q, k, v, do)
    want = per_sequence(q, k, v, do, lq, lk)
    # eager baseline in the same dtype: the reference path computes in fp32, so use a
    # plain low-precision per-sequence loop
    from vlfast.testing import eager_attention
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    eager_parts = []
    for b in range(len(lq)):
        sub = [t.transpose(0, 1)[None] for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                                  do[cq[b]:cq[b + 1]])]
        o, dq, dk, dv = grads(lambda a, b_, c: eager_attention(a, b_, c), *sub)
        eager_parts.append([t[0].transpose(0, 1) for t in (o, dq, dk, dv)])
    eager = [torch.cat([p[i] for p in eager_parts]) for i in range(4)]
    for name, g, e, o in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, o)


def test_varlen_dropout_equals_reference_given_keep_mask():
    lq, lk, H, D = [5, 17, 1], [9, 30, 4], 2, 32
    q, k, v, do = make(lq, lk, H, D, seed=2)
    p, seed, offset = 0.35, 2**33 + 7, 123
    keep = ops.varlen_keep_mask(sum(lq), H, max(lk), p, seed, offset, device=DEV)
    scale = 1 / math.sqrt(D)
    got = grads(lambda a, b, c: aop.varlen_attention_fwd(a, b, c, cu(lq), cu(lk), max(lq), max(lk), p, scale, seed,
                                                         offset, "triton")[0], q, k, v, do)
    want = grads(lambda a, b, c: ref.varlen_reference(a, b, c, cu(lq), cu(lk), max(lk), dropout_p=p, scale=scale,
                                                      keep_mask=keep), q.double(), k.double(), v.double(),
                 do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_varlen_opcheck(backend):
    lq, lk = [3, 5], [4, 2]
    q, k, v, _ = make(lq, lk, 2, 16, seed=3)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.vlfast.varlen_attention_fwd.default,
                          (q, k, v, cu(lq), cu(lk), 5, 4, 0.2, 0.25, 99, 0, backend))


def test_varlen_compile_fullgraph_aot_eager():
    lq, lk = [3, 9], [4, 11]
    q, k, v, do = make(lq, lk, 2, 32, seed=4)
    cq, ck = cu(lq), cu(lk)

    def fn(a, b, c):
        return ops.varlen_attention(a, b, c, cq, ck, 9, 11)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend("triton"):
        got = grads(compiled, q, k, v, do)
        want = grads(fn, q, k, v, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_varlen_bad_input():
    lq, lk = [3, 5], [4, 2]
    q, k, v, _ = make(lq, lk, 2, 16)
    good = dict(q=q, k=k, v=v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=5, max_seqlen_k=4)
    cases = [
        (dict(cu_seqlens_q=cu(lq).long()), r"cu_seqlens_q: expected dtype int32, got int64"),
        (dict(cu_seqlens_k=cu([4, 1])), r"cu_seqlens_k: expected cu_seqlens_k\[-1\] == total rows \(6\), got 5"),
        (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=DEV)),
         r"cu_seqlens_k: expected 4 entries like cu_seqlens_q, got 3"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32, device=DEV)),
         r"cu_seqlens_q: expected cu_seqlens\[0\] == 0, got 1"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 8], dtype=torch.int32, device=DEV), max_seqlen_q=6,
              cu_seqlens_k=torch.tensor([0, 7, 6], dtype=torch.int32, device=DEV)),
         r"cu_seqlens_k: expected non-decreasing offsets, got cu_seqlens_k\[1\]=7 > cu_seqlens_k\[2\]=6"),
        (dict(max_seqlen_q=4), r"max_seqlen_q: expected >= the longest sequence \(5\), got 4"),
        (dict(max_seqlen_k=-1), r"max_seqlen_k: expected an int >= 0, got -1"),
        (dict(q=q[None]), r"q: expected a 3-d tensor \(total_q,H,D\), got shape"),
        (dict(k=k[:, :1]), r"k: expected shape \(total_k, H=2, D=16\), got shape \(6, 1, 16\)"),
        (dict(cu_seqlens_q=cu(lq)[None]), r"cu_seqlens_q: expected a 1-d tensor \(B\+1,\)"),
    ]
    for override, pattern in cases:
        args = {**good, **override}
        with pytest.raises(ValueError, match=pattern):
            ops.varlen_attention(**args)
