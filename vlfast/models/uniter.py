"""UNITER (Chen et al., 2020): one BERT encoder over words and detector regions.

Follows ChenRocks/UNITER ``model/model.py`` (``UniterModel``):

* text embeddings: word + position + token type (type 0) -> LayerNorm -> dropout;
* image embeddings: ``img_layer_norm(img_linear(feat [+ mask_embedding]))``
  + ``pos_layer_norm(pos_linear(box))`` + token type embedding (type 1, the text
  embeddings' table, shared) -> ``LayerNorm`` -> dropout.  Boxes are 7-d
  ``[x1, y1, x2, y2, w, h, w*h]`` (normalised by the image size, as UNITER's feature
  stores hold them);
* one BERT encoder over the real words and the real regions of each sample, then
  BERT's pooler (tanh(dense(first token))).

The official code packs each sample's regions right after its real words
(``gather_index``), so the encoder sees only real tokens.  Here the padded path runs
the encoder on ``[text slots | visual slots]`` with the key mask
``text_mask | visual_mask``: attention is permutation invariant once the position
embeddings are added, so every real token gets exactly the official value.  The
padding-free path packs the same real tokens (words, then regions, per sample) and
runs ``varlen_attention``.  Either way ``last_hidden_state`` comes back as text slots
then visual slots with padding zeroed, and the pooler reads the first real token of
the packed order (the first word; the first region for a sample without words), as
the official pooler does on its packed sequence.

Shapes: B batch, Lt text length, Lv regions, E hidden.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops
from vlfast.models.base import (ConversionReport, ModelConfig, PathLike, PretrainedModel, finish_loading,
                                load_hf_bert, load_state_dict_file, load_with_report)
from vlfast.models.layers import (BertEncoder, BertPooler, BertTextEmbeddings, SingleStreamOutput, as_bool_mask,
                                  bind_packing, check_feats, check_ids, fail, init_bert_weights, zero_padding)
from vlfast.models.packing import VLPacking

_NAME = "Uniter"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------

@dataclass
class UniterConfig(ModelConfig):
    """UNITER's configuration: BERT's fields (HF names) plus the region inputs.

    ``img_dim``: detector feature size (2048 for the bottom-up-attention features);
    ``pos_dim``: box feature size (7: ``[x1, y1, x2, y2, w, h, w*h]``).  Text uses
    token type 0 and regions type 1 of the same table (``type_vocab_size`` >= 2).
    """

    model_type = "uniter"

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    img_dim: int = 2048
    pos_dim: int = 7

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu":
            raise ValueError(f"UniterConfig: hidden_act: expected 'gelu' (BERT's erf GELU, used by every "
                             f"UNITER checkpoint), got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"UniterConfig: hidden_size: expected a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.hidden_size}")
        if self.type_vocab_size < 2:
            raise ValueError(f"UniterConfig: type_vocab_size: expected >= 2 (type 1 = regions), "
                             f"got {self.type_vocab_size}")

    @classmethod
    def base(cls, **kw: Any) -> "UniterConfig":
        """UNITER-base: 12 x 768, 12 heads (cased BERT-base vocabulary of 28996)."""
        return cls(**kw)

    @classmethod
    def large(cls, **kw: Any) -> "UniterConfig":
        """UNITER-large: 24 x 1024, 16 heads."""
        d = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        d.update(kw)
        return cls(**d)

    @classmethod
    def small(cls, **kw: Any) -> "UniterConfig":
        """A tiny UNITER for tests and the CPU default: 2 x 64, 4 heads, vocab 100,
        64-d region features."""
        d = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64, img_dim=64)
        d.update(kw)
        return cls(**d)


# ----------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------

class UniterImageEmbeddings(nn.Module):
    """Region embeddings.  Names (official): img_linear, img_layer_norm, pos_linear,
    pos_layer_norm, mask_embedding (2 x img_dim; row 0 is "not masked" and always
    acts as zero), LayerNorm."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        E, eps = config.hidden_size, config.layer_norm_eps
        self.img_linear = nn.Linear(config.img_dim, E)
        self.img_layer_norm = nn.LayerNorm(E, eps=eps)
        self.pos_layer_norm = nn.LayerNorm(E, eps=eps)
        self.pos_linear = nn.Linear(config.pos_dim, E)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(E, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats: Tensor, boxes: Tensor, type_ids: Tensor, type_weight: Tensor,
                img_masks: Optional[Tensor] = None) -> Tensor:
        """feats (B,Lv,img_dim), boxes (B,Lv,pos_dim), type_ids (B,Lv) into type_weight
        (T,E) (the text embeddings' token-type table), img_masks (B,Lv) bool or None
        -> (B,Lv,E)."""
        if img_masks is not None:
            # official: feat + mask_embedding(img_masks) with row 0 forced to zero; only
            # row 1 ever contributes, so add it where masked (no in-place weight edit)
            feats = feats + img_masks[..., None].to(feats.dtype) * self.mask_embedding.weight[1]
        # the two matmuls stay here (cuBLAS); LN_img + LN_pos + type row, LN, dropout fused
        ln, iln, pln = self.LayerNorm, self.img_layer_norm, self.pos_layer_norm
        if not (ln.eps == iln.eps == pln.eps):
            img, pos = iln(self.img_linear(feats)), pln(self.pos_linear(boxes))
            return self.dropout(ln(img + pos + F.embedding(type_ids, type_weight)))
        return ops.uniter_visual_embeddings(self.img_linear(feats), self.pos_linear(boxes), type_ids, type_weight,
                                            iln.weight, iln.bias, pln.weight, pln.bias, ln.weight, ln.bias,
                                            eps=ln.eps, dropout_p=self.dropout.p if self.training else 0.0)


