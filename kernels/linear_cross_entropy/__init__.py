"""Fused linear + cross-entropy (hard labels and soft targets / KL) without the N x V
logits: reference, Triton row kernel, custom ops."""
