"""The four visual embedding ops (uniter/vilbert/vlbert/visualbert_visual_embeddings):
Triton kernel (interpreted on CPU) vs the reference and an fp64 oracle, every gradient
(inputs, LayerNorm parameters, embedding tables), dropout, custom-op checks, compile and
input errors."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from vlfast import ops
from vlfast.kernels.embeddings import reference as ref
from vlfast.testing import assert_close_to_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Case:
    """One op's inputs: ``floats`` (differentiable), ``call(floats, **kw)`` the public op,
    ``reference(floats, **kw)`` the reference, ``raw(floats, seed, offset, p, backend)``
    the forward custom op."""

    def __init__(self, name: str, B: int, L: int, E: int, dtype=torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.shape = name, (B, L, E)

        def rnd(*s, scale=1.0, shift=0.0):
            return (shift + scale * torch.randn(*s, generator=g)).to(DEV, dtype)

        def ln():
            return [rnd(E, scale=0.1, shift=1.0), rnd(E, scale=0.1)]

        tid = torch.randint(0, 3, (B, L), generator=g).to(DEV)
        pid = torch.randint(0, 20, (B, L), generator=g).to(DEV)
        vm = (torch.rand(B, L, generator=g) > 0.3).to(DEV)
        al = torch.randint(-1, 20, (B, L, 3), generator=g).to(DEV)
        al[0, 0] = -1  # a region with no aligned word
        self.do = rnd(B, L, E)
        if name == "uniter":
            self.floats = [rnd(B, L, E), rnd(B, L, E), rnd(3, E)] + ln() + ln() + ln()
            self.names = ["img_proj", "pos_proj", "type_weight", "img_ln_w", "img_ln_b", "pos_ln_w", "pos_ln_b",
                          "ln_w", "ln_b"]
            self.fn = lambda m, f, **kw: m(f[0], f[1], tid, *f[2:], **kw)
        elif name == "vilbert":
            self.floats = [rnd(B, L, E), rnd(B, L, E)] + ln()
            self.names = ["img_proj", "loc_proj", "ln_w", "ln_b"]
            self.fn = lambda m, f, **kw: m(*f, **kw)
        elif name in ("vlbert", "vlbert_1x1"):
            relu = name == "vlbert"
            self.floats = [rnd(B, L, E), rnd(1, E), rnd(20, E), rnd(3, E)] + ln() + ln()
            self.names = ["obj_hidden", "img_weight", "position_weight", "type_weight", "vis_ln_w", "vis_ln_b",
                          "ln_w", "ln_b"]
            mask = vm if relu else None
            self.fn = lambda m, f, **kw: m(f[0], pid, tid, *f[1:], visual_mask=mask, relu=relu, **kw)
        else:
            align = al if name == "visualbert" else None
            self.floats = [rnd(B, L, E), rnd(3, E), rnd(5, E), rnd(20, E)] + ln()
            self.names = ["visual_proj", "type_weight", "visual_position_weight", "position_weight", "ln_w", "ln_b"]
            self.fn = lambda m, f, **kw: m(f[0], tid, align, *f[1:], **kw)
        self.op = {"uniter": ops.uniter_visual_embeddings, "vilbert": ops.vilbert_visual_embeddings,
                   "vlbert": ops.vlbert_visual_embeddings, "vlbert_1x1": ops.vlbert_visual_embeddings,
                   "visualbert": ops.visualbert_visual_embeddings,
                   "visualbert_noalign": ops.visualbert_visual_embeddings}[name]
        self.ref = {"uniter": ref.uniter_visual_embeddings, "vilbert": ref.vilbert_visual_embeddings,
                    "vlbert": ref.vlbert_visual_embeddings, "vlbert_1x1": ref.vlbert_visual_embeddings,
                    "visualbert": ref.visualbert_visual_embeddings,
                    "visualbert_noalign": ref.visualbert_visual_embeddings}[name]

    def run(self, which: str, floats=None, do=None, **kw):
        """(out, grads...) of the public op ("op") or the reference ("ref")."""
        floats = self.floats if floats is None else floats
        leaves = [t.detach().clone().requires_grad_(True) for t in floats]
        out = self.fn(self.op if which == "op" else self.ref, leaves, **kw)
        gs = torch.autograd.grad(out, leaves, self.do.to(out.dtype) if do is None else do, allow_unused=True)
        gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]
        return [out.detach(), *gs]

    def oracle(self, **kw):
        return self.run("ref", [t.double() for t in self.floats], self.do.double(), **kw)


NAMES = ["uniter", "vilbert", "vlbert", "vlbert_1x1", "visualbert", "visualbert_noalign"]
SHAPES = [(1, 1, 32), (2, 7, 48), (1, 37, 96), (1, 129, 48), (1, 3, 768)]


def _compare(case: Case, got, want, orc=None, atol=3e-5):
    for name, g, w in zip(["out"] + case.names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4, msg=lambda m: f"{case.name} {name}: {m}")
    if orc is not None:
        for name, g, w, o in zip(["out"] + case.names, got, want, orc):
            assert_close_to_oracle(f"{case.name} {name}", g, w, o)


# 129 rows only for two flavours with tables (keeps the interpreter run short)
CASES = [(n, s) for n in NAMES for s in SHAPES if s[1] != 129 or n in ("uniter", "visualbert")]


@pytest.mark.parametrize("name,shape", CASES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_fp32_forward_and_every_grad_match_reference_and_oracle(name, shape):
    case = Case(name, *shape)
    with ops.backend("triton"):
        got = case.run("op")
    _compare(case, got, case.run("ref"), case.oracle())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["uniter", "vilbert", "vlbert", "visualbert"])
def test_half_precision_error_at_most_twice_eager(name, dtype):
    case = Case(name, 2, 19, 96, dtype=dtype, seed=3)
    with ops.backend("triton"):
        got = case.run("op")
    eager = case.run("ref")
    for n, g, e, o in zip(["out"] + case.names, got, eager, case.oracle()):
        assert g.dtype == dtype
        assert_close_to_oracle(f"{name} {n}", g, e, o)


def test_gradients_are_deterministic():
    for name in ("uniter", "vlbert", "visualbert"):
        case = Case(name, 2, 37, 48, seed=5)
        with ops.backend("triton"):
            a, b = case.run("op"), case.run("op")
        for x, y in zip(a, b):
            assert torch.equal(x, y), name


def test_vlbert_masked_slots_and_relu():
    """Slots with visual_mask False see LN_vis(0) (the official zeroed object), and no
    gradient reaches obj_hidden there; negative hidden values get none either (ReLU)."""
    case = Case("vlbert", 2, 9, 32, seed=6)
    with ops.backend("triton"):
        got = case.run("op")
    dh = got[1]
    h = case.floats[0]
    assert (dh[h <= 0] == 0).all()
    assert dh.abs().sum() > 0


def test_reference_is_bitwise_the_plain_module_formulas():
    """The references compute exactly the models' plain-torch formulas (CPU fp32)."""
    import torch.nn.functional as F
    case = Case("uniter", 2, 5, 32)
    f = case.floats
    tid = torch.randint(0, 3, (2, 5))
    want = F.layer_norm(F.layer_norm(f[0], (32,), f[3], f[4], 1e-12) + F.layer_norm(f[1], (32,), f[5], f[6], 1e-12)
                        + F.embedding(tid, f[2]), (32,), f[7], f[8], 1e-12)
    with ops.backend("reference"):
        got = ops.uniter_visual_embeddings(f[0], f[1], tid, *f[2:])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["uniter", "vilbert", "vlbert", "visualbert"])
