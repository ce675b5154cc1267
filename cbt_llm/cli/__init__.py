"""`cbt-llm`: one command, one subcommand per stage, one module per subcommand.

Every subcommand takes `--config FILE`, its own flags (which are shorthands for config fields), dotted
overrides (`data.seq_len=1024`) and `--dry-run` (print the resolved config and exit). Flags win over the
YAML; overrides win over flags. Nothing in the product imports this package: it is the top layer, and it imports
each stage lazily, inside the subcommand that runs it.
"""

from __future__ import annotations

import argparse
import sys

from cbt_llm.cli import chat, eval, export, guard, launch, pairs, prepare, serve, synth, tokenizer, train
from cbt_llm.cli.args import resolve
from cbt_llm.core.errors import ConfigError

SUBCOMMANDS = (synth, pairs, tokenizer, prepare, train, export, eval, launch, serve, chat, guard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbt-llm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        if getattr(args, "dry_run_text", None):
            print(args.dry_run_text(cfg))
        return 0
    try:
        return args.func(cfg, args)
    except (ConfigError, OSError) as exc:  # a bad setting, a missing or damaged file: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
