"""`cbt-llm`: one command, one subcommand per stage.

Every subcommand takes `--config FILE`, its own flags (which are shorthands for config fields), dotted
overrides (`data.seq_len=1024`) and `--dry-run` (print the resolved config and exit). Flags win over the
YAML; overrides win over flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cbt_llm.core.config import Config, load_config
from cbt_llm.core.errors import ConfigError

# flag dest -> dotted config key, per subcommand
_FLAGS: dict[str, list[tuple[str, str, type, str]]] = {
    "synth template": [
        ("--num-records", "synth.num_records", int, "records to generate"),
        ("--seed", "synth.seed", int, "random seed"),
        ("--out", "synth.out_dir", str, "output folder"),
        ("--num-shards", "synth.num_shards", int, "number of output shards"),
        ("--compress", "synth.compress", str, "none or zstd"),
        ("--crisis-fraction", "synth.crisis_fraction", float, "fraction of crisis (suicide/self-harm) questions"),
        ("--workers", "synth.workers", int, "parallel processes (1: single process, 0: one per CPU)"),
        ("--min-turns", "synth.min_turns", int, "sessions: fewest turns"),
        ("--max-turns", "synth.max_turns", int, "sessions: most turns"),
    ],
    "synth api": [
        ("--input", "api.input", str, "PsyQA JSON or our JSONL"),
        ("--out", "api.out_dir", str, "output folder"),
        ("--base-url", "api.base_url", str, "OpenAI-compatible base URL, e.g. http://host:8000/v1"),
        ("--model", "api.model", str, "model name"),
        ("--api-key-env", "api.api_key_env", str, "environment variable that holds the API key"),
        ("--concurrency", "api.concurrency", int, "requests in flight"),
        ("--timeout", "api.timeout_s", float, "per-request timeout, seconds"),
        ("--max-retries", "api.max_retries", int, "retries per question"),
        ("--limit", "api.limit", int, "process at most N questions"),
        ("--num-sessions", "api.num_sessions", int, "sessions without --input: how many"),
        ("--max-turns", "api.max_turns", int, "sessions: turn limit"),
    ],
    "tokenizer train": [
        ("--input", "tokenizer.input", str, "glob of corpus shards"),
        ("--vocab-size", "tokenizer.vocab_size", int, "vocabulary size"),
        ("--out", "tokenizer.out_dir", str, "tokenizer folder"),
    ],
    "prepare": [
        ("--out", "data.out_dir", str, "output folder"),
        ("--tokenizer", "data.tokenizer", str, "tokenizer folder or HF id"),
    ],
    "train": [
        ("--data", "train.data_dir", str, "folder written by `cbt-llm prepare`"),
        ("--run-dir", "train.run_dir", str, "checkpoints, metrics and W&B files"),
        ("--model", "model.name_or_path", str, "Hugging Face id or local folder"),
        ("--max-steps", "train.max_steps", int, "optimizer steps (0: train.epochs)"),
    ],
    # the run to export; the model is rebuilt from that run's own saved config.yaml, not from --config
    "export": [
        ("--run", "train.run_dir", str, "the run folder to export"),
    ],
    "eval": [
        ("--questions", "eval.questions", str, "heldout.jsonl, a PsyQA JSON or our corpus JSONL"),
        ("--predictions", "eval.predictions", str, "score this JSONL of {id, output, reference?}; no model needed"),
        ("--out", "eval.out_dir", str, "output folder"),
        ("--limit", "eval.limit", int, "evaluate the first N questions"),
        ("--max-new-tokens", "eval.max_new_tokens", int, "longest answer in tokens"),
    ],
    "launch": [
        ("--nodes", "launch.nodes", int, "machines"),
        ("--gpus-per-node", "launch.gpus_per_node", int, "GPUs per machine (processes per machine on CPU)"),
    ],
}


def _add_flags(p: argparse.ArgumentParser, key: str) -> None:
    """The subcommand's shorthand flags, each stored under its dotted config key (see _resolve)."""
    for flag, dotted, typ, help_ in _FLAGS.get(key, []):
        p.add_argument(
            flag,
            dest="flag:" + dotted,
            type=typ,
            default=None,
            metavar=dotted.rsplit(".", 1)[-1].upper(),
            help=f"{help_} ({dotted})",
        )


def _add_common(p: argparse.ArgumentParser, key: str) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _add_flags(p, key)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=1024")


def _resolve(args: argparse.Namespace) -> Config:
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
    return load_config(args.config, args.overrides, extra)


