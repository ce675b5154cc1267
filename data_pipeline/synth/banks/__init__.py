"""Phrase banks: data only. records (topics, personas, the five parts' phrasings, crisis questions) for the template
generator and both generators' topics; sessions (the session arc's lines); structure_seed (hand-written exemplars
of each CBT part for training the structure scorer); structure_corpus.jsonl.zst (the frozen template records the
scorer also trains on, data_pipeline/synth/scorer.py)."""
