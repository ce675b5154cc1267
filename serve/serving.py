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
from serve.engine import PromptTooLong
from serve.guarded import GuardedReply, GuardedStream, guarded_reply
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
    limits          the largest max_tokens a request may ask for, and what one that names none gets
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
    ):
        self.engine, self.guard, self.limits = engine, guard, limits
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
                answer = await self._generate(req)
        except APIError as exc:
            self.metrics.count(exc.status)
            return error_response(exc)
        except ClientGone:
            self.metrics.count(499)
            return Response(status_code=499)
        completion = answer.completion
        usage = Usage.of(completion.prompt_tokens, completion.completion_tokens)
        self._count_tokens(usage)
        self.metrics.count(200)
        self.metrics.latency.observe(time.perf_counter() - started)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choice = Choice(message=AssistantMessage(content=answer.text), finish_reason=completion.finish)
        reply = ChatCompletion(id=rid, created=created, model=self.engine.name, choices=[choice], usage=usage)
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

    async def _generate(self, req: ChatCompletionRequest) -> GuardedReply:
        """The guarded reply, made in a worker thread: a 400 APIError naming `messages` when the prompt does not fit
        the model's context, a 500 when generation fails (the server keeps serving)."""
        gen = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stop": req.stop}
        # the guard runs in the worker thread too: it is thread-safe, and cheap next to the model
        call = functools.partial(
            guarded_reply, self.engine, self.guard, req.message_dicts(), req.user, max_new_tokens=req.max_tokens, **gen
        )
        self.metrics.in_flight.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._workers, call)
        except PromptTooLong as exc:
            raise APIError(str(exc), "messages") from None
        except Exception as exc:
            raise APIError(f"generation failed: {exc.__class__.__name__}", status=500, kind="server_error") from None
        finally:
            self.metrics.in_flight.dec()

    def _count_tokens(self, usage: Usage) -> None:
        self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(usage.completion_tokens)

    # -- a streamed reply -----------------------------------------------------------------------------------------

    async def _stream(self, request: Request, req: ChatCompletionRequest, started: float) -> StreamingResponse:
        """The guarded reply as server-sent events while the model makes it. The slot is taken here (a 503, or
        ClientGone) and the prompt checked (a 400) before the stream starts; from then on a worker thread runs the
        GuardedStream and hands its pieces over, and gives the slot back once the model is done."""
        await self._take_slot(request)
        loop = asyncio.get_running_loop()
        run = Generation()
        gen = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stop": req.stop}
        stream = GuardedStream(
            model_deltas(self.engine, run),
            self.guard,
            req.message_dicts(),
            req.user,
            max_new_tokens=req.max_tokens,
            **gen,
        )
        self.metrics.in_flight.inc()
        try:
            await loop.run_in_executor(self._workers, stream.start)
        except BaseException as exc:
            self.metrics.in_flight.dec()
            self._slots.release()
            if isinstance(exc, PromptTooLong):
                raise APIError(str(exc), "messages") from None
            if isinstance(exc, Exception):
                raise APIError(
                    f"generation failed: {exc.__class__.__name__}", status=500, kind="server_error"
                ) from None
            raise
        self.metrics.count(200)
        pieces: asyncio.Queue = asyncio.Queue()
        worker = self._workers.submit(_drive, stream, run, loop, pieces)

        def finished(_) -> None:  # in the loop: the model is done, the slot goes back
            self.metrics.in_flight.dec()
            self._slots.release()
            self._count_tokens(Usage.of(run.prompt_tokens, run.completion_tokens))
            self.metrics.latency.observe(time.perf_counter() - started)

        worker.add_done_callback(lambda _: _call_soon(loop, finished, None))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = self._events(rid, created, stream, run, pieces, req.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(
        self, rid: str, created: int, stream: GuardedStream, run: Generation, pieces: asyncio.Queue, usage: bool
    ) -> AsyncIterator[str]:
        """chat.completion.chunk events: the role, each piece as it comes, the finish reason, the usage chunk when
        asked for, then [DONE]; an error event in OpenAI's shape instead when the generation fails. Leaving early
        (the client hung up) stops the model."""

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(
                id=rid, created=created, model=self.engine.name, choices=choices, usage=usage
            ).sse()

        try:
            yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
            while (item := await pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    err = APIError(f"generation failed: {item.__class__.__name__}", status=500, kind="server_error")
                    yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
                    return
                yield chunk([ChunkChoice(delta=Delta(content=item))])
            # a reply the guard cut ends with the crisis block: "stop", as its model was stopped (not cut by length)
            finish = "stop" if stream.reply is not None and stream.reply.replaced else run.finish
            yield chunk([ChunkChoice(delta=Delta(), finish_reason=finish)])
            if usage:
                yield chunk([], Usage.of(run.prompt_tokens, run.completion_tokens))
            yield SSE_DONE
        finally:
            run.cancel()  # a client gone mid-stream: the model stops after its next token (a no-op once it is done)


def _drive(stream: GuardedStream, run: Generation, loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue) -> None:
    """A stream's worker thread: the GuardedStream's pieces into `pieces` (in the loop's thread), then an exception
    if it failed, then _END; stops early once the reader cancelled `run`."""
    it = iter(stream)
    try:
        for piece in it:
            if run.cancelled.is_set() or not _call_soon(loop, pieces.put_nowait, piece):
                break
    except Exception as exc:
        _call_soon(loop, pieces.put_nowait, exc)
    finally:
        it.close()  # the model stops (when the loop above ended early) and is waited for
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