def _cmd_synth_template(cfg: Config, args) -> int:
    if cfg.synth.sessions:
        from data_pipeline.synth.sessions import run_synth_sessions

        run_synth_sessions(cfg.synth)
        return 0
    from data_pipeline.synth.template import run_synth_template

    run_synth_template(cfg.synth)
    return 0


def _cmd_synth_api(cfg: Config, args) -> int:
    if cfg.api.sessions:
        from data_pipeline.synth.api_sessions import run_synth_api_sessions as run
    elif cfg.api.agents.enabled:
        # data_pipeline may not import evaluation: the CLI hands the agents loop the judge's rubric as its critic
        from cbt_llm.domain.rubrics import RUBRICS, RubricCritic
        from data_pipeline.synth.agents import run_synth_api_agents

        critic = RubricCritic(RUBRICS[cfg.api.agents.rubric])

        def run(api):
            return run_synth_api_agents(api, critic)
    else:
        from data_pipeline.synth.api import run_synth_api as run

    summary = run(cfg.api)
    return 0 if summary.get("ok", 0) + summary.get("skipped", 0) > 0 or summary.get("total", 0) == 0 else 1


def _cmd_tokenizer_train(cfg: Config, args) -> int:
    from data_pipeline.tokenizer import train_tokenizer

    train_tokenizer(cfg.tokenizer)
    return 0


def _cmd_prepare(cfg: Config, args) -> int:
    from data_pipeline.prepare import PrepareError, run_prepare

    try:
        run_prepare(cfg, strict=args.strict, ray_address=args.ray_address)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_train(cfg: Config, args) -> int:
    from train.recipe import run_train
    from train.runtime import dist_env

    gen_eval = None
    if cfg.train.gen_eval_every:
        from evaluation.intrain import TrainingGenEval

        gen_eval = TrainingGenEval(cfg, rank=dist_env()[0])
    return run_train(cfg, gen_eval=gen_eval)


def _cmd_export(cfg: Config, args) -> int:
    from train.export import run_export

    run_export(cfg.train.run_dir, args.out, merge_lora=args.merge_lora, tag=args.tag)
    return 0


def _cmd_eval(cfg: Config, args) -> int:
    from evaluation.run import run_eval

    run_eval(cfg)
    return 0


def _cmd_launch(cfg: Config, args) -> int:
    from launch.render import TrainCommand
    from launch.submit import run_launch

    cmd = TrainCommand(config=args.config, overrides=list(args.overrides))
    return run_launch(args.launcher, cfg, cmd, dry_run=args.launch_dry_run, node_rank=args.node_rank, wait=args.wait)


def _cmd_serve(cfg: Config, args) -> int:
    from serve.app import serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise ConfigError(f"--api-key-env: the environment variable {args.api_key_env} is unset or empty")
    if args.max_queue < 0 or args.max_body_bytes < 1 or args.max_tokens_limit < 1:
        raise ConfigError("--max-queue must be >= 0, --max-body-bytes and --max-tokens-limit >= 1")
    if args.max_batch < 1 or args.batch_window_ms < 0:
        raise ConfigError("--max-batch must be >= 1 and --batch-window-ms >= 0")
    engine = serve_engine(args)
    serve(
        engine,
        host=args.host,
        port=args.port,
        graceful_s=args.graceful_timeout,
        max_tokens_limit=args.max_tokens_limit,
        api_key=api_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


def serve_engine(args):
    """The engine behind `cbt-llm serve`: --backend proxy forwards to --upstream; otherwise the model loads with
    eval's backend rule (auto: vLLM when installed and on CUDA, else transformers) behind the batching loop."""
    from cbt_llm.inference.generate import choose_backend
    from serve.batching import BatchingEngine
    from serve.engine import Engine, VllmEngine, check_model_args

    if args.backend == "proxy":
        from serve.remote import RemoteEngine

        if not args.upstream:
            raise ConfigError("--backend proxy needs --upstream URL (an OpenAI-compatible server, e.g. .../v1)")
        if args.model or args.adapter:
            raise ConfigError("--backend proxy: the upstream serves its own model; use --upstream-model, not --model")
        key = "unused"
        if args.upstream_api_key_env:
            key = os.environ.get(args.upstream_api_key_env, "")
            if not key:
                raise ConfigError(f"--upstream-api-key-env: {args.upstream_api_key_env} is unset or empty")
        return RemoteEngine(args.upstream, model=args.upstream_model, api_key=key, concurrency=args.max_batch)
    if args.upstream:
        raise ConfigError("--upstream goes with --backend proxy")
    check_model_args(args.model or "", args.adapter or "")  # one line naming --model / --adapter, before weights load
    try:
        backend = choose_backend(args.backend)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("eval.backend", "--backend")) from None
    if backend == "vllm":
        engine = VllmEngine.load(args.model, args.adapter or "", dtype=args.dtype)
    else:
        engine = Engine.load(args.model, args.adapter or "", device=args.device, dtype=args.dtype)
    return BatchingEngine(engine, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000)


