"""What every subcommand's arguments share: `--config FILE`, shorthand flags that set one config field each,
dotted overrides and `--dry-run`, resolved into one Config. Flags win over the YAML; overrides win over flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from cbt_llm.core.config import Config, load_config
from cbt_llm.core.errors import ConfigError

# (flag, dotted config key, type, help): a shorthand flag stores its value under its config key
Flag = tuple[str, str, type, str]


def add_flags(p: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """Each shorthand flag, stored under `flag:<dotted key>` (see resolve)."""
    for flag, dotted, typ, help_ in flags:
        p.add_argument(
            flag,
            dest="flag:" + dotted,
            type=typ,
            default=None,
            metavar=dotted.rsplit(".", 1)[-1].upper(),
            help=f"{help_} ({dotted})",
        )


def add_switch(p: argparse.ArgumentParser, flag: str, dotted: str, help_: str) -> None:
    """A flag that sets a boolean config field to true."""
    p.add_argument(flag, dest="flag:" + dotted, action="store_const", const=True, default=None, help=help_)


def add_common(p: argparse.ArgumentParser, flags: list[Flag], dry_run: bool = True) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_flags(p, flags)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=1024")


def resolve(args: argparse.Namespace) -> Config:
    """The config of one command line: the YAML, then the flags, then the overrides."""
    extra: dict = {}
    if getattr(args, "eval_model", None):  # `eval --model DIR [--adapter DIR]`: one model, instead of eval.models
        name = Path(args.eval_model.rstrip("/")).name or args.eval_model
        extra["eval"] = {"models": [{"name": name, "path": args.eval_model, "adapter": args.eval_adapter or ""}]}
    elif getattr(args, "eval_adapter", None):
        raise ConfigError("--adapter needs --model (the base model the adapter applies to)")
    for dest, value in vars(args).items():
        if dest.startswith("flag:") and value is not None:
            node = extra
            parts = dest[5:].split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []), extra)
