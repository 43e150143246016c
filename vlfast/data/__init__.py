"""vlfast.data: synthetic world, feature-store readers, samplers and collators."""
