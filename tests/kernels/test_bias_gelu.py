"""vlfast.ops.bias_gelu: the Triton kernels (interpreted on CPU) vs the reference and an
fp64 oracle (dx and dbias), mixed dtypes, the plain-torch code it replaces,
custom-op checks, compile, dispatch and input errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlfast import _dispatch, ops
from vlfast.kernels.bias_gelu import op as bop
from vlfast.kernels.bias_gelu import reference as ref
from vlfast.testing import assert_close_to_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (leading shape, E): rows 1, 7, 37, 129; E not a power of two; 768 / 3072 at few rows
SHAPES = [((1,), 48), ((7,), 96), ((37,), 100), ((129,), 40), ((3,), 768), ((2,), 3072), ((2, 3, 5), 72)]
NAMES = ("out", "dx", "dbias")


def make(lead, E, dtype=torch.float32, seed=0, bias_dtype=None):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (E,)
    x = torch.randn(shape, generator=g) * 2
    b = torch.randn(E, generator=g)
    do = torch.randn(shape, generator=g)
    return x.to(DEV, dtype), b.to(DEV, bias_dtype or dtype), do.to(DEV, torch.promote_types(dtype, bias_dtype or dtype))


def run(fn, x, b, do):
    x, b = (t.detach().clone().requires_grad_(True) for t in (x, b))
    out = fn(x, b)
    return (out.detach(),) + tuple(torch.autograd.grad(out, (x, b), do))


def oracle(x, b, do):
    return run(ref.bias_gelu, x.double(), b.double(), do.double())


def _ids(s):
    return "x".join(map(str, s[0])) + f"-E{s[1]}"


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_fp32_matches_reference_and_oracle(shape):
    x, b, do = make(*shape)
    with ops.backend("triton"):
        got = run(ops.bias_gelu, x, b, do)
    with ops.backend("reference"):
        want = run(ops.bias_gelu, x, b, do)
    for name, g, e, o in zip(NAMES, got, want, oracle(x, b, do)):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert_close_to_oracle(name, g, e, o)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [((37,), 96), ((2, 5), 768)], ids=_ids)
def test_half_precision_error_at_most_twice_eager(dtype, shape):
    x, b, do = make(*shape, dtype=dtype, seed=3)
    with ops.backend("triton"):
        got = run(ops.bias_gelu, x, b, do)
    eager = run(ref.bias_gelu, x, b, do)
    for name, g, e, o in zip(NAMES, got, eager, oracle(x, b, do)):
        assert g.dtype == dtype, name
        assert_close_to_oracle(name, g, e, o)


def test_mixed_dtypes_promote_like_x_plus_bias():
    x, b, do = make((13,), 96, dtype=torch.bfloat16, bias_dtype=torch.float32, seed=4)
    with ops.backend("triton"):
        got = run(ops.bias_gelu, x, b, do)
    want = run(ref.bias_gelu, x, b, do)
    assert [t.dtype for t in got] == [torch.float32, torch.bfloat16, torch.float32]
    for name, g, e in zip(NAMES, got, want):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


def test_noncontiguous_zero_rows_and_determinism():
    xx, bb, do = make((21,), 192, seed=5)
    x, b, do = xx[:, ::2], bb[::2], do[:, :96]
    with ops.backend("triton"):
        a = run(ops.bias_gelu, x, b, do)
        c = run(ops.bias_gelu, x, b, do)
        e = torch.zeros(0, 4, 96, device=DEV, requires_grad=True)
        bz = b.clone().requires_grad_(True)
        out = ops.bias_gelu(e, bz)
        (db,) = torch.autograd.grad(out.sum(), (bz,))
    assert all(torch.equal(u, v) for u, v in zip(a, c))
    for name, g, o in zip(NAMES, a, oracle(x, b, do)):
        torch.testing.assert_close(g.double(), o, atol=3e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert out.shape == (0, 4, 96) and torch.equal(db, torch.zeros_like(b))


def test_reference_path_is_bitwise_the_plain_torch_code():
    """On CPU fp32, F.gelu(F.linear(h, W) + b) is bitwise F.gelu(F.linear(h, W, b)):
    BertIntermediate may split the bias off the matmul."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96)
    h = torch.randn(3, 11, 64, requires_grad=True)
    want = F.gelu(dense(h))
    got = ops.bias_gelu(F.linear(h, dense.weight), dense.bias)
    assert torch.equal(got, want)
    do = torch.randn_like(want)
    g1 = torch.autograd.grad(got, (h, dense.weight, dense.bias), do)
    g2 = torch.autograd.grad(want, (h, dense.weight, dense.bias), do)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_reference_backward_formula_matches_autograd():
    x, b, do = make((9,), 40, dtype=torch.float64)
    dx, db = ref.bias_gelu_backward(do, x, b)
    want = run(ref.bias_gelu, x, b, do)
    torch.testing.assert_close(dx, want[1])
    torch.testing.assert_close(db, want[2])


