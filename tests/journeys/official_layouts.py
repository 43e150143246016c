"""Random checkpoints in the four models' *official* layouts, written from the official
code (not from vlfast's state_dicts or its ``to_official``): key names, shapes, tied
tensors and the file wrapping each release uses, at sizes given as arguments.

Each model has a ``<model>_config(**overrides)`` (the official config's fields: the
released base values, then the overrides) and a ``write_<model>(directory, config)``
that builds the random state_dict and saves it as the release is saved:

* UNITER (ChenRocks/UNITER): ``uniter-base.pt``, ``torch.save`` of a plain
  ``UniterForPretraining.state_dict()`` (``utils/save.py`` ModelSaver: ``{k: v.cpu()}``,
  so tied tensors are saved as separate copies).
* ViLBERT (facebookresearch/vilbert-multi-task): ``pytorch_model.bin``, ``torch.save`` of
  ``BertForMultiModalPreTraining.state_dict()`` (``model.module`` unwrapped first, tied
  tensors shared).
* VL-BERT (jackroos/VL-BERT): ``vl-bert_base_res101_pretrain_multitask-0000.model``,
  ``torch.save({"state_dict": net.state_dict(), "optimizer": optimizer.state_dict()})``
  (``common/callbacks/epoch_end_callbacks/checkpoint.py``) of the DataParallel-wrapped
  ``ResNetVLBERTForPretrainingMultitask``: every key under ``module.``.
* VisualBERT (HF transformers): ``VisualBertForPreTraining(VisualBertConfig(...))`` and
  its own ``save_pretrained(DIR)`` -- HF's code is the official layout.

Values are random (seeded), none of them left at a default initialisation (so a tensor
a loader skips cannot pass an equality check by chance); LayerNorm weights are near 1.
LayerNorm parameters are named ``weight``/``bias`` in all four: UNITER's LayerNorm is
apex ``FusedLayerNorm`` (``model/model.py``, ``model/layer.py``, ``model/pretrain.py``),
ViLBERT's and VL-BERT's ``BertLayerNorm`` is FusedLayerNorm or a fallback module with
``self.weight``/``self.bias``.

Shapes: V vocab, E hidden, I intermediate, P max positions, T token types.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

PathLike = Union[str, Path]

UNITER_FILE = "uniter-base.pt"
VILBERT_FILE = "pytorch_model.bin"
VLBERT_FILE = "vl-bert_base_res101_pretrain_multitask-0000.model"


class _Builder:
    """An ordered state_dict of random tensors (one seeded generator).  ``kind``:
    "w" weight matrix / embedding table, "b" bias, "ln_w" LayerNorm weight (near 1),
    "scalar" a 0-d parameter."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], kind: str = "w") -> Tensor:
        if name in self.sd:
            raise KeyError(f"official_layouts: {name} twice")
        t = torch.randn(shape, generator=self.g)
        t = {"w": 0.05 * t, "b": 0.02 * t, "ln_w": 1.0 + 0.1 * t, "scalar": 1.0 + 0.1 * t}[kind]
        self.sd[name] = t
        return t

    def linear(self, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        """nn.Linear(n_in, n_out): weight (n_out, n_in), bias (n_out,)."""
        self.tensor(f"{name}.weight", (n_out, n_in))
        if bias:
            self.tensor(f"{name}.bias", (n_out,), "b")

    def layer_norm(self, name: str, n: int) -> None:
        self.tensor(f"{name}.weight", (n,), "ln_w")
        self.tensor(f"{name}.bias", (n,), "b")

    def embedding(self, name: str, rows: int, dim: int) -> Tensor:
        return self.tensor(f"{name}.weight", (rows, dim))

    def bert_layer(self, p: str, E: int, I: int) -> None:
        """BertLayer (UNITER model/layer.py, ViLBERT vilbert.py BertLayer / BertImageLayer
        with the stream's own sizes, VL-BERT external/pytorch_pretrained_bert/modeling.py):
        attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
        intermediate.dense, output.{dense,LayerNorm}."""
        for n in ("query", "key", "value"):
            self.linear(f"{p}attention.self.{n}", E, E)
        self.linear(f"{p}attention.output.dense", E, E)
        self.layer_norm(f"{p}attention.output.LayerNorm", E)
        self.linear(f"{p}intermediate.dense", I, E)
        self.linear(f"{p}output.dense", E, I)
        self.layer_norm(f"{p}output.LayerNorm", E)

    def mlm_head(self, p: str, E: int, word_embeddings: Tensor) -> None:
        """BertOnlyMLMHead(config, word_embeddings.weight): ``predictions.bias`` (V,) (an
        own parameter of BertLMPredictionHead, so first in its state_dict),
        ``predictions.transform.{dense,LayerNorm}``, ``predictions.decoder.weight`` (V, E)
        = the word embeddings (tied; no decoder bias)."""
        self.tensor(f"{p}predictions.bias", (word_embeddings.shape[0],), "b")
        self.linear(f"{p}predictions.transform.dense", E, E)
        self.layer_norm(f"{p}predictions.transform.LayerNorm", E)
        self.sd[f"{p}predictions.decoder.weight"] = word_embeddings


# ----------------------------------------------------------------------------------
# UNITER: model/model.py (UniterModel, UniterTextEmbeddings, UniterImageEmbeddings,
# UniterEncoder), model/layer.py (BertLayer, BertPooler, BertOnlyMLMHead),
# model/pretrain.py (UniterForPretraining, RegionFeatureRegression,
# RegionClassification), utils/const.py (IMG_DIM 2048, IMG_LABEL_DIM 1601),
# config/uniter-base.json
# ----------------------------------------------------------------------------------

def uniter_config(**overrides: Any) -> dict[str, Any]:
    """config/uniter-base.json's fields (bert-base-cased vocabulary), then ``overrides``;
    plus utils/const.py's IMG_DIM / IMG_LABEL_DIM (the train scripts pass them to the
    model) under those names."""
    c: dict[str, Any] = {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                         "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
                         "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12,
                         "type_vocab_size": 2, "vocab_size": 28996, "IMG_DIM": 2048, "IMG_LABEL_DIM": 1601}
    c.update(overrides)
    return c


def uniter_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """``UniterForPretraining(config, img_dim, img_label_dim).state_dict()``.

    * ``uniter.embeddings.``: word_embeddings (V,E) (padding_idx 0), position_embeddings
      (P,E), token_type_embeddings (T,E), LayerNorm (E)  [UniterTextEmbeddings]
    * ``uniter.img_embeddings.``: img_linear (E, img_dim), img_layer_norm (E),
      pos_layer_norm (E), pos_linear (E, 7), mask_embedding (2, img_dim) (row 0 is zero:
      the official forward fills it with 0 before use), LayerNorm (E)  [UniterImageEmbeddings]
    * ``uniter.encoder.layer.N.``  [UniterEncoder of BertLayer]; ``uniter.pooler.dense``
      (E,E)  [BertPooler]
    * heads: ``cls.predictions.*`` (decoder tied to the word embeddings)
      [BertOnlyMLMHead]; ``feat_regress.weight`` (E, img_dim) = img_linear.weight (tied),
      ``feat_regress.bias`` (img_dim), ``feat_regress.net.0`` (E,E), ``.net.2``
      LayerNorm (net.1 is GELU)  [RegionFeatureRegression]; ``region_classifier.net.0``
      (E,E), ``.net.2`` LayerNorm, ``.net.3`` (IMG_LABEL_DIM, E)  [RegionClassification];
      ``itm_output`` (2, E).
    """
    c = config
    E, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    F_ = c["IMG_DIM"]
    b = _Builder(seed)
    p = "uniter.embeddings."
    words = b.embedding(p + "word_embeddings", V, E)
    b.embedding(p + "position_embeddings", c["max_position_embeddings"], E)
    b.embedding(p + "token_type_embeddings", c["type_vocab_size"], E)
    b.layer_norm(p + "LayerNorm", E)
    p = "uniter.img_embeddings."
    b.linear(p + "img_linear", E, F_)
    b.layer_norm(p + "img_layer_norm", E)
    b.layer_norm(p + "pos_layer_norm", E)
    b.linear(p + "pos_linear", E, 7)
    b.embedding(p + "mask_embedding", 2, F_)[0].zero_()
    b.layer_norm(p + "LayerNorm", E)
    for n in range(c["num_hidden_layers"]):
        b.bert_layer(f"uniter.encoder.layer.{n}.", E, I)
    b.linear("uniter.pooler.dense", E, E)
    # heads
    b.mlm_head("cls.", E, words)
    b.sd["feat_regress.weight"] = b.sd["uniter.img_embeddings.img_linear.weight"]
    b.tensor("feat_regress.bias", (F_,), "b")
    b.linear("feat_regress.net.0", E, E)
    b.layer_norm("feat_regress.net.2", E)
    b.linear("region_classifier.net.0", E, E)
    b.layer_norm("region_classifier.net.2", E)
    b.linear("region_classifier.net.3", c["IMG_LABEL_DIM"], E)
    b.linear("itm_output", 2, E)
    return b.sd


UNITER_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


def write_uniter(directory: PathLike, config: dict[str, Any], seed: int = 0) -> Path:
    """``DIR/uniter-base.pt``: the state_dict as ModelSaver writes it (``{k: v.cpu()}`` of
    a CUDA model: every key its own tensor, the tied ones equal copies)."""
    sd = {k: v.clone() for k, v in uniter_state_dict(config, seed).items()}
    path = Path(directory) / UNITER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


# ----------------------------------------------------------------------------------
# ViLBERT: vilbert/vilbert.py (BertForMultiModalPreTraining, BertModel, BertEmbeddings,
# BertImageEmbeddings, BertEncoder, BertLayer, BertImageLayer, BertConnectionLayer,
# BertBiAttention, BertBiOutput, BertTextPooler, BertImagePooler, BertPreTrainingHeads,
# BertImagePredictionHead), config/bert_base_6layer_6conect.json
# ----------------------------------------------------------------------------------

def vilbert_config(**overrides: Any) -> dict[str, Any]:
    """config/bert_base_6layer_6conect.json, then ``overrides`` (e.g.
    ``task_specific_tokens=True`` for the multi-task model; ``dynamic_attention`` is
    BertConfig's default False)."""
    c: dict[str, Any] = {
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512,
        "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522,
        "v_feature_size": 2048, "v_target_size": 1601, "v_hidden_size": 1024, "v_num_hidden_layers": 6,
        "v_num_attention_heads": 8, "v_intermediate_size": 1024, "bi_hidden_size": 1024,
        "bi_num_attention_heads": 8, "bi_intermediate_size": 1024, "bi_attention_type": 1,
        "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1,
        "v_initializer_range": 0.02, "v_biattention_id": [0, 1, 2, 3, 4, 5],
        "t_biattention_id": [6, 7, 8, 9, 10, 11], "pooling_method": "mul"}
    c.update(overrides)
    return c


def vilbert_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """``BertForMultiModalPreTraining(BertConfig.from_json(config)).state_dict()``.

    * ``bert.embeddings.``: word_embeddings (V,E), position_embeddings (P,E),
      token_type_embeddings (T,E), LayerNorm (E), task_embeddings (20,E) only with
      task_specific_tokens  [BertEmbeddings]
    * ``bert.v_embeddings.``: image_embeddings (Ev, v_feature_size),
      image_location_embeddings (Ev, 5), LayerNorm (Ev)  [BertImageEmbeddings]
    * ``bert.encoder.layer.N.`` (E, I)  [BertLayer]; ``bert.encoder.v_layer.N.`` (Ev, Iv)
      [BertImageLayer; dyLinear_q/k (Ev, E) only with dynamic_attention];
      ``bert.encoder.c_layer.N.`` for each entry of v_biattention_id  [BertConnectionLayer]:
      ``biattention.{query1,key1,value1}`` (Eb, Ev), ``{query2,key2,value2}`` (Eb, E);
      ``biOutput.dense1`` (Ev, Eb), ``LayerNorm1`` (Ev), ``q_dense1`` (Ev, Eb), ``dense2``
      (E, Eb), ``LayerNorm2`` (E), ``q_dense2`` (E, Eb); ``v_intermediate.dense`` (Iv, Ev),
      ``v_output.{dense (Ev, Iv), LayerNorm}``, ``t_intermediate.dense`` (I, E),
      ``t_output.{dense (E, I), LayerNorm}`` (bi_intermediate_size is unused)
    * ``bert.t_pooler.dense`` (Eb, E), ``bert.v_pooler.dense`` (Eb, Ev)
      [BertTextPooler, BertImagePooler]
    * heads ``cls.``  [BertPreTrainingHeads]: ``predictions.*`` (decoder tied to the word
      embeddings), ``bi_seq_relationship`` (2, Eb), ``imagePredictions.transform.{dense
      (Ev,Ev), LayerNorm}``, ``imagePredictions.decoder`` (v_target_size, Ev).
    """
    c = config
    E, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    Ev, Iv, Eb = c["v_hidden_size"], c["v_intermediate_size"], c["bi_hidden_size"]
    if c.get("model", "bert") != "bert":
        raise ValueError("official_layouts: only the BERT text stream (model 'bert') is transcribed")
    b = _Builder(seed)
    p = "bert.embeddings."
    words = b.embedding(p + "word_embeddings", V, E)
    b.embedding(p + "position_embeddings", c["max_position_embeddings"], E)
    b.embedding(p + "token_type_embeddings", c["type_vocab_size"], E)
    b.layer_norm(p + "LayerNorm", E)
    if c.get("task_specific_tokens", False):
        b.embedding(p + "task_embeddings", 20, E)
    p = "bert.v_embeddings."
    b.linear(p + "image_embeddings", Ev, c["v_feature_size"])
    b.linear(p + "image_location_embeddings", Ev, 5)
    b.layer_norm(p + "LayerNorm", Ev)
    for n in range(c["num_hidden_layers"]):
        b.bert_layer(f"bert.encoder.layer.{n}.", E, I)
    for n in range(c["v_num_hidden_layers"]):
        p = f"bert.encoder.v_layer.{n}."
        b.bert_layer(p, Ev, Iv)
        if c.get("dynamic_attention", False):
            b.linear(p + "attention.self.dyLinear_q", Ev, E)
            b.linear(p + "attention.self.dyLinear_k", Ev, E)
    for n in range(len(c["v_biattention_id"])):
        p = f"bert.encoder.c_layer.{n}."
        for w in ("query1", "key1", "value1"):
            b.linear(f"{p}biattention.{w}", Eb, Ev)
        for w in ("query2", "key2", "value2"):
            b.linear(f"{p}biattention.{w}", Eb, E)
        b.linear(p + "biOutput.dense1", Ev, Eb)
        b.layer_norm(p + "biOutput.LayerNorm1", Ev)
        b.linear(p + "biOutput.q_dense1", Ev, Eb)
        b.linear(p + "biOutput.dense2", E, Eb)
        b.layer_norm(p + "biOutput.LayerNorm2", E)
        b.linear(p + "biOutput.q_dense2", E, Eb)
        b.linear(p + "v_intermediate.dense", Iv, Ev)
        b.linear(p + "v_output.dense", Ev, Iv)
        b.layer_norm(p + "v_output.LayerNorm", Ev)
        b.linear(p + "t_intermediate.dense", I, E)
        b.linear(p + "t_output.dense", E, I)
        b.layer_norm(p + "t_output.LayerNorm", E)
    b.linear("bert.t_pooler.dense", Eb, E)
    b.linear("bert.v_pooler.dense", Eb, Ev)
    # heads (BertPreTrainingHeads)
    b.mlm_head("cls.", E, words)
    b.linear("cls.bi_seq_relationship", 2, Eb)
    b.linear("cls.imagePredictions.transform.dense", Ev, Ev)
    b.layer_norm("cls.imagePredictions.transform.LayerNorm", Ev)
    b.linear("cls.imagePredictions.decoder", c["v_target_size"], Ev)
    return b.sd


VILBERT_HEADS = ("cls.",)


def write_vilbert(directory: PathLike, config: dict[str, Any], seed: int = 0) -> Path:
    """``DIR/pytorch_model.bin``: ``torch.save(model_to_save.state_dict())`` (tied tensors
    shared, no ``module.``)."""
    path = Path(directory) / VILBERT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vilbert_state_dict(config, seed), path)
    return path


