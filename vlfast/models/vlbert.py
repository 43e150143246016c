"""VL-BERT (Su et al., 2020), as jackroos/VL-BERT builds it, on vlfast ops.

The official model is split in two: an outer module (``ResNetVLBERT*``, file
``pretrain/modules/resnet_vlbert_for_pretraining*.py``) that turns region features and
boxes into object representations and builds the inputs, and ``VisualLinguisticBert``
(``common/visual_linguistic_bert.py``) that embeds and encodes them.  This class is both,
from pre-extracted region features on (running the Fast R-CNN backbone on raw images is
out of scope).

Object representations (``FastRCNN.forward`` + ``common/utils/bbox.py``)::

    geometry  = coordinate_embeddings([x1,y1,x2,y2, W,H], box_embed_dim)   # (Lv, 4, 2*d)
        (box -> centre/size: xc=(x1+x2)/2, yc=(y1+y2)/2, w=x2-x1, h=y2-y1;
         p = [xc/W, yc/H, w/W, h/H] * 100; per coordinate [sin(p/1000^(i/d)), cos(...)],
         i = 0..d-1; flattened coordinate-major to 8*d values)
    obj_reps  = ReLU(obj_downsample(Dropout(cat(geometry, feature))))      # (Lv, visual_size)

Embeddings (``VisualLinguisticBert.embedding``)::

    text   : word(id)          + visual_ln_text(visual_1x1_text(obj_reps[tag]))
    object : [IMG] (object_linguistic_embeddings, one learned row)
                               + visual_ln_object(visual_1x1_object(obj_reps))
    [END]  : end_embedding
    each   + position + token type, then embedding_LayerNorm and dropout.

Masked RoIs (MVRC pretraining, ``ResNetVLBERTForPretrainingMultitask.forward``; here the
``img_masks`` (B, Lv) bool argument, True = masked, which ``VLBatch.model_inputs`` passes
from ``batch.targets["img_masks"]``): a masked region's FEATURE is replaced by
``object_mask_visual_embedding`` (1, visual_feat_dim) before ``obj_downsample`` (its box
geometry is kept; officially ``box_features[mvrc_ops == 1] = ...weight[0]``), so its
obj_reps -- and the text visual embedding of words tagged to it -- come from that row;
and its [IMG] token is ``object_mask_word_embedding`` (1, hidden) instead of
``object_linguistic_embeddings`` (``object_linguistic_embeddings[mvrc_ops == 1] = ...``).
Official init: the visual row 0.0, the word row normal(0, initializer_range).  Without
``img_masks`` (or with no True at a real region) the outputs are the plain model's.

``visual_1x1_*`` exist only when ``visual_size != hidden_size`` (the released configs use
visual_size == hidden_size, so they have none); ``visual_ln=False`` replaces the two
LayerNorms with learned scalars ``visual_scale_text`` / ``visual_scale_object``.  The
official init fills the two visual LayerNorm weights (or scalars) with
``visual_scale_*_init`` = 0.0: at initialisation the visual features do not reach the
encoder yet.  ``obj_downsample`` keeps PyTorch's default Linear init, as officially.

The text visual feature: every text token also gets a visual embedding.  Officially it is
``obj_reps[b, text_tags[b, i]]`` with ``text_tags`` zero except in VCR (where a word
naming an object points at it); the datasets put the whole-image box first
(``ADD_IMAGE_AS_A_BOX``, feature = mean of the region features), so by default every
word sees the whole image.  Here: ``text_tags`` (optional, (B, Lt) indices into the
visual slots) or, by default, each row's FIRST REAL region (slot 0 for left-aligned
masks, the official choice) -- pass the whole-image box first to follow the official
recipe.  A row with no real region (``visual_feats=None`` or an all-False
``visual_mask`` row) uses ``aux_text_visual_embedding``, the learned row the official
multitask pretraining gives text-only samples.

Sequence packing.  Officially the encoder sees, per row and without gaps, the real text
tokens (``[CLS] ... [SEP]`` as given), the real objects, then ``[END]``, then padding.
Positions: text 0..n_t-1 (rank among real text tokens), every object n_t (one shared
position), [END] n_t+1 (plus ``position_padding_idx + 1``, 0 for BERT).  Token types: the
given ids for text, 2 for objects (``visual_token_type_ids`` overrides) and [END].  Here
the internal sequence is ``[text slots (Lt)] [visual slots (Lv)] [END]`` with padding
left in place and masked: the same set of real tokens with the same embeddings, so the
encoder output is the official one (attention does not depend on order).  The
padding-free path packs exactly the official order.  The pooler reads the first real
token (the official ``sequence_output[:, 0]``, [CLS] for left-aligned text).  Given the
batch's ``packing`` (a :class:`~vlfast.models.packing.VLPacking`), the padding-free
path appends the [END] slot to its ``joint`` layout on the device (no host sync), and
the position-range check reads the longest text from ``packing.text.max_seqlen``.

Outputs: ``last_hidden_state`` (B, Lt+Lv, E), the text slots then the visual slots
(the [END] slot is dropped; padding zeroed); ``pooler_output`` (B, E);
``hidden_states`` (embeddings + one per layer), each (B, Lt+Lv, E) like
``last_hidden_state``; ``attentions`` one (B, H, Lt+Lv+1, Lt+Lv+1) per layer over the
internal sequence, whose last query/key is [END].

Official state_dict (``module.`` optional; ``convert_official`` / ``to_official``)::

    vlbert.{word_embeddings,end_embedding,position_embeddings,token_type_embeddings,
            embedding_LayerNorm,visual_1x1_text,visual_1x1_object,visual_ln_text,
            visual_ln_object,visual_scale_text,visual_scale_object,encoder,pooler}.*
                                                  <-> the same names without ``vlbert.``
    image_feature_extractor.obj_downsample.1.*    <-> obj_downsample.*
    object_linguistic_embeddings.weight           <-> object_linguistic_embeddings.weight
    aux_text_visual_embedding.weight              <-> aux_text_visual_embedding.weight
    object_mask_visual_embedding.weight           <-> object_mask_visual_embedding.weight
    object_mask_word_embedding.weight             <-> object_mask_word_embedding.weight

The two MVRC masking rows exist only in MVRC pretraining checkpoints (fine-tuning models
have neither; end-to-end pretraining with ``MASK_RAW_PIXELS`` has no visual row): where
absent the report lists them as missing (left at init; only ``img_masks`` uses them).
Everything else in a full checkpoint -- pretraining heads (``vlbert.mlm_head``,
``vlbert.mvrc_head``, ``vlbert.relationsip_head``), the CNN of end-to-end checkpoints
(``image_feature_extractor.backbone`` / ``roi_head_feature_extractor`` / ``head``), task
heads (``final_mlp``, ...) -- is reported as unused.  The released
pretraining configs have ``with_pooler: false``: their checkpoints carry no
``vlbert.pooler.*`` and the report lists ``pooler.*`` as missing (left at init).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops
from vlfast.models.base import (ConversionReport, ModelConfig, PathLike, PretrainedModel, finish_loading,
                                load_hf_bert, load_state_dict_file, load_with_report)
from vlfast.models.layers import (BertEncoder, BertPooler, SingleStreamOutput, as_bool_mask, bind_packing,
                                  check_feats, check_ids, fail, init_bert_weights, value_checks, zero_padding)
from vlfast.models.packing import VLPacking

NAME = "VLBert"
logger = logging.getLogger(__name__)
BOX_WAVE_LENGTH = 1000.0   # coordinate_embeddings: p / 1000 ** (i / d)
BOX_SCALE = 100.0          # coordinates are fractions of the image size times 100
OBJECT_TOKEN_TYPE = 2      # objects and [END]


@dataclasses.dataclass
class VLBertConfig(ModelConfig):
    """VL-BERT sizes (HF field names plus the official VLBERT config's own).

    visual_feat_dim: region feature size (2048: ResNet-101 / bottom-up features);
    box_embed_dim: the sin/cos size per box coordinate (hard-coded 256 in the official
    FastRCNN, so the geometry takes 4 * 2 * 256 = 2048 values; keep it at 256 to load
    official checkpoints); visual_size: the object representation size
    (``IMAGE_FINAL_DIM`` = ``VLBERT.visual_size``); visual_ln / visual_scale_*_init: the
    visual LayerNorms (or scalars) and their initial weight; visual_dropout_prob: the
    dropout before ``obj_downsample``; position_padding_idx: -1 for BERT (positions
    start at 0), RoBERTa's padding index otherwise.
    """

    model_type: ClassVar[str] = "vlbert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 3
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    visual_feat_dim: int = 2048
    box_embed_dim: int = 256
    visual_size: int = 768
    visual_ln: bool = True
    visual_scale_text_init: float = 0.0
    visual_scale_object_init: float = 0.0
    visual_dropout_prob: float = 0.1
    position_padding_idx: int = -1

    @classmethod
    def base(cls) -> "VLBertConfig":
        """VL-BERT-base (cfgs/pretrain/base_prec_4x16G_fp32.yaml)."""
        return cls()

    @classmethod
    def large(cls) -> "VLBertConfig":
        """VL-BERT-large (cfgs/pretrain/large_prec_4x16G_fp16.yaml)."""
        return cls(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   visual_size=1024)

    @classmethod
    def small(cls) -> "VLBertConfig":
        """A tiny model for tests and the CPU default (visual_size != hidden_size, so the
        visual_1x1 projections exist; the box geometry keeps the official 256 x 8)."""
        return cls(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=64, visual_feat_dim=32, visual_size=48)

    @property
    def geometry_dim(self) -> int:
        """Size of the sin/cos box geometry: 4 coordinates x (sin, cos) x box_embed_dim."""
        return 8 * self.box_embed_dim


def box_geometry_embedding(boxes: Tensor, image_size: Tensor, dim: int) -> Tensor:
    """The official ``coordinate_embeddings``: boxes (..., 4) [x1,y1,x2,y2] in pixels,
    image_size (..., 2) (width, height) -> (..., 8*dim), per coordinate of
    (xc, yc, w, h) / (W, H, W, H) * 100: ``dim`` sines then ``dim`` cosines of
    p / 1000 ** (i / dim).  Computed in fp32, returned in the boxes' dtype."""
    b = boxes.float()
    wh = image_size.float()
    W, H = wh[..., 0], wh[..., 1]
    x1, y1, x2, y2 = b.unbind(-1)
    xc, yc, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    pos = torch.stack((xc / W, yc / H, bw / W, bh / H), -1) * BOX_SCALE    # (..., 4)
    freq = BOX_WAVE_LENGTH ** (torch.arange(dim, dtype=torch.float32, device=b.device) / dim)
    ang = pos[..., None] / freq                                            # (..., 4, dim)
    emb = torch.cat((ang.sin(), ang.cos()), -1)                            # (..., 4, 2*dim)
    return emb.flatten(-2).to(boxes.dtype)


class VLBert(PretrainedModel):
    """VL-BERT backbone: region features + boxes + text -> single-stream BERT.

    ``model(input_ids, attention_mask=None, token_type_ids=None, visual_feats=None,
    visual_boxes=None, visual_mask=None, visual_token_type_ids=None,
    image_text_alignment=None, output_attentions=False, output_hidden_states=False,
    padding_free=False, image_size=None, text_tags=None, img_masks=None)``; see the
    module docstring for the packing, the masked RoIs and the outputs.
    """

    # The released pretraining configs have with_pooler: false (no vlbert.pooler.*), and
    # fine-tuning releases carry no MVRC rows (those live in the pretraining model).
    release_missing = ("pooler.", "object_mask_visual_embedding.", "object_mask_word_embedding.")

    config_class = VLBertConfig

    def __init__(self, config: VLBertConfig):
        super().__init__()
        self.config = c = config
        E, V = c.hidden_size, c.visual_size
        # object representations (official: image_feature_extractor.obj_downsample = Dropout, Linear, ReLU)
        self.visual_dropout = nn.Dropout(c.visual_dropout_prob)
        self.obj_downsample = nn.Linear(c.geometry_dim + c.visual_feat_dim, V)
        self.object_linguistic_embeddings = nn.Embedding(1, E)       # the [IMG] token
        self.aux_text_visual_embedding = nn.Embedding(1, V)          # text-only rows
        # VisualLinguisticBert embeddings
        self.word_embeddings = nn.Embedding(c.vocab_size, E)
        self.end_embedding = nn.Embedding(1, E)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, E)
        self.embedding_LayerNorm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.embedding_dropout = nn.Dropout(c.hidden_dropout_prob)
        self.visual_1x1_text: Optional[nn.Linear] = None
        self.visual_1x1_object: Optional[nn.Linear] = None
        if V != E:
            self.visual_1x1_text = nn.Linear(V, E)
            self.visual_1x1_object = nn.Linear(V, E)
        if c.visual_ln:
            self.visual_ln_text = nn.LayerNorm(E, eps=c.layer_norm_eps)
            self.visual_ln_object = nn.LayerNorm(E, eps=c.layer_norm_eps)
        else:
            self.visual_scale_text = nn.Parameter(torch.tensor(float(c.visual_scale_text_init)))
            self.visual_scale_object = nn.Parameter(torch.tensor(float(c.visual_scale_object_init)))
        self.encoder = BertEncoder(c.num_hidden_layers, E, c.num_attention_heads, c.intermediate_size,
                                   c.attention_probs_dropout_prob, c.hidden_dropout_prob, c.layer_norm_eps)
        self.pooler = BertPooler(E)

        init_bert_weights(self, c.initializer_range)
        self.obj_downsample.reset_parameters()        # official: PyTorch's default init
        if c.visual_ln:
            with torch.no_grad():
                self.visual_ln_text.weight.fill_(c.visual_scale_text_init)
                self.visual_ln_object.weight.fill_(c.visual_scale_object_init)
        # MVRC masking rows (official ResNetVLBERTForPretrainingMultitask): init_weight fills
        # the visual row with 0.0 and draws the word row from normal(0, initializer_range).
        # Registered last and built from given tensors, so the draws of every other
        # parameter's initialisation are unchanged.
        self.object_mask_visual_embedding = nn.Embedding(1, c.visual_feat_dim,
                                                         _weight=torch.zeros(1, c.visual_feat_dim))
        self.object_mask_word_embedding = nn.Embedding(1, E, _weight=torch.empty(1, E))
        nn.init.normal_(self.object_mask_word_embedding.weight, std=c.initializer_range)

    # ------------------------------------------------------------------ embeddings

    def _visual(self, x: Tensor, which: str) -> Tensor:
        """visual_1x1_<which> (if any) then visual_ln_<which> (or the scalar scale)."""
        proj = getattr(self, f"visual_1x1_{which}")
        if proj is not None:
            x = proj(x)
        if self.config.visual_ln:
            return getattr(self, f"visual_ln_{which}")(x)
        return x * getattr(self, f"visual_scale_{which}")

    def object_representations(self, visual_feats: Tensor, visual_boxes: Tensor, image_size: Tensor) -> Tensor:
        """visual_feats (B,Lv,visual_feat_dim), visual_boxes (B,Lv,4) pixels, image_size
        (B,2) (width, height) -> obj_reps (B,Lv,visual_size)."""
        return F.relu(self._object_hidden(visual_feats, visual_boxes, image_size))

    def _object_hidden(self, visual_feats: Tensor, visual_boxes: Tensor, image_size: Tensor) -> Tensor:
        """obj_downsample(dropout(cat(geometry, feature))) before its ReLU: (B,Lv,visual_size)."""
        geo = box_geometry_embedding(visual_boxes, image_size[:, None, :], self.config.box_embed_dim)
        x = torch.cat((geo.to(visual_feats.dtype), visual_feats), -1)
        return self.obj_downsample(self.visual_dropout(x))

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, visual_feats: Optional[Tensor] = None,
                visual_boxes: Optional[Tensor] = None, visual_mask: Optional[Tensor] = None,
                visual_token_type_ids: Optional[Tensor] = None, image_text_alignment: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, padding_free: bool = False,
                image_size: Optional[Tensor] = None, text_tags: Optional[Tensor] = None,
                img_masks: Optional[Tensor] = None, *, packing: Optional[VLPacking] = None) -> SingleStreamOutput:
        """input_ids (B,Lt) with [CLS]/[SEP] as the tokenizer gives them; attention_mask
        (B,Lt); token_type_ids (B,Lt) (default 0); visual_feats (B,Lv,visual_feat_dim);
        visual_boxes (B,Lv,4) [x1,y1,x2,y2] in pixels; image_size (B,2) (width, height) in
        the same pixels; visual_mask (B,Lv); visual_token_type_ids (B,Lv) (default 2);
        text_tags (B,Lt) the visual slot whose representation each text token gets
        (default: the row's first real region); img_masks (B,Lv) bool or 0/1, True = a
        masked RoI (MVRC: its feature becomes ``object_mask_visual_embedding``, its [IMG]
        ``object_mask_word_embedding``; padded slots are ignored), None = none masked.
        image_text_alignment must be None.  ``packing`` (with padding_free): the batch's
        precomputed :class:`~vlfast.models.packing.VLPacking`, so the forward and backward
        never wait on the device; None: packed from the masks (host syncs on a GPU).

        Returns SingleStreamOutput: last_hidden_state (B,Lt+Lv,E), pooler_output (B,E),
        hidden_states / attentions when asked (see the module docstring)."""
        c = self.config
        if image_text_alignment is not None:
            fail(NAME, "image_text_alignment", "None (VL-BERT has no image-text alignment input)",
                 f"a {type(image_text_alignment).__name__}")
        if input_ids is None:
            fail(NAME, "input_ids", "a (B, Lt) integer tensor (VL-BERT always has text: at least [CLS] [SEP])",
                 "None")
        check_ids(NAME, "input_ids", input_ids, upper=c.vocab_size)
        B, Lt = input_ids.shape
        dev = input_ids.device
        t_mask = as_bool_mask(NAME, "attention_mask", attention_mask, (B, Lt), dev)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids(NAME, "token_type_ids", token_type_ids, (B, Lt), c.type_vocab_size)
        dtype = self.word_embeddings.weight.dtype
        # fused: everything after the object matmul(s) through ops.vlbert_visual_embeddings;
        # the scalar visual_scale_* variant (visual_ln=False) stays plain torch
        fused = c.visual_ln and visual_feats is not None and self.visual_ln_object.eps == self.embedding_LayerNorm.eps
        obj_hidden = obj_reps = None
        masked: Optional[Tensor] = None        # (B,Lv) bool: masked real RoIs (img_masks & visual_mask)

        # ---- visual inputs -> object representations
        if visual_feats is None:
            for name, val in (("visual_boxes", visual_boxes), ("visual_mask", visual_mask),
                              ("visual_token_type_ids", visual_token_type_ids), ("text_tags", text_tags),
                              ("img_masks", img_masks)):
                if val is not None:
                    fail(NAME, name, "None when visual_feats is None", f"a {type(val).__name__}")
            Lv = 0
            obj_reps = torch.zeros(B, 0, c.visual_size, device=dev, dtype=dtype)
            v_mask = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        else:
            check_feats(NAME, "visual_feats", visual_feats, B, c.visual_feat_dim, "visual_feat_dim")
            Lv = visual_feats.shape[1]
            if visual_boxes is None:
                fail(NAME, "visual_boxes", f"a (B={B}, Lv={Lv}, 4) tensor [x1,y1,x2,y2] in pixels", "None")
            check_feats(NAME, "visual_boxes", visual_boxes, B, 4, "[x1,y1,x2,y2] in pixels")
            if visual_boxes.shape[1] != Lv:
                fail(NAME, "visual_boxes", f"shape ({B}, {Lv}, 4) (Lv of visual_feats)",
                     f"shape {tuple(visual_boxes.shape)}")
            image_size = self._check_image_size(image_size, B)
            v_mask = as_bool_mask(NAME, "visual_mask", visual_mask, (B, Lv), dev)
            # padding regions are inert: their features and boxes (NaN, inf, ...) become 0
            feats = zero_padding(visual_feats.to(dtype), v_mask)
            boxes = zero_padding(visual_boxes.to(dev), v_mask)
            if img_masks is not None:
                # official (precomputed features): box_features[mvrc_ops == 1] =
                # object_mask_visual_embedding.weight[0], before FastRCNN (geometry kept)
                masked = as_bool_mask(NAME, "img_masks", img_masks, (B, Lv), dev) & v_mask
                feats = torch.where(masked[..., None], self.object_mask_visual_embedding.weight[0].to(dtype), feats)
            obj_hidden = self._object_hidden(feats, boxes, image_size.to(dev))
            if not fused:
                obj_reps = F.relu(obj_hidden)
                obj_reps = obj_reps * v_mask[..., None].to(obj_reps.dtype)    # official: zeros at padded slots
        if visual_token_type_ids is None:
            v_types = torch.full((B, Lv), OBJECT_TOKEN_TYPE, dtype=torch.long, device=dev)
        else:
            v_types = check_ids(NAME, "visual_token_type_ids", visual_token_type_ids, (B, Lv), c.type_vocab_size)

        # ---- text visual embeddings: obj_reps[b, tag], aux row when the row has no region
        has_region = v_mask.any(1)                                              # (B,)
        if text_tags is None:
            first = v_mask.int().argmax(1) if Lv else torch.zeros(B, dtype=torch.long, device=dev)
            tags = first[:, None].expand(B, Lt)
        else:
            tags = check_ids(NAME, "text_tags", text_tags, (B, Lt), max(Lv, 1))
        aux = self.aux_text_visual_embedding.weight[0].expand(B, Lt, -1)
        if Lv and fused:
            # obj_reps[b, tag] = relu(obj_hidden[b, tag]) * mask[b, tag]: gather first, same values
            idx = tags.long()[..., None]
            text_vis = F.relu(torch.gather(obj_hidden, 1, idx.expand(B, Lt, obj_hidden.shape[-1])))
            text_vis = text_vis * torch.gather(v_mask, 1, tags.long())[..., None].to(text_vis.dtype)
            text_vis = torch.where(has_region[:, None, None], text_vis, aux)
        elif Lv:
            text_vis = torch.gather(obj_reps, 1, tags.long()[..., None].expand(B, Lt, obj_reps.shape[-1]))
            text_vis = torch.where(has_region[:, None, None], text_vis, aux)
        else:
            text_vis = aux
        text_emb = self.word_embeddings(input_ids) + self._visual(text_vis, "text")
        if not fused:
            img = self.object_linguistic_embeddings.weight[0]
            if masked is not None:
                # official: object_linguistic_embeddings[mvrc_ops == 1] = object_mask_word_embedding.weight[0]
                img = torch.where(masked[..., None], self.object_mask_word_embedding.weight[0], img)
            obj_emb = img + self._visual(obj_reps, "object")
        end_emb = self.end_embedding.weight[0].expand(B, 1, -1)

        # ---- positions and token types of [text slots][visual slots][END]
        n_t = t_mask.sum(1, keepdim=True)                                       # (B,1)
        off = c.position_padding_idx + 1
        # the longest text must leave the objects' and [END]'s positions in the table; Lt
        # bounds it without reading a value, else the packing's host int, else (no
        # packing, a batch this long) read it back
        if B and Lt + 1 + off >= c.max_position_embeddings:
            if padding_free and isinstance(packing, VLPacking) and packing.text.width == Lt:
                longest = packing.text.max_seqlen
            else:
                longest = int(n_t.max())
            if longest + 1 + off >= c.max_position_embeddings:
                fail(NAME, "input_ids", f"at most {c.max_position_embeddings - 2 - off} real text tokens "
                     f"(max_position_embeddings={c.max_position_embeddings}; objects and [END] take the next "
                     f"two)", f"{longest} real tokens")
        t_pos = (t_mask.long().cumsum(1) - 1).clamp(min=0) + off
        pos = torch.cat((t_pos, (n_t + off).expand(B, Lv), n_t + 1 + off), 1)
        types = torch.cat((token_type_ids.long(), v_types.long(),
                           torch.full((B, 1), OBJECT_TOKEN_TYPE, dtype=torch.long, device=dev)), 1)
        if fused:
            # the LayerNorm is per row: text and [END] rows here, object rows in the op
            ln, p = self.embedding_LayerNorm, self.embedding_dropout.p if self.training else 0.0
            te = torch.cat((text_emb, end_emb), 1)
            te_rows = torch.cat((pos[:, :Lt], pos[:, Lt + Lv:]), 1), torch.cat((types[:, :Lt], types[:, Lt + Lv:]), 1)
            te = te + self.position_embeddings(te_rows[0]) + self.token_type_embeddings(te_rows[1])
            te = self.embedding_dropout(ln(te))
            if self.visual_1x1_object is not None:     # ReLU and mask come before that matmul
                obj_in = self.visual_1x1_object(F.relu(obj_hidden) * v_mask[..., None].to(obj_hidden.dtype))
                relu, omask = False, None
            else:
                obj_in, relu, omask = obj_hidden, True, v_mask
            vln = self.visual_ln_object
            o_types, type_w = types[:, Lt:Lt + Lv], self.token_type_embeddings.weight
            if masked is not None:
                # the [IMG] -> object_mask_word_embedding swap at masked slots: the op adds the
                # one [IMG] row to every slot, so the masked slots' difference rides on a second
                # copy of the token-type table, rows T..2T-1 = type + (mask_word - [IMG]),
                # picked by type id + T (other slots read the same rows as without img_masks)
                T = type_w.shape[0]
                delta = self.object_mask_word_embedding.weight[0] - self.object_linguistic_embeddings.weight[0]
                type_w = torch.cat((type_w, type_w + delta), 0)
                o_types = o_types + masked.long() * T
            obj = ops.vlbert_visual_embeddings(obj_in, pos[:, Lt:Lt + Lv], o_types,
                                               self.object_linguistic_embeddings.weight,
                                               self.position_embeddings.weight, type_w,
                                               vln.weight, vln.bias, ln.weight, ln.bias, visual_mask=omask,
                                               relu=relu, eps=ln.eps, dropout_p=p)
            x = torch.cat((te[:, :Lt], obj.to(te.dtype), te[:, Lt:]), 1)
        else:
            x = torch.cat((text_emb, obj_emb.to(text_emb.dtype), end_emb), 1)
            x = x + self.position_embeddings(pos) + self.token_type_embeddings(types)
            x = self.embedding_dropout(self.embedding_LayerNorm(x))
        mask = torch.cat((t_mask, v_mask, torch.ones(B, 1, dtype=torch.bool, device=dev)), 1)

        # ---- encoder, pooler
        packed = None
        if padding_free and not output_attentions:
            # [text | visual] + the [END] slot, real in every row
            packed = bind_packing(NAME, packing, "joint" if Lv else "text", mask, after=1)
        h, states, attns = self.encoder(x, mask, padding_free=padding_free, output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states, packed=packed)
        first_real = mask.int().argmax(1)
        pooled = self.pooler(h[torch.arange(B, device=dev), first_real][:, None])
        L = Lt + Lv
        return SingleStreamOutput(last_hidden_state=h[:, :L], pooler_output=pooled,
                                  hidden_states=None if states is None else [s[:, :L] for s in states],
                                  attentions=attns)

    @staticmethod
    def _check_image_size(image_size: Optional[Tensor], B: int) -> Tensor:
        want = f"a (B={B}, 2) tensor of (width, height) in pixels (required with visual_boxes)"
        if image_size is None:
            fail(NAME, "image_size", want, "None")
        if not isinstance(image_size, Tensor):
            fail(NAME, "image_size", want, type(image_size).__name__)
        if tuple(image_size.shape) != (B, 2):
            fail(NAME, "image_size", want, f"shape {tuple(image_size.shape)}")
        if image_size.dtype == torch.bool or image_size.dtype.is_complex:
            fail(NAME, "image_size", want, str(image_size.dtype).replace("torch.", ""))
        if image_size.numel() and value_checks(image_size) and not bool((image_size > 0).all()):
            fail(NAME, "image_size", "positive widths and heights", f"min {float(image_size.min())}")
        return image_size.float()

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_bert(cls, src: Any, config: Optional[VLBertConfig] = None) -> "VLBert":
        """Text-stream initialisation from an HF BertModel (directory, module or
        (state_dict, config)), as the official ``load_language_pretrained_model``:
        word / position embeddings, token types (rows 0-1; a one-row table is copied to
        all three rows), the embedding LayerNorm, the encoder layers and the pooler.
        ``config`` defaults to the base config with the BERT's sizes (visual_size =
        hidden_size).  A config with fewer layers takes the BERT's first ones."""
        sd, bcfg = load_hf_bert(src)
        if config is None:
            E = int(bcfg["hidden_size"])
            config = VLBertConfig(vocab_size=int(bcfg["vocab_size"]), hidden_size=E,
                                  num_hidden_layers=int(bcfg["num_hidden_layers"]),
                                  num_attention_heads=int(bcfg["num_attention_heads"]),
                                  intermediate_size=int(bcfg["intermediate_size"]),
                                  max_position_embeddings=int(bcfg["max_position_embeddings"]),
                                  hidden_dropout_prob=float(bcfg.get("hidden_dropout_prob", 0.1)),
                                  attention_probs_dropout_prob=float(bcfg.get("attention_probs_dropout_prob", 0.1)),
                                  layer_norm_eps=float(bcfg.get("layer_norm_eps", 1e-12)),
                                  pad_token_id=int(bcfg.get("pad_token_id") or 0), visual_size=E)
        model = cls(config)
        ours: dict[str, Tensor] = {}
        for k, v in sd.items():
            if k.startswith("encoder.layer."):
                if int(k.split(".")[2]) < config.num_hidden_layers:
                    ours[k] = v
            elif k.startswith("pooler."):
                ours[k] = v
            elif k.startswith("embeddings.LayerNorm."):
                ours["embedding_LayerNorm." + k[len("embeddings.LayerNorm."):]] = v
            elif k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
                ours[k[len("embeddings."):]] = v
        tt = sd.get("embeddings.token_type_embeddings.weight")
        if tt is not None:
            table = model.token_type_embeddings.weight.detach().clone()
            n = min(tt.shape[0], table.shape[0])
            table[:n] = tt[:n]
            if tt.shape[0] == 1:
                table[:] = tt[0]
            ours["token_type_embeddings.weight"] = table
        load_with_report(model, ours)
        return model

    @classmethod
    def from_official(cls, src: Union[dict[str, Tensor], PathLike], config: Optional[VLBertConfig] = None, *,
                      output_loading_info: bool = False) -> Union["VLBert", tuple["VLBert", ConversionReport]]:
        """Build from an official jackroos/VL-BERT state_dict (or a file holding one),
        keys with or without ``module.``.  Without ``config`` the sizes are inferred:
        vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
        num_hidden_layers, intermediate_size, visual_size (visual_1x1 or
        obj_downsample), visual_feat_dim (obj_downsample's input minus the geometry,
        box_embed_dim being the official 256), visual_ln; num_attention_heads =
        hidden_size // 64 (12 for base, 16 for large); the rest is the base config's.
        Returns the model; ``(model, report)`` with ``output_loading_info=True`` -- report
        lists our parameters the source lacks (also logged as a warning) and the source
        keys we do not use, under the source's own names.  A source with none of the
        model's tensors raises ValueError."""
        sd = load_state_dict_file(src) if not isinstance(src, dict) else src
        pairs = _official_to_ours(sd)                         # (source key, our key, tensor)
        ours = {k: v for _, k, v in pairs}
        if config is None:
            config = infer_config(ours)
        model = cls(config)
        own = set(model.state_dict())
        missing, _ = load_with_report(model, {k: v for k, v in ours.items() if k in own})
        unexpected = sorted(src_k for src_k, k, _ in pairs if k not in own)
        return finish_loading(f"{NAME}.from_official", model, ConversionReport(missing=missing, unexpected=unexpected),
                              output_loading_info, logger)


