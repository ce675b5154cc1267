"""The OpenAI-compatible client every `synth api` job shares: requests with retries and backoff, a pool of
concurrent requests feeding one writer, the run's counters, and the output folder's resume and rotation.

Retryable failures (429, 5xx, timeouts, connection errors, unusable replies) are retried with backoff (a server's
Retry-After wins). A model's answer the crisis guard's output check stops (stop_unsafe: every layer of the guard the
run built once, with reply_guard, from the config's guard section) is an unusable reply like any other: retried,
then rejected with the harm kind in its reason, and counted by kind (Stats.unsafe), so it never reaches a corpus.
401/403/404 before any success stop the run with one line naming the field to fix, instead of rejecting every
question; a run where nothing connects says so once. API keys only ever go into the Authorization
header, and reasons quoted from server replies are scrubbed of them before they reach any file.
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
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from cbt_llm.core.config import ApiSynthConfig, GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import write_text_atomic
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.inference.safety_model import build_guard
from data_pipeline.io import dumps

RECORDS_FILE = "records.jsonl"


REJECTS_FILE = "rejects.jsonl"


SUMMARY_FILE = "summary.json"


# Statuses that mean the endpoint, model or credentials are wrong rather than this one question: when they
# arrive before any success, the run stops with one clear line instead of rejecting every question.
_FATAL_STATUSES = frozenset({401, 403, 404})


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_USERINFO = re.compile(r"//[^/@]*@")


class Retryable(Exception):
    def __init__(self, kind: str, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.retry_after = kind, reason, retry_after


class _Fatal(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


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
    unsafe: Counter = field(default_factory=Counter)  # harm kind -> replies the guard's output check stopped


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
class RunContext:
    """What every request of one run shares: the config, the HTTP client, the concurrency limit, the writer's
    queue, the counters and the abort flag; `redact` keeps the API keys out of every reason that reaches a file."""

    cfg: ApiSynthConfig
    keys: tuple[str, ...]
    client: httpx.AsyncClient
    sem: asyncio.Semaphore
    queue: asyncio.Queue
    stats: Stats
    rng: random.Random
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str | None = None
    guard: CrisisGuard | None = None  # the output check every model answer passes (None: none, for tests only)

    def redact(self, text: str) -> str:
        # A server may quote the key back in an error body (OpenAI does, partly): never let it reach a file.
        text = " ".join(str(text).split())
        for key in self.keys:
            text = text.replace(key, "***")
        return text


def reply_guard(guard: GuardConfig | CrisisGuard | None) -> CrisisGuard:
    """The guard a run checks its model answers with, built once: a config's guard section (cfg.guard, what the
    CLI passes), a guard already built, or None for the default guard section (the shipped learned layer)."""
    if isinstance(guard, CrisisGuard):
        return guard
    return build_guard(guard if guard is not None else GuardConfig())


def stop_unsafe(ctx: RunContext, text: str, what: str) -> None:
    """Raise Retryable("unsafe_reply") when the run's guard's output check (read_reply_text: every layer) stops
    `text`, the model's answer as it would be written; the reason names `what`, the harm kind and the layer, and
    the kind is counted in ctx.stats.unsafe."""
    if ctx.guard is None:
        return
    kind, layer = ctx.guard.read_reply_text(text)
    if kind is None:
        return
    ctx.stats.unsafe[kind] += 1
    raise Retryable("unsafe_reply", f"{what} stopped by the crisis guard's output check: {kind} ({layer} layer)")


class GiveUp(Exception):
    """No usable reply after every attempt, or a non-retryable HTTP error: the reject's reason, counts and stage."""

    def __init__(self, reason: str, attempts: int, errors: list[str], stage: str = "api"):
        super().__init__(reason)
        self.reason, self.attempts, self.errors, self.stage = reason, attempts, errors, stage


class Aborted(Exception):
    """The run is stopping (the endpoint refused its first requests, or nothing connects): ask nothing more."""


async def _post(ctx: RunContext, ep: Endpoint, body: dict) -> dict:
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


async def ask(ctx: RunContext, ep: Endpoint, body: dict, accept: Callable[[dict, int], Any]) -> Any:
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


async def settled(ctx: RunContext, item_id: str, attempt: Awaitable[Any]) -> Any:
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


def _fatal_message(ctx: RunContext, ep: Endpoint, exc: _Fatal) -> str:
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
    process: Callable[[RunContext, Any], Awaitable[None]],
    keys: tuple[str, ...],
    paths: tuple[Path, Path],
    stats: Stats,
    desc: str = "synth api",
    unit: str = "q",
    guard: CrisisGuard | None = None,
) -> str | None:
    """Run `process(ctx, item)` over `todo` with at most cfg.concurrency requests in flight; each process puts one
    ("record" | "reject" | "progress", obj) on ctx.queue, which one writer task appends to paths (records,
    rejects); `guard` is ctx.guard, the output check of stop_unsafe. Returns the reason the run stopped early, or
    None."""
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        ctx = RunContext(
            cfg=cfg,
            keys=tuple(k for k in keys if k),
            client=client,
            sem=asyncio.Semaphore(cfg.concurrency),
            queue=asyncio.Queue(maxsize=1024),
            stats=stats,
            rng=random.Random(),
            guard=guard,
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
