"""ViLBERT: forward contract, padded vs padding-free parity, gradients, the official
encoder's layer order and semantics, official / HF-BERT checkpoints, save/load and
input errors.  Small configs only (the whole file runs in seconds on CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.models import base as mbase
from vlfast.models import vilbert as V
from vlfast.models.vilbert import ViLBert, ViLBertConfig, convert_official, infer_config, to_official

B, LT, LV = 3, 9, 6


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves biases at 0 and LayerNorms at (1, 0): perturb every parameter so
    a mix-up of any two of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _model(seed: int = 0, **kw) -> ViLBert:
    torch.manual_seed(seed)
    return _perturb(ViLBert(ViLBertConfig.small(**kw)), seed).eval()


def _inputs(seed: int = 0, vocab: int = 100, feat: int = 2048, int_masks: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(B, LT, dtype=torch.long)
    am[1, 5:] = 0
    am[2, 3:] = 0
    vm = torch.ones(B, LV, dtype=torch.long)
    vm[0, 4:] = 0
    vm[2, 2:] = 0
    if not int_masks:
        am, vm = am.bool(), vm.bool()
    return dict(input_ids=torch.randint(1, vocab, (B, LT), generator=g), attention_mask=am,
                token_type_ids=torch.randint(0, 2, (B, LT), generator=g),
                visual_feats=torch.randn(B, LV, feat, generator=g), visual_boxes=torch.rand(B, LV, 5, generator=g),
                visual_mask=vm)


# ----------------------------------------------------------------------------------
# Config and the official layer order
# ----------------------------------------------------------------------------------

def test_configs():
    b = ViLBertConfig.base()
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.intermediate_size) == (768, 12, 12, 3072)
    assert (b.v_feature_size, b.v_hidden_size, b.v_num_hidden_layers, b.v_num_attention_heads,
            b.v_intermediate_size) == (2048, 1024, 6, 8, 1024)
    assert (b.bi_hidden_size, b.bi_num_attention_heads) == (1024, 8)
    assert b.v_biattention_id == [0, 1, 2, 3, 4, 5] and b.t_biattention_id == [6, 7, 8, 9, 10, 11]
    assert (b.fixed_t_layer, b.fixed_v_layer, b.fusion_method) == (0, 0, "mul")
    lg = ViLBertConfig.large()
    assert (lg.hidden_size, lg.num_hidden_layers, lg.num_attention_heads) == (1024, 24, 16)
    assert lg.t_biattention_id == list(range(18, 24))
    s = ViLBertConfig.small()
    assert ViLBertConfig.from_dict(s.to_dict()) == s and s.to_dict()["model_type"] == "vilbert"


# config/bert_base_6layer_6conect.json of vilbert-multi-task, as released
_OFFICIAL_BASE_JSON = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512,
    "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522,
    "v_feature_size": 2048, "v_target_size": 1601, "v_hidden_size": 1024, "v_num_hidden_layers": 6,
    "v_num_attention_heads": 8, "v_intermediate_size": 1024, "bi_hidden_size": 1024, "bi_num_attention_heads": 8,
    "bi_intermediate_size": 1024, "bi_attention_type": 1, "v_attention_probs_dropout_prob": 0.1,
    "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1, "v_initializer_range": 0.02,
    "v_biattention_id": [0, 1, 2, 3, 4, 5], "t_biattention_id": [6, 7, 8, 9, 10, 11], "pooling_method": "mul"}


def test_official_config_json(tmp_path):
    assert ViLBertConfig.from_official_config(_OFFICIAL_BASE_JSON) == ViLBertConfig.base()
    (tmp_path / "c.json").write_text(json.dumps(dict(_OFFICIAL_BASE_JSON, t_biattention_id=[8, 9, 10, 11],
                                                     v_biattention_id=[0, 1, 2, 3], v_num_hidden_layers=4)))
    c = ViLBertConfig.from_official_config(tmp_path / "c.json")
    assert c.t_biattention_id == [8, 9, 10, 11] and c.v_num_hidden_layers == 4
    with pytest.raises(ValueError, match="hidden_act"):
        ViLBertConfig.from_official_config(dict(_OFFICIAL_BASE_JSON, hidden_act="relu"))


@pytest.mark.parametrize("kw, arg", [
    (dict(t_biattention_id=[3]), "t_biattention_id"),
    (dict(v_biattention_id=[0, 2]), "v_biattention_id"),
    (dict(t_biattention_id=[3, 2]), "t_biattention_id"),
    (dict(fixed_t_layer=3), "fixed_t_layer"),
    (dict(fixed_v_layer=1), "fixed_v_layer"),
    (dict(bi_num_attention_heads=3), "bi_num_attention_heads"),
    (dict(fusion_method="cat"), "fusion_method"),
])
def test_config_errors(kw, arg):
    with pytest.raises(ValueError, match=arg):
        ViLBertConfig.small(**kw)


def test_schedule_is_the_official_order():
    # Read off vilbert-multi-task BertEncoder.forward: for each (v_id, t_id), text layers
    # up to t_id, then vision layers up to v_id, then the co-layer; then the remaining
    # vision layers, then the remaining text layers.
    base = [(s.kind, s.index) for s in V.layer_schedule(ViLBertConfig.base())]
    expected = [("t", i) for i in range(6)] + [("c", 0)]
    for k in range(5):
        expected += [("t", 6 + k), ("v", k), ("c", k + 1)]
    expected += [("v", 5), ("t", 11)]
    assert base == expected
    small = [(s.kind, s.index) for s in V.layer_schedule(ViLBertConfig.small())]
    assert small == [("t", 0), ("t", 1), ("c", 0), ("t", 2), ("v", 0), ("c", 1), ("v", 1), ("t", 3)]
    frozen = V.layer_schedule(ViLBertConfig.small(fixed_t_layer=2))
    assert [s.index for s in frozen if s.frozen and s.kind == "t"] == [0, 1]


def test_layers_run_in_schedule_order():
    m = _model()
    seen = []
    enc = m.encoder
    for kind, mods in (("t", enc.layer), ("v", enc.v_layer), ("c", enc.c_layer)):
        for i, mod in enumerate(mods):
            mod.register_forward_hook(lambda *_, k=kind, i=i: seen.append((k, i)))
    for pf in (False, True):
        seen.clear()
        m(**_inputs(), padding_free=pf)
        assert seen == [(s.kind, s.index) for s in enc.schedule]


# ----------------------------------------------------------------------------------
# An independent oracle in the official key names, following the official forward
# (additive -10000 masks, BertBiAttention's query2.key1 / query1.key2 pairing, BiOutput
# cross-wiring, ReLU poolers).
# ----------------------------------------------------------------------------------

def _official_forward(P: dict, c: ViLBertConfig, ids, tt, am, feats, boxes, vm):
    def lin(x, n):
        return F.linear(x, P[n + ".weight"], P[n + ".bias"])

    def ln(x, n):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return P[n + ".weight"] * (x - u) / torch.sqrt(s + 1e-12) + P[n + ".bias"]

    def gelu(x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def heads(x, h):
        return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

    def attend(q, k, v, add):
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + add, -1)
        o = p @ v
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    def layer(x, n, add, h):
        a = attend(*(heads(lin(x, f"{n}.attention.self.{w}"), h) for w in ("query", "key", "value")), add)
        a = ln(lin(a, f"{n}.attention.output.dense") + x, f"{n}.attention.output.LayerNorm")
        return ln(lin(gelu(lin(a, f"{n}.intermediate.dense")), f"{n}.output.dense") + a, f"{n}.output.LayerNorm")

    add_t = ((1.0 - am.float()) * -10000.0)[:, None, None, :]
    add_v = ((1.0 - vm.float()) * -10000.0)[:, None, None, :]
    pos = torch.arange(ids.shape[1])[None]
    e = "bert.embeddings"
    t = ln(P[f"{e}.word_embeddings.weight"][ids] + P[f"{e}.position_embeddings.weight"][pos]
           + P[f"{e}.token_type_embeddings.weight"][tt], f"{e}.LayerNorm")
    v = ln(lin(feats, "bert.v_embeddings.image_embeddings") + lin(boxes, "bert.v_embeddings.image_location_embeddings"),
           "bert.v_embeddings.LayerNorm")
    t_start = v_start = 0
    for count, (v_end, t_end) in enumerate(zip(c.v_biattention_id, c.t_biattention_id)):
        for i in range(t_start, t_end):
            t = layer(t, f"bert.encoder.layer.{i}", add_t, c.num_attention_heads)
        for i in range(v_start, v_end):
            v = layer(v, f"bert.encoder.v_layer.{i}", add_v, c.v_num_attention_heads)
        n, hb = f"bert.encoder.c_layer.{count}", c.bi_num_attention_heads
        q1, k1, v1 = (heads(lin(v, f"{n}.biattention.{w}1"), hb) for w in ("query", "key", "value"))
        q2, k2, v2 = (heads(lin(t, f"{n}.biattention.{w}2"), hb) for w in ("query", "key", "value"))
        ctx1 = attend(q2, k1, v1, add_v)  # text queries over regions
        ctx2 = attend(q1, k2, v2, add_t)  # region queries over words
        av = ln(lin(ctx2, f"{n}.biOutput.dense1") + v, f"{n}.biOutput.LayerNorm1")
        at = ln(lin(ctx1, f"{n}.biOutput.dense2") + t, f"{n}.biOutput.LayerNorm2")
        v = ln(lin(gelu(lin(av, f"{n}.v_intermediate.dense")), f"{n}.v_output.dense") + av, f"{n}.v_output.LayerNorm")
        t = ln(lin(gelu(lin(at, f"{n}.t_intermediate.dense")), f"{n}.t_output.dense") + at, f"{n}.t_output.LayerNorm")
        t_start, v_start = t_end, v_end
    for i in range(v_start, c.v_num_hidden_layers):
        v = layer(v, f"bert.encoder.v_layer.{i}", add_v, c.v_num_attention_heads)
    for i in range(t_start, c.num_hidden_layers):
        t = layer(t, f"bert.encoder.layer.{i}", add_t, c.num_attention_heads)
    return t, v, F.relu(lin(t[:, 0], "bert.t_pooler.dense")), F.relu(lin(v[:, 0], "bert.v_pooler.dense"))


@pytest.mark.parametrize("ids", [None, ([1, 1], [0, 2])])
def test_matches_official_forward(ids):
    kw = {} if ids is None else dict(v_biattention_id=ids[0], t_biattention_id=ids[1])
    m = _model(**kw)
    x = _inputs()
    P = to_official(m.state_dict())
    with torch.no_grad():
        t, v, pt, pv = _official_forward(P, m.config, x["input_ids"], x["token_type_ids"], x["attention_mask"],
                                         x["visual_feats"], x["visual_boxes"], x["visual_mask"])
        for pf in (False, True):
            o = m(**x, padding_free=pf)
            assert (o.seq_t - t * x["attention_mask"][..., None]).abs().max() < 1e-5
            assert (o.seq_v - v * x["visual_mask"][..., None]).abs().max() < 1e-5
            assert (o.pooled_t - pt).abs().max() < 1e-5 and (o.pooled_v - pv).abs().max() < 1e-5


def test_co_attention_runs_on_the_fused_op(monkeypatch):
    calls = []
    real = V.ops.co_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(V.ops, "co_attention", spy)
    m = _model()
    m(**_inputs())
    assert len(calls) == m.config.num_co_layers
    assert calls[0] == (B, 2, LT, 16)  # (B, bi heads, Lt, bi head dim)
    m.train()
    calls.clear()
    m(**_inputs()).seq_t.sum().backward()  # training: dropout through the op
    assert len(calls) == m.config.num_co_layers


# ----------------------------------------------------------------------------------
# Forward contract
# ----------------------------------------------------------------------------------

def test_forward_contract():
    m = _model()
    x = _inputs()
    with torch.no_grad():
        out = m(**x)
    seq_t, seq_v, pooled_t, pooled_v = out
    assert seq_t.shape == (B, LT, 64) and seq_v.shape == (B, LV, 48)
    assert pooled_t.shape == (B, 32) and pooled_v.shape == (B, 32)
    assert out[0] is out.seq_t and len(out) == 4
    am, vm = x["attention_mask"].bool(), x["visual_mask"].bool()
    assert seq_t[~am].abs().max() == 0 and seq_v[~vm].abs().max() == 0
    assert seq_t[am].abs().min() > 0
    # ReLU poolers on the first slot of each stream, fused by product
    assert torch.equal(pooled_t, F.relu(m.t_pooler.dense(seq_t[:, 0])))
    assert torch.equal(pooled_v, F.relu(m.v_pooler.dense(seq_v[:, 0])))
    assert torch.equal(out.pooler_output, pooled_t * pooled_v)
    assert torch.equal(m.fused_pooled(out), pooled_t * pooled_v)
    assert out.attentions is None and out.hidden_states is None
    m.config.fusion_method = "sum"
    assert torch.equal(m.fused_pooled(out), pooled_t + pooled_v)


def test_defaults_all_real_and_type_zero():
    m = _model()
    x = _inputs()
    ones_t, ones_v = torch.ones(B, LT, dtype=torch.long), torch.ones(B, LV, dtype=torch.long)
    with torch.no_grad():
        a = m(x["input_ids"], visual_feats=x["visual_feats"], visual_boxes=x["visual_boxes"])
        b = m(x["input_ids"], ones_t, torch.zeros_like(x["input_ids"]), x["visual_feats"], x["visual_boxes"], ones_v)
    for u, w in zip(a, b):
        assert torch.equal(u, w)


def test_bool_and_int_masks_agree():
    m = _model()
    with torch.no_grad():
        a = m(**_inputs(int_masks=True))
        b = m(**_inputs(int_masks=False))
    for u, w in zip(a, b):
        assert torch.equal(u, w)


@pytest.mark.parametrize("kw", [{}, dict(task_specific_tokens=True), dict(v_biattention_id=[], t_biattention_id=[])])
def test_padding_free_parity(kw):
    m = _model(**kw)
    x = _inputs()
    if kw.get("task_specific_tokens"):
        x["task_ids"] = torch.tensor([[3], [0], [19]])
    with torch.no_grad():
        a = m(**x, output_hidden_states=True)
        b = m(**x, padding_free=True, output_hidden_states=True)
    for u, w in zip(a, b):
        assert (u - w).abs().max() < 1e-5
    for sa, sb in zip(a.hidden_states, b.hidden_states):
        assert len(sa) == len(sb)
        for u, w in zip(sa, sb):
            assert (u - w).abs().max() < 1e-5


def test_attentions_and_hidden_states():
    m = _model()
    x = _inputs()
    c = m.config
    with torch.no_grad():
        plain = m(**x)
        out = m(**x, output_attentions=True, output_hidden_states=True)
    for u, w in zip(plain, out):
        assert (u - w).abs().max() < 1e-5
    st, sv = out.hidden_states
    n_c = c.num_co_layers
    assert len(st) == 1 + c.num_hidden_layers + n_c and len(sv) == 1 + c.v_num_hidden_layers + n_c
    assert all(s.shape == (B, LT, 64) for s in st) and all(s.shape == (B, LV, 48) for s in sv)
    assert torch.equal(st[-1], out.seq_t) and torch.equal(sv[-1], out.seq_v)
    at, av, ac = out.attentions
    assert len(at) == c.num_hidden_layers and len(av) == c.v_num_hidden_layers and len(ac) == n_c
    assert all(a.shape == (B, 4, LT, LT) for a in at) and all(a.shape == (B, 4, LV, LV) for a in av)
    am, vm = x["attention_mask"].bool(), x["visual_mask"].bool()
    for t2v, v2t in ac:
        assert t2v.shape == (B, 2, LT, LV) and v2t.shape == (B, 2, LV, LT)
        assert torch.allclose(t2v.sum(-1), torch.ones(()), atol=1e-5)   # every row has a real region
        assert t2v.masked_select(~vm[:, None, None, :]).abs().max() == 0
        assert v2t.masked_select(~am[:, None, None, :]).abs().max() == 0


# ----------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------

def test_backward_reaches_every_parameter():
    # token types 0 and 1 both occur, so every parameter (including both type rows)
    # gets a gradient; the official BiOutput's unused q_dense1/q_dense2 are buffers.
    m = _model()
    out = m(**_inputs())
    (out.seq_t.sum() + out.seq_v.pow(2).sum() + out.pooler_output.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    bufs = {n for n, _ in m.named_buffers()}
    assert {"encoder.c_layer.0.biOutput.q_dense1.weight", "encoder.c_layer.0.biOutput.q_dense2.bias"} <= bufs


def test_training_step_and_frozen_layers():
    m = _model(fixed_t_layer=2)
    m.train()
    out = m(**_inputs(), padding_free=True)
    out.pooler_output.sum().backward()
    for name, p in m.named_parameters():
        frozen = name.startswith(("encoder.layer.0.", "encoder.layer.1.", "embeddings."))
        assert (p.grad is None) == frozen, name
    # two attention-dropout rates: two attention launches instead of one co-attention
    m2 = _model(v_attention_probs_dropout_prob=0.2).train()
    m2(**_inputs()).seq_v.sum().backward()
    assert m2.encoder.c_layer[0].biattention.query1.weight.grad is not None


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------

def _official_sd(m: ViLBert, heads: bool = True) -> dict:
    sd = to_official(m.state_dict())
    if heads:  # pretraining / task heads of BertForMultiModalPreTraining, VILBertForVLTasks
        sd["cls.predictions.bias"] = torch.zeros(100)
        sd["cls.bi_seq_relationship.weight"] = torch.zeros(2, 32)
        sd["vil_prediction.logit_fc.0.weight"] = torch.zeros(64, 32)
    return sd


def test_official_key_layout():
    keys = set(to_official(_model().state_dict()))
    for k in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
              "bert.v_embeddings.image_embeddings.weight", "bert.v_embeddings.image_location_embeddings.weight",
              "bert.v_embeddings.LayerNorm.bias", "bert.encoder.layer.3.attention.self.query.weight",
              "bert.encoder.v_layer.1.output.LayerNorm.weight", "bert.encoder.c_layer.1.biattention.query1.weight",
              "bert.encoder.c_layer.1.biattention.value2.bias", "bert.encoder.c_layer.0.biOutput.dense1.weight",
              "bert.encoder.c_layer.0.biOutput.LayerNorm2.weight", "bert.encoder.c_layer.0.biOutput.q_dense1.weight",
              "bert.encoder.c_layer.0.v_intermediate.dense.weight", "bert.encoder.c_layer.0.t_output.LayerNorm.bias",
              "bert.t_pooler.dense.weight", "bert.v_pooler.dense.bias"):
        assert k in keys, k
    sd = to_official(_model().state_dict())
    assert sd["bert.v_embeddings.image_location_embeddings.weight"].shape == (48, 5)
    assert sd["bert.encoder.c_layer.0.biattention.query1.weight"].shape == (32, 48)   # vision -> bi
    assert sd["bert.encoder.c_layer.0.biattention.query2.weight"].shape == (32, 64)   # text -> bi
    assert sd["bert.encoder.c_layer.0.biOutput.dense1.weight"].shape == (48, 32)
    assert sd["bert.t_pooler.dense.weight"].shape == (32, 64)


def test_official_round_trip(tmp_path):
    m = _model()
    sd = m.state_dict()
    back = convert_official(to_official(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # with heads and a DataParallel prefix, from a dict and from a file
    off = {"module." + k: v for k, v in _official_sd(m).items()}
    torch.save(off, tmp_path / "pytorch_model.bin")
    x = _inputs()
    with torch.no_grad():
        ref = m(**x)
    for src in (off, tmp_path / "pytorch_model.bin"):
        m2, rep = ViLBert.from_official(src, m.config, output_loading_info=True)
        assert rep.missing == [] and rep.unexpected == sorted(
            ["cls.predictions.bias", "cls.bi_seq_relationship.weight", "vil_prediction.logit_fc.0.weight"])
        with torch.no_grad():
            for u, w in zip(ref, m2.eval()(**x)):
                assert torch.equal(u, w)
    # TF-era LayerNorm names
    old = {(k[:-7] + ".gamma" if "LayerNorm" in k and k.endswith(".weight") else k): v
           for k, v in to_official(sd).items()}
    assert convert_official(old).keys() == sd.keys()


def test_convert_cli(tmp_path, capsys):
    from vlfast import convert

    m = _model()
    torch.save(_official_sd(m), tmp_path / "pretrained_model.bin")
    (tmp_path / "cfg.json").write_text(json.dumps(m.config.to_dict()))
    assert convert.main(["--model", "vilbert", "--src", str(tmp_path / "pretrained_model.bin"),
                         "--out", str(tmp_path / "out"), "--config", str(tmp_path / "cfg.json")]) == 0
    assert "cls.predictions.bias" in capsys.readouterr().out
    m2 = ViLBert.from_pretrained(tmp_path / "out").eval()
    x = _inputs()
    with torch.no_grad():
        for u, w in zip(m(**x), m2(**x)):
            assert torch.equal(u, w)


def test_from_official_infers_the_config():
    m = _model(task_specific_tokens=True)
    m2, rep = ViLBert.from_official(_official_sd(m, heads=False), output_loading_info=True)
    assert rep.missing == [] and rep.unexpected == []
    c, c2 = m.config, m2.config
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
              "type_vocab_size", "v_feature_size", "v_hidden_size", "v_num_hidden_layers", "v_intermediate_size",
              "bi_hidden_size", "v_biattention_id", "t_biattention_id", "task_specific_tokens", "num_task_tokens"):
        assert getattr(c2, f) == getattr(c, f), f
    # head counts are not in the shapes: BERT's head width 64 for text, 8 (official) for vision / bi
    assert (c2.num_attention_heads, c2.v_num_attention_heads, c2.bi_num_attention_heads) == (1, 8, 8)
    assert all(torch.equal(u, w) for u, w in zip(m.state_dict().values(), m2.state_dict().values()))
    # missing keys are reported, ours by name
    sd = _official_sd(m, heads=False)
    del sd["bert.t_pooler.dense.weight"]
    _, rep = ViLBert.from_official(sd, m.config, output_loading_info=True)
    assert rep.missing == ["t_pooler.dense.weight"] and rep.unexpected == []


def test_base_layout_infers_base_config():
    # shapes only (meta tensors): the base model's official key set gives the base config
    with torch.device("meta"):
        sd = ViLBert(ViLBertConfig.base()).state_dict()
    assert infer_config(sd) == ViLBertConfig.base()


def test_from_bert():
    d = mbase.bert_checkpoint_dir()
    bert_sd, cfg = mbase.load_hf_bert(d)
    c = ViLBertConfig.small(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512, v_num_hidden_layers=1,
                            v_biattention_id=[0], t_biattention_id=[5])
    m = ViLBert.from_bert(d, c)
    sd = m.state_dict()
    for k in ("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
              "embeddings.LayerNorm.bias", "encoder.layer.0.attention.self.query.weight",
              "encoder.layer.5.output.LayerNorm.weight", "encoder.layer.3.intermediate.dense.bias"):
        assert torch.equal(sd[k], bert_sd[k]), k
    with pytest.raises(ValueError, match="config.hidden_size"):
        ViLBert.from_bert(d, c.replace(hidden_size=768))
    # default config: the BERT's text sizes, co-layers on its last layers
    m = ViLBert.from_bert((bert_sd, cfg))
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (384, 6, 12, 30522)
    assert c.t_biattention_id == list(range(6)) and c.v_biattention_id == list(range(6))
    assert c.v_hidden_size == 1024 and torch.equal(m.encoder.layer[2].output.dense.weight,
                                                   bert_sd["encoder.layer.2.output.dense.weight"])


def test_save_and_load(tmp_path):
    m = _model(task_specific_tokens=True)
    m.save_pretrained(tmp_path / "ck")
    m2 = ViLBert.from_pretrained(tmp_path / "ck").eval()
    assert m2.config == m.config
    x = dict(_inputs(), task_ids=torch.tensor([[1], [2], [3]]))
    with torch.no_grad():
        a, b = m(**x), m2(**x)
    assert a.seq_t.shape == (B, LT + 1, 64)   # the task token after [CLS]
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert V.MODEL_CLASS is ViLBert and V.CONFIG_CLASS is ViLBertConfig


# ----------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------

def _bad(**changes):
    x = _inputs()
    x.update(changes)
    return x


@pytest.mark.parametrize("changes, arg", [
    (dict(visual_feats=torch.randn(B + 1, LV, 2048)), "visual_feats"),
    (dict(visual_feats=torch.randn(B, LV, 1024)), "visual_feats"),
    (dict(visual_feats=None), "visual_feats"),
    (dict(visual_boxes=torch.rand(B, LV, 4)), "visual_boxes"),
    (dict(visual_boxes=torch.rand(B, LV + 1, 5)), "visual_boxes"),
    (dict(visual_boxes=torch.rand(B + 1, LV, 5)), "visual_boxes"),
    (dict(attention_mask=torch.ones(B, LT + 1, dtype=torch.long)), "attention_mask"),
    (dict(attention_mask=torch.full((B, LT), 2)), "attention_mask"),
    (dict(attention_mask=torch.ones(B, LT)), "attention_mask"),
    (dict(visual_mask=torch.ones(B + 1, LV, dtype=torch.bool)), "visual_mask"),
    (dict(token_type_ids=torch.full((B, LT), 2)), "token_type_ids"),
    (dict(input_ids=torch.full((B, LT), 100)), "input_ids"),
    (dict(input_ids=torch.ones(B, 129, dtype=torch.long), attention_mask=None, token_type_ids=None), "input_ids"),
    (dict(task_ids=torch.zeros(B, 1, dtype=torch.long)), "task_ids"),
])
def test_bad_inputs(changes, arg):
    m = _model()
    with pytest.raises(ValueError, match=arg):
        m(**_bad(**changes))


def test_task_ids_required_with_task_tokens():
    m = _model(task_specific_tokens=True)
    with pytest.raises(ValueError, match="task_ids"):
        m(**_inputs())
    with pytest.raises(ValueError, match="task_ids"):
        m(**_inputs(), task_ids=torch.full((B, 1), 20))
