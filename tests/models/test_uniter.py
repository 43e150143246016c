"""UNITER: forward contract, equality with the official gather-packed forward,
padded vs padding-free parity, gradients, official checkpoint layout, BERT init,
save/load and input errors.  Small configs, fp32."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.models.base import bert_checkpoint_dir
from vlfast.models.uniter import (CONFIG_CLASS, MODEL_CLASS, Uniter, UniterConfig, convert_official, infer_config,
                                  to_official)

CFG = UniterConfig.small(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_batch(cfg: UniterConfig, txt_lens, n_regions, seed=0, device="cpu"):
    """A ragged batch: left-aligned words and regions, padding with junk values
    (the model must ignore them), 7-d boxes [x1,y1,x2,y2,w,h,w*h]."""
    g = torch.Generator().manual_seed(seed)
    B, Lt, Lv = len(txt_lens), max(txt_lens), max(n_regions)
    ids = torch.randint(1, cfg.vocab_size, (B, Lt), generator=g)
    tmask = torch.arange(Lt)[None] < torch.tensor(txt_lens)[:, None]
    vmask = torch.arange(Lv)[None] < torch.tensor(n_regions)[:, None]
    feats = torch.randn(B, Lv, cfg.img_dim, generator=g)
    xy = torch.rand(B, Lv, 2, generator=g) * 0.5
    wh = torch.rand(B, Lv, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh, wh, wh[..., :1] * wh[..., 1:]], -1)
    img_masks = (torch.rand(B, Lv, generator=g) < 0.3) & vmask
    img_masks[:, 0] |= vmask[:, 0]  # at least one masked region per sample that has regions
    d = dict(input_ids=ids, attention_mask=tmask, visual_feats=feats, visual_boxes=boxes, visual_mask=vmask)
    return {k: v.to(device) for k, v in d.items()}, img_masks.to(device)


def small_model(seed=0, **kw) -> Uniter:
    torch.manual_seed(seed)
    return Uniter(CFG.replace(**kw) if kw else CFG).eval()


# ----------------------------------------------------------------------------------
# The official forward, written from ChenRocks/UNITER model/model.py + layer.py and
# data/data.py (get_gather_index), on a state_dict in the official key layout
# ----------------------------------------------------------------------------------

def official_keys(cfg: UniterConfig) -> dict[str, tuple[int, ...]]:
    """UniterModel's parameter names and shapes under ``uniter.`` as the official code
    builds them (UniterTextEmbeddings, UniterImageEmbeddings, UniterEncoder of
    BertLayer, BertPooler)."""
    E, I = cfg.hidden_size, cfg.intermediate_size
    k = {
        "uniter.embeddings.word_embeddings.weight": (cfg.vocab_size, E),
        "uniter.embeddings.position_embeddings.weight": (cfg.max_position_embeddings, E),
        "uniter.embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, E),
        "uniter.embeddings.LayerNorm.weight": (E,), "uniter.embeddings.LayerNorm.bias": (E,),
        "uniter.img_embeddings.img_linear.weight": (E, cfg.img_dim), "uniter.img_embeddings.img_linear.bias": (E,),
        "uniter.img_embeddings.img_layer_norm.weight": (E,), "uniter.img_embeddings.img_layer_norm.bias": (E,),
        "uniter.img_embeddings.pos_layer_norm.weight": (E,), "uniter.img_embeddings.pos_layer_norm.bias": (E,),
        "uniter.img_embeddings.pos_linear.weight": (E, 7), "uniter.img_embeddings.pos_linear.bias": (E,),
        "uniter.img_embeddings.mask_embedding.weight": (2, cfg.img_dim),
        "uniter.img_embeddings.LayerNorm.weight": (E,), "uniter.img_embeddings.LayerNorm.bias": (E,),
        "uniter.pooler.dense.weight": (E, E), "uniter.pooler.dense.bias": (E,),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"uniter.encoder.layer.{n}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            k[p + lin + ".weight"], k[p + lin + ".bias"] = (E, E), (E,)
        k[p + "intermediate.dense.weight"], k[p + "intermediate.dense.bias"] = (I, E), (I,)
        k[p + "output.dense.weight"], k[p + "output.dense.bias"] = (E, I), (E,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            k[p + ln + ".weight"], k[p + ln + ".bias"] = (E,), (E,)
    return k


def official_heads(cfg: UniterConfig, label_dim: int = 5) -> dict[str, tuple[int, ...]]:
    """UniterForPretraining's heads (cls, feat_regress, region_classifier, itm_output)."""
    E = cfg.hidden_size
    return {
        "cls.predictions.bias": (cfg.vocab_size,),
        "cls.predictions.transform.dense.weight": (E, E), "cls.predictions.transform.dense.bias": (E,),
        "cls.predictions.transform.LayerNorm.weight": (E,), "cls.predictions.transform.LayerNorm.bias": (E,),
        "cls.predictions.decoder.weight": (cfg.vocab_size, E),
        "feat_regress.weight": (E, cfg.img_dim), "feat_regress.bias": (cfg.img_dim,),
        "feat_regress.net.0.weight": (E, E), "feat_regress.net.0.bias": (E,),
        "feat_regress.net.2.weight": (E,), "feat_regress.net.2.bias": (E,),
        "region_classifier.net.0.weight": (E, E), "region_classifier.net.0.bias": (E,),
        "region_classifier.net.2.weight": (E,), "region_classifier.net.2.bias": (E,),
        "region_classifier.net.3.weight": (label_dim, E), "region_classifier.net.3.bias": (label_dim,),
        "itm_output.weight": (2, E), "itm_output.bias": (2,),
    }


