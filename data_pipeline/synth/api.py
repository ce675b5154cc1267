"""`cbt-llm synth api`: the paper's method. A versioned CBT prompt goes to any OpenAI-compatible endpoint
(POST {base_url}/chat/completions) and every reply that validates becomes a schema v1 record.

Outputs, all in `out_dir`:

- records.jsonl: one validated record per line, appended and flushed per record by a single writer task.
- rejects.jsonl: this run's rejects, one `{id, stage, reason, ...}` per line. `stage` is "input" (a bad entry
  in the input file) or "api" (no valid reply after all retries, or a non-retryable HTTP error). A re-run
  first rotates the previous rejects.jsonl to rejects.<N>.jsonl (N = 1, 2, ...), so rejects.jsonl always
  matches the summary of the latest run and no earlier reject is lost.
- summary.json: counts, tokens, timing and the resolved config (which holds the NAME of the key variable only).

Resume: a re-run reads the ids already in records.jsonl and skips them, so a record is never written twice;
rejected ids are tried again. A last line cut short by a crash is dropped (the file is rewritten without it)
and that question is asked again.

Every answer passes the crisis guard's output check before it can become a record (client.stop_unsafe, on the
answer as it would be written): one the guard stops is retried like an unusable reply, then rejected with the harm
kind in its reason; summary.json counts them by kind (unsafe_replies). The guard is built once per run from the
config's guard section, which the CLI passes as run_synth_api(cfg.api, guard=cfg.guard).

With api.agents (`--agents`), data_pipeline/synth/agents.py critiques each valid answer on the eval judge's
rubric and has it revised before one record, the best-scoring draft, is written.

The API key is read from the environment variable named by `api.api_key_env` and only ever placed in the
Authorization header; reasons quoted from server replies are scrubbed of it before they reach any file.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cbt_llm.core.config import ApiSynthConfig, GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from cbt_llm.domain.cbt import CBT_PARTS, DISTORTIONS, join_answer
from cbt_llm.domain.crisis import (
    CRISIS_SUPPORT_SENTENCE,
    PROFESSIONAL_HELP_MARKERS,
    corpus_is_crisis,
    has_crisis_support,
)
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.prompts import build_messages, get_prompt
from cbt_llm.domain.record import SCHEMA_VERSION, has_chinese, validate_record
from data_pipeline.io import dumps, expand_inputs
from data_pipeline.sources.psyqa import load_questions
from data_pipeline.synth.client import (
    RECORDS_FILE,
    REJECTS_FILE,
    SUMMARY_FILE,
    Endpoint,
    Retryable,
    RunContext,
    Stats,
    ask,
    check_endpoint,
    content_of,
    first_line_has,
    make_endpoint,
    recover_done_ids,
    reply_guard,
    rotate_rejects,
    run_pool,
    safe_url,
    settled,
    stop_unsafe,
    usage_of,
)


class QuestionLoop(Protocol):
    """What run_synth_api takes in place of its one-request-per-question process (the agents loop of agents.py,
    which imports this module): its per-question process, its critic's key, and its summary rows."""

    key: str

    async def process(self, ctx: RunContext, q: dict, ep: Endpoint) -> None: ...

    def summary(self) -> dict: ...

    def rows(self, summary: dict) -> dict: ...


# Appended when a model's encouragement forgets that more help may be needed: the corpus must never teach a
# model to present itself as a replacement for a professional.
PROFESSIONAL_HELP_SENTENCE = "如果这些困扰持续存在或不断加重,建议寻求专业心理咨询师或精神科医生的帮助。"

_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)


class ReplyError(ValueError):
    """A reply that arrived but cannot become a record (not JSON, missing or empty part, no Chinese)."""


# ----------------------------------------------------------------------------------------------- replies