# ----------------------------------------------------------------------------------
# VL-BERT: common/visual_linguistic_bert.py (VisualLinguisticBert,
# VisualLinguisticBertForPretraining, VisualLinguisticBertMVRCHead,
# VisualLinguisticBertRelationshipPredictionHead), common/fast_rcnn.py (FastRCNN:
# obj_downsample), pretrain/modules/resnet_vlbert_for_pretraining_multitask.py
# (ResNetVLBERTForPretrainingMultitask), external/pytorch_pretrained_bert/modeling.py
# (BertEncoder, BertPooler, BertOnlyMLMHead), cfgs/pretrain/base_prec_4x16G_fp32.yaml,
# pretrain/function/config.py (defaults)
# ----------------------------------------------------------------------------------

def vlbert_config(network: Optional[dict[str, Any]] = None, **vlbert: Any) -> dict[str, Any]:
    """cfgs/pretrain/base_prec_4x16G_fp32.yaml's NETWORK flags that shape the state_dict
    and its NETWORK.VLBERT section (plus config.py's defaults for the keys the yaml
    leaves out: visual_region_classes 1601, word_embedding_frozen False,
    IMAGE_SEMANTIC False), then ``network`` / ``vlbert`` overrides.  IMAGE_FINAL_DIM
    follows VLBERT.visual_size unless given (the model needs them equal)."""
    v: dict[str, Any] = {"with_pooler": False, "input_transform_type": 1, "visual_size": 768, "hidden_size": 768,
                         "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                         "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                         "max_position_embeddings": 512, "type_vocab_size": 3, "vocab_size": 30522,
                         "initializer_range": 0.02, "visual_scale_text_init": 0.0, "visual_scale_object_init": 0.0,
                         "visual_ln": True, "pos_embedding_frozen": False, "visual_region_classes": 1601,
                         "word_embedding_frozen": False}
    v.update(vlbert)
    n: dict[str, Any] = {"IMAGE_FEAT_PRECOMPUTED": True, "IMAGE_SEMANTIC": False, "MASK_RAW_PIXELS": True,
                         "WITH_REL_LOSS": False, "WITH_MLM_LOSS": True, "WITH_MVRC_LOSS": True,
                         "IMAGE_FINAL_DIM": v["visual_size"]}
    n.update(network or {})
    n["VLBERT"] = v
    return {"NETWORK": n}


