"""The OpenAI-compatible HTTP routes and the server that runs them: POST /v1/chat/completions (plain and SSE
streaming), GET /v1/models, /health and /metrics.

The routes only route: the service (serve/serving.py) checks the key and the request (serve/protocol.py holds the
request and reply models), waits for the model, and answers through the crisis guard; serve/metrics.py is the
/metrics page. Nothing here logs message text: uvicorn's access log has the method, path and status only.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from cbt_llm.domain.guard import CrisisGuard
from serve.protocol import Limits
from serve.serving import ChatService

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any conversation the model's context holds
MAX_QUEUE = 64


def create_app(
    engine,
    guard: CrisisGuard | None = None,
    *,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 512,
    api_key: str | None = None,
    max_queue: int = MAX_QUEUE,
    max_body_bytes: int = MAX_BODY_BYTES,
    trim_history: bool = False,
) -> FastAPI:
    """The app around `engine` (serve.engine.Engine or anything with .name and .generate_one; with
    .concurrency, that many requests may be in generate_one at once).

    max_tokens_limit    the largest max_tokens a request may ask for (more is a 400)
    default_max_tokens  what a request that names no max_tokens gets when the model's context is unknown (with a
                        known context: what it has left after the prompt); at most max_tokens_limit
    api_key             when set, /v1/* needs `Authorization: Bearer <api_key>`
    max_queue           requests that may wait for the model; one more gets a 503 with Retry-After
    max_body_bytes      larger request bodies get a 413
    trim_history        drop a conversation's oldest turns to fit the model's context (else it is a 400 naming
                        `messages`)
    """
    guard = guard or CrisisGuard()
    service = ChatService(
        engine,
        guard,
        limits=Limits(max_tokens=max_tokens_limit, default_max_tokens=default_max_tokens),
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        trim_history=trim_history,
    )
    app = FastAPI(title="cbt-llm serve", docs_url=None, redoc_url=None)
    app.state.engine, app.state.guard, app.state.service = engine, guard, service
    app.state.registry = service.metrics.registry

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models(request: Request):
        return service.models(request)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.page(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat_completions(request)

    return app


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