# ----------------------------------------------------------------------------------
# Official key layout
# ----------------------------------------------------------------------------------

_VLBERT_MODULES = ("word_embeddings.", "end_embedding.", "position_embeddings.", "token_type_embeddings.",
                   "embedding_LayerNorm.", "visual_1x1_text.", "visual_1x1_object.", "visual_ln_text.",
                   "visual_ln_object.", "encoder.", "pooler.")
_VLBERT_PARAMS = ("visual_scale_text", "visual_scale_object")
_TOP = ("object_linguistic_embeddings.", "aux_text_visual_embedding.", "object_mask_visual_embedding.",
        "object_mask_word_embedding.")      # the same names in both layouts
_OBJ_OFFICIAL, _OBJ_OURS = "image_feature_extractor.obj_downsample.1.", "obj_downsample."


def _ours_is_vlbert(k: str) -> bool:
    return k.startswith(_VLBERT_MODULES) or k in _VLBERT_PARAMS


def _official_to_ours(sd: dict[str, Tensor]) -> list[tuple[str, str, Tensor]]:
    out = []
    for src, v in sd.items():
        k = src[len("module."):] if src.startswith("module.") else src
        if k.startswith("vlbert.") and _ours_is_vlbert(k[len("vlbert."):]):
            k = k[len("vlbert."):]
        elif k.startswith(_OBJ_OFFICIAL):
            k = _OBJ_OURS + k[len(_OBJ_OFFICIAL):]
        out.append((src, k, v))
    return out