def test_dropout_equals_reference_given_the_keep_mask(name):
    """The public op draws its seed from torch's generator (offset 0); the kernel drops
    exactly the keep-mask helper's elements and matches the reference given that mask."""
    case = Case(name, 2, 13, 48, seed=7)
    p = 0.3
    B, L, E = case.shape
    with ops.backend("triton"):
        torch.manual_seed(11)
        got = case.run("op", dropout_p=p)
    torch.manual_seed(11)
    drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())  # the seed the op drew
    keep = ops.embeddings_keep_mask(B, L, E, p, drawn, 0, device=DEV)
    assert torch.equal(got[0] == 0, ~keep)
    want = case.run("ref", dropout_p=p, keep=keep)
    _compare(case, got, want)
    with ops.backend("reference"):
        torch.manual_seed(11)
        _compare(case, got, case.run("op", dropout_p=p))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dropout_rate(backend):
    case = Case("vilbert", 2, 16, 64, seed=2)
    with ops.backend(backend):
        out = case.run("op", dropout_p=0.1)[0]
    rate = (out == 0).float().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / out.numel())


# ----------------------------------------------------------------------------------
# Custom-op contract and compile
# ----------------------------------------------------------------------------------

def _raw_args(case: Case, p: float, backend: str):
    """Positional arguments of the case's forward custom op."""
    f = [t.requires_grad_(True) for t in (x.detach().clone() for x in case.floats)]
    B, L, _ = case.shape
    g = torch.Generator().manual_seed(1)
    tid = torch.randint(0, 3, (B, L), generator=g).to(DEV)
    pid = torch.randint(0, 20, (B, L), generator=g).to(DEV)
    tail = (p, 1234, 0, backend)
    if case.name == "uniter":
        return torch.ops.vlfast.uniter_visual_embeddings_fwd, (f[0], f[1], tid, *f[2:], 1e-12, *tail)
    if case.name == "vilbert":
        return torch.ops.vlfast.vilbert_visual_embeddings_fwd, (*f, 1e-12, *tail)
    if case.name == "vlbert":
        vm = torch.rand(B, L, generator=g).to(DEV) > 0.3
        return torch.ops.vlfast.vlbert_visual_embeddings_fwd, (f[0], vm, pid, tid, *f[1:], True, 1e-12, *tail)
    al = torch.randint(-1, 20, (B, L, 3), generator=g).to(DEV)
    return torch.ops.vlfast.visualbert_visual_embeddings_fwd, (f[0], tid, al, *f[1:], 1e-12, *tail)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["uniter", "vilbert", "vlbert", "visualbert"])