# ----------------------------------------------------------------------------------
# Custom-op contract and compile
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    x, b, do = make((6,), 40, seed=6)
    torch.library.opcheck(torch.ops.vlfast.bias_gelu_fwd.default,
                          (x.requires_grad_(True), b.requires_grad_(True), backend))
    torch.library.opcheck(torch.ops.vlfast.bias_gelu_bwd.default, (do, x.detach(), b.detach(), backend))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_aot_eager(backend):
    x, b, do = make((2, 5), 48, seed=7)

    def fn(a, c):
        return ops.bias_gelu(a * 2, c)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with ops.backend(backend):
        got = run(compiled, x, b, do)
        want = run(fn, x, b, do)
    for name, g, e in zip(NAMES, got, want):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------

def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    assert _dispatch.select("bias_gelu", "cpu", hidden=3072, dtypes=(torch.float32,)) == "reference"
    assert _dispatch.select("bias_gelu", "cuda", hidden=3072, dtypes=(torch.bfloat16, torch.float32)) == "triton"
    assert _dispatch.select("bias_gelu", "cuda", hidden=3072, dtypes=(torch.float64,)) == "reference"


def test_backward_runs_on_the_forward_backend(monkeypatch):
    x, b, do = make((7,), 48)
    seen = []
    real = _dispatch.select

    def spy(op, device_type, requested=None, **facts):
        got = real(op, device_type, requested, **facts)
        seen.append(got)
        return got

    monkeypatch.setattr(_dispatch, "select", spy)
    x.requires_grad_(True)
    with ops.backend("triton"):
        out = ops.bias_gelu(x, b)
    assert seen == ["triton"]
    out.backward(do)  # outside the block
    assert seen == ["triton", "triton"]


def test_fp64_on_reference_and_forcing_triton_says_why():
    x, b, do = make((5,), 48)
    for g, o in zip(run(ops.bias_gelu, x.double(), b.double(), do.double()), oracle(x, b, do)):
        torch.testing.assert_close(g, o)
    with ops.backend("triton"), pytest.raises(_dispatch.BackendError, match="takes fp16/bf16/fp32"):
        ops.bias_gelu(x.double(), b)


def test_bad_input_names_argument_expected_and_actual():
    x, b, _ = make((2, 3), 16)
    cases = [
        (("x", b), r"x: expected a torch.Tensor, got str"),
        ((x.int(), b), r"x: expected dtype float16 or bfloat16 or float32 or float64, got int32"),
        ((x[..., :0], b), r"x: expected a tensor \(\.\.\., E\) with E >= 1, got shape \(2, 3, 0\)"),
        ((x, b[:8]), r"bias: expected shape \(E=16,\) to match x \(2, 3, 16\), got shape \(8,\)"),
        ((x, b.long()), r"bias: expected dtype float16 or bfloat16 or float32 or float64, got int64"),
    ]
    if DEV == "cpu":
        cases.append(((x, b.to("meta")), r"bias: expected the device of x \(cpu\), got meta"))
    for args, pattern in cases:
        with pytest.raises(ValueError, match=r"vlfast.ops.bias_gelu: " + pattern):
            ops.bias_gelu(*args)
