"""Task heads (vlfast.training.tasks): every head's loss, logits and predictions on tiny
hand-built VLBatches against hand computations from the backbone's own outputs (the
head math written out with plain tensor ops: Linear as x @ W.T + b, erf GELU, LayerNorm,
BCE / cross-entropy / KL by formula); row grouping; hard-negative mining; save/load with
answers.json; input errors.  Small configs, dropout off (eval mode), fp32."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.data.batch import VLBatch
from vlfast.models import Uniter, UniterConfig, ViLBertConfig, VisualBertConfig, VLBertConfig
from vlfast.training import tasks as T
from vlfast.training.submission import write_vqa_submission

TOL = dict(rtol=1e-5, atol=1e-6)


def _nodrop(cfg):
    names = {"hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
             "v_attention_probs_dropout_prob", "visual_dropout_prob"}
    return cfg.replace(**{n: 0.0 for n in names if hasattr(cfg, n)})


CFGS = {"uniter": (_nodrop(UniterConfig.small()), 64), "visualbert": (_nodrop(VisualBertConfig.small()), 32),
        "vlbert": (_nodrop(VLBertConfig.small()), 32), "vilbert": (_nodrop(ViLBertConfig.small()), 2048)}


def make_batch(model_type: str, B: int = 4, Lt: int = 7, Lv: int = 5, seed: int = 0,
               txt_lens=None, n_regions=None) -> VLBatch:
    """Ragged, left-aligned words and regions (padding holds junk the model must ignore)."""
    g = torch.Generator().manual_seed(seed)
    feat_dim = CFGS[model_type][1]
    txt_lens = txt_lens or [Lt - (i % 3) for i in range(B)]
    n_regions = n_regions or [Lv - (i % 3) for i in range(B)]
    ids = torch.randint(5, 100, (B, Lt), generator=g)
    am = torch.arange(Lt)[None] < torch.tensor(txt_lens)[:, None]
    vm = torch.arange(Lv)[None] < torch.tensor(n_regions)[:, None]
    xy = torch.rand(B, Lv, 2, generator=g) * 0.5
    wh = torch.rand(B, Lv, 2, generator=g) * 0.4 + 0.05
    return VLBatch(input_ids=ids, attention_mask=am, token_type_ids=torch.zeros_like(ids),
                   visual_feats=torch.randn(B, Lv, feat_dim, generator=g), boxes=torch.cat([xy, xy + wh], -1),
                   visual_mask=vm, image_size=torch.tensor([[640.0, 480.0]] * B))


def build(head_cls, model_type: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    head = head_cls(CFGS[model_type][0], **kw).eval()
    # non-trivial head biases / LayerNorm affine so every parameter matters in the checks
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith("backbone.") and (name.endswith("bias") or "LayerNorm" in name or
                                                     name.split(".")[-2].isdigit() and p.dim() == 1):
                p.add_(0.1 * torch.randn_like(p))
    return head


# -- plain-op references ------------------------------------------------------------------

def lin(x, m):
    return x @ m.weight.T + m.bias


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ln(x, m):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def bce(x, t):
    return -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))


def ce(logits, y):
    return (torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None]).squeeze(-1)).mean()


def encode(head, batch, **extra):
    return head.backbone(**batch.model_inputs(head.backbone, **extra))


# ----------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------

def soft_targets(B, A, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0])[torch.randint(0, 5, (B, A), generator=g)]
    t[:, 0] = 0.0
    return t


def test_uniter_vqa_bce_times_num_answers():
    A = 11
    head = build(T.UniterForVQA, "uniter", num_answers=A)
    b = make_batch("uniter")
    t = soft_targets(b.batch_size, A)
    b.targets["vqa_targets"] = t
    out = head(b)
    pooled = encode(head, b).pooler_output
    m = head.vqa_output
    logits = lin(ln(gelu(lin(pooled, m[0])), m[2]), m[3])
    torch.testing.assert_close(out.logits, logits, **TOL)
    # loss = BCE averaged over B*A entries, times A = per-sample sum over answers, averaged
    torch.testing.assert_close(out.loss, bce(logits, t).sum(1).mean(), **TOL)
    torch.testing.assert_close(out.loss, bce(logits, t).mean() * A, **TOL)
    assert out.predictions.tolist() == logits.argmax(1).tolist()
    assert out.logits.shape == (4, A) and out.predictions.shape == (4,)


@pytest.mark.parametrize("head_cls,mt,kw", [(T.UniterForVQA, "uniter", dict(num_answers=5)),
                                            (T.VisualBertForVQA, "visualbert", dict(num_answers=5)),
                                            (T.UniterForRefCOCO, "uniter", {})])
def test_padding_free_heads_match_padded(head_cls, mt, kw):
    head = build(head_cls, mt, **kw)
    packed = head_cls(head.backbone, padding_free=True, **kw).eval()
    packed.load_state_dict(head.state_dict())
    b = make_batch(mt)
    torch.testing.assert_close(packed(b).logits, head(b).logits, rtol=1e-4, atol=1e-5)


def test_no_targets_no_loss_and_gradients_flow():
    head = build(T.UniterForVQA, "uniter", num_answers=5)
    b = make_batch("uniter")
    assert head(b).loss is None
    b.targets["vqa_targets"] = soft_targets(4, 5)
    head.train()
    head(b).loss.backward()
    assert head.vqa_output[3].weight.grad.abs().sum() > 0
    assert head.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("task_tokens", [False, True])
def test_vilbert_vqa(task_tokens):
    A = 9
    if task_tokens:   # the multi-task model: the VQA task token (1) goes after [CLS]
        torch.manual_seed(0)
        head = T.ViLBertForVQA(CFGS["vilbert"][0].replace(task_specific_tokens=True), num_answers=A).eval()
    else:
        head = build(T.ViLBertForVQA, "vilbert", num_answers=A)
    b = make_batch("vilbert")
    t = soft_targets(4, A)
    b.targets["vqa_targets"] = t
    out = head(b)
    o = encode(head, b, **({"task_ids": torch.ones(4, 1, dtype=torch.long)} if task_tokens else {}))
    pooled = o.pooled_t * o.pooled_v                       # fusion "mul"
    m = head.vil_prediction.logit_fc
    logits = lin(ln(gelu(lin(pooled, m[0])), m[2]), m[3])
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, bce(logits, t).mean() * A, **TOL)


@pytest.mark.parametrize("loss", ["kl", "bce"])
def test_visualbert_vqa_answer_token_and_losses(loss):
    A = 8
    head = build(T.VisualBertForVQA, "visualbert", num_answers=A, loss=loss)
    b = make_batch("visualbert", txt_lens=[7, 6, 5, 3])
    t = soft_targets(4, A)
    b.targets["vqa_targets"] = t
    out = head(b)
    seq = encode(head, b).last_hidden_state
    h = torch.stack([seq[0, 5], seq[1, 4], seq[2, 3], seq[3, 1]])  # real length - 2
    logits = lin(h, head.cls)
    torch.testing.assert_close(out.logits, logits, **TOL)
    if loss == "kl":
        logp = torch.log_softmax(logits, -1)
        kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
        torch.testing.assert_close(out.loss, kl.sum() / 4, **TOL)
        # HF / original: KLDivLoss(batchmean) on log_softmax, the soft scores as given
        torch.testing.assert_close(out.loss, torch.nn.KLDivLoss(reduction="batchmean")(logp, t), **TOL)
    else:
        torch.testing.assert_close(out.loss, bce(logits, t).mean() * A, **TOL)


@pytest.mark.parametrize("classifier", ["mlm", "2fc", "1fc"])
def test_vlbert_vqa(classifier):
    A = 6
    head = build(T.VLBertForVQA, "vlbert", num_answers=A, classifier=classifier, classifier_hidden_size=24)
    b = make_batch("vlbert", txt_lens=[7, 4, 5, 6])
    t = soft_targets(4, A)
    b.targets["vqa_targets"] = t
    out = head(b)
    seq = encode(head, b).last_hidden_state
    h = seq[torch.arange(4), torch.tensor([5, 2, 3, 4])]
    m = head.final_mlp
    if classifier == "mlm":
        logits = lin(ln(gelu(lin(h, m[0].dense)), m[0].LayerNorm), m[2])
    elif classifier == "2fc":
        logits = lin(torch.relu(lin(h, m[1])), m[4])
    else:
        logits = lin(h, m[1])
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, bce(logits, t).mean() * A, **TOL)


def test_vqa_answers_label_map_and_submission(tmp_path):
    answers = ["yes", "no", "2", "red", "cat"]
    head = build(T.UniterForVQA, "uniter", answers=answers)
    assert head.num_answers == 5
    b = make_batch("uniter")
    out = head(b)
    strings = head.answer_strings(out.predictions)
    assert strings == [answers[i] for i in out.predictions.tolist()]
    path = write_vqa_submission(tmp_path / "vqa.json", [11, 12, 13, 14], strings)
    assert json.loads(path.read_text()) == [{"question_id": q, "answer": a} for q, a in zip([11, 12, 13, 14], strings)]
    with pytest.raises(ValueError, match="num_answers"):
        T.UniterForVQA(CFGS["uniter"][0], num_answers=4, answers=answers)
    with pytest.raises(ValueError, match="label map"):
        build(T.UniterForVQA, "uniter", num_answers=5).answer_strings(out.predictions)


# ----------------------------------------------------------------------------------
# NLVR2
# ----------------------------------------------------------------------------------

def test_uniter_nlvr2_paired_types_and_logits():
    base = Uniter(CFGS["uniter"][0])
    row1 = base.embeddings.token_type_embeddings.weight[1].detach().clone()
    head = T.UniterForNLVR2(base, mode="paired").eval()
    tt = head.backbone.embeddings.token_type_embeddings.weight
    assert tt.shape[0] == 3 and head.config.type_vocab_size == 3
    torch.testing.assert_close(tt[2], row1)                # init_type_embedding: row 2 = row 1
    b = make_batch("uniter")                               # rows (s0 L, s0 R, s1 L, s1 R)
    y = torch.tensor([1, 0])
    b.targets["nlvr2_labels"] = y
    out = head(b)
    types = torch.tensor([1, 2, 1, 2])[:, None].expand(4, 5)
    pooled = encode(head, b, visual_token_type_ids=types).pooler_output
    logits = lin(pooled.reshape(2, -1), head.nlvr2_output)  # concat the pair's pooled outputs
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, ce(logits, y), **TOL)
    # rows in another order, grouped by pair_index (left before right inside each sample)
    perm = torch.tensor([2, 0, 3, 1])
    b2 = T.select_rows(b, perm)
    b2.targets["pair_index"] = torch.tensor([1, 0, 1, 0])
    b2.targets["nlvr2_labels"] = y
    out2 = head(b2)
    torch.testing.assert_close(out2.logits, out.logits, **TOL)
    torch.testing.assert_close(out2.loss, out.loss, **TOL)


def test_uniter_nlvr2_triplet_uses_img_index():
    head = build(T.UniterForNLVR2, "uniter", mode="triplet")
    b = make_batch("uniter", Lv=6, n_regions=[6, 5, 6, 4])
    img_index = (torch.arange(6) >= 3).long()[None].expand(4, 6)
    y = torch.tensor([0, 1, 1, 0])
    b.targets.update(nlvr2_labels=y, img_index=img_index)
    out = head(b)
    pooled = encode(head, b, visual_token_type_ids=1 + img_index).pooler_output
    logits = lin(pooled, head.nlvr2_output)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, ce(logits, y), **TOL)
    del b.targets["img_index"]
    with pytest.raises(ValueError, match="img_index"):
        head(b)


def test_uniter_nlvr2_paired_attn_official_semantics():
    head = build(T.UniterForNLVR2, "uniter", mode="paired-attn")
    b = make_batch("uniter")
    y = torch.tensor([0, 1])
    b.targets["nlvr2_labels"] = y
    out = head(b)
    types = torch.tensor([1, 2, 1, 2])[:, None].expand(4, 5)
    seq = encode(head, b, visual_token_type_ids=types).last_hidden_state    # (4, T, E)
    pad = ~torch.cat([b.attention_mask, b.visual_mask], 1)
    bs, tl, d = seq.shape
    # the official reshaping: (bs, tl, d) -> (bs//2, 2*tl, d) -> chunk into left / right
    left, right = seq.reshape(bs // 2, tl * 2, d).chunk(2, dim=1)
    lpad, rpad = pad.reshape(bs // 2, tl * 2).chunk(2, dim=1)
    l2r, _ = head.attn1(left, right, right, key_padding_mask=rpad)
    r2l, _ = head.attn2(right, left, left, key_padding_mask=lpad)

    def fc(x):
        return torch.relu(lin(x, head.fc[0]))

    def pool(x, p):
        score = torch.relu(lin(x, head.attn_pool.fc[0])).squeeze(-1) + p.float() * -1e4
        return (torch.softmax(score, 1)[..., None] * x).sum(1)

    lo = pool(fc(torch.cat([l2r, left], -1)), lpad)
    ro = pool(fc(torch.cat([r2l, right], -1)), rpad)
    logits = lin(torch.cat([lo, ro], -1), head.nlvr2_output)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, ce(logits, y), **TOL)


def test_vilbert_nlvr2_binary_bce():
    head = build(T.ViLBertForNLVR2, "vilbert")
    b = make_batch("vilbert")
    y = torch.tensor([1, 0])
    b.targets["nlvr2_labels"] = y
    out = head(b)
    o = encode(head, b)
    pooled = (o.pooled_t * o.pooled_v).reshape(2, -1)
    m = head.vil_binary_prediction.logit_fc
    logits = lin(ln(gelu(lin(pooled, m[0])), m[2]), m[3])
    torch.testing.assert_close(out.logits, logits, **TOL)
    onehot = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(out.loss, bce(logits, onehot).mean(), **TOL)


def test_visualbert_nlvr2_one_row_two_images():
    head = build(T.VisualBertForNLVR2, "visualbert")
    b = make_batch("visualbert", Lv=6)
    img_index = (torch.arange(6) >= 2).long()[None].expand(4, 6)
    y = torch.tensor([1, 1, 0, 1])
    b.targets.update(nlvr2_labels=y, img_index=img_index)
    out = head(b)
    pooled = encode(head, b, visual_token_type_ids=img_index).pooler_output
    logits = lin(pooled, head.cls)
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, ce(logits, y), **TOL)


# ----------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------

def mc_batch(model_type, seed=0):
    """5 rows: sample 0 has 3 choices (rows 0, 2, 4), sample 1 has 2 (rows 1, 3)."""
    b = make_batch(model_type, B=5, seed=seed)
    b.targets["pair_index"] = torch.tensor([0, 1, 0, 1, 0])
    b.targets["mc_labels"] = torch.tensor([2, 1])
    return b


def test_uniter_vcr_rowwise_ce_and_type_table():
    base = Uniter(CFGS["uniter"][0])
    row0 = base.embeddings.token_type_embeddings.weight[0].detach().clone()
    torch.manual_seed(0)
    head = T.UniterForVCR(base, num_special_tokens=3).eval()
    tt = head.backbone.embeddings.token_type_embeddings.weight
    assert tt.shape[0] == 4
    torch.testing.assert_close(tt[2], row0)
    torch.testing.assert_close(tt[3], row0)
    assert head.config.vocab_size == CFGS["uniter"][0].vocab_size + 3
    b = mc_batch("uniter")
    out = head(b)
    pooled = encode(head, b).pooler_output
    m = head.vcr_output
    rows = lin(ln(torch.relu(lin(pooled, m[0])), m[2]), m[3])          # (5, 2)
    row_target = torch.tensor([0, 0, 0, 1, 1])                         # s0 choice 2 = row 4; s1 choice 1 = row 3
    torch.testing.assert_close(out.loss, ce(rows, row_target), **TOL)
    r1 = rows[:, 1].detach()
    expected = torch.stack([r1[[0, 2, 4]], torch.cat([r1[[1, 3]], torch.tensor([float("-inf")])])])
    torch.testing.assert_close(out.logits, expected, **TOL)
    assert out.predictions.tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize("head_cls,mt", [(T.ViLBertForVCR, "vilbert"), (T.VisualBertForMultipleChoice, "visualbert")])
def test_choice_ce_heads(head_cls, mt):
    head = build(head_cls, mt)
    b = mc_batch(mt)
    out = head(b)
    o = encode(head, b)
    if mt == "vilbert":
        s = lin(o.pooled_t * o.pooled_v, head.vil_logit).squeeze(-1)
    else:
        s = lin(o.pooler_output, head.cls).squeeze(-1)
    inf = float("-inf")
    logits = torch.stack([torch.stack([s[0], s[2], s[4]]), torch.stack([s[1], s[3], torch.tensor(inf)])])
    torch.testing.assert_close(out.logits, logits, **TOL)
    lse = torch.stack([torch.logsumexp(logits[0], 0), torch.logsumexp(logits[1, :2], 0)])
    torch.testing.assert_close(out.loss, ((lse[0] - s[4]) + (lse[1] - s[3])) / 2, **TOL)


@pytest.mark.parametrize("loss", ["sigmoid", "ce"])
def test_vlbert_vcr(loss):
    w = 3.0
    head = build(T.VLBertForVCR, "vlbert", loss=loss, positive_weight=w)
    b = make_batch("vlbert", B=6)
    b.targets["pair_index"] = torch.tensor([0, 0, 0, 1, 1, 1])
    y = torch.tensor([1, 2])
    b.targets["mc_labels"] = y
    out = head(b)
    s = lin(encode(head, b).pooler_output, head.final_mlp[1]).squeeze(-1).view(2, 3)
    torch.testing.assert_close(out.logits, s, **TOL)
    if loss == "ce":
        torch.testing.assert_close(out.loss, ce(s, y), **TOL)
    else:
        onehot = F.one_hot(y, 3).float()
        weight = 1 + (w - 1) * onehot
        expected = (w + 1) / (2 * w) * (weight * bce(s, onehot)).mean()
        torch.testing.assert_close(out.loss, expected, **TOL)


# ----------------------------------------------------------------------------------
# Region scoring
# ----------------------------------------------------------------------------------

def test_uniter_refcoco_cls_and_rank():
    for mlp in (1, 2):
        head = build(T.UniterForRefCOCO, "uniter", mlp=mlp)
        b = make_batch("uniter", n_regions=[5, 4, 3, 5])
        y = torch.tensor([4, 0, 2, 1])
        b.targets["ref_targets"] = y
        out = head(b)
        reg = encode(head, b).last_hidden_state[:, -5:]
        m = head.re_output
        s = lin(reg, m) if mlp == 1 else lin(ln(gelu(lin(reg, m[0])), m[2]), m[3])
        s = s.squeeze(-1).masked_fill(~b.visual_mask, -1e4)
        torch.testing.assert_close(out.logits, s, **TOL)
        torch.testing.assert_close(out.loss, ce(s, y), **TOL)
        assert out.predictions.tolist() == s.argmax(1).tolist()
    # rank loss with hard negatives only: the best-scoring other real region
    head = build(T.UniterForRefCOCO, "uniter", loss="rank", hard_ratio=1.0, margin=0.7)
    out = head(b)
    s = out.logits
    neg = s.masked_fill(F.one_hot(y, 5).bool(), -1e9).argmax(1)
    pos_sc = torch.sigmoid(s.gather(1, y[:, None]).squeeze(1))
    neg_sc = torch.sigmoid(s.gather(1, neg[:, None]).squeeze(1))
    torch.testing.assert_close(out.loss, torch.clamp(0.7 + neg_sc - pos_sc, min=0).mean(), **TOL)
    # random negatives with 2 real regions: the other one
    b2 = make_batch("uniter", n_regions=[2, 2, 2, 2])
    b2.targets["ref_targets"] = torch.tensor([0, 1, 1, 0])
    head.hard_ratio = 0.0
    out = head(b2)
    s, y2 = out.logits, b2.targets["ref_targets"]
    pos_sc = torch.sigmoid(s.gather(1, y2[:, None]).squeeze(1))
    neg_sc = torch.sigmoid(s.gather(1, (1 - y2)[:, None]).squeeze(1))
    torch.testing.assert_close(out.loss, torch.clamp(0.7 + neg_sc - pos_sc, min=0).mean(), **TOL)


@pytest.mark.parametrize("head_cls", [T.ViLBertForRefCOCO, T.ViLBertForPhraseGrounding])
def test_vilbert_region_scoring_equals_official_mean_times_lv(head_cls):
    head = build(head_cls, "vilbert")
    b = make_batch("vilbert", n_regions=[5, 3, 4, 5])
    y = torch.tensor([1, 2, 0, 4])
    b.targets["ref_targets"] = y
    out = head(b)
    seq_v = encode(head, b).seq_v
    logits = lin(seq_v, head.vision_logit).squeeze(-1) + (~b.visual_mask).float() * -10000.0
    torch.testing.assert_close(out.logits, logits, **TOL)
    t = F.one_hot(y, 5).float()
    # the official: BCEWithLogits(mean) over (B, Lv) times Lv, padded slots included
    torch.testing.assert_close(out.loss, bce(logits, t).mean() * 5, **TOL)
    # soft per-region targets (IoU, zeroed below 0.5) take precedence
    soft = torch.rand(4, 5) * b.visual_mask
    b.targets["ref_region_targets"] = soft
    torch.testing.assert_close(head(b).loss, (bce(logits, soft) * b.visual_mask).sum() / 4, **TOL)
    assert head.head_config["task_id"] == (18 if head_cls is T.ViLBertForPhraseGrounding else 10)


def test_vlbert_refcoco_mean_over_real_regions():
    head = build(T.VLBertForRefCOCO, "vlbert")
    b = make_batch("vlbert", n_regions=[5, 2, 4, 3])
    soft = (torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.5).float() * b.visual_mask
    b.targets["ref_region_targets"] = soft
    out = head(b)
    reg = encode(head, b).last_hidden_state[:, -5:]
    m = head.final_mlp
    s = lin(gelu(lin(reg, m[0].dense)), m[2]).squeeze(-1).masked_fill(~b.visual_mask, -10000.0)
    torch.testing.assert_close(out.logits, s, **TOL)
    vm = b.visual_mask
    torch.testing.assert_close(out.loss, bce(s[vm], soft[vm]).mean(), **TOL)
    assert bool(vm[torch.arange(4), out.predictions].all())
    boxes = head.predicted_boxes(b, out.predictions, pixels=True)
    torch.testing.assert_close(boxes, b.boxes[torch.arange(4), out.predictions] * torch.tensor([640., 480.] * 2))


def test_visualbert_phrase_grounding():
    head = build(T.VisualBertForPhraseGrounding, "visualbert")
    b = make_batch("visualbert", n_regions=[5, 4, 5, 3])
    pos = torch.tensor([[1, 3, -1], [2, -1, -1], [1, 2, 4], [3, 1, -1]])
    g = torch.Generator().manual_seed(5)
    t = torch.softmax(torch.randn(4, 3, 5, generator=g), -1) * b.visual_mask[:, None, :]
    t = t / t.sum(-1, keepdim=True)
    t[:, 1:][pos[:, 1:] < 0] = 0.0
    t[0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])       # a one-hot target (zeros in the KL)
    b.targets.update(phrase_positions=pos, phrase_targets=t)
    out = head(b)
    seq = encode(head, b).last_hidden_state
    Lt = b.input_ids.shape[1]
    ph = seq[torch.arange(4)[:, None], pos.clamp_min(0)]                        # (4, 3, E)
    d = head.config.hidden_size // head.config.num_attention_heads
    s = lin(ph, head.attention.query) @ lin(seq[:, Lt:], head.attention.key).transpose(1, 2) / math.sqrt(d)
    s = s.masked_fill(~b.visual_mask[:, None, :], torch.finfo(torch.float32).min)
    torch.testing.assert_close(out.logits, s, **TOL)
    logp = torch.log_softmax(s, -1)
    torch.testing.assert_close(out.loss, torch.nn.KLDivLoss(reduction="batchmean")(logp, t), **TOL)
    pred = s.argmax(-1).masked_fill(pos < 0, -1)
    assert out.predictions.tolist() == pred.tolist()


# ----------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------

def retrieval_batch(mt, seed=0):
    """Two groups: rows 0-3 (positive at row 2) and rows 4-6 (positive at row 4)."""
    b = make_batch(mt, B=7, seed=seed)
    b.targets["pair_index"] = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    b.targets["itm_labels"] = torch.tensor([0, 0, 1, 0, 1, 0, 0])
    return b


def test_uniter_retrieval_hinge():
    head = build(T.UniterForRetrieval, "uniter", margin=0.4)
    b = retrieval_batch("uniter")
    out = head(b)
    s = lin(encode(head, b).pooler_output, head.rank_output).squeeze(-1)
    torch.testing.assert_close(out.logits, s, **TOL)
    sg = torch.sigmoid(s)
    terms = [torch.clamp(0.4 + sg[j] - sg[2], min=0) for j in (0, 1, 3)] + \
            [torch.clamp(0.4 + sg[j] - sg[4], min=0) for j in (5, 6)]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), **TOL)
    assert out.predictions.tolist() == [int(s[:4].argmax()), int(s[4:].argmax())]
    w, bias = torch.randn(2, 64), torch.randn(2)
    head.init_from_itm_head(w, bias)
    torch.testing.assert_close(head.rank_output.weight, w[1:])
    torch.testing.assert_close(head.rank_output.bias, bias[1:])


def test_vilbert_retrieval_ce():
    head = build(T.ViLBertForRetrieval, "vilbert")
    b = retrieval_batch("vilbert")
    out = head(b)
    o = encode(head, b)
    s = lin(o.pooled_t * o.pooled_v, head.vil_logit).squeeze(-1)
    torch.testing.assert_close(out.logits, s, **TOL)
    l0 = torch.logsumexp(s[:4], 0) - s[2]
    l1 = torch.logsumexp(s[4:], 0) - s[4]
    torch.testing.assert_close(out.loss, (l0 + l1) / 2, **TOL)


def test_hard_negative_mining_keeps_positive_and_top_negatives():
    head = build(T.UniterForRetrieval, "uniter")
    head.train()
    b = retrieval_batch("uniter", seed=3)
    b.meta["ids"] = [f"r{i}" for i in range(7)]
    with torch.no_grad():
        head.eval()
        s = head(b).logits
    head.train()
    sub = head.mine_hard_negatives(b, num_hard=2)
    assert head.training                                    # mode restored
    neg0 = [j for j in (0, 1, 3)]
    top0 = sorted(neg0, key=lambda j: -float(s[j]))[:2]
    top1 = sorted([5, 6], key=lambda j: -float(s[j]))[:2]
    rows = [2] + top0 + [4] + top1
    assert sub.meta["ids"] == [f"r{i}" for i in rows]
    assert sub.targets["pair_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert sub.targets["itm_labels"].tolist() == [1, 0, 0, 1, 0, 0]
    torch.testing.assert_close(sub.visual_feats, b.visual_feats[rows])
    assert head(sub).loss is not None


# ----------------------------------------------------------------------------------
# Grouping, table, save / load, errors
# ----------------------------------------------------------------------------------

def test_group_rows():
    g = T.group_rows("t", 5, torch.tensor([1, 0, 1, 0, 1]))
    assert g.index.tolist() == [[1, 3, 0], [0, 2, 4]]
    assert g.valid.tolist() == [[True, True, False], [True, True, True]]
    assert g.position.tolist() == [0, 0, 1, 1, 2]
    g = T.group_rows("t", 6, None, per_group=3)
    assert g.index.tolist() == [[0, 1, 2], [3, 4, 5]] and g.position.tolist() == [0, 1, 2, 0, 1, 2]
    g = T.group_rows("t", 6, None, num_groups=2)
    assert g.index.shape == (2, 3)
    with pytest.raises(ValueError, match="2 rows per sample"):
        T.group_rows("t", 3, torch.tensor([0, 0, 1]), per_group=2)
    with pytest.raises(ValueError, match="no rows for sample"):
        T.group_rows("t", 2, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="pair_index"):
        T.group_rows("t", 3, torch.tensor([0.0, 1.0, 1.0]))


def test_head_table():
    assert set(T.HEADS) == {"vqa", "nlvr2", "vcr", "refcoco", "retrieval", "phrase_grounding"}
    h = T.head_for("vqa", CFGS["visualbert"][0], num_answers=3, loss="bce")
    assert isinstance(h, T.VisualBertForVQA) and h.loss_type == "bce"
    with pytest.raises(ValueError, match="supports 'retrieval'"):
        T.head_for("retrieval", CFGS["vlbert"][0])


def test_save_load_round_trip_with_answers(tmp_path):
    answers = [f"a{i}" for i in range(7)]
    head = build(T.UniterForVQA, "uniter", answers=answers)
    b = make_batch("uniter")
    ref = head(b).logits
    d = head.save_pretrained(tmp_path / "ckpt")
    assert json.loads((d / "answers.json").read_text()) == answers
    assert json.loads((d / "task.json").read_text())["head_class"] == "UniterForVQA"
    loaded = T.TaskHead.from_pretrained(d).eval()
    assert isinstance(loaded, T.UniterForVQA) and loaded.answers == answers
    torch.testing.assert_close(loaded(b).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(T.UniterForVQA.from_pretrained(d).eval()(b).logits, ref, rtol=0, atol=0)
    assert isinstance(Uniter.from_pretrained(d), Uniter)    # the backbone alone
    with pytest.raises(ValueError, match="head_class"):
        T.ViLBertForVQA.from_pretrained(d)
    # UNITER's ans2label.json (answer -> label) is read too
    (tmp_path / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    assert T.load_answer_map(tmp_path / "ans2label.json") == answers
    assert not list(d.glob("*.tmp"))


@pytest.mark.parametrize("head_cls,mt,kw", [
    (T.UniterForNLVR2, "uniter", dict(mode="paired-attn")), (T.UniterForVCR, "uniter", dict(num_special_tokens=2)),
    (T.ViLBertForRetrieval, "vilbert", {}), (T.VLBertForVQA, "vlbert", dict(num_answers=4, classifier="2fc",
                                                                              classifier_hidden_size=16)),
    (T.VisualBertForPhraseGrounding, "visualbert", {})])
def test_save_load_other_heads(tmp_path, head_cls, mt, kw):
    head = build(head_cls, mt, **kw)
    d = head.save_pretrained(tmp_path / "c")
    loaded = T.TaskHead.from_pretrained(d)
    assert type(loaded) is head_cls and loaded.head_config == head.head_config
    for (k, v), (k2, v2) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not (d / "answers.json").exists()


def test_input_errors():
    with pytest.raises(ValueError, match="backbone_or_config: expected a Uniter or a UniterConfig"):
        T.UniterForVQA(CFGS["vilbert"][0])
    head = build(T.UniterForVQA, "uniter", num_answers=5)
    b = make_batch("uniter")
    b.targets["vqa_targets"] = torch.rand(4, 6)
    with pytest.raises(ValueError, match=r"vqa_targets.*\(4, 5\)"):
        head(b)
    with pytest.raises(ValueError, match="VLBatch"):
        head({"input_ids": b.input_ids})
    nl = build(T.UniterForNLVR2, "uniter")
    b = make_batch("uniter", B=3)
    b.targets["nlvr2_labels"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="rows"):
        nl(b)
    bv = make_batch("vilbert", n_regions=[5, 3, 5, 5])
    bv.targets["ref_targets"] = torch.tensor([0, 4, 0, 0])
    with pytest.raises(ValueError, match="real regions"):
        build(T.ViLBertForRefCOCO, "vilbert")(bv)
    r = build(T.UniterForRetrieval, "uniter")
    b = retrieval_batch("uniter")
    b.targets["itm_labels"] = torch.tensor([0, 0, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="exactly one positive"):
        r(b)
