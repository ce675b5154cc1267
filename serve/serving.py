"""The chat completions service behind the HTTP routes (serve/app.py): the key check, the request's body and
fields, the wait for the model, the guarded reply, the response (plain or server-sent events) and the metrics.

Every completion goes through the crisis guard, streaming or not (serve/guarded.py: the guard's verdict on the user
turn and its note for the model, the output check, the crisis block first and the disclaimer on a conversation's
first reply).

Streaming (`"stream": true`) streams the model's text as it is made, through the guard (serve/guarded.py's
GuardedStream over serve/streaming.py's token stream, the same path as `cbt-llm chat`): the role first, then the
crisis block in a crisis (before the model starts), then the model's text a sentence at a time as the guard's
OutputStream releases it (each sentence only once every layer of the output check has read the text up to it), then
the disclaimer on a conversation's first reply, the finish reason, the usage chunk when
stream_options.include_usage asks, and `data: [DONE]`. When the output check trips mid-stream, the text already
sent stays, nothing held back is sent, the crisis block follows as the replacement, the model is stopped and the
finish reason is "stop". A prompt too long for the context is a 400 before the stream starts; a generation that fails
once it has started ends the stream with an error event in OpenAI's shape. Usage of a streamed reply: prompt
tokens as for a plain one, completion tokens the tokens the model generated (a local model's counted off its
generated ids by the plain reply's rule; other engines' as they report them).

A stream holds its slot (below) until the model is done; the generation runs in a worker thread, which hands the
pieces to the response through a queue. A client that hangs up mid-stream stops the model after its next token
(serve.streaming.Generation.cancel) and frees the slot once it has stopped.

One generation at a time, or `engine.concurrency` at once for an engine that batches them (serve/batching.py)
or forwards them (serve/remote.py): requests wait on an asyncio semaphore (queue depth is the /metrics gauge
cbt_llm_queue_depth) and the generation itself runs in a worker thread, so /health and /metrics answer while a
request is being served. A streamed request to the batching engine is not batched: it holds the model alone for
as long as its tokens come (serve/batching.py). At most `max_queue` requests wait; one more gets a 503 with
Retry-After instead of growing memory. A request whose client went away while it waited is skipped (counted as
status 499), not generated.

Security and limits: with `api_key` set, /v1/* needs `Authorization: Bearer <key>` (compared in constant time;
otherwise a 401 in OpenAI's error shape); /health and /metrics stay open (they hold no message text, and health
checks and Prometheus scrapers carry no key). A body over `max_body_bytes` (by Content-Length or as read) is a
413, a prompt that does not fit the model's context a 400 naming `messages`. Nothing here logs message text.

The reply length and a long conversation (serve/context.py): a request without max_tokens gets what the model's
context has left after the prompt (at most the server's max_tokens_limit); an explicit one that does not fit is a 400
naming it. A conversation longer than the context is a 400 naming `messages`, unless the service trims (`trim_history`,
serve.trim_history): then its oldest turns are dropped from what the model sees, after the guard has read them all.
`n` > 1 answers with n choices, each through the guard's output check (serve/guarded.py's guarded_replies); streamed,
the choices come one after another, each with its own index, role and finish reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cbt_llm.domain.guard import CrisisGuard
from serve.context import ReplyBudget
from serve.engine import PromptTooLong
from serve.guarded import GuardedReply, GuardedStream, guarded_replies
from serve.metrics import ServeMetrics
from serve.protocol import (
    SSE_DONE,
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Limits,
    ModelCard,
    ModelList,
    Usage,
    parse_chat_request,
)
from serve.streaming import Generation, model_deltas

RETRY_AFTER_S = 1
_END = object()  # the last item a stream's worker hands over
_CHOICE_DONE = object()  # a choice's stream is done


class ClientGone(Exception):
    """The client hung up while its request waited for the model: nobody to answer."""


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class ChatService:
    """Chat completions from `engine` (serve.engine.Engine or anything with .name and .generate_one; with
    .concurrency, that many requests may be in generate_one at once) behind `guard`.

    api_key         when set, /v1/* needs `Authorization: Bearer <api_key>`
    max_queue       requests that may wait for the model; one more gets a 503 with Retry-After
    max_body_bytes  larger request bodies get a 413
    limits          the largest max_tokens a request may ask for, and what one that names none gets when the
                    model's context is unknown
    trim_history    drop a conversation's oldest turns to fit the model's context (else a 400 naming `messages`)
    """

    def __init__(
        self,
        engine,
        guard: CrisisGuard,
        *,
        limits: Limits,
        api_key: str | None,
        max_queue: int,
        max_body_bytes: int,
        trim_history: bool = False,
    ):
        self.engine, self.guard, self.limits = engine, guard, limits
        advice = (
            "shorten the latest message"
            if trim_history
            else "shorten the conversation, or start the server with serve.trim_history: true (--trim-history) to "
            "drop its oldest turns"
        )
        self.budget = ReplyBudget(
            engine, cap=limits.max_tokens, trim=trim_history, fallback=limits.default_max_tokens, advice=advice
        )
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.concurrency = max(1, int(getattr(engine, "concurrency", 1)))
        self._slots = asyncio.Semaphore(self.concurrency)
        self._workers = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="cbt-serve")
        self._waiting = 0  # requests waiting for a slot (the running ones not included)
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = ServeMetrics(engine, guard, self.concurrency)

    # -- the routes ----------------------------------------------------------------------------------------------

    def health(self) -> dict:
        return {"status": "ok", "model": self.engine.name}

    def models(self, request: Request) -> Response | dict:
        try:
            self.authorize(request)
        except APIError as exc:
            return error_response(exc)
        return ModelList(data=[ModelCard(id=self.engine.name)]).model_dump()

    async def chat_completions(self, request: Request) -> Response:
        """One chat completion, every outcome counted in the metrics by its HTTP status."""
        started = time.perf_counter()
        try:
            self.authorize(request)
            req = await self.read_request(request)
            if req.stream:
                return await self._stream(request, req, started)
            async with self._slot(request):
                answers = await self._generate(req)
        except APIError as exc:
            self.metrics.count(exc.status)
            return error_response(exc)
        except ClientGone:
            self.metrics.count(499)
            return Response(status_code=499)
        done = [a.completion for a in answers]
        usage = Usage.of(done[0].prompt_tokens, sum(c.completion_tokens for c in done))
        self._count_tokens(usage)
        self.metrics.count(200)
        self.metrics.latency.observe(time.perf_counter() - started)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [
            Choice(index=i, message=AssistantMessage(content=a.text), finish_reason=a.completion.finish)
            for i, a in enumerate(answers)
        ]
        reply = ChatCompletion(id=rid, created=created, model=self.engine.name, choices=choices, usage=usage)
        return JSONResponse(reply.model_dump())

    # -- the steps of a request ----------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """Nothing when the request may pass; a 401 APIError in OpenAI's shape otherwise."""
        if self._expected is None:
            return
        # the header's raw bytes (Starlette decodes headers as latin-1), so a UTF-8 key matches too
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, self._expected):
            raise APIError(
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                status=401,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_request(self, request: Request) -> ChatCompletionRequest:
        """The request's body as JSON, then its fields, checked: a 413 or 400 APIError otherwise."""
        raw = await read_body(request, self.max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError("the request body is not valid JSON") from None
        return parse_chat_request(body, self.limits)

    @contextlib.asynccontextmanager
    async def _slot(self, request: Request) -> AsyncIterator[None]:
        """Wait for one of the model's `concurrency` slots and hold it: a 503 APIError when `max_queue` requests
        wait already, ClientGone when the client left while this one waited."""
        await self._take_slot(request)
        try:
            yield
        finally:
            self._slots.release()

    async def _take_slot(self, request: Request) -> None:
        """_slot's wait, for a holder that gives the slot back itself (self._slots.release(), once)."""
        if self._waiting >= self.max_queue:
            raise APIError(
                f"the server is busy ({self._waiting} requests waiting); retry shortly",
                status=503,
                kind="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._waiting += 1
        self.metrics.queue.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self.metrics.queue.dec()
        try:
            if await request.is_disconnected():  # the client gave up while it waited: nobody to answer
                raise ClientGone
        except BaseException:
            self._slots.release()
            raise

    def _gen(self, req: ChatCompletionRequest) -> dict:
        """generate_one's options of a request, and the fit that sizes its reply to the model's context."""
        return {
            "max_new_tokens": req.reply_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "stop": req.stop,
            "fit": functools.partial(self.budget, field=req.reply_tokens_field),
        }

    async def _generate(self, req: ChatCompletionRequest) -> list[GuardedReply]:
        """The request's `n` guarded replies, made in a worker thread: a 400 APIError when the prompt does not fit
        the model's context (naming `messages`, or the reply length asked for), a 500 when generation fails (the
        server keeps serving)."""
        # the guard runs in the worker thread too: it is thread-safe, and cheap next to the model
        call = functools.partial(
            guarded_replies,
            self.engine,
            self.guard,
            req.message_dicts(),
            req.user,
            req.n,
            block_when_no_room=True,
            **self._gen(req),
        )
        self.metrics.in_flight.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._workers, call)
        except Exception as exc:
            raise failure(exc) from None
        finally:
            self.metrics.in_flight.dec()

    def _count_tokens(self, usage: Usage) -> None:
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)

    # -- a streamed reply -----------------------------------------------------------------------------------------

    async def _stream(self, request: Request, req: ChatCompletionRequest, started: float) -> StreamingResponse:
        """The guarded reply as server-sent events while the model makes it. The slot is taken here (a 503, or
        ClientGone) and the prompt checked (a 400) before the stream starts; from then on a worker thread runs the
        GuardedStreams (one per choice of `n`, one after another) and hands their pieces over, and gives the slot
        back once the model is done."""
        await self._take_slot(request)
        loop = asyncio.get_running_loop()
        runs = [Generation() for _ in range(req.n)]
        gen = self._gen(req)
        messages = req.message_dicts()

        def start() -> list[GuardedStream]:  # in a worker: the guard reads the user turn once, for every choice
            streams: list[GuardedStream] = []
            for i, run in enumerate(runs):
                seed = {"seed": req.seed + i} if req.seed is not None else {}
                verdict = streams[0].verdict if streams else None
                stream = GuardedStream(
                    model_deltas(self.engine, run),
                    self.guard,
                    messages,
                    req.user,
                    verdict=verdict,
                    block_when_no_room=True,
                    **(gen | seed),
                )
                stream.start()
                streams.append(stream)
            return streams

        self.metrics.in_flight.inc()
        try:
            streams = await loop.run_in_executor(self._workers, start)
        except BaseException as exc:
            self.metrics.in_flight.dec()
            self._slots.release()
            if isinstance(exc, Exception):
                raise failure(exc) from None
            raise
        self.metrics.count(200)
        pieces: asyncio.Queue = asyncio.Queue()
        worker = self._workers.submit(_drive, streams, runs, loop, pieces)

        def finished(_) -> None:  # in the loop: the model is done, the slot goes back
            self.metrics.in_flight.dec()
            self._slots.release()
            self._count_tokens(_usage(runs))
            self.metrics.latency.observe(time.perf_counter() - started)

        worker.add_done_callback(lambda _: _call_soon(loop, finished, None))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = self._events(rid, created, streams, runs, pieces, req.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(
        self,
        rid: str,
        created: int,
        streams: list[GuardedStream],
        runs: list[Generation],
        pieces: asyncio.Queue,
        usage: bool,
    ) -> AsyncIterator[str]:
        """chat.completion.chunk events: the role of every choice, then each piece as it comes (with its choice's
        index) and each choice's finish reason once it is done, the usage chunk when asked for, then [DONE]; an
        error event in OpenAI's shape instead when the generation fails. Leaving early (the client hung up) stops
        the model."""

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(
                id=rid, created=created, model=self.engine.name, choices=choices, usage=usage
            ).sse()

        try:
            for i in range(len(streams)):
                yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            while (item := await pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    err = APIError(f"generation failed: {item.__class__.__name__}", status=500, kind="server_error")
                    yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
                    return
                i, piece = item
                if piece is not _CHOICE_DONE:
                    yield chunk([ChunkChoice(index=i, delta=Delta(content=piece))])
                    continue
                # a reply the guard cut ends with the crisis block: "stop", as its model was stopped (not cut by
                # length)
                reply = streams[i].reply
                finish = "stop" if reply is not None and reply.replaced else runs[i].finish
                yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=finish)])
            if usage:
                yield chunk([], _usage(runs))
            yield SSE_DONE
        finally:
            for run in runs:  # a client gone mid-stream: the model stops after its next token (a no-op once done)
                run.cancel()


def failure(exc: Exception) -> APIError:
    """A generation's exception as the reply the client gets: a prompt that does not fit is a 400 naming what to
    change (`messages` or the reply length), an upstream's 400 (serve --backend proxy) its reason as a 400, anything
    else a 500 that names the exception's class only."""
    if isinstance(exc, PromptTooLong):
        return APIError(str(exc), exc.param)
    if getattr(exc, "status_code", None) == 400:  # the openai client's BadRequestError from an upstream
        body = getattr(exc, "body", None)
        reason = body.get("message") if isinstance(body, dict) else None
        return APIError(f"the upstream server refused the request: {reason or exc}", getattr(exc, "param", None))
    return APIError(f"generation failed: {exc.__class__.__name__}", status=500, kind="server_error")


def _usage(runs: list[Generation]) -> Usage:
    """The usage of a streamed request: its prompt once, the tokens of every choice."""
    return Usage.of(runs[0].prompt_tokens, sum(r.completion_tokens for r in runs))


def _drive(
    streams: list[GuardedStream], runs: list[Generation], loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue
) -> None:
    """A stream's worker thread: each GuardedStream's pieces, as (choice index, piece), into `pieces` (in the loop's
    thread), then (index, _CHOICE_DONE); an exception if one failed; then _END. Stops early once the reader
    cancelled the runs."""
    try:
        for i, (stream, run) in enumerate(zip(streams, runs)):
            it = iter(stream)
            try:
                for piece in it:
                    if run.cancelled.is_set() or not _call_soon(loop, pieces.put_nowait, (i, piece)):
                        return
            finally:
                it.close()  # the model stops (when the loop above ended early) and is waited for
            if run.cancelled.is_set() or not _call_soon(loop, pieces.put_nowait, (i, _CHOICE_DONE)):
                return
    except Exception as exc:
        _call_soon(loop, pieces.put_nowait, exc)
    finally:
        _call_soon(loop, pieces.put_nowait, _END)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, arg) -> bool:
    """fn(arg) in the loop's thread; False when the loop is gone (the server stopped)."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        return False
    return True


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes: a 413 APIError by Content-Length, or once more was read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise APIError("the Content-Length header is not a number") from None
        if too_big:
            raise APIError(f"the request body is over {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"the request body is over {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)
