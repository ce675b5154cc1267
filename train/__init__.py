"""Training: packed shards in, checkpoints and metrics out."""