def random_official_sd(cfg: UniterConfig, seed=0, heads=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = {**official_keys(cfg), **(official_heads(cfg) if heads else {})}
    sd = {}
    for k, shp in keys.items():
        t = torch.randn(shp, generator=g) * (0.1 if len(shp) > 1 else 0.05)
        if k.endswith("LayerNorm.weight") or k.endswith("layer_norm.weight") or k.endswith("net.2.weight"):
            t = t + 1.0
        sd[k] = t
    return sd


def get_gather_index(txt_lens, num_bbs, batch_size, max_len, out_size):
    """data/data.py's get_gather_index."""
    gi = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        gi[i, tl:tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long)
    return gi


def official_forward(sd, cfg, input_ids, position_ids, img_feat, img_pos_feat, attention_mask, gather_index,
                     img_masks=None):
    """UniterModel.forward (eval mode, output_all_encoded_layers=False), eager, in the
    official layout: returns the packed sequence (B, out_size, E)."""
    P = "uniter."
    eps = 1e-12
    E, H = cfg.hidden_size, cfg.num_attention_heads

    def lin(x, name):
        return F.linear(x, sd[P + name + ".weight"], sd[P + name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (E,), sd[P + name + ".weight"], sd[P + name + ".bias"], eps)

    def emb(ids, name):
        return F.embedding(ids, sd[P + name + ".weight"])

    ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    txt = ln(emb(input_ids, "embeddings.word_embeddings") + emb(position_ids, "embeddings.position_embeddings")
             + emb(torch.zeros_like(input_ids), "embeddings.token_type_embeddings"), "embeddings.LayerNorm")
    img_type = emb(torch.ones_like(img_feat[:, :, 0].long()), "embeddings.token_type_embeddings")
    if img_masks is not None:
        w = sd[P + "img_embeddings.mask_embedding.weight"].clone()
        w[0].fill_(0)
        img_feat = img_feat + F.embedding(img_masks.long(), w)
    im = ln(lin(img_feat, "img_embeddings.img_linear"), "img_embeddings.img_layer_norm")
    pos = ln(lin(img_pos_feat, "img_embeddings.pos_linear"), "img_embeddings.pos_layer_norm")
    img = ln(im + pos + img_type, "img_embeddings.LayerNorm")
    gi = gather_index.unsqueeze(-1).expand(-1, -1, E)
    h = torch.gather(torch.cat([txt, img], 1), 1, gi)
    B, L, _ = h.shape
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{n}."

        def split(x):
            return x.view(B, L, H, E // H).permute(0, 2, 1, 3)

        q, k, v = (split(lin(h, p + "attention.self." + t)) for t in ("query", "key", "value"))
        s = q @ k.transpose(-1, -2) / math.sqrt(E // H) + ext
        ctx = (torch.softmax(s, -1) @ v).permute(0, 2, 1, 3).reshape(B, L, E)
        a = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        i = lin(a, p + "intermediate.dense")
        i = i * 0.5 * (1.0 + torch.erf(i / math.sqrt(2.0)))
        h = ln(lin(i, p + "output.dense") + a, p + "output.LayerNorm")
    return h


def official_pooler(sd, seq):
    return torch.tanh(F.linear(seq[:, 0], sd["uniter.pooler.dense.weight"], sd["uniter.pooler.dense.bias"]))


def official_batch(batch, img_masks, txt_lens, n_regions):
    """Our batch in the official collate layout (data/data.py)."""
    B, Lt = batch["input_ids"].shape
    out_size = max(t + n for t, n in zip(txt_lens, n_regions))
    attn = torch.zeros(B, out_size, dtype=torch.long)
    for i, (t, n) in enumerate(zip(txt_lens, n_regions)):
        attn[i, :t + n] = 1
    ids = batch["input_ids"] * batch["attention_mask"]  # padded with 0, as the official collate does
    return dict(input_ids=ids, position_ids=torch.arange(Lt)[None].expand(B, Lt), img_feat=batch["visual_feats"],
                img_pos_feat=batch["visual_boxes"], attention_mask=attn,
                gather_index=get_gather_index(txt_lens, n_regions, B, Lt, out_size), img_masks=img_masks)


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------

TXT, REG = [5, 9, 3, 1], [4, 2, 6, 0]


def test_configs():
    b, l, s = UniterConfig.base(), UniterConfig.large(), UniterConfig.small()
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.img_dim, b.pos_dim) == (768, 12, 12, 2048, 7)
    assert (l.hidden_size, l.num_hidden_layers, l.num_attention_heads, l.intermediate_size) == (1024, 24, 16, 4096)
    assert s.hidden_size == 64 and s.num_hidden_layers == 2 and s.num_attention_heads == 4
    assert MODEL_CLASS is Uniter and CONFIG_CLASS is UniterConfig and UniterConfig.model_type == "uniter"
    assert UniterConfig.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="hidden_act"):
        UniterConfig.small(hidden_act="relu")
    with pytest.raises(ValueError, match="type_vocab_size"):
        UniterConfig.small(type_vocab_size=1)


def test_forward_contract():
    model = small_model()
    batch, _ = make_batch(CFG, TXT, REG)
    B, Lt, Lv, E = 4, max(TXT), max(REG), CFG.hidden_size
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    seq, pooled = out
    assert seq is out.last_hidden_state and pooled is out[1] and len(out) == 2
    assert seq.shape == (B, Lt + Lv, E) and pooled.shape == (B, E)
    full = torch.cat([batch["attention_mask"], batch["visual_mask"]], 1)
    assert torch.all(seq[~full] == 0) and torch.all(seq[full].abs().sum(-1) > 0)
    first = seq[:, 0]  # every sample here has at least one word
    assert torch.allclose(pooled, torch.tanh(model.pooler.dense(first)), atol=1e-6)
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1
    assert all(h.shape == (B, Lt + Lv, E) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], seq)
    assert len(out.attentions) == CFG.num_hidden_layers
    assert all(a.shape == (B, CFG.num_attention_heads, Lt + Lv, Lt + Lv) for a in out.attentions)
    a = out.attentions[0]
    assert torch.allclose(a.sum(-1)[full[:, None].expand_as(a.sum(-1))], torch.ones(()), atol=1e-5)
    assert torch.all(a.masked_select(~full[:, None, None, :]) == 0)  # padding keys get no weight
    # without the optional outputs
    plain = model(**batch)
    assert plain.attentions is None and plain.hidden_states is None
    assert torch.allclose(plain.last_hidden_state, seq, atol=1e-6)


@pytest.mark.parametrize("with_img_masks", [False, True])
def test_matches_official_gather_forward(device, with_img_masks):
    """Our [text | regions] layout with a key mask == the official packed forward:
    text slot j <-> packed j, region k <-> packed txt_len + k; pooler on packed slot 0."""
    osd = random_official_sd(CFG, seed=1)
    model, report = Uniter.from_official(osd, CFG, output_loading_info=True)
    assert report.missing == [] and sorted(report.unexpected) == sorted(official_heads(CFG))
    model = model.eval().to(device)
    batch, img_masks = make_batch(CFG, TXT, REG, seed=2)
    assert img_masks.sum() >= 3
    ob = official_batch(batch, img_masks if with_img_masks else None, TXT, REG)
    with torch.no_grad():
        ref = official_forward(osd, CFG, **ob)
        ref_pool = official_pooler(osd, ref)
        dev = {k: v.to(device) for k, v in batch.items()}
        im = img_masks.to(device) if with_img_masks else None
        for pf in (False, True):
            out = model(**dev, img_masks=im, padding_free=pf)
            seq, pooled = out.last_hidden_state.cpu(), out.pooler_output.cpu()
            Lt = max(TXT)
            for i, (t, n) in enumerate(zip(TXT, REG)):
                torch.testing.assert_close(seq[i, :t], ref[i, :t], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(seq[i, Lt:Lt + n], ref[i, t:t + n], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(pooled, ref_pool, atol=2e-5, rtol=1e-4)
        # the masked-region embedding matters (the comparison above is not vacuous)
        other = model(**dev, img_masks=None if with_img_masks else img_masks.to(device))
        assert (other.last_hidden_state.cpu()[0, max(TXT)] - ref[0, TXT[0]]).abs().max() > 1e-3


def test_padding_free_parity():
    model = small_model(3)
    batch, img_masks = make_batch(CFG, [7, 2, 11, 4, 1], [3, 9, 0, 5, 12], seed=4)
    batch["token_type_ids"] = torch.randint(0, 2, batch["input_ids"].shape)
    with torch.no_grad():
        a = model(**batch, img_masks=img_masks, output_hidden_states=True)
        b = model(**batch, img_masks=img_masks, output_hidden_states=True, padding_free=True)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() < 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() < 1e-5
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() < 1e-5


def test_text_only_and_image_only():
    model = small_model(5)
    batch, _ = make_batch(CFG, TXT, REG, seed=6)
    full = model(**batch)
    # text only: the official text-only path (no regions)
    t = model(batch["input_ids"], batch["attention_mask"])
    assert t.last_hidden_state.shape == (4, max(TXT), CFG.hidden_size)
    tp = model(batch["input_ids"], batch["attention_mask"], padding_free=True)
    assert (t.last_hidden_state - tp.last_hidden_state).abs().max() < 1e-5
    assert not torch.allclose(t.last_hidden_state, full.last_hidden_state[:, :max(TXT)])
    # image only: pooler on the first real region
    v = model(None, visual_feats=batch["visual_feats"], visual_boxes=batch["visual_boxes"],
              visual_mask=batch["visual_mask"])
    assert v.last_hidden_state.shape == (4, max(REG), CFG.hidden_size)
    assert torch.allclose(v.pooler_output[:3], torch.tanh(model.pooler.dense(v.last_hidden_state[:3, 0])), atol=1e-6)


def test_sample_without_words_pools_first_region():
    """The official packing puts region 0 at slot 0 when a sample has no word."""
    model = small_model(7)
    batch, _ = make_batch(CFG, [3, 0], [2, 4], seed=8)
    out = model(**batch)
    Lt = 3
    assert torch.allclose(out.pooler_output[1], torch.tanh(model.pooler.dense(out.last_hidden_state[1, Lt])), atol=1e-6)


def test_backward_reaches_every_parameter():
    """With img_masks given, every parameter gets a non-zero gradient (the unused rows
    -- word padding row, mask_embedding row 0, positions past Lt -- are zero inside
    their tensors, as in the official model)."""
    model = small_model(9)
    model.train()
    batch, img_masks = make_batch(CFG, TXT, REG, seed=10)
    img_masks[0, 0] = True
    out = model(**batch, img_masks=img_masks, padding_free=True)
    (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert torch.all(model.img_embeddings.mask_embedding.weight.grad[0] == 0)


def test_bool_and_int_masks_agree():
    model = small_model(11)
    batch, img_masks = make_batch(CFG, TXT, REG, seed=12)
    ib = dict(batch, attention_mask=batch["attention_mask"].long(), visual_mask=batch["visual_mask"].int())
    with torch.no_grad():
        a = model(**batch, img_masks=img_masks)
        b = model(**ib, img_masks=img_masks.long())
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_official_round_trip_and_layout():
    model = small_model(13)
    sd = model.state_dict()
    off = to_official(sd)
    # our names are exactly the official UniterModel's under "uniter."
    assert {k: tuple(v.shape) for k, v in off.items()} == official_keys(CFG)
    back = convert_official(off)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # "module." prefix, old gamma/beta LayerNorm names, heads dropped
    variant = {"module." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in off.items()}
    variant["module.itm_output.weight"] = torch.zeros(2, CFG.hidden_size)
    back2 = convert_official(variant)
    assert back2.keys() == sd.keys() and all(torch.equal(back2[k], sd[k]) for k in sd)


def test_from_official_loads_everything(tmp_path):
    cfg = CFG.replace(num_hidden_layers=3, hidden_size=128, num_attention_heads=2, intermediate_size=96,
                      vocab_size=77, max_position_embeddings=40, img_dim=48)
    osd = random_official_sd(cfg, seed=14)
    # inferred config (heads = hidden // 64 = 2): every shape-given field matches
    model, report = Uniter.from_official(osd, output_loading_info=True)
    assert report.missing == [] and sorted(report.unexpected) == sorted(official_heads(cfg))
    got = model.config
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
              "type_vocab_size", "img_dim", "pos_dim", "num_attention_heads"):
        assert getattr(got, f) == getattr(cfg, f), f
    ours = model.state_dict()
    for k, v in osd.items():
        if k.startswith("uniter."):
            assert torch.equal(ours[k[len("uniter."):]], v), k
    # from a file, encoder only, with "module."
    path = tmp_path / "uniter.pt"
    torch.save({"module." + k: v for k, v in osd.items() if k.startswith("uniter.")}, path)
    model2, report2 = Uniter.from_official(str(path), cfg, output_loading_info=True)
    assert report2.missing == [] and report2.unexpected == []
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in ours.items())
    # a bare UniterModel state_dict (no "uniter." prefix)
    model3, report3 = Uniter.from_official({k[len("uniter."):]: v for k, v in osd.items() if k.startswith("uniter.")},
                                           output_loading_info=True)
    assert report3.missing == [] and report3.unexpected == []
    # a missing parameter is reported, a shape mismatch raises naming the key
    partial = {k: v for k, v in osd.items() if "pooler" not in k}
    _, rep = Uniter.from_official(partial, cfg, output_loading_info=True)
    assert rep.missing == ["pooler.dense.bias", "pooler.dense.weight"]
    with pytest.raises(ValueError, match="img_linear"):
        Uniter.from_official(osd, cfg.replace(img_dim=64))
    assert infer_config(convert_official(osd), num_attention_heads=4).num_attention_heads == 4


def test_from_bert_loads_text_stream():
    from safetensors.torch import load_file

    d = bert_checkpoint_dir()
    model = Uniter.from_bert(d)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (384, 6, 12, 30522)
    assert (c.img_dim, c.pos_dim, c.type_vocab_size) == (2048, 7, 2)
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in load_file(str(d / "model.safetensors")).items()}
    ours = model.state_dict()
    for k in ("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
              "encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.LayerNorm.bias",
              "pooler.dense.weight"):
        assert torch.equal(ours[k], sd[k]), k
    # every BERT tensor we have went in
    assert all(torch.equal(ours[k], v) for k, v in sd.items() if k in ours)
    # a config that does not fit raises naming the key
    with pytest.raises(ValueError, match="word_embeddings"):
        Uniter.from_bert(d, UniterConfig.small(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                                                num_hidden_layers=1, max_position_embeddings=512))


def test_save_load_pretrained(tmp_path):
    model = small_model(15)
    model.save_pretrained(tmp_path / "ckpt")
    again = Uniter.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config == model.config
    batch, img_masks = make_batch(CFG, TXT, REG, seed=16)
    with torch.no_grad():
        assert torch.equal(model(**batch, img_masks=img_masks).last_hidden_state,
                           again(**batch, img_masks=img_masks).last_hidden_state)


def test_bad_inputs():
    model = small_model(17)
    batch, img_masks = make_batch(CFG, TXT, REG, seed=18)

    def run(match, **changes):
        with pytest.raises(ValueError, match=match):
            model(**dict(batch, **changes))

    run("visual_feats.*batch size", visual_feats=batch["visual_feats"][:2])
    run("visual_feats.*img_dim", visual_feats=batch["visual_feats"][..., :10])
    run("visual_boxes.*last dim 7", visual_boxes=batch["visual_boxes"][..., :4])
    run("visual_boxes.*batch size", visual_boxes=batch["visual_boxes"][:3])
    run("visual_boxes.*Lv", visual_boxes=batch["visual_boxes"][:, :2])
    run("visual_boxes.*None", visual_boxes=None)
    run("attention_mask.*shape", attention_mask=batch["attention_mask"][:, :2])
    run("visual_mask.*shape", visual_mask=batch["visual_mask"][:3])
    run("visual_mask.*0/1", visual_mask=batch["visual_mask"].long() * 2)
    run("attention_mask.*bool or 0/1", attention_mask=batch["attention_mask"].float())
    run("img_masks.*shape", img_masks=img_masks[:, :1])
    run("input_ids.*values", input_ids=batch["input_ids"] + CFG.vocab_size)
    run("input_ids.*integer", input_ids=batch["input_ids"].float())
    run("token_type_ids.*shape", token_type_ids=torch.zeros(4, 1, dtype=torch.long))
    run("visual_token_type_ids.*values", visual_token_type_ids=torch.full(batch["visual_mask"].shape, 2))
    run("image_text_alignment.*None", image_text_alignment=torch.zeros(4, max(REG), 2, dtype=torch.long))
    run("visual_feats.*float", visual_feats=batch["visual_feats"].long())
    with pytest.raises(ValueError, match="visual_boxes.*text-only"):
        model(batch["input_ids"], visual_boxes=batch["visual_boxes"])
    with pytest.raises(ValueError, match="input_ids"):
        model(None)


def test_convert_cli(tmp_path, capsys):
    """python -m vlfast.convert --model uniter on a synthetic official checkpoint."""
    from vlfast.convert import main

    osd = random_official_sd(CFG, seed=19)
    src = tmp_path / "uniter-small.pt"
    torch.save(osd, src)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(__import__("json").dumps(CFG.to_dict()))
    assert main(["--model", "uniter", "--src", str(src), "--out", str(tmp_path / "out"),
                 "--config", str(cfg_path)]) == 0
    text = capsys.readouterr().out
    assert "missing in the source (0)" in text and "itm_output.weight" in text
    model = Uniter.from_pretrained(tmp_path / "out")
    assert torch.equal(model.state_dict()["encoder.layer.1.output.dense.weight"],
                       osd["uniter.encoder.layer.1.output.dense.weight"])