def vlbert_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """``ResNetVLBERTForPretrainingMultitask(config).state_dict()`` (without the
    DataParallel ``module.``), for precomputed features (IMAGE_FEAT_PRECOMPUTED: FastRCNN
    has no CNN, only obj_downsample).

    * ``image_feature_extractor.obj_downsample.1`` (IMAGE_FINAL_DIM, 2 * 2048 [+ 128 with
      IMAGE_SEMANTIC]) -- Sequential(Dropout, Linear, ReLU); the 2048 feature width and
      the 2048 = 8 x 256 box geometry are hard-coded; ``image_feature_extractor.
      object_embed`` (81, 128) only with IMAGE_SEMANTIC  [FastRCNN]
    * ``object_linguistic_embeddings`` (1, E); ``object_mask_visual_embedding`` (1, 2048)
      when IMAGE_FEAT_PRECOMPUTED or not MASK_RAW_PIXELS; ``object_mask_word_embedding``
      (1, E) with WITH_MVRC_LOSS; ``aux_text_visual_embedding`` (1, E) -- the hidden size,
      which equals visual_size in every released config
      [ResNetVLBERTForPretrainingMultitask]
    * ``vlbert.``  [VisualLinguisticBert]: visual_scale_text / visual_scale_object (0-d,
      own parameters, so first) when not visual_ln; word_embeddings (V,E), end_embedding
      (1,E), position_embeddings (P,E), token_type_embeddings (T,E), embedding_LayerNorm
      (E); visual_1x1_text / visual_1x1_object (E, visual_size) only when visual_size !=
      hidden_size; visual_ln_text / visual_ln_object (E) with visual_ln; encoder.layer.N
      [BertEncoder]; pooler.dense (E,E) only with with_pooler; special_word_embeddings
      (1000, E) only with word_embedding_frozen
    * heads ``vlbert.``  [VisualLinguisticBertForPretraining]: relationsip_head.
      caption_image_relationship (2,E) with WITH_REL_LOSS; mlm_head.predictions.*
      (decoder tied to vlbert.word_embeddings) with WITH_MLM_LOSS; mvrc_head.transform.dense
      (E,E), mvrc_head.region_cls_pred (visual_region_classes, E) with WITH_MVRC_LOSS.
    """
    net, c = config["NETWORK"], config["NETWORK"]["VLBERT"]
    E, I, V, Vs = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["visual_size"]
    if not net["IMAGE_FEAT_PRECOMPUTED"]:
        raise ValueError("official_layouts: only precomputed features (no ResNet in the checkpoint) are transcribed")
    if net["IMAGE_FINAL_DIM"] != Vs:
        raise ValueError("official_layouts: IMAGE_FINAL_DIM must equal VLBERT.visual_size (obj_reps feed visual_1x1)")
    b = _Builder(seed)
    b.linear("image_feature_extractor.obj_downsample.1", net["IMAGE_FINAL_DIM"],
             2 * 2048 + (128 if net["IMAGE_SEMANTIC"] else 0))
    if net["IMAGE_SEMANTIC"]:
        b.embedding("image_feature_extractor.object_embed", 81, 128)
    b.embedding("object_linguistic_embeddings", 1, E)
    if net["IMAGE_FEAT_PRECOMPUTED"] or not net["MASK_RAW_PIXELS"]:
        b.embedding("object_mask_visual_embedding", 1, 2048)
    if net["WITH_MVRC_LOSS"]:
        b.embedding("object_mask_word_embedding", 1, E)
    b.embedding("aux_text_visual_embedding", 1, E)
    p = "vlbert."
    if not c["visual_ln"]:
        b.tensor(p + "visual_scale_text", (), "scalar")
        b.tensor(p + "visual_scale_object", (), "scalar")
    words = b.embedding(p + "word_embeddings", V, E)
    b.embedding(p + "end_embedding", 1, E)
    b.embedding(p + "position_embeddings", c["max_position_embeddings"], E)
    b.embedding(p + "token_type_embeddings", c["type_vocab_size"], E)
    b.layer_norm(p + "embedding_LayerNorm", E)
    if Vs != E:
        b.linear(p + "visual_1x1_text", E, Vs)
        b.linear(p + "visual_1x1_object", E, Vs)
    if c["visual_ln"]:
        b.layer_norm(p + "visual_ln_text", E)
        b.layer_norm(p + "visual_ln_object", E)
    for n in range(c["num_hidden_layers"]):
        b.bert_layer(f"{p}encoder.layer.{n}.", E, I)
    if c["with_pooler"]:
        b.linear(p + "pooler.dense", E, E)
    if c["word_embedding_frozen"]:
        b.embedding(p + "special_word_embeddings", 1000, E)
    if net["WITH_REL_LOSS"]:
        b.linear(p + "relationsip_head.caption_image_relationship", 2, E)
    if net["WITH_MLM_LOSS"]:
        b.mlm_head(p + "mlm_head.", E, words)
    if net["WITH_MVRC_LOSS"]:
        b.linear(p + "mvrc_head.transform.dense", E, E)
        b.linear(p + "mvrc_head.region_cls_pred", c["visual_region_classes"], E)
    return b.sd


