"""Corpus building (synth) and preparation (prepare): corpus in, tokenized packed shards out."""
