"""vlfast.kernels.dropout_mask: Philox4x32-10 keep masks, every backend bit for bit.

The chain of trust: an independent pure-Python Philox4x32-10 (general 4-word counter,
2-word key) is checked against the Random123 known-answer vectors; the reference,
the C++ driver, the Triton kernel (interpreter on CPU) and, on a GPU, the CUDA kernel
are then checked against it and against each other.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from vlfast import _dispatch
from vlfast.kernels.dropout_mask import dropout_threshold, keep_mask
from vlfast.kernels.dropout_mask import reference as ref

M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------
# Independent pure-Python Philox4x32 (Salmon et al., SC'11), written from the paper
# ----------------------------------------------------------------------------------

def _philox4x32(ctr: tuple[int, int, int, int], key: tuple[int, int], rounds: int = 10) -> tuple[int, ...]:
    m0, m1 = 0xD2511F53, 0xCD9E8D57
    w0, w1 = 0x9E3779B9, 0xBB67AE85
    x0, x1, x2, x3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:  # the key is bumped between rounds
            k0, k1 = (k0 + w0) & M32, (k1 + w1) & M32
        p0, p1 = m0 * x0, m1 * x2  # exact Python ints
        x0, x1, x2, x3 = ((p1 >> 32) ^ x1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ x3 ^ k1) & M32, p0 & M32
    return x0, x1, x2, x3


def _py_u32(seed: int, counter: int) -> int:
    """vlfast's philox_u32 from the general function: key (seed lo, hi), counter (lo, hi, 0, 0)."""
    return _philox4x32((counter & M32, counter >> 32, 0, 0), (seed & M32, seed >> 32))[0]


def _py_keep(seed: int, counter: int, p: float) -> bool:
    return (_py_u32(seed, counter) >> 8) >= dropout_threshold(p)


# Random123 kat_vectors, philox4x32 with 10 rounds: counter, key -> output
KATS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KATS)
def test_pure_python_philox_matches_random123_kats(ctr, key, expected):
    assert _philox4x32(ctr, key) == expected