VLBERT_HEADS = ("vlbert.relationsip_head.", "vlbert.mlm_head.", "vlbert.mvrc_head.")


def write_vlbert(directory: PathLike, config: dict[str, Any], seed: int = 0) -> Path:
    """``DIR/vl-bert_base_res101_pretrain_multitask-0000.model``: ``{"state_dict":
    module.* keys (tied tensors shared), "optimizer": an AdamW state_dict}``."""
    sd = {f"module.{k}": v for k, v in vlbert_state_dict(config, seed).items()}
    ids = list(range(len({id(v) for v in sd.values()})))
    optimizer = {"state": {0: {"step": 10, "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}},
                 "param_groups": [{"lr": 1e-7, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-4,
                                   "amsgrad": False, "initial_lr": 1e-7, "params": ids}]}
    path = Path(directory) / VLBERT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "optimizer": optimizer}, path)
    return path


# ----------------------------------------------------------------------------------
# VisualBERT: HF transformers VisualBertForPreTraining (models/visual_bert)
# ----------------------------------------------------------------------------------

def visualbert_config(**overrides: Any) -> dict[str, Any]:
    """HF VisualBertConfig keyword arguments: HF's defaults (BERT-base sizes) with the
    VQA checkpoints' 2048-d region features, then ``overrides``."""
    c: dict[str, Any] = {"vocab_size": 30522, "hidden_size": 768, "visual_embedding_dim": 2048,
                         "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                         "max_position_embeddings": 512, "type_vocab_size": 2}
    c.update(overrides)
    return c


def write_visualbert(directory: PathLike, config: dict[str, Any], seed: int = 0) -> Path:
    """``transformers.VisualBertForPreTraining(VisualBertConfig(**config))``, every
    parameter moved off its initial value by seeded noise, saved with HF's own
    ``save_pretrained(DIR)`` -> DIR (config.json + model.safetensors, keys
    ``visual_bert.*`` and the heads ``cls.predictions.*`` / ``cls.seq_relationship.*``;
    HF leaves the tied decoder weight out of the file)."""
    import transformers

    torch.manual_seed(seed)  # HF's init draws from the global generator
    model = transformers.VisualBertForPreTraining(transformers.VisualBertConfig(**copy.deepcopy(config)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = Path(directory)
    model.save_pretrained(d)
    return d


VISUALBERT_HEADS = ("cls.",)

__all__ = ["uniter_config", "uniter_state_dict", "write_uniter", "vilbert_config", "vilbert_state_dict",
           "write_vilbert", "vlbert_config", "vlbert_state_dict", "write_vlbert", "visualbert_config",
           "write_visualbert", "UNITER_HEADS", "VILBERT_HEADS", "VLBERT_HEADS", "VISUALBERT_HEADS"]
