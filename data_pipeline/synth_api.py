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

With api.agents (`--agents`), data_pipeline/synth_agents.py critiques each valid answer on the eval judge's
rubric and has it revised before one record, the best-scoring draft, is written.

The API key is read from the environment variable named by `api.api_key_env` and only ever placed in the
Authorization header; reasons quoted from server replies are scrubbed of it before they reach any file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from tqdm import tqdm

from cbt_llm.config import ApiSynthConfig, ConfigError
from cbt_llm.fileio import write_text_atomic
from cbt_llm.report import print_summary, write_metrics
from data_pipeline.io import dumps, expand_inputs
from data_pipeline.prompts import build_messages, get_prompt
from data_pipeline.psyqa import load_questions
from data_pipeline.schema import (
    CBT_PARTS,
    CRISIS_SUPPORT_SENTENCE,
    DISTORTIONS,
    PROFESSIONAL_HELP_MARKERS,
    SCHEMA_VERSION,
    has_chinese,
    has_crisis_support,
    is_crisis,
    join_answer,
    validate_record,
)

if TYPE_CHECKING:  # the agents loop imports this module; a run is handed one, never imports it
    from data_pipeline.synth_agents import AgentLoop

RECORDS_FILE = "records.jsonl"
REJECTS_FILE = "rejects.jsonl"
SUMMARY_FILE = "summary.json"

# Appended when a model's encouragement forgets that more help may be needed: the corpus must never teach a
# model to present itself as a replacement for a professional.
PROFESSIONAL_HELP_SENTENCE = "如果这些困扰持续存在或不断加重,建议寻求专业心理咨询师或精神科医生的帮助。"

# Statuses that mean the endpoint, model or credentials are wrong rather than this one question: when they
# arrive before any success, the run stops with one clear line instead of rejecting every question.
_FATAL_STATUSES = frozenset({401, 403, 404})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
_USERINFO = re.compile(r"//[^/@]*@")


class ReplyError(ValueError):
    """A reply that arrived but cannot become a record (not JSON, missing or empty part, no Chinese)."""