def parse_reply(content: Any) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse a model's message content into (cbt parts, known distortions, unknown distortion labels).

    Tolerates a ```json fence and prose around the object. Raises ReplyError with a one-line reason.
    """
    if not isinstance(content, str) or not content.strip():
        raise ReplyError("reply content is empty")
    text = content.strip()
    m = _FENCE.search(text)
    if m:
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # Some models put a sentence before or after the object: take the outermost braces.
        start, end = text.find("{"), text.rfind("}")
        if start == -1 or end <= start:
            raise ReplyError("reply content is not JSON") from None
        try:
            obj = json.loads(text[start : end + 1])
        except json.JSONDecodeError as exc:
            raise ReplyError(f"reply content is not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ReplyError(f"reply JSON is not an object ({type(obj).__name__})")
    missing = [p for p in CBT_PARTS if p not in obj]
    if missing:
        raise ReplyError(f"reply JSON lacks part(s): {', '.join(missing)}")
    cbt: dict[str, str] = {}
    for part in CBT_PARTS:
        value = obj[part]
        if not isinstance(value, str):
            raise ReplyError(f"part '{part}' is not a string ({type(value).__name__})")
        value = value.strip()
        if not value:
            raise ReplyError(f"part '{part}' is empty")
        if not has_chinese(value):
            raise ReplyError(f"part '{part}' has no Chinese text")
        cbt[part] = value
    raw = obj.get("distortions") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raw = []
    # Labels are optional metadata: an unknown one is dropped (and noted in meta), not a reason to retry.
    known = list(dict.fromkeys(d for d in raw if isinstance(d, str) and d in DISTORTIONS))
    unknown = [str(d) for d in raw if not (isinstance(d, str) and d in DISTORTIONS)]
    return cbt, known, unknown


def end_sentence(text: str) -> str:
    return text if text.endswith(("\u3002", "\uff01", "\uff1f", "!", "?", ".", "\u2026")) else text + "\u3002"


def build_record(
    q: dict,
    cbt: dict[str, str],
    distortions: list[str],
    *,
    model: str,
    prompt_version: str,
    usage: dict[str, int],
    attempts: int,
    dropped_distortions: list[str] | None = None,
) -> tuple[dict | None, str | None]:
    """Turn a parsed reply into a validated schema v1 record. Returns (record, None) or (None, reason).

    Enforces the safety rules whatever the model wrote: a crisis-flagged question gets
    CRISIS_SUPPORT_SENTENCE when the reply has no crisis support, and every encouragement says that more
    professional help may be needed.
    """
    cbt = dict(cbt)
    crisis = corpus_is_crisis(q["question"], q["description"])
    meta: dict[str, Any] = {
        "generator": "api",
        "prompt_version": prompt_version,
        "model": model,
        "usage": usage,
        "attempts": attempts,
        "crisis": crisis,
        "crisis_support_added": False,
        "professional_help_added": False,
        "schema_version": SCHEMA_VERSION,
    }
    if dropped_distortions:
        meta["dropped_distortions"] = dropped_distortions
    if not any(m in cbt["encouragement"] for m in PROFESSIONAL_HELP_MARKERS):
        cbt["encouragement"] = end_sentence(cbt["encouragement"]) + PROFESSIONAL_HELP_SENTENCE
        meta["professional_help_added"] = True
    if crisis and not has_crisis_support(join_answer(cbt)):
        cbt["encouragement"] = end_sentence(cbt["encouragement"]) + CRISIS_SUPPORT_SENTENCE
        meta["crisis_support_added"] = True
    record = {
        "id": q["id"],
        "question": q["question"],
        "description": q["description"],
        "keywords": q["keywords"],
        "cbt": cbt,
        "answer": join_answer(cbt),
        "distortions": distortions,
        "source": f"api:{model}",
        "meta": meta,
    }
    return validate_record(record)


# ------------------------------------------------------------------------------------------------- files


# -------------------------------------------------------------------------------------------------- http


def draft_body(cfg: ApiSynthConfig, q: dict, messages: list[dict] | None = None) -> dict:
    """The request for one question's answer: its CBT prompt (or `messages`, e.g. a revision's) and sampling."""
    if messages is None:
        crisis = corpus_is_crisis(q["question"], q["description"])
        messages = build_messages(
            q["question"], q["description"], q["keywords"], crisis=crisis, version=cfg.prompt_version
        )
    return {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def record_acceptor(ctx: RunContext, q: dict) -> Callable[[dict, int], dict]:
    """The `ask` acceptor of an answer to `q`: the validated record, or Retryable with why the reply is unusable
    (not JSON, not a valid record, or stopped by the crisis guard's output check)."""
    cfg = ctx.cfg

    def accept(data: dict, attempt: int) -> dict:
        content, finish = content_of(data)
        try:
            cbt, distortions, unknown = parse_reply(content)
        except ReplyError as exc:
            hint = " (finish_reason=length: raise api.max_tokens)" if finish == "length" else ""
            raise Retryable("invalid_reply", ctx.redact(f"{exc}{hint}")) from None
        record, reason = build_record(
            q,
            cbt,
            distortions,
            model=cfg.model,
            prompt_version=cfg.prompt_version,
            usage=usage_of(data),
            attempts=attempt,
            dropped_distortions=unknown,
        )
        if reason:
            raise Retryable("invalid_record", ctx.redact(f"record failed schema validation: {reason}"))
        stop_unsafe(ctx, record["answer"], "answer")
        return record

    return accept


async def _process(ctx: RunContext, q: dict, ep: Endpoint) -> None:
    """Ask for one question until a valid record comes back or the retries run out; queue the outcome."""
    record = await settled(ctx, q["id"], ask(ctx, ep, draft_body(ctx.cfg, q), record_acceptor(ctx, q)))
    if record is not None:
        await ctx.queue.put(("record", record))


# --------------------------------------------------------------------------------------------------- run


def check_input(cfg: ApiSynthConfig) -> None:
    """api.input names at least one existing file."""
    try:
        expand_inputs(cfg.input)
    except FileNotFoundError as exc:
        raise ConfigError(f"api.input: {exc}") from None


def check_out_dir(cfg: ApiSynthConfig) -> None:
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"api.out_dir '{cfg.out_dir}' exists and is not a folder; pass another --out")


def check_config(cfg: ApiSynthConfig) -> None:
    """Fail early, with one line naming the field and the fix, before any file or network work."""
    if not cfg.model.strip():
        raise ConfigError("api.model is empty; pass --model NAME (the model name the endpoint serves)")
    if not cfg.input.strip():
        raise ConfigError("api.input is empty; pass --input PATH (PsyQA JSON or our JSONL)")
    check_input(cfg)
    check_endpoint(cfg.base_url, cfg.api_key_env)
    get_prompt(cfg.prompt_version)
    check_out_dir(cfg)
    records = Path(cfg.out_dir) / RECORDS_FILE
    if first_line_has(records, '"messages"'):
        raise ConfigError(f"api.out_dir '{cfg.out_dir}' holds sessions from `synth api --sessions`; pass another --out")
    # resume skips the ids already written, so one folder must hold one kind: critiqued answers or plain ones
    agents_records = first_line_has(records, AGENTS_META_MARK)
    if first_line_has(records, '"id"') and agents_records != cfg.agents.enabled:
        made = "with" if agents_records else "without"
        raise ConfigError(
            f"api.out_dir '{cfg.out_dir}' holds records made {made} api.agents (--agents); pass another --out"
        )


# How a records.jsonl line made by the agents loop starts its meta.agents (dumps writes no spaces).
AGENTS_META_MARK = '"agents":{'


def run_synth_api(
    cfg: ApiSynthConfig, agents: QuestionLoop | None = None, guard: GuardConfig | CrisisGuard | None = None
) -> dict:
    """Generate CBT records for every question of `cfg.input` through the endpoint; resumable.

    `guard`: the crisis guard every answer passes (client.reply_guard: the root config's guard section, as the CLI
    passes it, a built guard, or None for the default section), built once here.

    `agents` (api.agents.enabled; built by data_pipeline.synth.agents.run_synth_api_agents) critiques and revises
    every answer instead of writing the first valid one. Returns the summary dict (total, ok, skipped, retried,
    rejected, input_rejected, not_attempted, prompt_tokens, completion_tokens, unsafe_replies (by harm kind), ...,
    and "agents" with them), also
    written to out_dir/summary.json. Raises ConfigError for a bad config, or when the endpoint refuses the very
    first requests (HTTP 401/403/404).
    """
    check_config(cfg)
    if cfg.agents.enabled and agents is None:
        raise ConfigError(
            "api.agents.enabled: the agents loop runs from `cbt-llm synth api --agents` "
            "(or data_pipeline.synth.agents.run_synth_api_agents)"
        )
    checker = reply_guard(guard)
    t0 = time.perf_counter()
    try:
        questions, input_rejects = load_questions(cfg.input)
    except ValueError as exc:
        raise ConfigError(f"api.input: {exc}") from None
    # limit takes the first N questions of the input, so repeating a limited run resumes the same N.
    selected = questions[: cfg.limit] if cfg.limit else questions

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_path, rejects_path = out / RECORDS_FILE, out / REJECTS_FILE
    done, truncated = recover_done_ids(records_path)
    rotated = rotate_rejects(rejects_path)
    with open(rejects_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(dumps(r) + "\n" for r in input_rejects)
    if not questions:
        raise ConfigError(
            f"api.input: no valid question in '{cfg.input}' ({len(input_rejects)} entries rejected, "
            f"reasons in {rejects_path}); pass PsyQA JSON or JSONL with id and question"
        )
    todo = [q for q in selected if q["id"] not in done]

    ep = make_endpoint(cfg.base_url, cfg.model, cfg.api_key_env)

    stats = Stats()
    abort_reason = None
    t_api = time.perf_counter()
    process, keys = (
        (partial(agents.process, ep=ep), (ep.key, agents.key)) if agents else (partial(_process, ep=ep), (ep.key,))
    )
    if todo:
        abort_reason = asyncio.run(
            run_pool(cfg, todo, process, keys, (records_path, rejects_path), stats, guard=checker)
        )
    api_seconds = time.perf_counter() - t_api

    summary: dict[str, Any] = {
        "total": len(selected),
        "ok": stats.ok,
        "skipped": len(selected) - len(todo),
        "retried": stats.retried,
        "rejected": stats.rejected,
        "input_rejected": len(input_rejects),
        "not_attempted": stats.not_attempted,
        "requests": stats.requests,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "seconds": round(time.perf_counter() - t0, 3),
        "req_per_s": round(stats.requests / api_seconds, 3) if api_seconds > 0 and stats.requests else 0.0,
        "errors": dict(sorted(stats.errors.items())),
        "unsafe_replies": dict(sorted(stats.unsafe.items())),
        "truncated_lines_dropped": truncated,
        "aborted": abort_reason,
        "records": str(records_path),
        "rejects": str(rejects_path),
        "previous_rejects": str(rotated) if rotated else None,
        "model": cfg.model,
        "prompt_version": cfg.prompt_version,
        "config": {**cfg.model_dump(mode="json"), "base_url": safe_url(cfg.base_url)},
    }
    if agents:
        summary["agents"] = agents.summary()
        summary["config"]["agents"]["critic_base_url"] = safe_url(cfg.agents.critic_base_url)
    write_metrics(out / SUMMARY_FILE, summary)
    rows = {
        k: summary[k]
        for k in (
            "total",
            "ok",
            "skipped",
            "retried",
            "rejected",
            "input_rejected",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "seconds",
            "req_per_s",
        )
    }
    if stats.not_attempted:
        rows["not_attempted"] = stats.not_attempted
    if stats.unsafe:
        rows["unsafe replies (guard)"] = sum(stats.unsafe.values())
    if agents:
        rows.update(agents.rows(summary["agents"]))
    print_summary(f"synth api: {cfg.model} ({cfg.prompt_version})", rows)
    if abort_reason:
        raise ConfigError(abort_reason)
    return summary
