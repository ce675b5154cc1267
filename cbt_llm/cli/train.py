"""`cbt-llm train`: DeepSpeed ZeRO training on the packed shards, run under torchrun, the deepspeed launcher, Slurm
or a Ray job (every launcher runs this same recipe on every rank)."""

from __future__ import annotations

import argparse

from cbt_llm.cli.args import Flag, add_common
from cbt_llm.core.config import Config

FLAGS: list[Flag] = [
    ("--data", "train.data_dir", str, "folder written by `cbt-llm prepare`"),
    ("--run-dir", "train.run_dir", str, "checkpoints, metrics and W&B files"),
    ("--model", "model.name_or_path", str, "Hugging Face id or local folder"),
    ("--max-steps", "train.max_steps", int, "optimizer steps (0: train.epochs)"),
]


def run(cfg: Config, args) -> int:
    from train.recipe import run_train

    return run_train(cfg, gen_eval=generation_eval(cfg))


def generation_eval(cfg: Config):
    """train.gen_eval_every's hook: the evaluation stage's generation eval on the training model (train does not
    import the evaluation stage; the CLI, above both, hands it over). None when it is off."""
    if not cfg.train.gen_eval_every:
        return None
    from evaluation.intrain import TrainingGenEval
    from train.runtime import dist_env

    return TrainingGenEval(cfg, rank=dist_env()[0])


def dry_run(cfg: Config) -> str:
    from train.plan import batch_arithmetic

    return batch_arithmetic(cfg)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="DeepSpeed ZeRO training on the packed shards (run under torchrun/deepspeed)")
    add_common(p, FLAGS)
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run, dry_run_text=dry_run)