class Retryable(Exception):
    def __init__(self, kind: str, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.retry_after = kind, reason, retry_after


class _Fatal(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


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
    crisis = is_crisis(q["question"], q["description"])
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


def recover_done_ids(path: Path, redo: str = "that question will be asked again") -> tuple[set[str], int]:
    """Ids already in records.jsonl, and how many crash-truncated last lines were dropped (0 or 1).

    Only the last line may be bad (a crash mid-write); the file is then rewritten without it. A bad line
    anywhere else means the file was edited or corrupted otherwise, and raises ConfigError naming the line.
    """
    if not path.exists():
        return set(), 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    ids: set[str] = set()
    dropped = 0
    for i in nonempty:
        try:
            rid = json.loads(lines[i].decode("utf-8"))["id"]
            if not isinstance(rid, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if i == nonempty[-1]:
                dropped = 1
                keep = b"\n".join(line for line in lines[:i] if line.strip())
                write_text_atomic(path, keep.decode("utf-8") + ("\n" if keep else ""))
                print(
                    f"warning: {path}: dropped a truncated last line (a crash mid-write); {redo}",
                    file=sys.stderr,
                )
                break
            raise ConfigError(
                f"{path}:{i + 1}: not a valid record line (only a truncated last line is repaired); "
                "fix the line or move the file away"
            ) from None
        ids.add(rid)
    if not dropped and raw and not raw.endswith(b"\n"):
        # A complete last object without its newline: the next append must not glue onto it.
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return ids, dropped


def first_line_has(path: Path, needle: str) -> bool:
    """Does the file's first line contain `needle`? (Tells single-answer records and sessions apart.)"""
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        return needle in fh.readline()


def rotate_rejects(path: Path) -> Path | None:
    """Move a non-empty previous rejects.jsonl to rejects.<N>.jsonl (next free N). Returns the new path."""
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        path.unlink()
        return None
    taken = [
        int(m.group(1))
        for p in path.parent.glob("rejects.*.jsonl")
        if (m := re.fullmatch(r"rejects\.(\d+)\.jsonl", p.name))
    ]
    dest = path.with_name(f"rejects.{max(taken, default=0) + 1}.jsonl")
    os.replace(path, dest)
    return dest


# -------------------------------------------------------------------------------------------------- http


def safe_url(url: str) -> str:
    return _USERINFO.sub("//***@", url)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt + 1`.

    A server's Retry-After wins (capped). Otherwise exponential with "equal jitter": half the step is fixed,
    half random, so many workers hit by the same 429 do not come back in lock-step.
    """
    if retry_after is not None:
        return min(retry_after, cap)
    step = min(cap, base * (2**attempt))
    return step / 2 + rng.uniform(0, step / 2)


@dataclass
class Stats:
    ok: int = 0
    rejected: int = 0
    retried: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    not_attempted: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass
class Endpoint:
    """One OpenAI-compatible endpoint. `fields` is the config prefix that sets it ("api." or "api.client_"), so an
    error names the field to fix; `any_success` is per endpoint, so a good counsellor endpoint does not hide a
    client endpoint whose every request is refused."""

    url: str
    model: str
    key: str | None
    key_env: str
    fields: str = "api."
    any_success: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def make_endpoint(base_url: str, model: str, key_env: str, fields: str = "api.") -> Endpoint:
    """The endpoint of a checked config; the key is read here, and a missing one is said once, on stderr."""
    key = os.environ.get(key_env) or None
    if key is None:
        print(
            f"warning: ${key_env} is not set; sending requests without an Authorization header "
            "(fine for a local server)",
            file=sys.stderr,
        )
    return Endpoint(base_url.rstrip("/") + "/chat/completions", model, key, key_env, fields)


@dataclass
class _Ctx:
    cfg: ApiSynthConfig
    keys: tuple[str, ...]
    client: httpx.AsyncClient
    sem: asyncio.Semaphore
    queue: asyncio.Queue
    stats: Stats
    rng: random.Random
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str | None = None

    def redact(self, text: str) -> str:
        # A server may quote the key back in an error body (OpenAI does, partly): never let it reach a file.
        text = " ".join(str(text).split())
        for key in self.keys:
            text = text.replace(key, "***")
        return text


class GiveUp(Exception):
    """No usable reply after every attempt, or a non-retryable HTTP error: the reject's reason, counts and stage."""

    def __init__(self, reason: str, attempts: int, errors: list[str], stage: str = "api"):
        super().__init__(reason)
        self.reason, self.attempts, self.errors, self.stage = reason, attempts, errors, stage


class Aborted(Exception):
    """The run is stopping (the endpoint refused its first requests, or nothing connects): ask nothing more."""


async def _post(ctx: _Ctx, ep: Endpoint, body: dict) -> dict:
    """One request. Returns the parsed response JSON; raises Retryable or _Fatal."""
    ctx.stats.requests += 1
    timeout_s = ctx.cfg.timeout_s
    try:
        # httpx's timeout is per phase (connect, each read); this bounds the whole request.
        async with asyncio.timeout(timeout_s):
            resp = await ctx.client.post(ep.url, json=body, headers=ep.headers)
    except (TimeoutError, httpx.TimeoutException):
        raise Retryable("timeout", f"no reply within {timeout_s:g} s") from None
    except httpx.TransportError as exc:
        raise Retryable("connection", ctx.redact(f"connection error ({type(exc).__name__}: {exc})")) from None
    except httpx.RequestError as exc:  # e.g. a body that fails to decode
        raise Retryable("request_error", ctx.redact(f"request failed ({type(exc).__name__}: {exc})")) from None
    if resp.status_code != 200:
        snippet = ctx.redact(resp.text[:200])
        reason = f"HTTP {resp.status_code}: {snippet}" if snippet else f"HTTP {resp.status_code}"
        retry_after = _parse_retry_after(resp.headers.get("retry-after"))
        if resp.status_code == 429:
            raise Retryable("http_429", reason, retry_after)
        if resp.status_code >= 500 or resp.status_code == 408:
            raise Retryable(f"http_{resp.status_code}", reason, retry_after)
        raise _Fatal(resp.status_code, reason)
    try:
        data = resp.json()
    except (ValueError, UnicodeDecodeError):
        raise Retryable("malformed_body", "response body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Retryable("malformed_body", "response body is not a JSON object")
    usage = usage_of(data)
    ctx.stats.prompt_tokens += usage["prompt_tokens"]
    ctx.stats.completion_tokens += usage["completion_tokens"]
    return data


def usage_of(data: dict) -> dict[str, int]:
    """Token usage as reported by the server; a missing or odd field counts as 0 rather than failing."""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    out = {}
    for k in ("prompt_tokens", "completion_tokens"):
        try:
            out[k] = max(0, int(usage.get(k) or 0))
        except (TypeError, ValueError):
            out[k] = 0
    return out


def content_of(data: dict) -> tuple[Any, str | None]:
    try:
        choice = data["choices"][0]
        return choice["message"]["content"], choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        raise Retryable("invalid_reply", "response has no choices[0].message.content") from None


async def ask(ctx: _Ctx, ep: Endpoint, body: dict, accept: Callable[[dict, int], Any]) -> Any:
    """POST `body` to `ep` until `accept(response, attempt)` returns a value, and return it.

    `accept` raises Retryable for a reply that arrived but cannot be used, or GiveUp to stop asking (a reply
    it will not ask for again). Retryable failures (429, 5xx, timeouts, connection errors, unusable replies) are
    retried up to cfg.max_retries times with backoff; then, or at once on another HTTP error, GiveUp carries the
    reason. Raises Aborted when the run is stopping.
    """
    cfg = ctx.cfg
    kinds: list[str] = []
    last: Retryable | None = None
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            ctx.stats.retried += 1
            # Sleep outside the semaphore: a backing-off request must not hold a slot others could use.
            await asyncio.sleep(
                backoff_delay(
                    attempt - 1, cfg.backoff_s, cfg.max_backoff_s, last.retry_after if last else None, ctx.rng
                )
            )
        try:
            async with ctx.sem:
                # Checked after the wait for a slot: that wait is where the other requests' 401s arrive.
                if ctx.abort.is_set():
                    raise Aborted
                data = await _post(ctx, ep, body)
            value = accept(data, attempt + 1)
        except Retryable as exc:
            last = exc
            kinds.append(exc.kind)
            ctx.stats.errors[exc.kind] += 1
            continue
        except GiveUp:
            ep.any_success = True  # the endpoint answered; only the reply was refused
            raise
        except _Fatal as exc:
            kinds.append(f"http_{exc.status}")
            ctx.stats.errors[f"http_{exc.status}"] += 1
            if exc.status in _FATAL_STATUSES and not ep.any_success and not ctx.abort.is_set():
                ctx.abort_reason = _fatal_message(ctx, ep, exc)
                ctx.abort.set()
            raise GiveUp(exc.reason, attempt + 1, kinds) from None
        ep.any_success = True
        return value
    if last and all(k == "connection" for k in kinds) and not ep.any_success and not ctx.abort.is_set():
        # Nothing ever connected: the server is down or base_url is wrong; say so once, do not reject them all.
        ctx.abort_reason = (
            f"api: cannot connect to {safe_url(ep.url)} ({last.reason}); is the server running? "
            f"check {ep.fields}base_url"
        )
        ctx.abort.set()
    reason = f"{last.reason if last else 'unknown error'} (gave up after {cfg.max_retries + 1} attempts)"
    raise GiveUp(reason, cfg.max_retries + 1, kinds)


def draft_body(cfg: ApiSynthConfig, q: dict, messages: list[dict] | None = None) -> dict:
    """The request for one question's answer: its CBT prompt (or `messages`, e.g. a revision's) and sampling."""
    if messages is None:
        crisis = is_crisis(q["question"], q["description"])
        messages = build_messages(
            q["question"], q["description"], q["keywords"], crisis=crisis, version=cfg.prompt_version
        )
    return {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}


def record_acceptor(ctx: _Ctx, q: dict) -> Callable[[dict, int], dict]:
    """The `ask` acceptor of an answer to `q`: the validated record, or Retryable with why the reply is unusable."""
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
        return record

    return accept


async def _process(ctx: _Ctx, q: dict, ep: Endpoint) -> None:
    """Ask for one question until a valid record comes back or the retries run out; queue the outcome."""
    record = await settled(ctx, q["id"], ask(ctx, ep, draft_body(ctx.cfg, q), record_acceptor(ctx, q)))
    if record is not None:
        await ctx.queue.put(("record", record))


async def settled(ctx: _Ctx, item_id: str, attempt: Awaitable[Any]) -> Any:
    """What `attempt` returns; None once an aborted run (counted as not attempted) or a give-up (a reject with
    its reason and errors) has been put on the writer's queue instead."""
    try:
        return await attempt
    except Aborted:
        ctx.stats.not_attempted += 1
        await ctx.queue.put(("progress", None))
    except GiveUp as exc:
        reject = {
            "id": item_id,
            "stage": exc.stage,
            "reason": exc.reason,
            "attempts": exc.attempts,
            "errors": exc.errors,
        }
        await ctx.queue.put(("reject", reject))
    return None


def _fatal_message(ctx: _Ctx, ep: Endpoint, exc: _Fatal) -> str:
    f = ep.fields
    if exc.status in (401, 403):
        key_state = f"${ep.key_env} is set" if ep.key else f"${ep.key_env} is not set, so no key was sent"
        fix = f"check the key in ${ep.key_env} ({f}api_key_env) and {f}base_url"
        return f"api: {safe_url(ep.url)} refused the request with HTTP {exc.status} ({key_state}); {fix}"
    return (
        f"api: {safe_url(ep.url)} answered HTTP {exc.status} before any success; check {f}base_url "
        f"(it usually ends in /v1) and {f}model ('{ep.model}')"
    )


async def _writer(queue: asyncio.Queue, records_path: Path, rejects_path: Path, stats: Stats, pbar: tqdm) -> None:
    """The only task that touches the output files, so lines never interleave; flushes after every line."""
    with (
        open(records_path, "a", encoding="utf-8", newline="\n") as rec_fh,
        open(rejects_path, "a", encoding="utf-8", newline="\n") as rej_fh,
    ):
        while True:
            item = await queue.get()
            if item is None:
                return
            kind, obj = item
            if kind == "record":
                rec_fh.write(dumps(obj) + "\n")
                rec_fh.flush()
                stats.ok += 1
            elif kind == "reject":
                rej_fh.write(dumps(obj) + "\n")
                rej_fh.flush()
                stats.rejected += 1
            pbar.update(1)
            pbar.set_postfix(ok=stats.ok, rejected=stats.rejected, retried=stats.retried, refresh=False)


async def run_pool(
    cfg: ApiSynthConfig,
    todo: list,
    process: Callable[[_Ctx, Any], Awaitable[None]],
    keys: tuple[str, ...],
    paths: tuple[Path, Path],
    stats: Stats,
    desc: str = "synth api",
    unit: str = "q",
) -> str | None:
    """Run `process(ctx, item)` over `todo` with at most cfg.concurrency requests in flight; each process puts one
    ("record" | "reject" | "progress", obj) on ctx.queue, which one writer task appends to paths (records,
    rejects). Returns the reason the run stopped early, or None."""
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        ctx = _Ctx(
            cfg=cfg,
            keys=tuple(k for k in keys if k),
            client=client,
            sem=asyncio.Semaphore(cfg.concurrency),
            queue=asyncio.Queue(maxsize=1024),
            stats=stats,
            rng=random.Random(),
        )
        pending = iter(todo)

        async def worker() -> None:
            for item in pending:  # a shared iterator: each item goes to exactly one worker
                await process(ctx, item)

        with tqdm(total=len(todo), desc=desc, unit=unit, file=sys.stderr, mininterval=0.5) as pbar:
            writer = asyncio.create_task(_writer(ctx.queue, *paths, stats, pbar))
            # Twice the concurrency in workers: the semaphore bounds requests in flight, the extra workers keep
            # slots busy while others sleep in backoff.
            n_workers = min(len(todo), 2 * cfg.concurrency)
            workers = asyncio.gather(*(worker() for _ in range(n_workers)))
            try:
                await asyncio.wait({writer, workers}, return_when=asyncio.FIRST_COMPLETED)
                if writer.done():
                    # The writer only stops early on an error (e.g. disk full): stop the workers, who would
                    # otherwise block forever on a full queue, and raise the writer's error.
                    workers.cancel()
                    await asyncio.gather(workers, return_exceptions=True)
                    writer.result()
                await workers
            finally:
                if not writer.done():
                    await ctx.queue.put(None)
                    await writer
        return ctx.abort_reason


# --------------------------------------------------------------------------------------------------- run


def check_endpoint(base_url: str, key_env: str, fields: str = "api.") -> None:
    """An endpoint's base URL and key variable name; `fields` prefixes the field names in the error line."""
    try:
        url = httpx.URL(base_url)
        ok_url = url.scheme in ("http", "https") and bool(url.host)
    except (httpx.InvalidURL, TypeError, ValueError):
        ok_url = False
    if not ok_url:
        flag = "--base-url " if fields == "api." else f"{fields}base_url="
        raise ConfigError(
            f"{fields}base_url '{safe_url(base_url)}' is not an http(s) URL; pass e.g. {flag}http://127.0.0.1:8000/v1"
        )
    if not _ENV_NAME.match(key_env):
        # Never echo the value: the usual mistake here is pasting the key itself.
        raise ConfigError(
            f"{fields}api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key itself"
        )


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


def run_synth_api(cfg: ApiSynthConfig, agents: AgentLoop | None = None) -> dict:
    """Generate CBT records for every question of `cfg.input` through the endpoint; resumable.

    `agents` (api.agents.enabled; built by data_pipeline.synth_agents.run_synth_api_agents) critiques and revises
    every answer instead of writing the first valid one. Returns the summary dict (total, ok, skipped, retried,
    rejected, input_rejected, not_attempted, prompt_tokens, completion_tokens, ..., and "agents" with them), also
    written to out_dir/summary.json. Raises ConfigError for a bad config, or when the endpoint refuses the very
    first requests (HTTP 401/403/404).
    """
    check_config(cfg)
    if cfg.agents.enabled and agents is None:
        raise ConfigError(
            "api.agents.enabled: the critic comes from the evaluation stage; run `cbt-llm synth api --agents` "
            "(or data_pipeline.synth_agents.run_synth_api_agents with a critic)"
        )
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
        abort_reason = asyncio.run(run_pool(cfg, todo, process, keys, (records_path, rejects_path), stats))
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
    if agents:
        rows.update(agents.rows(summary["agents"]))
    print_summary(f"synth api: {cfg.model} ({cfg.prompt_version})", rows)
    if abort_reason:
        raise ConfigError(abort_reason)
    return summary
