"""The near-line trainer: incremental SFT from the training-samples stream, gated publish to Triton, rollback."""
