"""The public functional API of vlfast: every op, dispatched per backend.

Masks are bool with True = real token/region.  Shapes: B batch, H heads, L length,
D head dim.  ``backend(name)`` forces a backend inside a ``with`` block;
``VLFAST_BACKEND`` does the same for the whole process.
"""
from __future__ import annotations

from vlfast._dispatch import BackendError, backend, requested_backend
from vlfast.kernels.attention.op import (attention, attention_keep_mask, varlen_attention,
                                         varlen_keep_mask)
from vlfast.kernels.co_attention.op import co_attention, co_attention_keep_masks
from vlfast.kernels.dropout_mask import keep_mask
from vlfast.kernels.embeddings.op import (embeddings_keep_mask, text_embeddings, text_embeddings_keep_mask,
                                          uniter_visual_embeddings, uniter_visual_embeddings_keep_mask,
                                          vilbert_visual_embeddings, vilbert_visual_embeddings_keep_mask,
                                          visualbert_visual_embeddings, visualbert_visual_embeddings_keep_mask,
                                          vlbert_visual_embeddings, vlbert_visual_embeddings_keep_mask)
from vlfast.kernels.bias_gelu.op import bias_gelu
from vlfast.kernels.layer_norm.op import (dropout_add_layer_norm, dropout_add_layer_norm_keep_mask,
                                          layer_norm)
from vlfast.kernels.linear_cross_entropy.op import linear_cross_entropy, linear_soft_cross_entropy
from vlfast.kernels.ot.op import ipot, sinkhorn, wra_distance

__all__ = [
    "BackendError", "backend", "requested_backend",
    "attention", "attention_keep_mask", "varlen_attention", "varlen_keep_mask",
    "co_attention", "co_attention_keep_masks", "keep_mask",
    "ipot", "sinkhorn", "wra_distance",
    "layer_norm", "dropout_add_layer_norm", "dropout_add_layer_norm_keep_mask", "bias_gelu",
    "text_embeddings", "uniter_visual_embeddings", "vilbert_visual_embeddings", "vlbert_visual_embeddings",
    "visualbert_visual_embeddings", "embeddings_keep_mask", "text_embeddings_keep_mask",
    "uniter_visual_embeddings_keep_mask", "vilbert_visual_embeddings_keep_mask", "vlbert_visual_embeddings_keep_mask",
    "visualbert_visual_embeddings_keep_mask",
    "linear_cross_entropy", "linear_soft_cross_entropy",
]
