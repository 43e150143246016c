"""Fused embedding ops: text embeddings (gather-sum, LayerNorm, dropout) and the visual
embeddings of UNITER, ViLBERT, VL-BERT and VisualBERT (everything after their matmuls)."""
