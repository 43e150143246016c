"""Co-attention: both directions of ViLBERT's co-attentional layer in one launch."""
