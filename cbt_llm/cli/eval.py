"""`cbt-llm eval`: several models answer held-out questions and are scored side by side (reference metrics, CBT
structure, safety, optional LLM judges and multi-turn sessions)."""

from __future__ import annotations

import argparse

from cbt_llm.cli.args import Flag, add_common, add_switch
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--questions", "eval.questions", str, "heldout.jsonl, a PsyQA JSON or our corpus JSONL"),
    ("--predictions", "eval.predictions", str, "score this JSONL of {id, output, reference?}; no model needed"),
    ("--out", "eval.out_dir", str, "output folder"),
    ("--limit", "eval.limit", int, "evaluate the first N questions"),
    ("--max-new-tokens", "eval.max_new_tokens", int, "longest answer in tokens"),
]


def run(cfg: Config, args) -> int:
    from evaluation.run import run_eval

    run_eval(cfg)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="answer held-out questions with several models and score them side by side")
    add_common(p, FLAGS)
    p.add_argument("--model", dest="eval_model", default=None, help="one model folder (replaces eval.models)")
    p.add_argument("--adapter", dest="eval_adapter", default=None, help="a LoRA adapter on top of --model")
    add_switch(
        p,
        "--sessions",
        "eval.sessions.enabled",
        "multi-turn sessions with a client simulator too, judged on CTRS (eval.sessions)",
    )
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
