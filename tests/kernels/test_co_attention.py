"""vlfast.ops.co_attention: both directions of ViLBERT's co-attention in one launch,
equal to two attention calls."""
from __future__ import annotations

import math

import pytest
import torch

from vlfast import ops
from vlfast.kernels.attention import reference as ref
from vlfast.kernels.co_attention import op as cop
from vlfast.testing import assert_close_to_oracle, eager_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, H, Lt, Lv, D, dtype=torch.float32, seed=0, masks=True):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, H, Lt, D, generator=g).to(DEV, dtype) for _ in range(3)]
    v = [torch.randn(B, H, Lv, D, generator=g).to(DEV, dtype) for _ in range(3)]
    dct = torch.randn(B, H, Lt, D, generator=g).to(DEV, dtype)
    dcv = torch.randn(B, H, Lv, D, generator=g).to(DEV, dtype)
    tm = vm = None
    if masks:
        tm = (torch.rand(B, Lt, generator=g) > 0.2).to(DEV)
        vm = (torch.rand(B, Lv, generator=g) > 0.3).to(DEV)
        tm[:, 0] = True
        vm[:, 0] = True
        if B > 1:
            vm[B - 1] = False  # text queries of this sample see no region
    return t, v, tm, vm, dct, dcv


def run(fn, t, v, dct, dcv):
    leaves = [x.detach().clone().requires_grad_(True) for x in (*t, *v)]
    ctx_t, ctx_v = fn(*leaves)
    g = torch.autograd.grad((ctx_t, ctx_v), leaves, (dct, dcv))
    return (ctx_t.detach(), ctx_v.detach()) + tuple(g)


def two_attentions(tm, vm, keep=(None, None), p=0.0, scale=None):
    def fn(qt, kt, vt, qv, kv, vv):
        return (ref.attention_reference(qt, kv, vv, vm, dropout_p=p, scale=scale, keep_mask=keep[0]),
                ref.attention_reference(qv, kt, vt, tm, dropout_p=p, scale=scale, keep_mask=keep[1]))
    return fn


NAMES = ("ctx_t", "ctx_v", "dq_t", "dk_t", "dv_t", "dq_v", "dk_v", "dv_v")


@pytest.mark.parametrize("shape", [(2, 2, 23, 37, 32), (1, 2, 1, 7, 64), (2, 1, 37, 129, 128), (2, 2, 7, 1, 32)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masks", [True, False])
def test_equals_two_attention_calls(shape, masks):
    t, v, tm, vm, dct, dcv = make(*shape, masks=masks)
    with ops.backend("triton"):
        got = run(lambda qt, kt, vt, qv, kv, vv: ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm), t, v, dct, dcv)
    want = run(two_attentions(tm, vm), [x.double() for x in t], [x.double() for x in v], dct.double(),
               dcv.double())
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    with ops.backend("reference"):
        r = run(lambda qt, kt, vt, qv, kv, vv: ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm), t, v, dct, dcv)
    for name, a, b in zip(NAMES, r, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_error_at_most_twice_eager(dtype):
    t, v, tm, vm, dct, dcv = make(2, 2, 23, 41, 64, dtype=dtype, seed=1)
    with ops.backend("triton"):
        got = run(lambda qt, kt, vt, qv, kv, vv: ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm), t, v, dct, dcv)
    eager = run(lambda qt, kt, vt, qv, kv, vv: (eager_attention(qt, kv, vv, vm), eager_attention(qv, kt, vt, tm)),
                t, v, dct, dcv)
    orc = run(two_attentions(tm, vm), [x.double() for x in t], [x.double() for x in v], dct.double(), dcv.double())
    for name, g, e, o in zip(NAMES, got, eager, orc):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, o)


