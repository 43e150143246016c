"""Bias + erf GELU, BERT's intermediate activation (reference, Triton kernel, custom ops)."""