def _cmd_chat(cfg: Config, args) -> int:
    from serve.chat import run_batch, run_chat
    from serve.engine import Engine, check_model_args
    from serve.remote import RemoteEngine

    if args.max_tokens < 1 or not 0.0 <= args.temperature <= 2.0 or not 0.0 < args.top_p <= 1.0:
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
    gen = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if args.batch:
        counts = run_batch(engine, args.batch, args.out, system=args.system, **gen)
        print(
            f"chat --batch: {counts['answered']} answered, {counts['bad']} bad lines (with their reason) in {args.out}"
        )
        return 0
    return run_chat(engine, system=args.system, **gen)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model folder (`cbt-llm export`) or base model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder on top of --model")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal, through the crisis guard")
    p.add_argument("--model", default=None, help="exported model folder (`cbt-llm export`) or base model")
    p.add_argument("--url", default=None, help="an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--remote-model", default=None, help="model name to ask the --url server for (default: its first)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder on top of --model")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as `cbt-llm eval` decodes")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--system", default="", help="system prompt (default: the one export.json records, if any)")
    p.add_argument("--batch", default=None, help="answer a JSONL file, one {id?, messages} or {id?, text} a line")
    p.add_argument("--out", default=None, help="with --batch: the JSONL file of guarded replies")
    p.set_defaults(func=_cmd_chat, config=None, overrides=[], dry_run=False)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible chat server with the crisis guard on every reply")
    p.add_argument("--model", default=None, help="exported model folder (`cbt-llm export`) or base model")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder on top of --model")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "transformers", "vllm", "proxy"),
        help="auto (vllm when installed and on CUDA, else transformers), transformers, vllm, or proxy (--upstream)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together at most (default 8)")
    p.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long a batch waits for more requests (default 5)"
    )
    p.add_argument("--upstream", default=None, help="with --backend proxy: the OpenAI-compatible server's URL (/v1)")
    p.add_argument("--upstream-model", default=None, help="model name to ask the upstream for (default: its first)")
    p.add_argument("--upstream-api-key-env", default=None, metavar="NAME", help="the upstream's key, from env NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="require `Authorization: Bearer <key>` on /v1/*, the key read from environment variable NAME",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get a 503 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get a 413 (default 1 MiB)")
    p.add_argument(
        "--graceful-timeout", type=int, default=30, help="seconds in-flight requests get on SIGTERM (default 30)"
    )
    # no config file: the server is configured by its flags alone
    p.set_defaults(func=_cmd_serve, config=None, overrides=[], dry_run=False)


def _add_launch(sub) -> None:
    launch = sub.add_parser("launch", help="render and run/submit the training job: deepspeed launcher, Slurm or Ray")
    kinds = launch.add_subparsers(dest="launcher", required=True)
    for name, help_ in (
        ("deepspeed", "the deepspeed launcher: one node, a hostfile over ssh, or --no_ssh per node"),
        ("slurm", "an sbatch script: torchrun per node, c10d rendezvous, requeue on preemption"),
        ("ray", "a Ray job running Ray Train's TorchTrainer"),
    ):
        p = kinds.add_parser(name, help=help_)
        p.add_argument("--config", help="YAML config (see configs/)")
        # its own --dry-run: print the rendered script rather than the resolved config
        p.add_argument(
            "--dry-run", dest="launch_dry_run", action="store_true", help="print the launcher script and exit"
        )
        _add_flags(p, "launch")
        p.add_argument(
            "--node-rank", type=int, default=None, help="deepspeed --no_ssh multi-node: this machine's index"
        )
        p.add_argument("--wait", action="store_true", help="slurm: wait for the job to finish (sbatch --wait)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to `cbt-llm train` too")
        p.set_defaults(func=_cmd_launch, dry_run=False)


def _batch_arithmetic(cfg: Config) -> str:
    """`train --dry-run`: rows and tokens per optimizer step and steps per epoch, from the shards' manifest when
    present (train.tokens_per_micro_batch needs its seq_len to become rows)."""
    tc = cfg.train
    world = cfg.data.world_size  # the ranks the shards were sized for
    where = (
        "data.out_dir"
        if tc.data_dir == cfg.data.out_dir
        else f"train.data_dir, set apart from data.out_dir {cfg.data.out_dir}"
    )
    reads = f"# data: reads the shards in {tc.data_dir} ({where})"
    try:
        from train.data import load_manifest, rows_per_micro_batch, steps_per_epoch

        m = load_manifest(tc.data_dir)
        mb = rows_per_micro_batch(tc, m["seq_len"])
        spe, left_out = steps_per_epoch(m, world, mb, tc.grad_accum)
    except ConfigError as exc:
        return (
            f"{reads}\n# batch: world_size {world} x micro_batch_size {tc.micro_batch_size} x grad_accum "
            f"{tc.grad_accum}\n# steps per epoch: unknown ({exc})"
        )
    rows_per_step = world * mb * tc.grad_accum
    budget = (
        f" (train.tokens_per_micro_batch {tc.tokens_per_micro_batch} // seq_len {m['seq_len']})"
        if tc.tokens_per_micro_batch
        else ""
    )
    eff = m["packing_efficiency"]["train"]
    total = tc.max_steps or tc.epochs * spe
    return "\n".join(
        [
            reads,
            f"# batch: world_size {world} x micro_batch_size {mb}{budget} x grad_accum {tc.grad_accum} "
            f"= {rows_per_step} packed rows per optimizer step",
            f"# tokens per micro-batch: <= {mb * m['seq_len']:,} per rank",
            f"# tokens per step: <= {rows_per_step * m['seq_len']:,} (about {rows_per_step * m['seq_len'] * eff:,.0f} "
            f"real at packing efficiency {eff:.3f}); steps per epoch: {spe} ({left_out} rows left out); "
            f"total steps: {total}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbt-llm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="build the CBT corpus").add_subparsers(dest="source", required=True)
    p = synth.add_parser("template", help="offline synthetic corpus generator")
    _add_common(p, "synth template")
    p.add_argument(
        "--sessions",
        dest="flag:synth.sessions",
        action="store_const",
        const=True,
        default=None,
        help="multi-turn counselling sessions instead of single-turn records (synth.sessions)",
    )
    p.set_defaults(func=_cmd_synth_template)
    p = synth.add_parser("api", help="CBT prompt to an OpenAI-compatible endpoint (the paper's method)")
    _add_common(p, "synth api")
    p.add_argument(
        "--sessions",
        dest="flag:api.sessions",
        action="store_const",
        const=True,
        default=None,
        help="multi-turn sessions: a counsellor and a client simulator talk (api.sessions)",
    )
    p.add_argument(
        "--agents",
        dest="flag:api.agents.enabled",
        action="store_const",
        const=True,
        default=None,
        help="draft -> critique on the judge's CBT rubric -> revise, until api.agents.threshold or max_rounds",
    )
    p.set_defaults(func=_cmd_synth_api)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer on the corpus")
    _add_common(p, "tokenizer train")
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="validate, split, tokenize, mask and pack the corpus with Ray Data")
    _add_common(p, "prepare")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS or local)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="DeepSpeed ZeRO training on the packed shards (run under torchrun/deepspeed)")
    _add_common(p, "train")
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="consolidate a run's checkpoint into a Hugging Face model or LoRA adapter")
    _add_common(p, "export")
    p.add_argument("--out", required=True, help="output folder (safetensors + tokenizer)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights")
    p.add_argument("--tag", default=None, help="checkpoint folder name (default: latest)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="answer held-out questions with several models and score them side by side")
    _add_common(p, "eval")
    p.add_argument("--model", dest="eval_model", default=None, help="one model folder (replaces eval.models)")
    p.add_argument("--adapter", dest="eval_adapter", default=None, help="a LoRA adapter on top of --model")
    p.add_argument(
        "--sessions",
        dest="flag:eval.sessions.enabled",
        action="store_const",
        const=True,
        default=None,
        help="multi-turn sessions with a client simulator too, judged on CTRS (eval.sessions)",
    )
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_eval)

    _add_launch(sub)
    _add_serve(sub)
    _add_chat(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _resolve(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        if args.command == "train":
            print(_batch_arithmetic(cfg))
        return 0
    func: Callable = args.func
    try:
        return func(cfg, args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
