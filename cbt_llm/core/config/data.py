"""Config sections of the data stage: `tokenizer train` (tokenizer) and `prepare` (data, with its near-duplicate
pass and quality gate)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cbt_llm.core.config.base import Section


class TokenizerConfig(Section):
    """`cbt-llm tokenizer train`: byte-level BPE trained on the corpus for the embedded demo."""

    input: str = Field("", description="Glob of corpus JSONL shards (empty: <synth.out_dir>/*.jsonl*).")
    vocab_size: int = Field(8000, ge=300, description="Vocabulary size including special tokens.")
    min_frequency: int = Field(2, ge=1)
    max_records: int = Field(200_000, ge=0, description="Train on at most this many records (0: all).")
    out_dir: str = Field("", description="Hugging Face tokenizer folder to write (empty: runs/<run_name>/tokenizer).")


class NearDupConfig(Section):
    """prepare's near-duplicate pass: MinHash LSH over character shingles of each example's user and assistant
    turns (data_pipeline/prepare/neardup.py); the first copy in (file, line) order is kept."""

    enabled: bool = Field(False, description="Remove near-duplicates (off: shards exactly as without the pass).")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets at which two examples are near-copies."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    shingle: int = Field(5, ge=1, le=32, description="Characters per shingle (after dropping whitespace, punctuation).")


class QualityConfig(Section):
    """prepare's quality gate: examples under a threshold go to rejects as low_quality with their score."""

    min_structure_coverage: int = Field(
        0, ge=0, le=5, description="Least CBT parts (0-5) the structure scorer must find in the answer (0: off)."
    )
    min_judge_total: float = Field(
        0.0,
        ge=0.0,
        description="Least meta.judge.total a judged record must carry (0: off; records without one pass this check).",
    )
    scorer: str = Field(
        "runs/structure_scorer.npz",
        description="The structure scorer .npz (built on first use, ~15 s), read when min_structure_coverage > 0.",
    )


class DataConfig(Section):
    """`cbt-llm prepare`: Ray Data validates, splits, templates, tokenizes, masks, packs and writes shards."""

    inputs: list[str] = Field(default_factory=list, description="Globs or URIs (empty: [<synth.out_dir>/*.jsonl*]).")
    format: Literal["cbt", "psyqa", "alpaca", "sharegpt", "messages", "preference"] = Field(
        "cbt",
        description="Declared input format (messages: OpenAI-messages sessions, as synth --sessions writes; "
        "preference: chosen/rejected answer pairs, ours, OpenAI's or TRL's, for train.objective dpo).",
    )
    out_dir: str = Field(
        "", description="Output folder (train/, validation/, rejects/, manifest.json; empty: runs/<run_name>/data)."
    )
    tokenizer: str = Field("", description="Tokenizer folder or Hugging Face id (empty: <tokenizer.out_dir>).")
    system_prompt: str = Field(
        "你是一名经验丰富的心理咨询师,专长于认知行为疗法,以心理咨询师的身份回答以下问题",
        description="System prompt put in front of every conversation.",
    )
    seq_len: int = Field(1024, ge=16, description="Packed row length in tokens.")
    packing: bool = Field(True, description="Pack examples into rows (false: one padded example per row).")
    packer: Literal["best", "bfd"] = Field(
        "best",
        description="best: per window, the fewest rows of two target-fill packers and best-fit-decreasing "
        "(data_pipeline/packing.py); bfd: best-fit-decreasing alone (about 4x faster, as full only on long-tailed "
        "lengths).",
    )
    pack_window: int = Field(
        20_000, ge=1, description="Examples per packing window (the packer sees one window at a time)."
    )
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of questions held out (by hash).")
    overlong: Literal["auto", "truncate", "reject", "split"] = Field(
        "auto",
        description="Policy for examples over seq_len: truncate, reject, or split on turn boundaries into pieces "
        "(data_pipeline/prepare/split.py); auto: split for format messages, truncate otherwise.",
    )
    max_chars: int = Field(20_000, ge=1, description="Records with more characters than this are rejected.")
    on_input_error: Literal["stop", "quarantine"] = Field(
        "stop",
        description="A damaged input file (unreadable, a zstd stream cut short or failing its checksum, a JSONL "
        "file ending mid-record, a synth shard that differs from its synth_summary.json): stop = fail with one "
        "line naming the file and how far the read got, writing nothing; quarantine = prepare without it and list "
        "it (reason, lines read) in the manifest's `quarantined` and the summary.",
    )
    num_shards: int = Field(0, ge=0, description="Train shards to write (0: a multiple of world_size).")
    world_size: int = Field(
        8,
        ge=1,
        description="Training ranks the shards are sized for (their count is a multiple of it, so 8 also serves 1, 2 "
        "or 4 ranks); `cbt-llm launch` starts this many unless launch.gpus_per_node says otherwise.",
    )
    ray_object_store_mb: int = Field(
        1024,
        ge=100,
        description="Object store size of the embedded local Ray (bounds prepare's memory; not used on a cluster).",
    )
    seed: int = 0
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    rows_per_shard: int = Field(
        16_384,
        ge=1,
        description="Train rows per shard when num_shards is 0: the shard count is the smallest multiple of world_size "
        "that keeps shards at or under this many rows.",
    )
    # Ray Data execution (ray_*): speed and memory of prepare, never the content of the shards
    ray_block_mb: int = Field(
        8,
        ge=1,
        description="Ray Data's target block size, MiB. Ray's default (128) holds a whole input file's records in one "
        "block and stalls the ordered stream until the corpus is in the object store; small blocks keep it flowing.",
    )
    ray_read_lines: int = Field(
        2048, ge=1, description="Input lines (or Parquet rows) per block out of the file reader."
    )
    ray_tokenize_batch: int = Field(
        1024,
        ge=1,
        description="Records per Ray Data batch sent to a prepare actor, which parses, validates, screens, "
        "tokenizes and masks them (one actor per CPU at most).",
    )
