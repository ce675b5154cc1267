"""`cbt-llm serve`: an OpenAI-compatible chat server with the crisis guard on every reply, in front of a local model
(transformers or vLLM, batched) or of an upstream server (`--backend proxy`). Every flag sets one field of the
config's serve section, so a YAML can hold the server's settings too."""

from __future__ import annotations

import ipaddress
import os
import sys

from cbt_llm.cli.args import Flag, add_common, add_switch
from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError

FLAGS: list[Flag] = [
    ("--model", "serve.model", str, "exported model folder (`cbt-llm export`) or base model"),
    ("--adapter", "serve.adapter", str, "a LoRA adapter folder on top of --model"),
    ("--device", "serve.device", str, "cpu, cuda or cuda:N (default: cuda when available)"),
    ("--dtype", "serve.dtype", str, "auto, float32, bfloat16 or float16"),
    ("--max-batch", "serve.max_batch", int, "requests generated together at most (default 8)"),
    ("--batch-window-ms", "serve.batch_window_ms", float, "how long a batch waits for more requests (default 5)"),
    ("--upstream", "serve.upstream", str, "with --backend proxy: the OpenAI-compatible server's URL (/v1)"),
    ("--upstream-model", "serve.upstream_model", str, "model name to ask the upstream for (default: its first)"),
    ("--upstream-api-key-env", "serve.upstream_api_key_env", str, "the upstream's key, from this environment variable"),
    ("--host", "serve.host", str, "address to listen on (default: loopback only)"),
    ("--port", "serve.port", int, "port (default 8000)"),
    (
        "--max-tokens-limit",
        "serve.max_tokens_limit",
        int,
        "largest max_tokens a request may ask for, and the most a request without one gets",
    ),
    (
        "--api-key-env",
        "serve.api_key_env",
        str,
        "require `Authorization: Bearer <key>` on /v1/*, the key read from this environment variable",
    ),
    ("--max-queue", "serve.max_queue", int, "requests that may wait; more get a 503 (default 64)"),
    ("--max-body-bytes", "serve.max_body_bytes", int, "larger bodies get a 413 (default 1 MiB)"),
    ("--graceful-timeout", "serve.graceful_timeout", int, "seconds in-flight requests get on SIGTERM (default 30)"),
]


def _key(env_name: str, flag: str) -> str | None:
    """The key in environment variable `env_name` (None when no variable is named); unset or empty is an error."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError(f"{flag}: the environment variable {env_name} is unset or empty")
    return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(sc) -> str | None:
    """Refuse (one line naming the flag) to listen beyond loopback without a key unless told to; the warning to log
    when told to, else None."""
    if _loopback(sc.host) or sc.api_key_env:
        return None
    if not sc.allow_unauthenticated:
        raise ConfigError(
            f"--host {sc.host}: a counselling chat open to the network with no authentication; set --api-key-env NAME "
            "(clients send `Authorization: Bearer <key>`), or pass --allow-unauthenticated to serve it anyway"
        )
    return (
        f"warning: serving on {sc.host}:{sc.port} WITHOUT authentication (--allow-unauthenticated): anyone who can "
        "reach this address can talk to the model"
    )


def run(cfg: Config, args) -> int:
    from cbt_llm.inference.safety_model import build_guard
    from serve.app import serve
    from serve.engines import build_engine

    sc = cfg.serve
    warning = check_exposure(sc)
    api_key = _key(sc.api_key_env, "--api-key-env")
    # the upstream's key matters only to a proxy that can start; build_engine names a missing --upstream first
    proxies = sc.backend == "proxy" and sc.upstream and not (sc.model or sc.adapter)
    upstream_key = _key(sc.upstream_api_key_env, "--upstream-api-key-env") if proxies else None
    engine = build_engine(
        backend=sc.backend,
        model=sc.model,
        adapter=sc.adapter,
        device=sc.device or None,
        dtype=sc.dtype,
        upstream=sc.upstream,
        upstream_model=sc.upstream_model or None,
        upstream_api_key=upstream_key or "unused",
        max_batch=sc.max_batch,
        batch_window_s=sc.batch_window_ms / 1000,
    )
    print(warning or f"serve: {sc.host}:{sc.port}, " + ("API key required" if api_key else "loopback only, no key"),
          file=sys.stderr, flush=True)  # fmt: skip
    serve(
        engine,
        guard=build_guard(cfg.guard),
        host=sc.host,
        port=sc.port,
        graceful_s=sc.graceful_timeout,
        max_tokens_limit=sc.max_tokens_limit,
        api_key=api_key,
        max_queue=sc.max_queue,
        max_body_bytes=sc.max_body_bytes,
        trim_history=sc.trim_history,
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible chat server with the crisis guard on every reply")
    add_common(p, FLAGS)
    p.add_argument(
        "--backend",
        dest="flag:serve.backend",
        default=None,
        choices=("auto", "transformers", "vllm", "proxy"),
        help="auto (vllm when installed and on CUDA, else transformers), transformers, vllm, or proxy (--upstream)",
    )
    add_switch(p, "--allow-unauthenticated", "serve.allow_unauthenticated",
               "listen beyond loopback without --api-key-env (refused otherwise)")  # fmt: skip
    add_switch(p, "--trim-history", "serve.trim_history",
               "drop a conversation's oldest turns to fit the model's context (else a 400)")  # fmt: skip
    p.set_defaults(func=run)
