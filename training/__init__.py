"""vlfast.training: the training stack (for now, the demo run by python -m vlfast.train)."""
