"""`cbt-llm prepare`: validate, deduplicate, split, tokenize, mask and pack the corpus into Parquet shards with a
manifest, with Ray Data (locally or on a cluster)."""

from __future__ import annotations

import sys

from cbt_llm.cli.args import Flag, add_common
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--out", "data.out_dir", str, "output folder"),
    ("--tokenizer", "data.tokenizer", str, "tokenizer folder or HF id"),
]


def run(cfg: Config, args) -> int:
    from data_pipeline.prepare import PrepareError, run_prepare

    try:
        run_prepare(cfg, strict=args.strict, ray_address=args.ray_address)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="validate, split, tokenize, mask and pack the corpus with Ray Data")
    add_common(p, FLAGS)
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS or local)")
    p.set_defaults(func=run)
