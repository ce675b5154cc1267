"""`cbt-llm synth template` (the offline generator: records, sessions or preference pairs) and `cbt-llm synth api` (a
CBT prompt on an OpenAI-compatible endpoint: single answers, sessions, or the agents' draft-critique-revise loop)."""

from __future__ import annotations

from cbt_llm.cli.args import Flag, add_common, add_switch
from cbt_llm.core.config import Config

TEMPLATE_FLAGS: list[Flag] = [
    ("--num-records", "synth.num_records", int, "records to generate"),
    ("--seed", "synth.seed", int, "random seed"),
    ("--out", "synth.out_dir", str, "output folder"),
    ("--num-shards", "synth.num_shards", int, "number of output shards"),
    ("--compress", "synth.compress", str, "none or zstd"),
    ("--crisis-fraction", "synth.crisis_fraction", float, "fraction of crisis (suicide/self-harm) questions"),
    ("--workers", "synth.workers", int, "parallel processes (1: single process, 0: one per CPU)"),
    ("--min-turns", "synth.min_turns", int, "sessions: fewest turns"),
    ("--max-turns", "synth.max_turns", int, "sessions: most turns"),
]
API_FLAGS: list[Flag] = [
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
]


def run_template(cfg: Config, args) -> int:
    if cfg.synth.pairs:
        from data_pipeline.synth.pairs import run_synth_pairs

        run_synth_pairs(cfg.synth)
        return 0
    if cfg.synth.sessions:
        from data_pipeline.synth.sessions import run_synth_sessions

        run_synth_sessions(cfg.synth)
        return 0
    from data_pipeline.synth.template import run_synth_template

    run_synth_template(cfg.synth)
    return 0


def run_api(cfg: Config, args) -> int:
    if cfg.api.sessions:
        from data_pipeline.synth.api_sessions import run_synth_api_sessions as run
    elif cfg.api.agents.enabled:
        from data_pipeline.synth.agents import run_synth_api_agents as run
    else:
        from data_pipeline.synth.api import run_synth_api as run

    # the root config's guard section: every model answer passes its output check before it is written
    summary = run(cfg.api, guard=cfg.guard)
    return 0 if summary.get("ok", 0) + summary.get("skipped", 0) > 0 or summary.get("total", 0) == 0 else 1


def add_parser(sub) -> None:
    synth = sub.add_parser("synth", help="build the CBT corpus").add_subparsers(dest="source", required=True)
    p = synth.add_parser("template", help="offline synthetic corpus generator")
    add_common(p, TEMPLATE_FLAGS)
    add_switch(
        p,
        "--sessions",
        "synth.sessions",
        "multi-turn counselling sessions instead of single-turn records (synth.sessions)",
    )
    add_switch(
        p,
        "--pairs",
        "synth.pairs",
        "preference pairs: a five-part answer against a flawed one (synth.pairs, mix in synth.pair_flaws)",
    )
    p.set_defaults(func=run_template)
    p = synth.add_parser("api", help="CBT prompt to an OpenAI-compatible endpoint (the paper's method)")
    add_common(p, API_FLAGS)
    add_switch(
        p, "--sessions", "api.sessions", "multi-turn sessions: a counsellor and a client simulator talk (api.sessions)"
    )
    add_switch(
        p,
        "--agents",
        "api.agents.enabled",
        "draft -> critique on the judge's CBT rubric -> revise, until api.agents.threshold or max_rounds",
    )
    p.set_defaults(func=run_api)