# ----------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------

class Uniter(PretrainedModel):
    """UNITER's encoder (official ``UniterModel``).  Parameter names are the
    official ones without the ``uniter.`` prefix: ``embeddings.*``,
    ``img_embeddings.*``, ``encoder.layer.N.*``, ``pooler.dense.*``."""

    config_class = UniterConfig

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.config = config
        c = config
        self.embeddings = BertTextEmbeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings,
                                             c.type_vocab_size, c.hidden_dropout_prob, c.pad_token_id,
                                             c.layer_norm_eps)
        self.img_embeddings = UniterImageEmbeddings(c)
        self.encoder = BertEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                   c.intermediate_size, c.attention_probs_dropout_prob, c.hidden_dropout_prob,
                                   c.layer_norm_eps)
        self.pooler = BertPooler(c.hidden_size)
        init_bert_weights(self, c.initializer_range)

    # -- inputs ---------------------------------------------------------------------

    def _check_inputs(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor],
                      token_type_ids: Optional[Tensor], visual_feats: Optional[Tensor],
                      visual_boxes: Optional[Tensor], visual_mask: Optional[Tensor],
                      visual_token_type_ids: Optional[Tensor], img_masks: Optional[Tensor]):
        c = self.config
        if input_ids is None and visual_feats is None:
            fail(_NAME, "input_ids", "a (B, Lt) integer tensor (or visual_feats for image-only input)", "None")
        if input_ids is not None:
            check_ids(_NAME, "input_ids", input_ids, upper=c.vocab_size)
            B, Lt = input_ids.shape
            if Lt > c.max_position_embeddings:
                fail(_NAME, "input_ids", f"at most max_position_embeddings={c.max_position_embeddings} tokens",
                     f"shape {tuple(input_ids.shape)}")
            device = input_ids.device
        else:
            if not isinstance(visual_feats, Tensor) or visual_feats.dim() != 3:
                fail(_NAME, "visual_feats", f"a (B, Lv, {c.img_dim}) float tensor",
                     f"shape {tuple(visual_feats.shape)}" if isinstance(visual_feats, Tensor)
                     else type(visual_feats).__name__)
            B, Lt, device = visual_feats.shape[0], 0, visual_feats.device
            for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
                if t is not None:
                    fail(_NAME, name, "None when input_ids is None (image-only input)", f"a {type(t).__name__}")
        if visual_feats is None:
            for name, t in (("visual_boxes", visual_boxes), ("visual_mask", visual_mask),
                            ("visual_token_type_ids", visual_token_type_ids), ("img_masks", img_masks)):
                if t is not None:
                    fail(_NAME, name, "None when visual_feats is None (text-only input)", f"a {type(t).__name__}")
            Lv = 0
        else:
            check_feats(_NAME, "visual_feats", visual_feats, B, c.img_dim, "img_dim region features")
            Lv = visual_feats.shape[1]
            if visual_boxes is None:
                fail(_NAME, "visual_boxes", f"a (B={B}, Lv={Lv}, {c.pos_dim}) float tensor of "
                     "[x1, y1, x2, y2, w, h, w*h] boxes", "None")
            check_feats(_NAME, "visual_boxes", visual_boxes, B, c.pos_dim, "[x1, y1, x2, y2, w, h, w*h]")
            if visual_boxes.shape[1] != Lv:
                fail(_NAME, "visual_boxes", f"shape {(B, Lv, c.pos_dim)} (Lv of visual_feats)",
                     f"shape {tuple(visual_boxes.shape)}")
        tmask = as_bool_mask(_NAME, "attention_mask", attention_mask, (B, Lt), device)
        vmask = as_bool_mask(_NAME, "visual_mask", visual_mask, (B, Lv), device)
        check_ids(_NAME, "token_type_ids", token_type_ids, (B, Lt), c.type_vocab_size)
        check_ids(_NAME, "visual_token_type_ids", visual_token_type_ids, (B, Lv), c.type_vocab_size)
        imask = None if img_masks is None else as_bool_mask(_NAME, "img_masks", img_masks, (B, Lv), device)
        return B, Lt, Lv, tmask, vmask, imask

    # -- forward ----------------------------------------------------------------------

    def forward(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, visual_feats: Optional[Tensor] = None,
                visual_boxes: Optional[Tensor] = None, visual_mask: Optional[Tensor] = None,
                visual_token_type_ids: Optional[Tensor] = None, image_text_alignment: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, *,
                padding_free: bool = False, img_masks: Optional[Tensor] = None,
                packing: Optional[VLPacking] = None) -> SingleStreamOutput:
        """Encode words and regions.

        input_ids (B,Lt) (None: image only), attention_mask (B,Lt) bool or 0/1 int
        (left-aligned real words), token_type_ids (B,Lt) (default 0),
        visual_feats (B,Lv,img_dim) (None: text only), visual_boxes (B,Lv,7),
        visual_mask (B,Lv), visual_token_type_ids (B,Lv) (default 1), img_masks (B,Lv)
        bool: regions whose feature gets the learned ``mask_embedding`` added (MRM;
        as in the official code the model does not zero their features, the data
        pipeline does).  Text positions are 0..Lt-1.  ``image_text_alignment`` is
        VisualBERT's and must be None.  ``packing`` (with ``padding_free``): the
        batch's precomputed :class:`~vlfast.models.packing.VLPacking` (``joint``; ``text``
        / ``visual`` for text-only / image-only input), so the padding-free forward and
        backward never wait on the device; None: packed from the masks (host syncs).

        Returns ``SingleStreamOutput``: last_hidden_state (B, Lt+Lv, E) (text slots,
        then visual slots, padding zeroed), pooler_output (B, E), and when asked
        ``hidden_states`` (num_hidden_layers+1 tensors (B, Lt+Lv, E), embeddings
        first) and ``attentions`` (num_hidden_layers tensors (B, H, Lt+Lv, Lt+Lv) over
        the same slots; they run the padded path).
        """
        if image_text_alignment is not None:
            fail(_NAME, "image_text_alignment", "None (UNITER has no word-region alignment input; "
                 "that argument is VisualBERT's)", f"a {type(image_text_alignment).__name__}")
        B, Lt, Lv, tmask, vmask, imask = self._check_inputs(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_boxes, visual_mask,
            visual_token_type_ids, img_masks)
        parts = []
        if input_ids is not None:
            parts.append(self.embeddings(input_ids, token_type_ids))
        if visual_feats is not None:
            w = self.img_embeddings.img_linear.weight
            if visual_token_type_ids is None:
                visual_token_type_ids = torch.ones((B, Lv), dtype=torch.long, device=visual_feats.device)
            # padding regions are inert: their features and boxes (NaN, inf, ...) become 0
            parts.append(self.img_embeddings(zero_padding(visual_feats.to(w.dtype), vmask),
                                             zero_padding(visual_boxes.to(w.dtype), vmask),
                                             visual_token_type_ids, self.embeddings.token_type_embeddings.weight,
                                             imask))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        mask = torch.cat([tmask, vmask], dim=1)
        packed = None
        if padding_free and not output_attentions:
            which = "text" if visual_feats is None else ("visual" if input_ids is None else "joint")
            packed = bind_packing(_NAME, packing, which, mask)
        seq, states, attns = self.encoder(x, mask, padding_free=padding_free, output_attentions=output_attentions,
                                          output_hidden_states=output_hidden_states, packed=packed)
        # the official pooler reads slot 0 of the packed sequence: the first real token
        first = mask.to(torch.int8).argmax(dim=1)
        pooled = self.pooler(seq[torch.arange(B, device=seq.device), first][:, None])
        return SingleStreamOutput(last_hidden_state=seq, pooler_output=pooled,
                                  hidden_states=None if states is None else tuple(states),
                                  attentions=None if attns is None else tuple(attns))

    # -- checkpoints ------------------------------------------------------------------

    @classmethod
    def from_bert(cls, src: Any, config: Optional[UniterConfig] = None) -> "Uniter":
        """UNITER with its embeddings, encoder and pooler initialised from an HF BERT
        (a directory, a ``BertModel``-like module or a (state_dict, config) pair; see
        ``base.load_hf_bert``).  ``config`` defaults to the BERT's sizes (vocab, hidden,
        layers, heads, intermediate, positions, type vocab (at least 2), eps, dropouts)
        plus UNITER's region inputs (img_dim 2048, pos_dim 7); a given ``config`` must
        match the BERT's text sizes (a mismatch raises naming the key and both shapes).
        The region embeddings keep their initialisation.  A BERT with a
        single token type fills row 0 of the type table; row 1 (regions) keeps its
        initialisation."""
        sd, cfg = load_hf_bert(src)
        if config is None:
            config = UniterConfig(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"],
                max_position_embeddings=cfg.get("max_position_embeddings", 512),
                type_vocab_size=max(2, cfg.get("type_vocab_size", 2)),
                hidden_dropout_prob=cfg.get("hidden_dropout_prob", 0.1),
                attention_probs_dropout_prob=cfg.get("attention_probs_dropout_prob", 0.1),
                initializer_range=cfg.get("initializer_range", 0.02),
                layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), pad_token_id=cfg.get("pad_token_id", 0) or 0)
        model = cls(config)
        key = "embeddings.token_type_embeddings.weight"
        own = model.state_dict()
        if key in sd and sd[key].shape[0] < own[key].shape[0] and sd[key].shape[1:] == own[key].shape[1:]:
            rows = own[key].clone()
            rows[: sd[key].shape[0]] = sd[key]
            sd = {**sd, key: rows}
        load_with_report(model, sd)
        return model

    @classmethod
    def from_official(cls, src: Union[dict[str, Tensor], PathLike], config: Optional[UniterConfig] = None, *,
                      output_loading_info: bool = False) -> Union["Uniter", tuple["Uniter", ConversionReport]]:
        """A UNITER from an official checkpoint (ChenRocks/UNITER: ``uniter.*`` keys
        of ``UniterForPretraining`` / the fine-tuning models, or a bare
        ``UniterModel`` state_dict; a ``module.`` prefix and old ``gamma``/``beta``
        LayerNorm names are accepted).  ``src`` is a state_dict or a file path.

        With ``config=None`` the config is inferred from tensor shapes: vocab_size,
        hidden_size, max_position_embeddings, type_vocab_size, num_hidden_layers,
        intermediate_size, img_dim and pos_dim; num_attention_heads is
        hidden_size // 64 (BERT's head size: 12 for base, 16 for large); the rest
        (dropouts, eps, initializer_range) are the base config's.  Head weights
        (``cls.*``, ``feat_regress.*``, ``region_classifier.*``, ``itm_output.*``,
        ...) are reported as unused source keys.

        Returns the model; ``(model, report)`` with ``output_loading_info=True``
        (``ConversionReport``: ``missing`` = our parameters the source lacks, left at
        their initialisation and logged as a warning; ``unexpected`` = source keys not
        used).  A source with none of the model's tensors raises ValueError.
        """
        sd = load_state_dict_file(src) if isinstance(src, str) or hasattr(src, "__fspath__") else src
        if not isinstance(sd, dict):
            raise TypeError(f"Uniter.from_official: src: expected a state_dict or a path, got {type(sd).__name__}")
        ours = convert_official(sd)
        if config is None:
            config = infer_config(ours)
        model = cls(config)
        missing, unexpected = load_with_report(model, ours)
        # report unused keys under their source names
        back = {_official_key_to_ours(k): k for k in sd}
        unused = sorted([k for k in sd if _official_key_to_ours(k) is None] + [back.get(k, k) for k in unexpected])
        return finish_loading(f"{_NAME}.from_official", model, ConversionReport(missing=missing, unexpected=unused),
                              output_loading_info, logger)


