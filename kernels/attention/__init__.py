"""Attention: padded and packed varlen (reference, Triton kernel, custom ops)."""
