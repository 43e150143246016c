"""LayerNorm and fused dropout + residual + LayerNorm (reference, Triton kernel, custom ops)."""
