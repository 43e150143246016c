"""VisualBERT (Li et al. 2019; uclanlp/visualbert, HF ``modeling_visual_bert``) on vlfast ops.

One single-stream BERT over ``[text tokens ; projected regions]``:

* text embeddings: word + position + token type (BERT's);
* visual embeddings: ``visual_projection(region feature)`` + ``visual_token_type_embeddings``
  + a visual position: ``visual_position_embeddings[0]`` for every region, plus, when
  ``image_text_alignment`` is given, the mean of the *text* ``position_embeddings`` of the
  words the region is aligned to (entries -1 are padding; a region with no aligned word
  gets only ``visual_position_embeddings[0]``, as in the official code and HF);
* one LayerNorm + dropout shared by both parts, a BERT encoder, a pooler on the first
  text token.

Parameter names are HF ``VisualBertModel``'s (``embeddings.visual_projection``,
``embeddings.visual_token_type_embeddings``, ``encoder.layer.N.*``, ``pooler.dense``), so
the "official" layout of this model is HF's: the released uclanlp checkpoints were
converted to it by HF.  ``convert_official`` also accepts the original uclanlp ``.th``
layout (``bert.bert.*``, ``token_type_embeddings_visual``, ``position_embeddings_visual``,
``embeddings.projection``).

Token types of the regions: HF defaults ``visual_token_type_ids`` to 1, the original code
to 0.  ``VisualBertConfig.default_visual_token_type_id`` holds the default (1, HF's);
conversion from the original uclanlp layout sets it to 0.

Checkpoints: ``save_pretrained(DIR)`` writes an HF directory -- config.json with HF's
fields (``model_type: "visual_bert"``) and model.safetensors under HF ``VisualBertModel``'s
key names -- that ``transformers.AutoModel.from_pretrained(DIR)`` and
``VisualBertModel.from_pretrained(DIR)`` load.  vlfast's fields HF has no name for
(``default_visual_token_type_id``) are kept in the same config.json under the key
``"vlfast"`` (HF ignores it), so ``VisualBert.from_pretrained(DIR)`` restores the config
exactly; it also reads the older vlfast directories (``model_type: "visualbert"``).

Shapes: B batch, Lt text length, Lv regions, A alignments per region, E hidden,
Fv = ``visual_embedding_dim``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from vlfast import ops
from vlfast.models.base import (CONFIG_NAME, WEIGHTS_NAME, ConversionReport, ModelConfig, PathLike, PretrainedModel,
                                finish_loading, load_hf_bert, load_state_dict_file, load_with_report, strip_prefix)
from vlfast.models.layers import (BertEncoder, BertPooler, BertTextEmbeddings, SingleStreamOutput,
                                  as_bool_mask, bind_packing, check_feats, check_ids, fail, init_bert_weights,
                                  value_checks, zero_padding)
from vlfast.models.packing import VLPacking

NAME = "VisualBert"
HF_MODEL_TYPE = "visual_bert"  # HF's model_type (ours, VisualBertConfig.model_type, is "visualbert")
VLFAST_KEY = "vlfast"  # config.json: vlfast's fields HF has no name for
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------

@dataclasses.dataclass
class VisualBertConfig(ModelConfig):
    """VisualBERT's config, with HF ``VisualBertConfig``'s field names and defaults
    (``pad_token_id`` 1 and ``visual_embedding_dim`` 512 are HF's defaults; the VQA / NLVR2
    checkpoints use 2048 / 1024 region features).

    ``special_visual_initialize``: at initialisation, copy the token-type and position
    tables into their visual twins (HF and the original code do this; ``from_bert`` does it
    after loading the BERT).  ``default_visual_token_type_id``: the token type of regions
    when ``visual_token_type_ids`` is not given (1 as HF; the original code used 0).
    HF's ``bypass_transformer`` variant and activations other than erf GELU are not
    supported (``config_from_hf`` rejects them)."""

    model_type: ClassVar[str] = "visualbert"

    vocab_size: int = 30522
    hidden_size: int = 768
    visual_embedding_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    special_visual_initialize: bool = True
    pad_token_id: int = 1
    default_visual_token_type_id: int = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"VisualBertConfig: hidden_size: expected a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.hidden_size}")
        if not 0 <= self.default_visual_token_type_id < self.type_vocab_size:
            raise ValueError(f"VisualBertConfig: default_visual_token_type_id: expected a value in "
                             f"[0, type_vocab_size={self.type_vocab_size}), got {self.default_visual_token_type_id}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"VisualBertConfig: pad_token_id: expected a value in [0, vocab_size="
                             f"{self.vocab_size}), got {self.pad_token_id}")

    @classmethod
    def base(cls, **kw: Any) -> "VisualBertConfig":
        """BERT-base sized (HF's defaults): 12 x 768, 12 heads."""
        return cls(**kw)

    @classmethod
    def large(cls, **kw: Any) -> "VisualBertConfig":
        """BERT-large sized: 24 x 1024, 16 heads, intermediate 4096."""
        d = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        d.update(kw)
        return cls(**d)

    @classmethod
    def small(cls, **kw: Any) -> "VisualBertConfig":
        """Tiny, for tests and the CPU default: 2 x 64, 4 heads, vocab 100, 32-d regions."""
        d = dict(vocab_size=100, hidden_size=64, visual_embedding_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
        d.update(kw)
        return cls(**d)


_HF_FIELDS = ("vocab_size", "hidden_size", "visual_embedding_dim", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "initializer_range", "layer_norm_eps", "special_visual_initialize", "pad_token_id")


def _extra_fields() -> list[str]:
    """Our config fields HF's VisualBertConfig has no name for."""
    return [f.name for f in dataclasses.fields(VisualBertConfig) if f.name not in _HF_FIELDS]


def _vlfast_extras(ns: Any) -> dict[str, Any]:
    """The ``"vlfast"`` entry of an HF config.json written by ``save_pretrained``."""
    if ns is None:
        return {}
    if not isinstance(ns, Mapping):
        fail(NAME, f"config.{VLFAST_KEY}", "a dict of vlfast's extra config fields", type(ns).__name__)
    ns = dict(ns)
    mt = ns.pop("model_type", VisualBertConfig.model_type)
    if mt != VisualBertConfig.model_type:
        fail(NAME, f"config.{VLFAST_KEY}.model_type", repr(VisualBertConfig.model_type), repr(mt))
    unknown = sorted(set(ns) - set(_extra_fields()))
    if unknown:
        fail(NAME, f"config.{VLFAST_KEY}", f"fields among {_extra_fields()}", f"unknown fields {unknown}")
    return ns


def config_from_hf(hf_config: Any) -> VisualBertConfig:
    """Our config from an HF ``VisualBertConfig`` (object or dict, e.g. a config.json).
    Keeps HF's default visual token type (1) unless the config carries vlfast's extra
    fields (the ``"vlfast"`` entry ``save_pretrained`` writes).  A dict with vlfast's own
    ``model_type`` ("visualbert", the older vlfast config.json) is read as ours.  Raises
    ValueError for another ``model_type``, ``bypass_transformer=True`` or an activation
    other than "gelu" (erf GELU), which this model does not implement."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    mt = d.get("model_type")
    if mt == VisualBertConfig.model_type:
        return VisualBertConfig.from_dict(d)
    if mt not in (None, HF_MODEL_TYPE):
        fail(NAME, "config.model_type", f"{HF_MODEL_TYPE!r} (an HF VisualBERT config)", repr(mt))
    if d.get("bypass_transformer", False):
        fail(NAME, "config.bypass_transformer", "False (the bypass variant is not supported)", True)
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        fail(NAME, "config.hidden_act", "'gelu'", repr(act))
    kw = {k: d[k] for k in _HF_FIELDS if d.get(k) is not None}
    kw.update(_vlfast_extras(d.get(VLFAST_KEY)))
    return VisualBertConfig(**kw)


def config_to_hf(config: VisualBertConfig) -> dict[str, Any]:
    """HF ``VisualBertConfig`` keyword arguments for our config (``VisualBertConfig(**d)``)."""
    d = {k: getattr(config, k) for k in _HF_FIELDS}
    d.update(hidden_act="gelu", bypass_transformer=False)
    return d


def hf_config_json(config: VisualBertConfig) -> dict[str, Any]:
    """The config.json ``save_pretrained`` writes: HF's (``model_type: "visual_bert"``,
    ``architectures: ["VisualBertModel"]``, the fields of :func:`config_to_hf`) plus
    ``"vlfast"``: our model_type and the fields HF has no name for."""
    d: dict[str, Any] = {"architectures": ["VisualBertModel"], "model_type": HF_MODEL_TYPE}
    d.update(config_to_hf(config))
    d[VLFAST_KEY] = {"model_type": config.model_type, **{k: getattr(config, k) for k in _extra_fields()}}
    return d


# ----------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------

class VisualBertEmbeddings(BertTextEmbeddings):
    """Text embeddings (word, position, token type) and visual embeddings (projection,
    visual token type, visual position), summed per slot, concatenated text-then-visual,
    then the shared LayerNorm and dropout.

    Names: word_embeddings, position_embeddings, token_type_embeddings, LayerNorm,
    visual_token_type_embeddings, visual_position_embeddings, visual_projection (HF's)."""

    def __init__(self, config: VisualBertConfig):
        c = config
        super().__init__(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                         c.hidden_dropout_prob, c.pad_token_id, c.layer_norm_eps)
        self.visual_token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.visual_position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.visual_projection = nn.Linear(c.visual_embedding_dim, c.hidden_size)

    def text(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(B, Lt) ids -> (B, Lt, E) pre-LayerNorm sum; positions 0..Lt-1."""
        Lt = input_ids.shape[1]
        pos = self.position_embeddings.weight[:Lt]
        return self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + pos

    def visual(self, feats: Tensor, token_type_ids: Tensor, alignment: Optional[Tensor]) -> Tensor:
        """feats (B, Lv, Fv), token_type_ids (B, Lv), alignment (B, >=Lv, A) or None ->
        (B, Lv, E) pre-LayerNorm sum."""
        Lv = feats.shape[1]
        v = self.visual_projection(feats.to(self.visual_projection.weight.dtype))
        pos = self.visual_position_embeddings.weight[0]  # every region: visual position 0
        if alignment is not None:
            # mean of the aligned words' (text) position embeddings; -1 = no word
            alignment = alignment[:, :Lv]
            real = alignment != -1
            w = real.to(v.dtype)
            words = self.position_embeddings(alignment.clamp(min=0)) * w[..., None]
            count = w.sum(2).clamp(min=1.0)  # regions with no aligned word: divide by 1 (gives 0)
            pos = words.sum(2) / count[..., None] + pos
        return v + pos + self.visual_token_type_embeddings(token_type_ids)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, visual_feats: Optional[Tensor] = None,
                visual_token_type_ids: Optional[Tensor] = None,
                image_text_alignment: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        """-> (B, Lt+Lv, E) (Lv = 0 without visual_feats).

        Fused: the shared LayerNorm and dropout are per row, so the text rows go through
        ``ops.text_embeddings`` and the region rows through
        ``ops.visualbert_visual_embeddings`` (after ``visual_projection``), each
        normalising its own rows, and the two are concatenated -- the same values as
        ``dropout(LayerNorm(cat(text(...), visual(...))))``."""
        ln, W = self.LayerNorm, self.word_embeddings
        p = self.dropout.p if self.training else 0.0
        B, Lt = input_ids.shape
        # VisualBERT sums (word + type) + position; the op sums (word + its 2nd table) + its
        # 3rd table, so the type table and ids take the op's "position" slot and vice versa
        positions = torch.arange(Lt, device=input_ids.device)[None].expand(B, Lt)
        e = ops.text_embeddings(input_ids, positions, token_type_ids, W.weight, self.token_type_embeddings.weight,
                                self.position_embeddings.weight, ln.weight, ln.bias, padding_idx=W.padding_idx,
                                eps=ln.eps, dropout_p=p)
        if visual_feats is None:
            return e
        v = self.visual_projection(visual_feats.to(self.visual_projection.weight.dtype))
        align = None if image_text_alignment is None else image_text_alignment[:, :v.shape[1]]
        vis = ops.visualbert_visual_embeddings(v, visual_token_type_ids, align,
                                               self.visual_token_type_embeddings.weight,
                                               self.visual_position_embeddings.weight, self.position_embeddings.weight,
                                               ln.weight, ln.bias, eps=ln.eps, dropout_p=p)
        return torch.cat([e, vis], dim=1)


class VisualBert(PretrainedModel):
    """VisualBERT: embeddings, one single-stream BERT encoder over text then regions, pooler.

    ``model(input_ids, attention_mask, token_type_ids, visual_feats, visual_boxes=None,
    visual_mask, visual_token_type_ids, image_text_alignment, output_attentions,
    output_hidden_states, padding_free)`` -> ``SingleStreamOutput``; see ``forward``."""

    config_class = VisualBertConfig

    def __init__(self, config: VisualBertConfig):
        super().__init__()
        self.config = config
        c = config
        self.embeddings = VisualBertEmbeddings(c)
        self.encoder = BertEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.attention_probs_dropout_prob, c.hidden_dropout_prob, c.layer_norm_eps)
        self.pooler = BertPooler(c.hidden_size)
        init_bert_weights(self, std=c.initializer_range)
        if c.special_visual_initialize:
            self.special_visual_initialize()

    @torch.no_grad()
    def special_visual_initialize(self) -> None:
        """Copy token_type_embeddings / position_embeddings into their visual twins (the
        original code's ``special_intialize``, HF's ``special_visual_initialize``)."""
        e = self.embeddings
        e.visual_token_type_embeddings.weight.copy_(e.token_type_embeddings.weight)
        e.visual_position_embeddings.weight.copy_(e.position_embeddings.weight)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, visual_feats: Optional[Tensor] = None,
                visual_boxes: Optional[Tensor] = None, visual_mask: Optional[Tensor] = None,
                visual_token_type_ids: Optional[Tensor] = None, image_text_alignment: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                padding_free: bool = False, *, packing: Optional[VLPacking] = None) -> SingleStreamOutput:
        """Encode text and regions.

        Args:
            input_ids: (B, Lt) int token ids.
            attention_mask: (B, Lt) bool or 0/1 int, True/1 = real token; None = all real.
            token_type_ids: (B, Lt) int; None = 0.
            visual_feats: (B, Lv, Fv) float region features; None = text only (Lv = 0).
            visual_boxes: must be None (VisualBERT uses no boxes).
            visual_mask: (B, Lv) bool or 0/1 int, True/1 = real region; None = all real.
            visual_token_type_ids: (B, Lv) int; None = ``config.default_visual_token_type_id``.
            image_text_alignment: (B, Lv', A) int with Lv' >= Lv (extra rows are ignored, as in
                HF): word positions each region is aligned to, -1 = padding.
            output_attentions: also return per-layer (B, H, L, L) attention maps (padded path).
            output_hidden_states: also return the num_hidden_layers + 1 (B, L, E) states.
            padding_free: run the encoder on the packed real tokens (varlen attention);
                same outputs as the padded path.
            packing: with padding_free, the batch's precomputed
                :class:`~vlfast.models.packing.VLPacking` (its ``joint`` layout; ``text``
                without visual_feats), so the forward and backward never wait on the
                device; None: packed from the masks (host syncs on a GPU).

        Returns:
            SingleStreamOutput: last_hidden_state (B, Lt+Lv, E), text slots then visual slots,
            padded positions zero; pooler_output (B, E) (tanh-dense of slot 0);
            attentions / hidden_states (tuples) or None.
        """
        c = self.config
        if not isinstance(input_ids, Tensor):
            fail(NAME, "input_ids", "a (B, Lt) integer tensor", type(input_ids).__name__)
        check_ids(NAME, "input_ids", input_ids, upper=c.vocab_size)
        B, Lt = input_ids.shape
        dev = input_ids.device
        if Lt > c.max_position_embeddings:
            fail(NAME, "input_ids", f"at most max_position_embeddings={c.max_position_embeddings} tokens",
                 f"shape {tuple(input_ids.shape)}")
        if visual_boxes is not None:
            fail(NAME, "visual_boxes", "None (VisualBERT takes no boxes)",
                 f"shape {tuple(visual_boxes.shape)}" if isinstance(visual_boxes, Tensor)
                 else type(visual_boxes).__name__)
        t_mask = as_bool_mask(NAME, "attention_mask", attention_mask, (B, Lt), dev)
        check_ids(NAME, "token_type_ids", token_type_ids, (B, Lt), c.type_vocab_size)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        if visual_feats is None:
            for name, val in (("visual_mask", visual_mask), ("visual_token_type_ids", visual_token_type_ids),
                              ("image_text_alignment", image_text_alignment)):
                if val is not None:
                    fail(NAME, name, "None when visual_feats is None", "a tensor")
            mask = t_mask
        else:
            check_feats(NAME, "visual_feats", visual_feats, B, c.visual_embedding_dim,
                        "visual_embedding_dim region features")
            Lv = visual_feats.shape[1]
            v_mask = as_bool_mask(NAME, "visual_mask", visual_mask, (B, Lv), dev)
            check_ids(NAME, "visual_token_type_ids", visual_token_type_ids, (B, Lv), c.type_vocab_size)
            if visual_token_type_ids is None:
                visual_token_type_ids = torch.full((B, Lv), c.default_visual_token_type_id, dtype=torch.long,
                                                   device=dev)
            self._check_alignment(image_text_alignment, B, Lv)
            mask = torch.cat([t_mask, v_mask], dim=1)
            # padding regions are inert: their features (NaN, inf, ...) become 0
            visual_feats = zero_padding(visual_feats, v_mask)

        x = self.embeddings(input_ids, token_type_ids, visual_feats, visual_token_type_ids, image_text_alignment)
        packed = None
        if padding_free and not output_attentions:
            packed = bind_packing(NAME, packing, "text" if visual_feats is None else "joint", mask)
        h, states, attns = self.encoder(x, mask, padding_free=padding_free, output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states, packed=packed)
        return SingleStreamOutput(last_hidden_state=h, pooler_output=self.pooler(h),
                                  attentions=tuple(attns) if attns is not None else None,
                                  hidden_states=tuple(states) if states is not None else None)

    def _check_alignment(self, a: Optional[Tensor], B: int, Lv: int) -> None:
        if a is None:
            return
        name, P = "image_text_alignment", self.config.max_position_embeddings
        if not isinstance(a, Tensor) or a.dim() != 3:
            fail(NAME, name, f"a (B={B}, Lv>={Lv}, A) integer tensor",
                 f"shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__)
        if a.dtype.is_floating_point or a.dtype == torch.bool or a.dtype.is_complex:
            fail(NAME, name, "an integer tensor", str(a.dtype).replace("torch.", ""))
        if a.shape[0] != B or a.shape[1] < Lv:
            fail(NAME, name, f"shape (B={B}, Lv>={Lv}, A)", f"shape {tuple(a.shape)}")
        if a.numel() and value_checks(a) and (int(a.min()) < -1 or int(a.max()) >= P):
            fail(NAME, name, f"-1 (padding) or word positions in [0, {P})",
                 f"values in [{int(a.min())}, {int(a.max())}]")

    # ------------------------------------------------------------------ checkpoints

    def _pretrained_config_dict(self) -> dict[str, Any]:
        return hf_config_json(self.config)

    def _pretrained_state_dict(self) -> dict[str, Tensor]:
        return to_official(self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, map_location: Union[str, torch.device] = "cpu",
                        strict: bool = True) -> "VisualBert":
        """Load a directory written by ``save_pretrained`` (HF's layout, see the module
        docstring; HF's own ``VisualBertModel.save_pretrained`` directories too) or by an
        older vlfast (``model_type: "visualbert"``, config.json with our fields)."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{NAME}.from_pretrained: no {CONFIG_NAME} in {d}")
        raw = json.loads((d / CONFIG_NAME).read_text())
        mt = raw.get("model_type") if isinstance(raw, dict) else None
        if mt == VisualBertConfig.model_type:
            return super().from_pretrained(d, map_location=map_location, strict=strict)
        if mt != HF_MODEL_TYPE:
            fail(f"{NAME}.from_pretrained", f"{d / CONFIG_NAME}: model_type",
                 f"{HF_MODEL_TYPE!r} (or {VisualBertConfig.model_type!r}, older vlfast directories)", repr(mt))
        config = config_from_hf(raw)
        if not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{NAME}.from_pretrained: no {WEIGHTS_NAME} in {d} (for pytorch_model.bin: "
                                    f"{NAME}.from_hf)")
        model = cls(config)
        sd = convert_official(load_file(str(d / WEIGHTS_NAME), device=str(map_location)))
        model.load_state_dict(sd, strict=strict)
        return model

    @classmethod
    def from_official(cls, src: Union[Mapping[str, Tensor], str, os.PathLike],
                      config: Optional[VisualBertConfig] = None, *, output_loading_info: bool = False
                      ) -> Union["VisualBert", tuple["VisualBert", ConversionReport]]:
        """Load a state_dict in the official layout: HF's (``VisualBertModel`` keys, or
        ``VisualBertForPreTraining``/task models' with ``visual_bert.``), or the original
        uclanlp ``.th`` layout (``bert.bert.*``); with or without ``module.``.  ``src`` is a
        state_dict or a file (.safetensors/.bin/.pt/.th).

        ``config=None`` infers from tensor shapes: vocab_size, hidden_size,
        max_position_embeddings, type_vocab_size, visual_embedding_dim, num_hidden_layers,
        intermediate_size; and default_visual_token_type_id (0 for the uclanlp layout, else
        HF's 1).  num_attention_heads cannot be inferred: base's 12 when it divides
        hidden_size, else hidden_size // 64, else 1.  The rest are base()'s defaults.

        Returns the model; ``(model, report)`` with ``output_loading_info=True``:
        report.missing = our parameters left at init (also logged as a warning),
        report.unexpected = source keys not used (e.g. the ``cls.*`` heads).  A source
        with none of the model's tensors raises ValueError."""
        model, report = cls._load_official(src, config)
        return finish_loading(f"{NAME}.from_official", model, report, output_loading_info, logger)

    @classmethod
    def _load_official(cls, src: Union[Mapping[str, Tensor], str, os.PathLike],
                       config: Optional[VisualBertConfig]) -> tuple["VisualBert", ConversionReport]:
        sd = dict(load_state_dict_file(src)) if isinstance(src, (str, os.PathLike)) else dict(src)
        original = _is_uclanlp_layout(sd)
        ours = convert_official(sd)
        if config is None:
            config = infer_config(ours, default_visual_token_type_id=0 if original else 1)
        model = cls(config)
        missing, unexpected = load_with_report(model, ours)
        return model, ConversionReport(missing, unexpected)

    @classmethod
    def from_hf(cls, src: Any, config: Optional[VisualBertConfig] = None, *, output_loading_info: bool = False
                ) -> Union["VisualBert", tuple["VisualBert", ConversionReport]]:
        """From HF: a ``VisualBertModel`` / ``VisualBertForPreTraining`` (or any VisualBert
        task model: keys under ``visual_bert.``) module, a directory saved by HF or by
        ``save_pretrained`` (config.json + model.safetensors / pytorch_model.bin), or a
        state_dict.  The config comes from the HF config when there is one (``config``
        overrides; a bare state_dict infers it as ``from_official``).  Returns the model;
        ``(model, report)`` with ``output_loading_info=True`` (as ``from_official``)."""
        if isinstance(src, nn.Module):
            if config is None:
                config = config_from_hf(src.config)
            sd = src.state_dict()
        elif isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
            d = Path(src)
            if config is None:
                if not (d / "config.json").is_file():
                    raise FileNotFoundError(f"{NAME}.from_hf: no config.json in {d}")
                config = config_from_hf(json.loads((d / "config.json").read_text()))
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (d / name).is_file():
                    sd = load_state_dict_file(d / name)
                    break
            else:
                raise FileNotFoundError(f"{NAME}.from_hf: no model.safetensors or pytorch_model.bin in {d}")
        elif isinstance(src, (Mapping, str, os.PathLike)):
            sd = src
        else:
            raise TypeError(f"{NAME}.from_hf: src: expected an HF VisualBert module, a directory or a state_dict, "
                            f"got {type(src).__name__}")
        model, report = cls._load_official(sd, config)
        return finish_loading(f"{NAME}.from_hf", model, report, output_loading_info, logger)

    @classmethod
    def from_bert(cls, src: Any, config: Optional[VisualBertConfig] = None) -> "VisualBert":
        """Initialise the text side (embeddings, encoder layers, pooler) from an HF BERT:
        a directory, an HF ``BertModel``-like module or (state_dict, config dict); see
        ``base.load_hf_bert``.  ``config`` defaults to the BERT's sizes (vocab, hidden,
        layers, heads, intermediate, positions, types, eps, dropouts, pad id) with
        base()'s visual_embedding_dim.  A config with fewer layers takes the BERT's first
        ones.  Visual token-type / position tables are then copied from the text ones
        (when ``special_visual_initialize``); ``visual_projection`` keeps its random init.
        Shape mismatches raise ValueError."""
        sd, bcfg = load_hf_bert(src)
        if config is None:
            act = bcfg.get("hidden_act", "gelu")
            if act != "gelu":
                fail(NAME, "src (BERT config).hidden_act", "'gelu'", repr(act))
            keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
                    "attention_probs_dropout_prob", "initializer_range", "pad_token_id")
            config = VisualBertConfig(**{k: bcfg[k] for k in keys if bcfg.get(k) is not None})
        n = config.num_hidden_layers
        keep = {}
        for k, v in sd.items():
            m = re.match(r"encoder\.layer\.(\d+)\.", k)
            if m is None or int(m.group(1)) < n:
                keep[k] = v
        model = cls(config)
        load_with_report(model, keep)
        if config.special_visual_initialize:
            model.special_visual_initialize()
        return model


# ----------------------------------------------------------------------------------
# Official (HF) layout
# ----------------------------------------------------------------------------------

# the original uclanlp names -> HF's (the renames of HF's conversion script)
_UCLANLP_RENAMES = (("embeddings.token_type_embeddings_visual.", "embeddings.visual_token_type_embeddings."),
                    ("embeddings.position_embeddings_visual.", "embeddings.visual_position_embeddings."),
                    ("embeddings.projection.", "embeddings.visual_projection."))
# buffers some HF versions saved; not parameters
_DROP = ("embeddings.position_ids",)


def _is_uclanlp_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("bert.bert.", "module.bert.bert.")) for k in sd)


def convert_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> ours.  Strips ``module.``, then ``visual_bert.`` (HF task models)
    or ``bert.bert.`` (original uclanlp checkpoints, whose visual names are renamed as HF's
    conversion script does); drops the ``embeddings.position_ids`` buffer.  Other keys
    (heads: ``cls.*``, ``bert.cls.*``, ...) are kept unchanged, so loading reports them
    as unused.  HF ``VisualBertModel`` keys are ours as they are."""
    out: dict[str, Tensor] = {}
    for k, v in strip_prefix(dict(sd), "module.").items():
        if k.startswith("visual_bert."):
            k = k[len("visual_bert."):]
        elif k.startswith("bert.bert."):
            k = k[len("bert.bert."):]
            for old, new in _UCLANLP_RENAMES:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
        if k in _DROP:
            continue
        out[k] = v
    return out


def to_official(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Ours -> HF ``VisualBertModel`` keys (the same names); ``prefix="visual_bert."`` gives
    the keys of the base model inside ``VisualBertForPreTraining`` and the task models."""
    return {prefix + k: v for k, v in sd.items()}


def infer_config(sd: Mapping[str, Tensor], **overrides: Any) -> VisualBertConfig:
    """A config from the shapes of a state_dict with our keys (see ``from_official``)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"{NAME}: state_dict: expected a key {key!r} to infer the config, got none "
                             f"(pass config=...)")
        return tuple(sd[key].shape)

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))]
    if not layers:
        raise ValueError(f"{NAME}: state_dict: expected encoder.layer.N.* keys to infer the config, got none")
    heads = VisualBertConfig.num_attention_heads
    if hidden % heads:
        heads = hidden // 64 if hidden % 64 == 0 else 1
    kw: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=max(layers) + 1, num_attention_heads=heads,
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        visual_embedding_dim=shape("embeddings.visual_projection.weight")[1],
        intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0])
    kw["pad_token_id"] = min(VisualBertConfig.pad_token_id, vocab - 1)
    kw.update(overrides)
    return VisualBertConfig(**kw)


MODEL_CLASS = VisualBert
CONFIG_CLASS = VisualBertConfig

__all__ = ["VisualBertConfig", "VisualBert", "VisualBertEmbeddings", "convert_official", "to_official",
           "infer_config", "config_from_hf", "config_to_hf", "hf_config_json", "HF_MODEL_TYPE", "MODEL_CLASS",
           "CONFIG_CLASS"]
