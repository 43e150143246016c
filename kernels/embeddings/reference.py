"""Eager PyTorch embedding sums: the test oracle and the CPU path.

Each function computes exactly what the plain-torch model code it replaces computes --
the same torch ops, in the same order, in the inputs' dtype -- so on CPU a model's
outputs stay bitwise identical after switching to the op (dropout off).  Dropout, when
``dropout_p > 0``, is ``y * keep / (1 - p)`` with the bool ``keep`` mask of the op's
``*_keep_mask`` helper (element i of the (B,L,E) output, C order, uses Philox counter
``offset + i``).

Shapes: B batch, L length (Lv regions), E hidden, A aligned words per region.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _dropout(y: Tensor, dropout_p: float, keep: Optional[Tensor]) -> Tensor:
    if dropout_p <= 0.0:
        return y
    if keep is None:
        raise ValueError("embeddings reference: dropout_p > 0 needs keep (B,L,E) bool")
    return y * keep / (1.0 - dropout_p)


def text_embeddings(input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor, word_weight: Tensor,
                    position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                    padding_idx: Optional[int] = None, eps: float = 1e-12, dropout_p: float = 0.0,
                    keep: Optional[Tensor] = None) -> Tensor:
    """BERT's embeddings: ``dropout(LN((word[ids] + pos[position_ids]) + type[token_type_ids]))``.

    ids (B,L) integer; tables (V,E), (P,E), (T,E); ln (E,).  Returns (B,L,E)."""
    e = F.embedding(input_ids, word_weight, padding_idx) + F.embedding(position_ids, position_weight) \
        + F.embedding(token_type_ids, type_weight)
    y = F.layer_norm(e, (e.shape[-1],), ln_weight, ln_bias, eps)
    return _dropout(y, dropout_p, keep)


def uniter_visual_embeddings(img_proj: Tensor, pos_proj: Tensor, type_ids: Tensor, type_weight: Tensor,
                             img_ln_weight: Tensor, img_ln_bias: Tensor, pos_ln_weight: Tensor,
                             pos_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, *, eps: float = 1e-12,
                             dropout_p: float = 0.0, keep: Optional[Tensor] = None) -> Tensor:
    """UNITER's region embeddings after the two Linear layers:
    ``dropout(LN((LN_img(img_proj) + LN_pos(pos_proj)) + type[type_ids]))``.

    img_proj, pos_proj (B,Lv,E); type_ids (B,Lv); type_weight (T,E).  Returns (B,Lv,E)."""
    E = img_proj.shape[-1]
    img = F.layer_norm(img_proj, (E,), img_ln_weight, img_ln_bias, eps)
    pos = F.layer_norm(pos_proj, (E,), pos_ln_weight, pos_ln_bias, eps)
    e = img + pos + F.embedding(type_ids, type_weight)
    return _dropout(F.layer_norm(e, (E,), ln_weight, ln_bias, eps), dropout_p, keep)


def vilbert_visual_embeddings(img_proj: Tensor, loc_proj: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                              eps: float = 1e-12, dropout_p: float = 0.0, keep: Optional[Tensor] = None) -> Tensor:
    """ViLBERT's region embeddings after the feature and location Linear layers:
    ``dropout(LN(img_proj + loc_proj))``; (B,Lv,Ev) -> (B,Lv,Ev)."""
    e = img_proj + loc_proj
    return _dropout(F.layer_norm(e, (e.shape[-1],), ln_weight, ln_bias, eps), dropout_p, keep)


def vlbert_visual_embeddings(obj_hidden: Tensor, position_ids: Tensor, token_type_ids: Tensor, img_weight: Tensor,
                             position_weight: Tensor, type_weight: Tensor, visual_ln_weight: Tensor,
                             visual_ln_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                             visual_mask: Optional[Tensor] = None, relu: bool = True, eps: float = 1e-12,
                             dropout_p: float = 0.0, keep: Optional[Tensor] = None) -> Tensor:
    """VL-BERT's object slots after ``obj_downsample`` (or ``visual_1x1_object``):
    ``x = relu(obj_hidden)`` (when ``relu``) ``* visual_mask``; then
    ``dropout(LN(((img[0] + LN_vis(x)) + pos[position_ids]) + type[token_type_ids]))``.

    obj_hidden (B,Lv,E); visual_mask (B,Lv) bool or None; ids (B,Lv); img_weight (1,E)
    (the [IMG] row); tables (P,E), (T,E).  Returns (B,Lv,E)."""
    E = obj_hidden.shape[-1]
    x = F.relu(obj_hidden) if relu else obj_hidden
    if visual_mask is not None:
        x = x * visual_mask[..., None].to(x.dtype)
    obj = img_weight[0] + F.layer_norm(x, (E,), visual_ln_weight, visual_ln_bias, eps)
    e = obj + F.embedding(position_ids, position_weight) + F.embedding(token_type_ids, type_weight)
    return _dropout(F.layer_norm(e, (E,), ln_weight, ln_bias, eps), dropout_p, keep)


def visualbert_visual_embeddings(visual_proj: Tensor, token_type_ids: Tensor, image_text_alignment: Optional[Tensor],
                                 type_weight: Tensor, visual_position_weight: Tensor, position_weight: Tensor,
                                 ln_weight: Tensor, ln_bias: Tensor, *, eps: float = 1e-12, dropout_p: float = 0.0,
                                 keep: Optional[Tensor] = None) -> Tensor:
    """VisualBERT's region slots after ``visual_projection``:
    ``pos = visual_pos[0]``, or with ``image_text_alignment`` (B,Lv,A) (word positions,
    -1 = none) ``pos = sum_j pos_table[a_j] * [a_j != -1] / max(1, #aligned) + visual_pos[0]``;
    then ``dropout(LN((visual_proj + pos) + visual_type[token_type_ids]))``.

    visual_proj (B,Lv,E); token_type_ids (B,Lv); type_weight (T,E) (visual token types);
    visual_position_weight (P,E) (only row 0 is used); position_weight (P,E) (the text
    position table).  Returns (B,Lv,E)."""
    pos = visual_position_weight[0]
    if image_text_alignment is not None:
        real = image_text_alignment != -1
        w = real.to(visual_proj.dtype)
        words = F.embedding(image_text_alignment.clamp(min=0), position_weight) * w[..., None]
        count = w.sum(2).clamp(min=1.0)
        pos = words.sum(2) / count[..., None] + pos
    e = visual_proj + pos + F.embedding(token_type_ids, type_weight)
    return _dropout(F.layer_norm(e, (e.shape[-1],), ln_weight, ln_bias, eps), dropout_p, keep)