def test_one_launch_forward_two_launches_backward(monkeypatch):
    from vlfast.kernels.co_attention import triton as ct
    from vlfast.kernels.attention import triton as at
    launches = []

    class Count:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_co_fwd_kernel", "_co_bwd_dkdv_kernel", "_co_bwd_dq_kernel"):
        monkeypatch.setattr(ct, name, Count(name, getattr(ct, name)))
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(at, name, Count(name, getattr(at, name)))
    t, v, tm, vm, dct, dcv = make(2, 2, 9, 17, 32)
    with ops.backend("triton"):
        run(lambda qt, kt, vt, qv, kv, vv: ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm), t, v, dct, dcv)
    assert launches == ["_co_fwd_kernel", "_co_bwd_dkdv_kernel", "_co_bwd_dq_kernel"]


def test_dropout_equals_reference_given_keep_masks():
    B, H, Lt, Lv, D = 2, 2, 13, 29, 32
    t, v, tm, vm, dct, dcv = make(B, H, Lt, Lv, D, seed=3)
    p, seed, offset = 0.3, 2**35 + 3, 17
    keep = ops.co_attention_keep_masks(B, H, Lt, Lv, p, seed, offset, device=DEV)
    assert keep[0].shape == (B, H, Lt, Lv) and keep[1].shape == (B, H, Lv, Lt)
    scale = 1 / math.sqrt(D)

    def kern(qt, kt, vt, qv, kv, vv):
        out = cop.co_attention_fwd(qt, kt, vt, tm, qv, kv, vv, vm, p, scale, seed, offset, "triton")
        return out[0], out[1]

    got = run(kern, t, v, dct, dcv)
    want = run(two_attentions(tm, vm, keep, p, scale), [x.double() for x in t], [x.double() for x in v],
               dct.double(), dcv.double())
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the second direction's mask is the continuation of the first's Philox stream
    both = ops.keep_mask((2 * B * H * Lt * Lv,), p, seed, offset, device=DEV)
    assert torch.equal(both[: B * H * Lt * Lv].view(B, H, Lt, Lv), keep[0])
    assert torch.equal(both[B * H * Lt * Lv:].view(B, H, Lv, Lt), keep[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    t, v, tm, vm, _, _ = make(2, 2, 5, 7, 16, seed=4)
    leaves = [x.requires_grad_(True) for x in (*t, *v)]
    torch.library.opcheck(torch.ops.vlfast.co_attention_fwd.default,
                          (*leaves[:3], tm, *leaves[3:], vm, 0.2, 0.25, 5, 0, backend))


def test_compile_fullgraph_aot_eager():
    t, v, tm, vm, dct, dcv = make(2, 2, 7, 11, 32, seed=5)

    def fn(qt, kt, vt, qv, kv, vv):
        return ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend("triton"):
        got = run(compiled, t, v, dct, dcv)
        want = run(fn, t, v, dct, dcv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_input():
    t, v, tm, vm, _, _ = make(2, 2, 5, 7, 16)
    qt, kt, vt = t
    qv, kv, vv = v
    cases = [
        (dict(v_mask=vm[:, :6]), r"v_mask: expected shape \(B=2, Lk=7\), got shape \(2, 6\)"),
        (dict(t_mask=tm.float()), r"t_mask: expected dtype bool, got float32"),
        (dict(q_v=qv[..., :8]), r"k_v: expected shape \(B=2, H=2, Lk, D=8\) to match q_v"),
        (dict(q_v=qv.half(), k_v=kv.half(), v_v=vv.half()), r"q_v: expected the dtype of q_t \(float32\)"),
        (dict(k_t=kt[:, :, :4], v_t=vt[:, :, :4], t_mask=tm[:, :4]), r"k_t: expected the length of q_t"),
        (dict(q_v=torch.randn(3, 2, 7, 16, device=DEV), k_v=torch.randn(3, 2, 7, 16, device=DEV),
              v_v=torch.randn(3, 2, 7, 16, device=DEV), v_mask=torch.ones(3, 7, dtype=torch.bool, device=DEV)),
         r"q_v: expected shape \(B=2, H=2, Lv, D=16\) to match q_t"),
    ]
    for override, pattern in cases:
        a = dict(q_t=qt, k_t=kt, v_t=vt, t_mask=tm, q_v=qv, k_v=kv, v_v=vv, v_mask=vm)
        a.update(override)
        with pytest.raises(ValueError, match=pattern):
            ops.co_attention(**a)
