"""The data stage: corpus in, tokenized packed shards out.

synth/      building the corpus: offline generators, the API jobs, phrase banks, the structure scorer's training
sources/    where records come from: PsyQA and the input formats prepare reads
prepare/    `cbt-llm prepare`: corpus files -> validated, deduplicated, tokenized, packed Parquet shards
packing     the packers: tokenized examples into fixed-capacity rows
shards      the prepare -> train contract: the shards' row schema and manifest.json, read by train and launch
tokenizer   `cbt-llm tokenizer train`: the demo's byte-level BPE, and loading and hashing any tokenizer
io          file helpers the corpus stages share: globs, the (zstd) line reader, JSON lines
"""