# ----------------------------------------------------------------------------------
# Official key layout
# ----------------------------------------------------------------------------------

_OFFICIAL_PREFIX = "uniter."
_OUR_MODULES = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")


def _official_key_to_ours(key: str) -> Optional[str]:
    """``[module.]uniter.<name>`` (or a bare UniterModel's ``<name>``) -> ``<name>``
    with ``gamma``/``beta`` -> ``weight``/``bias``; None for keys outside the encoder
    (heads)."""
    k = key[len("module."):] if key.startswith("module.") else key
    if k.startswith(_OFFICIAL_PREFIX):
        k = k[len(_OFFICIAL_PREFIX):]
    elif not k.startswith(_OUR_MODULES):
        return None
    if not k.startswith(_OUR_MODULES):
        return None
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))


def convert_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official UNITER keys -> ours: ``[module.]uniter.X`` -> ``X`` (the module names
    are the same: embeddings, img_embeddings, encoder.layer.N, pooler), LayerNorm
    ``gamma``/``beta`` -> ``weight``/``bias``.  Keys outside ``uniter.`` (heads) are
    dropped; ``Uniter.from_official`` reports them."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = _official_key_to_ours(k)
        if new is not None:
            out[new] = v
    return out


def to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> the official layout (``uniter.`` + our name)."""
    return {_OFFICIAL_PREFIX + k: v for k, v in sd.items()}


def infer_config(sd: dict[str, Tensor], **overrides: Any) -> UniterConfig:
    """A UniterConfig from the shapes of a state_dict in OUR layout (see
    ``Uniter.from_official`` for what is inferred); ``overrides`` win."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in sd:
            raise ValueError(f"Uniter.from_official: src: expected the key {name!r} (to infer the config), "
                             f"got {len(sd)} keys without it")
        return tuple(sd[name].shape)

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    d: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        num_hidden_layers=max(layers) + 1 if layers else 0,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=(shape("encoder.layer.0.intermediate.dense.weight")[0] if layers
                           else UniterConfig.intermediate_size),
        img_dim=shape("img_embeddings.img_linear.weight")[1],
        pos_dim=shape("img_embeddings.pos_linear.weight")[1],
    )
    d.update(overrides)
    return UniterConfig(**d)


MODEL_CLASS = Uniter
CONFIG_CLASS = UniterConfig

__all__ = ["UniterConfig", "Uniter", "UniterImageEmbeddings", "convert_official", "to_official", "infer_config",
           "MODEL_CLASS", "CONFIG_CLASS"]
