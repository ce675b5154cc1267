"""`cbt-llm chat`: talk to a model in the terminal (a local model, or an OpenAI-compatible server), or answer a
JSONL file of conversations with `--batch`; every reply goes through the crisis guard."""

from __future__ import annotations

from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError

DEFAULT_MAX_TOKENS = 512  # the longest reply when --max-tokens is not given (less when the context has less left)


def run(cfg: Config, args) -> int:
    from cbt_llm.inference.safety_model import build_guard
    from serve.chat import run_batch, run_chat
    from serve.context import ReplyBudget
    from serve.engine import Engine, check_model_args
    from serve.remote import RemoteEngine

    bad_length = args.max_tokens is not None and args.max_tokens < 1
    if bad_length or not 0.0 <= args.temperature <= 2.0 or not 0.0 < args.top_p <= 1.0:
        raise ConfigError("--max-tokens must be >= 1, --temperature in [0, 2] and --top-p in (0, 1]")
    if bool(args.model) == bool(args.url):
        raise ConfigError("chat needs exactly one of --model (a local model) or --url (an OpenAI-compatible server)")
    if bool(args.batch) != bool(args.out):
        raise ConfigError("--batch and --out go together: --batch in.jsonl --out out.jsonl")
    if args.batch and not Path(args.batch).is_file():
        raise ConfigError(f"--batch: '{args.batch}' not found")
    if args.url:
        if args.adapter:
            raise ConfigError("--adapter needs --model; a server behind --url serves its own model")
        engine = RemoteEngine(args.url, model=args.remote_model)
    else:
        check_model_args(args.model, args.adapter or "")
        engine = Engine.load(args.model, args.adapter or "", device=args.device, dtype=args.dtype)
    # a local model: each reply gets what its context has left, at most --max-tokens, the oldest turns dropped when
    # there is too little left (unless --no-trim); a server sizes the reply itself unless --max-tokens says
    advice = "写短一些，或 /reset 开始新的对话" if not args.batch else "shorten the conversation"
    fit = ReplyBudget(engine, cap=args.max_tokens or DEFAULT_MAX_TOKENS, trim=not args.no_trim, advice=advice)
    asked = args.max_tokens if isinstance(engine, RemoteEngine) else None
    gen = {"max_new_tokens": asked, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if args.batch:
        counts = run_batch(engine, args.batch, args.out, build_guard(cfg.guard), system=args.system, fit=fit, **gen)
        print(
            f"chat --batch: {counts['answered']} answered, {counts['bad']} bad lines (with their reason) in {args.out}"
        )
        return 0
    return run_chat(engine, build_guard(cfg.guard), system=args.system, fit=fit, **gen)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal, through the crisis guard")
    p.add_argument("--model", default=None, help="exported model folder (`cbt-llm export`) or base model")
    p.add_argument("--url", default=None, help="an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--remote-model", default=None, help="model name to ask the --url server for (default: its first)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder on top of --model")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"longest reply in tokens (default: what the model's context has left, at most {DEFAULT_MAX_TOKENS}; "
        "with --url: what the server gives)",
    )
    p.add_argument(
        "--no-trim",
        action="store_true",
        help="a conversation longer than the model's context fails instead of dropping its oldest turns",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as `cbt-llm eval` decodes")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--system", default="", help="system prompt (default: the one export.json records, if any)")
    p.add_argument("--batch", default=None, help="answer a JSONL file, one {id?, messages} or {id?, text} a line")
    p.add_argument("--out", default=None, help="with --batch: the JSONL file of guarded replies")
    p.add_argument("--config", default=None, help="YAML config: its guard section (a trained guard, a model tier)")
    p.set_defaults(func=run, overrides=[], dry_run=False)