def convert_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official VL-BERT keys (``module.`` optional) -> ours.  Keys that are not part of
    this model (heads, CNN, MVRC rows, ...) are kept under their official name (minus
    ``module.``), so they show up as unused; the order of ``sd`` is kept."""
    return {k: v for _, k, v in _official_to_ours(sd)}


def to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> the official layout (no ``module.`` prefix); inverse of
    ``convert_official`` on our state_dicts."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if _ours_is_vlbert(k):
            k = "vlbert." + k
        elif k.startswith(_OBJ_OURS):
            k = _OBJ_OFFICIAL + k[len(_OBJ_OURS):]
        out[k] = v
    return out


def infer_config(sd: dict[str, Tensor], base: Optional[VLBertConfig] = None) -> VLBertConfig:
    """Sizes from a state_dict in OUR key layout (see ``VLBert.from_official``)."""
    cfg = base or VLBertConfig.base()
    ch: dict[str, Any] = {}
    if "word_embeddings.weight" in sd:
        ch["vocab_size"], ch["hidden_size"] = map(int, sd["word_embeddings.weight"].shape)
    E = ch.get("hidden_size", cfg.hidden_size)
    if E % 64 == 0:
        ch["num_attention_heads"] = E // 64
    if "position_embeddings.weight" in sd:
        ch["max_position_embeddings"] = int(sd["position_embeddings.weight"].shape[0])
    if "token_type_embeddings.weight" in sd:
        ch["type_vocab_size"] = int(sd["token_type_embeddings.weight"].shape[0])
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m}
    if layers:
        ch["num_hidden_layers"] = max(layers) + 1
    if "encoder.layer.0.intermediate.dense.weight" in sd:
        ch["intermediate_size"] = int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0])
    if "visual_1x1_object.weight" in sd:
        ch["visual_size"] = int(sd["visual_1x1_object.weight"].shape[1])
    elif "obj_downsample.weight" in sd:
        ch["visual_size"] = int(sd["obj_downsample.weight"].shape[0])
    else:
        ch["visual_size"] = E
    if "obj_downsample.weight" in sd:
        n_in = int(sd["obj_downsample.weight"].shape[1])
        if n_in <= cfg.geometry_dim:
            raise ValueError(f"{NAME}.from_official: image_feature_extractor.obj_downsample.1.weight: expected an "
                             f"input size > {cfg.geometry_dim} (geometry 8 x box_embed_dim={cfg.box_embed_dim} "
                             f"+ features), got shape {tuple(sd['obj_downsample.weight'].shape)}")
        ch["visual_feat_dim"] = n_in - cfg.geometry_dim
    elif "object_mask_visual_embedding.weight" in sd:
        ch["visual_feat_dim"] = int(sd["object_mask_visual_embedding.weight"].shape[1])
    if "visual_scale_text" in sd or "visual_scale_object" in sd:
        ch["visual_ln"] = False
    return cfg.replace(**ch)


MODEL_CLASS = VLBert
CONFIG_CLASS = VLBertConfig

__all__ = ["VLBertConfig", "VLBert", "box_geometry_embedding", "convert_official", "to_official", "infer_config",
           "MODEL_CLASS", "CONFIG_CLASS"]
