"""`cbt-llm pairs`: preference pairs from a model's own answers. It samples `pairs.n` answers per question from a
model (e.g. the SFT export), ranks them by the offline scorers (CBT structure, the guard's output check, crisis
support, length) and, when `pairs.judge` is set, an LLM judge, and writes the best against the worst in the pair
format prepare's `data.format: preference` reads (data_pipeline/synth/model_pairs.py)."""

from __future__ import annotations

from cbt_llm.cli.args import Flag, add_common
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--model", "pairs.model", str, "the model that answers: an exported folder, a base folder or Hub id"),
    ("--adapter", "pairs.adapter", str, "a LoRA adapter on top of --model"),
    ("--questions", "pairs.questions", str, "heldout.jsonl, a PsyQA JSON or our corpus JSONL"),
    ("--out", "pairs.out", str, "the pairs JSONL (samples.jsonl, rejects.jsonl and summary.json go beside it)"),
    ("--n", "pairs.n", int, "answers sampled per question"),
    ("--temperature", "pairs.temperature", float, "sampling temperature"),
    ("--top-p", "pairs.top_p", float, "nucleus sampling's top_p"),
    ("--max-new-tokens", "pairs.max_new_tokens", int, "longest answer in tokens"),
    ("--seed", "pairs.seed", int, "sampling seed (a question's answers repeat for the same seed)"),
    ("--min-margin", "pairs.min_margin", float, "least quality gap (0-1) within a safety tier"),
    ("--limit", "pairs.limit", int, "use the first N questions"),
]


def run(cfg: Config, args) -> int:
    from data_pipeline.synth.model_pairs import run_model_pairs

    summary = run_model_pairs(cfg)
    return 0 if summary["pairs"] > 0 or summary["this_run"]["questions"] == 0 else 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pairs", help="preference pairs: sample n answers per question from a model, rank them, best vs worst"
    )
    add_common(p, FLAGS)
    p.set_defaults(func=run)