def test_opcheck(name, backend):
    case = Case(name, 2, 3, 16, seed=4)
    fn, args = _raw_args(case, 0.25, backend)
    torch.library.opcheck(fn.default, args)


@pytest.mark.parametrize("name", ["uniter", "vlbert", "visualbert"])
def test_compile_fullgraph_aot_eager(name):
    case = Case(name, 2, 5, 32, seed=8)
    for backend in ("triton", "reference"):
        with ops.backend(backend):
            eager = case.run("op")
            op = case.op
            case.op = torch.compile(op, fullgraph=True, backend="aot_eager")
            try:
                compiled = case.run("op")
            finally:
                case.op = op
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------

def _raises(fn: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        fn()


def test_bad_input_names_argument_expected_and_actual():
    u = Case("uniter", 2, 5, 16).floats
    tid = torch.ones(2, 5, dtype=torch.long, device=DEV)
    _raises(lambda: ops.uniter_visual_embeddings(u[0], u[1][:, :4], tid, *u[2:]),
            r"uniter_visual_embeddings: pos_proj: expected shape \(2, 5, 16\), got shape \(2, 4, 16\)")
    _raises(lambda: ops.uniter_visual_embeddings(u[0], u[1], tid + 2, *u[2:]),
            r"type_ids: expected values in \[0, 3\), got 3 at index \(0, 0\)")
    _raises(lambda: ops.uniter_visual_embeddings(u[0], u[1], tid, u[2], u[3][:4], *u[4:]),
            r"img_ln_weight: expected shape \(16,\), got shape \(4,\)")
    _raises(lambda: ops.uniter_visual_embeddings(u[0], u[1].half(), tid, *u[2:]),
            r"pos_proj: expected dtype float32 \(like the other float inputs\), got float16")
    v = Case("vilbert", 2, 5, 16).floats
    _raises(lambda: ops.vilbert_visual_embeddings(v[0][0], *v[1:]), r"img_proj: expected a 3-d tensor \(B,L,E\)")
    _raises(lambda: ops.vilbert_visual_embeddings(*v, dropout_p=1.5), r"dropout_p: expected a float in \[0, 1\)")
    w = Case("vlbert", 2, 5, 16).floats
    pid = torch.zeros(2, 5, dtype=torch.long, device=DEV)
    _raises(lambda: ops.vlbert_visual_embeddings(w[0], pid + 20, pid, *w[1:]),
            r"vlbert_visual_embeddings: position_ids: expected values in \[0, 20\), got 20")
    _raises(lambda: ops.vlbert_visual_embeddings(w[0], pid, pid, w[2], *w[2:]),
            r"img_weight: expected shape \(1, E=16\), got shape \(20, 16\)")
    _raises(lambda: ops.vlbert_visual_embeddings(w[0], pid, pid, *w[1:], visual_mask=pid),
            r"visual_mask: expected dtype bool, got int64")
    x = Case("visualbert", 2, 5, 16).floats
    al = torch.full((2, 5, 3), -1, dtype=torch.long, device=DEV)
    al[1, 2, 0] = -2
    _raises(lambda: ops.visualbert_visual_embeddings(x[0], pid, al, *x[1:]),
            r"image_text_alignment: expected values in \[-1, 20\) \(-1 = none\), got -2 at index \(1, 2, 0\)")
    _raises(lambda: ops.visualbert_visual_embeddings(x[0], pid, al[:, :4], *x[1:]),
            r"image_text_alignment: expected shape \(2, 5, 3\), got shape \(2, 4, 3\)")


# ----------------------------------------------------------------------------------
# The models' embedding modules on the ops
# ----------------------------------------------------------------------------------

def _tiny_inputs(vocab: int, fdim: int, bdim: int, B: int = 2, Lt: int = 6, Lv: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (B, Lt), generator=g)
    am = torch.ones(B, Lt, dtype=torch.bool)
    am[1, 4:] = False
    feats = torch.randn(B, Lv, fdim, generator=g)
    vm = torch.ones(B, Lv, dtype=torch.bool)
    vm[0, 3:] = False
    boxes = torch.rand(B, Lv, bdim, generator=g)
    return ids, am, feats, vm, boxes


def test_modules_equal_their_plain_torch_formulas_bitwise():
    """CPU fp32, eval: the switched modules give exactly the old plain-torch values."""
    import torch.nn.functional as F
    from vlfast.models.uniter import Uniter, UniterConfig
    from vlfast.models.vilbert import ViLBert, ViLBertConfig
    from vlfast.models.visualbert import VisualBert, VisualBertConfig

    u = Uniter(UniterConfig.small()).eval()
    ids, am, f, vm, bx = _tiny_inputs(u.config.vocab_size, u.config.img_dim, 7)
    te = u.embeddings
    L = ids.shape[1]
    want = te.LayerNorm(te.word_embeddings(ids) + te.position_embeddings(torch.arange(L)[None].expand(2, L))
                        + te.token_type_embeddings(torch.zeros_like(ids)))
    assert torch.equal(te(ids), want)
    ie, tid = u.img_embeddings, torch.ones(2, 5, dtype=torch.long)
    imask = vm.clone()
    f2 = f + imask[..., None].float() * ie.mask_embedding.weight[1]
    want = ie.LayerNorm(ie.img_layer_norm(ie.img_linear(f2)) + ie.pos_layer_norm(ie.pos_linear(bx))
                        + te.token_type_embeddings(tid))
    assert torch.equal(ie(f, bx, tid, te.token_type_embeddings.weight, imask), want)

    v = ViLBert(ViLBertConfig.small()).eval()
    ve = v.v_embeddings
    f = torch.randn(2, 5, v.config.v_feature_size)
    b5 = torch.rand(2, 5, 5)
    assert torch.equal(ve(f, b5), ve.LayerNorm(ve.image_embeddings(f) + ve.image_location_embeddings(b5)))

    vb = VisualBert(VisualBertConfig.small()).eval()
    e = vb.embeddings
    ids, am, f, vm, bx = _tiny_inputs(vb.config.vocab_size, vb.config.visual_embedding_dim, 4)
    tt, vt = torch.zeros_like(ids), torch.ones(2, 5, dtype=torch.long)
    align = torch.tensor([[[0, 2], [-1, -1], [3, -1], [1, 1], [5, 0]]] * 2)
    for a in (None, align):
        want = e.LayerNorm(torch.cat([e.text(ids, tt), e.visual(f, vt, a)], 1))
        assert torch.equal(e(ids, tt, f, vt, a), want)


class _EmbeddingsOnly:
    """Stands in for ``vlfast._dispatch`` inside the embedding op module: the embedding
    ops see the requested backend, every other op keeps the default (the interpreted
    attention kernels would make these model tests slow)."""

    def __init__(self, real, backend: str):
        self._real, self._backend = real, backend

    def __getattr__(self, name):
        return getattr(self._real, name)

    def requested_backend(self) -> str:
        return self._backend


# (ViLBERT's module is a plain sum + LayerNorm, covered bitwise above; its tiny model
# alone takes ~10 s on a 2-core CPU, so it is left out here)
@pytest.mark.parametrize("model", ["visualbert", "uniter", "vlbert", "vlbert_relu", "vlbert_mvrc"])
def test_models_with_triton_embeddings_match_the_reference(model, monkeypatch):
    """Tiny configs: the embedding ops forced to Triton (interpreted) vs the reference,
    eval; outputs and the gradients of every embedding table and LayerNorm."""
    from vlfast.kernels.embeddings import op as eop
    from vlfast.models.uniter import Uniter, UniterConfig
    from vlfast.models.visualbert import VisualBert, VisualBertConfig
    from vlfast.models.vlbert import VLBert, VLBertConfig

    torch.manual_seed(0)
    if model == "visualbert":
        m = VisualBert(VisualBertConfig.small())
        ids, am, f, vm, bx = _tiny_inputs(m.config.vocab_size, m.config.visual_embedding_dim, 4)
        call = lambda: m(ids, am, None, f, visual_mask=vm)  # noqa: E731
    elif model == "uniter":
        m = Uniter(UniterConfig.small())
        ids, am, f, vm, bx = _tiny_inputs(m.config.vocab_size, m.config.img_dim, 7)
        call = lambda: m(ids, am, None, f, bx, vm, img_masks=vm & (torch.arange(5) == 1))  # noqa: E731
    else:
        c = VLBertConfig.small()
        if model == "vlbert_relu":
            c.visual_size = c.hidden_size  # no visual_1x1: the op applies ReLU and the mask
        m = VLBert(c)
        with torch.no_grad():
            m.visual_ln_text.weight.fill_(1.0)
            m.visual_ln_object.weight.fill_(1.0)
        ids, am, f, vm, bx = _tiny_inputs(c.vocab_size, c.visual_feat_dim, 4)
        bx = bx * 100
        bx[..., 2:] += 100
        # vlbert_mvrc: masked RoIs (their [IMG] swap rides on a doubled token-type table)
        im = vm & (torch.arange(5) % 2 == 1) if model == "vlbert_mvrc" else None
        call = lambda: m(ids, am, None, f, bx, vm, image_size=torch.full((2, 2), 300.0), img_masks=im)  # noqa: E731
    m.eval()
    outs = {}
    real = eop._dispatch
    for backend in ("reference", "triton"):
        m.zero_grad(set_to_none=True)
        monkeypatch.setattr(eop, "_dispatch", _EmbeddingsOnly(real, backend))
        o = call()
        h = o.last_hidden_state
        (h.square().mean() + o.pooler_output.sum()).backward()
        tables = {n: p.grad.clone() for n, p in m.named_parameters()
                  if p.grad is not None and ("embedding" in n or "LayerNorm" in n or "layer_norm" in n)}
        outs[backend] = (h.detach(), tables)
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], atol=2e-4, rtol=1e-3)
    assert outs["triton"][1].keys() == outs["reference"][1].keys() and outs["reference"][1]
    for n, gref in outs["reference"][1].items():
        torch.testing.assert_close(outs["triton"][1][n], gref, atol=2e-4, rtol=1e-3, msg=lambda s: f"{n}: {s}")
