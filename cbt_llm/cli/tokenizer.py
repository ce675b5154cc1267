"""`cbt-llm tokenizer train`: a byte-level BPE tokenizer with the ChatML template, trained on the corpus (the demo's;
real runs use the base model's own)."""

from __future__ import annotations

from cbt_llm.cli.args import Flag, add_common
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--input", "tokenizer.input", str, "glob of corpus shards"),
    ("--vocab-size", "tokenizer.vocab_size", int, "vocabulary size"),
    ("--out", "tokenizer.out_dir", str, "tokenizer folder"),
]


def run(cfg: Config, args) -> int:
    from data_pipeline.tokenizer import train_tokenizer

    train_tokenizer(cfg.tokenizer)
    return 0


def add_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer on the corpus")
    add_common(p, FLAGS)
    p.set_defaults(func=run)
