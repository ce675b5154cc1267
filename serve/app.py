"""The OpenAI-compatible HTTP layer: /v1/chat/completions (plain and SSE streaming), /v1/models, /health, /metrics.

Every completion goes through the crisis guard, streaming or not (serve/guarded.py: the guard's verdict on the user
turn and its note for the model, the output check, the crisis block first and the disclaimer on a conversation's
first reply).

Streaming does not stream tokens as the model makes them: the whole reply is generated, checked and wrapped first,
then sent as SSE chunks. A token stream would show model text before the output check could replace it, and the
crisis block must come before any model text anyway.

One generation at a time, or `engine.concurrency` at once for an engine that batches them (serve/batching.py)
or forwards them (serve/remote.py): requests wait on an asyncio semaphore (queue depth is the /metrics gauge
cbt_llm_queue_depth) and the generation itself runs in a worker thread, so /health and /metrics answer while a
request is being served. At most `max_queue` requests wait; one more gets a 503 with Retry-After instead of
growing memory. A request whose client went away while it waited is skipped (counted as status 499), not
generated.

Security and limits: with `api_key` set, /v1/* needs `Authorization: Bearer <key>` (compared in constant time;
otherwise a 401 in OpenAI's error shape); /health and /metrics stay open (they hold no message text, and health
checks and Prometheus scrapers carry no key). A body over `max_body_bytes` (by Content-Length or as read) is a
413, a prompt that does not fit the model's context a 400 naming `messages`. Nothing here logs message text:
uvicorn's access log has the method, path and status only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import json
import time
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from cbt_llm.domain.guard import CrisisGuard
from serve.engine import PromptTooLong
from serve.guarded import guarded_reply

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
CHUNK_CHARS = 8  # characters per streamed chunk
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any conversation the model's context holds
MAX_QUEUE = 64
RETRY_AFTER_S = 1


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise BadRequest(f"'{name}' must be in {left}{lo}, {hi}], got {value}", name)
    return value


def parse_request(body, max_tokens_limit: int, default_max_tokens: int) -> dict:
    """The request's fields, checked; BadRequest naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and (p.get("type") != "text" or isinstance(p.get("text", ""), str)) for p in content
        )
        if not isinstance(content, str) and not parts_ok:
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be a user turn", "messages")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, max_tokens_limit, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop)
    ):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return {
        "messages": messages,
        "max_tokens": max_tokens if max_tokens is not None else min(default_max_tokens, max_tokens_limit),
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "seed": _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        "stop": stop or [],
        "stream": stream,
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage")),
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }


class GuardCollector:
    """The guard's counters on every scrape: categories and counts only, never message text."""

    def __init__(self, guard: CrisisGuard):
        self.guard = guard

    def collect(self):
        m = self.guard.metrics()
        turns = CounterMetricFamily("cbt_llm_guard_user_turns", "user turns checked by the crisis guard")
        turns.add_metric([], m["user_turns_total"])
        crisis = CounterMetricFamily("cbt_llm_guard_crisis_turns", "crisis user turns by category", labels=["category"])
        for cat, n in sorted(m["crisis_turns_total"].items()):
            crisis.add_metric([str(cat)], n)
        mode = CounterMetricFamily("cbt_llm_guard_crisis_mode_turns", "turns in crisis mode from an earlier turn")
        mode.add_metric([], m["crisis_mode_turns_total"])
        replaced = CounterMetricFamily(
            "cbt_llm_guard_output_replaced", "model outputs replaced by the crisis block", labels=["reason"]
        )
        for reason, n in sorted(m["output_replaced_total"].items()):
            replaced.add_metric([str(reason)], n)
        yield from (turns, crisis, mode, replaced)