def _cases(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(seed, counter) pairs, both < 2**63: edges, above 2**32, and random ones."""
    rng = random.Random(seed)
    fixed = [(0, 0), (0, 1), (1, 0), (M32, M32), (2**32, 2**32), (2**32 + 5, 2**32 - 1),
             (2**63 - 1, 2**63 - 1), (0x299F31D0A4093822, 0x05A308D3243F6A88)]
    return fixed + [(rng.getrandbits(rng.choice([16, 32, 40, 63])), rng.getrandbits(rng.choice([8, 32, 33, 62])))
                    for _ in range(n)]


def test_kat_zero_is_reachable():
    # counter (0,0,0,0), key (0,0) is vlfast's seed 0, counter 0
    assert ref.philox_u32(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5
    assert _C().philox_u32(0, 0) == 0x6627E8D5


def test_reference_philox_matches_pure_python():
    cases = _cases(200)
    for seed, counter in cases:
        got = ref.philox_u32(seed, torch.tensor([counter], dtype=torch.int64)).item()
        assert got == _py_u32(seed, counter), (seed, counter)
    # a whole block at once, too
    seed = 0x123456789ABCDEF
    ctr = torch.arange(2**32 - 50, 2**32 + 50, dtype=torch.int64)
    got = ref.philox_u32(seed, ctr).tolist()
    assert got == [_py_u32(seed, c) for c in ctr.tolist()]
    assert all(0 <= g <= M32 for g in got)


def _C():
    mod, why = _dispatch.cpp_extension()
    assert mod is not None, f"vlfast._C is part of the install: {why}"
    return mod


def test_cpp_philox_matches_pure_python():
    C = _C()
    for seed, counter in _cases(200, seed=1):
        assert C.philox_u32(seed, counter) == _py_u32(seed, counter), (seed, counter)


def test_dropout_threshold_values():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0) == 0
    assert dropout_threshold(0.5) == 2**23
    assert dropout_threshold(0.1) == int(0.1 * 2**24 + 0.5)
    assert dropout_threshold(1 - 2**-30) == 2**24  # rounds up: keeps nothing


# ----------------------------------------------------------------------------------
# Backends agree bit for bit
# ----------------------------------------------------------------------------------

def _mask(backend: str, *args, **kw) -> torch.Tensor:
    with _dispatch.backend(backend):
        return keep_mask(*args, **kw)


def _cpu_backends() -> list[str]:
    return ["reference", "cpp", "triton"]


SHAPES = [(1,), (7,), (37, 3), (2, 3, 5, 129), (1000,)]
SEED_OFFSETS = [(0, 0), (1, 1), (12345, 2**32 - 100), (2**32 + 17, 5), (2**62 + 3, 2**40 + 7),
                (2**63 - 1, 2**63 - 10_000)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS, ids=str)
def test_cpu_backends_agree(shape, seed, offset):
    p = 0.3
    masks = {b: _mask(b, shape, p, seed, offset) for b in _cpu_backends()}
    ref_mask = masks["reference"]
    assert ref_mask.dtype == torch.bool and tuple(ref_mask.shape) == shape
    for b, m in masks.items():
        assert m.dtype == torch.bool and tuple(m.shape) == shape and m.device.type == "cpu", b
        assert torch.equal(m, ref_mask), f"{b} differs from the reference for seed={seed} offset={offset}"


def test_elements_follow_c_order_counters():
    shape, seed, offset, p = (3, 4, 5), 987654321987, 2**33 + 11, 0.4
    m = _mask("cpp", shape, p, seed, offset)
    for idx in [(0, 0, 0), (0, 0, 4), (0, 1, 0), (1, 0, 0), (2, 3, 4), (1, 2, 3)]:
        lin = (idx[0] * 4 + idx[1]) * 5 + idx[2]
        assert bool(m[idx]) == _py_keep(seed, offset + lin, p), idx


def test_offset_continues_the_stream():
    seed, p = 42, 0.25
    whole = _mask("cpp", 5000, p, seed, 100)
    assert torch.equal(_mask("cpp", 3000, p, seed, 2100), whole[2000:])
    assert torch.equal(_mask("reference", (10, 500), p, seed, 100).reshape(-1), whole)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_cpu_backends_agree_large(p):
    n = 1 << 16
    a = _mask("cpp", n, p, 7, 2**32 - 1000)
    b = _mask("reference", n, p, 7, 2**32 - 1000)
    assert torch.equal(a, b)


def test_cpp_large_parallel_matches_reference():
    n = (1 << 20) + 3  # above the OpenMP threshold, odd length
    assert torch.equal(_mask("cpp", n, 0.2, 2**40 + 1, 99), _mask("reference", n, 0.2, 2**40 + 1, 99))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [(3, (1 << 20) + 5)], ids=str)
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS, ids=str)
def test_cuda_backends_agree(shape, seed, offset):
    p = 0.3
    ref_mask = _mask("cpp", shape, p, seed, offset)
    for b in ("cuda", "triton", "reference"):
        m = _mask(b, shape, p, seed, offset, device="cuda")
        assert m.device.type == "cuda" and m.dtype == torch.bool
        assert torch.equal(m.cpu(), ref_mask), b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_unaligned_buffer_matches():
    # the driver takes raw pointers: an output that is not 4-byte aligned uses the scalar kernel
    C = _C()
    buf = torch.zeros(1003, dtype=torch.bool, device="cuda")
    C.keep_mask_cuda(buf[1:].data_ptr(), 1002, 5, 7, dropout_threshold(0.5), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(buf[1:].cpu(), _mask("cpp", 1002, 0.5, 5, 7))


# ----------------------------------------------------------------------------------
# Statistics and edge cases
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_tolerance(p, device):
    n = 1 << 20
    m = keep_mask(n, p, seed=2024, offset=0, device=device)
    q = 1.0 - dropout_threshold(p) / 2**24
    kept = m.sum().item()
    sigma = math.sqrt(n * q * (1 - q))
    assert abs(kept - n * q) < 6 * sigma, (kept, n * q, sigma)
    # and no visible pattern between neighbours: pairs of consecutive elements
    both = (m[:-1] & m[1:]).sum().item()
    assert abs(both - (n - 1) * q * q) < 6 * math.sqrt(n * q * q * (1 - q * q)) + 1


def test_p_zero_keeps_all(device):
    for b in ("reference", "cpp", "triton") if device == "cpu" else ("reference", "cuda", "triton"):
        assert bool(_mask(b, (4, 1000), 0.0, 3, 9, device=device).all()), b


def test_threshold_max_keeps_nothing():
    p = 1 - 2**-30
    for b in _cpu_backends():
        assert not bool(_mask(b, 4096, p, 3, 0).any()), b


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()], ids=str)
def test_empty_and_scalar_shapes(shape):
    for b in _cpu_backends():
        m = _mask(b, shape, 0.5, 1, 0)
        assert tuple(m.shape) == shape and m.dtype == torch.bool, b
    assert torch.equal(_mask("cpp", (), 0.5, 1, 0), _mask("reference", (), 0.5, 1, 0))


def test_accepts_int_like_arguments():
    import numpy as np

    a = keep_mask(torch.Size([4, 5]), 0.5, np.int64(11), np.int32(3))
    b = keep_mask([4, 5], 0.5, 11, torch.tensor(3))
    assert torch.equal(a, b) and a.shape == (4, 5)
    assert keep_mask(6, 0.5, 11).shape == (6,)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 1.5, "0.1", None, True])
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
        keep_mask(10, p, seed=1)
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_threshold(p)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, True, "3", None, torch.tensor(1.0)])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match=r"keep_mask: seed: expected an int in \[0, 2\*\*63\)"):
        keep_mask(10, 0.5, seed=seed)


@pytest.mark.parametrize("offset", [-1, 2**63, 0.5, False])
def test_bad_offset_raises(offset):
    with pytest.raises(ValueError, match="keep_mask: offset: expected"):
        keep_mask(10, 0.5, seed=1, offset=offset)


def test_offset_plus_numel_overflow_raises():
    with pytest.raises(ValueError, match=r"offset \+ numel <= 2\*\*63"):
        keep_mask(11, 0.5, seed=1, offset=2**63 - 10)
    keep_mask(10, 0.5, seed=1, offset=2**63 - 10)  # the last counters are fine


@pytest.mark.parametrize("shape", [(-1, 3), (2.0, 3), "abc", None, -4, True])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match="keep_mask: shape"):
        keep_mask(shape, 0.5, seed=1)


@pytest.mark.parametrize("device", ["meta", "not-a-device"])
def test_bad_device_raises(device):
    with pytest.raises(ValueError, match="keep_mask: device"):
        keep_mask(4, 0.5, seed=1, device=device)


def test_cpp_driver_validates_arguments():
    C = _C()
    buf = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.keep_mask_cpu(buf.data_ptr(), -1, 1, 0, 5)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 2\*\*24\]"):
        C.keep_mask_cpu(buf.data_ptr(), 8, 1, 0, 2**24 + 1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        C.keep_mask_cpu(buf.data_ptr(), 8, -5, 0, 5)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        C.keep_mask_cpu(buf.data_ptr(), 8, 1, -1, 5)
    with pytest.raises(ValueError, match="out_ptr is null"):
        C.keep_mask_cpu(0, 8, 1, 0, 5)
    C.keep_mask_cpu(0, 0, 1, 0, 5)  # nothing to write: fine
    assert not buf.any()


# ----------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------

def test_auto_on_cpu_picks_cpp():
    _C()
    assert _dispatch.select("keep_mask", "cpu", "auto") == "cpp"
    with _dispatch.backend("auto"):
        assert _dispatch.select("keep_mask", "cpu") == "cpp"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_picks_cuda_kernel():
    assert _dispatch.select("keep_mask", "cuda", "auto") in ("cuda", "triton")


def test_forcing_cuda_on_cpu_lists_every_backend():
    with _dispatch.backend("cuda"), pytest.raises(_dispatch.BackendError) as ei:
        keep_mask(16, 0.5, seed=1)
    msg = str(ei.value)
    assert "keep_mask" in msg and "'cuda'" in msg
    for b in _dispatch.BACKENDS:
        assert f"  {b}" in msg, (b, msg)
    assert "the CUDA kernel runs on CUDA tensors" in msg or "built without CUDA" in msg


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "reference")
    assert _dispatch.select("keep_mask", "cpu") == "reference"
    monkeypatch.setenv("VLFAST_BACKEND", "cpp")
    assert torch.equal(keep_mask(100, 0.5, 3), _mask("reference", 100, 0.5, 3))
