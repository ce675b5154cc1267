"""`cbt-llm export`: a run's checkpoint consolidated into a Hugging Face model folder or a LoRA adapter."""

from __future__ import annotations

from cbt_llm.cli.args import Flag, add_common
from cbt_llm.core.config import Config

# the run to export; the model is rebuilt from that run's own saved config.yaml, not from --config
FLAGS: list[Flag] = [("--run", "train.run_dir", str, "the run folder to export")]


def run(cfg: Config, args) -> int:
    from train.export import run_export

    run_export(cfg.train.run_dir, args.out, merge_lora=args.merge_lora, tag=args.tag)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="consolidate a run's checkpoint into a Hugging Face model or LoRA adapter")
    add_common(p, FLAGS)
    p.add_argument("--out", required=True, help="output folder (safetensors + tokenizer)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights")
    p.add_argument("--tag", default=None, help="checkpoint folder name (default: latest)")
    p.set_defaults(func=run)