class BatchCollector:
    """A batching engine's counters (serve/batching.py): generate calls made, and the requests they answered."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        batches = CounterMetricFamily("cbt_serve_batches", "generate calls on the model (batches, lone samples)")
        batches.add_metric([], self.engine.batches)
        answered = CounterMetricFamily("cbt_serve_batched_requests", "requests answered by those generate calls")
        answered.add_metric([], self.engine.requests)
        yield from (batches, answered)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes: a 413 BadRequest by Content-Length, or once more was read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise BadRequest("the Content-Length header is not a number") from None
        if too_big:
            raise BadRequest(f"the request body is over {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    engine,
    guard: CrisisGuard | None = None,
    *,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 512,
    api_key: str | None = None,
    max_queue: int = MAX_QUEUE,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app around `engine` (serve.engine.Engine or anything with .name and .generate_one; with
    .concurrency, that many requests may be in generate_one at once).

    api_key         when set, /v1/* needs `Authorization: Bearer <api_key>`
    max_queue       requests that may wait for the model; one more gets a 503 with Retry-After
    max_body_bytes  larger request bodies get a 413
    """
    guard = guard or CrisisGuard()
    app = FastAPI(title="cbt-llm serve", docs_url=None, redoc_url=None)
    concurrency = max(1, int(getattr(engine, "concurrency", 1)))
    lock = asyncio.Semaphore(concurrency)
    workers = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="cbt-serve")
    waiting = 0  # requests waiting for the lock (the running one not included)
    expected = f"Bearer {api_key}".encode() if api_key else None
    reg = CollectorRegistry()
    requests = Counter("cbt_llm_requests", "chat completion requests by HTTP status", ["status"], registry=reg)
    tokens = Counter("cbt_llm_tokens", "tokens by kind (prompt, completion)", ["kind"], registry=reg)
    latency = Histogram(
        "cbt_llm_request_seconds",
        "chat completion latency, queueing included",
        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        registry=reg,
    )
    queue = Gauge("cbt_llm_queue_depth", "requests waiting for the model", registry=reg)
    in_flight = Gauge("cbt_llm_in_flight", f"generations running (0 to {concurrency})", registry=reg)
    reg.register(GuardCollector(guard))
    if hasattr(engine, "batches"):
        reg.register(BatchCollector(engine))
    app.state.engine, app.state.guard, app.state.registry = engine, guard, reg

    def fail(exc: BadRequest) -> JSONResponse:
        requests.labels(str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.param), status_code=exc.status)

    def unauthorized(request: Request) -> JSONResponse | None:
        """None when the request may pass; a 401 in OpenAI's shape otherwise."""
        if expected is None:
            return None
        # the header's raw bytes (Starlette decodes headers as latin-1), so a UTF-8 key matches too
        given = request.headers.get("authorization", "").encode("latin-1")
        if hmac.compare_digest(given, expected):
            return None
        body = error_body("missing or wrong API key: send `Authorization: Bearer <key>`")
        body["error"]["code"] = "invalid_api_key"
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "cbt-llm"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(reg).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        nonlocal waiting
        t0 = time.perf_counter()
        if (denied := unauthorized(request)) is not None:
            requests.labels("401").inc()
            return denied
        try:
            raw = await read_body(request, max_body_bytes)
        except BadRequest as exc:
            return fail(exc)
        try:
            body = json.loads(raw)
        except ValueError:
            return fail(BadRequest("the request body is not valid JSON"))
        try:
            req = parse_request(body, max_tokens_limit, default_max_tokens)
        except BadRequest as exc:
            return fail(exc)

        if waiting >= max_queue:
            requests.labels("503").inc()
            body = error_body(f"the server is busy ({waiting} requests waiting); retry shortly", kind="server_busy")
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        gen = {k: req[k] for k in ("temperature", "top_p", "seed", "stop")}
        waiting += 1
        queue.inc()
        try:
            await lock.acquire()
        finally:
            waiting -= 1
            queue.dec()
        try:
            if await request.is_disconnected():  # the client gave up while it waited: nobody to answer
                requests.labels("499").inc()
                return Response(status_code=499)
            in_flight.inc()
            try:
                # the guard runs in the worker thread too: it is thread-safe, and cheap next to the model
                call = functools.partial(
                    guarded_reply, engine, guard, req["messages"], req["user"], max_new_tokens=req["max_tokens"], **gen
                )
                answer = await asyncio.get_running_loop().run_in_executor(workers, call)
            except PromptTooLong as exc:
                return fail(BadRequest(str(exc), "messages"))
            except Exception as exc:  # the server keeps serving; the client gets a 500 in OpenAI's shape
                requests.labels("500").inc()
                body = error_body(f"generation failed: {exc.__class__.__name__}", kind="server_error")
                return JSONResponse(body, status_code=500)
            finally:
                in_flight.dec()
        finally:
            lock.release()
        out, reply = answer.completion, answer.text
        usage = {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        }
        tokens.labels("prompt").inc(out.prompt_tokens)
        tokens.labels("completion").inc(out.completion_tokens)
        requests.labels("200").inc()
        latency.observe(time.perf_counter() - t0)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req["stream"]:
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": engine.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": out.finish,
                    }
                ],
                "usage": usage,
            }
        return StreamingResponse(
            _sse(rid, created, engine.name, reply, out.finish, usage if req["include_usage"] else None),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


def _sse(rid: str, created: int, model: str, reply: str, finish: str, usage: dict | None) -> Iterator[str]:
    """The already guarded reply as OpenAI chat.completion.chunk events, then [DONE]."""

    def event(choices: list[dict], **extra) -> str:
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        return f"data: {json.dumps({**c, **extra}, ensure_ascii=False)}\n\n"

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return event([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    yield chunk({"role": "assistant", "content": ""})
    for i in range(0, len(reply), CHUNK_CHARS):
        yield chunk({"content": reply[i : i + CHUNK_CHARS]})
    yield chunk({}, finish)
    if usage is not None:
        yield event([], usage=usage)  # stream_options.include_usage: one last chunk with no choices
    yield "data: [DONE]\n\n"


def serve(engine, host: str = "127.0.0.1", port: int = 8000, graceful_s: int = 30, **app_kwargs) -> None:
    """Run the app with uvicorn until interrupted. On SIGTERM or Ctrl-C uvicorn stops accepting connections and
    lets the requests in flight finish, for at most `graceful_s` seconds, then exits."""
    import uvicorn

    uvicorn.run(
        create_app(engine, **app_kwargs),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=graceful_s,
    )
