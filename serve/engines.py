"""The engine behind `cbt-llm serve`, by its --backend: `proxy` forwards every request to an OpenAI-compatible
upstream (serve/remote.py); otherwise the model loads by the inference library's backend rule (auto: vLLM when it
is installed and CUDA is available, else transformers) behind the batching loop (serve/batching.py). The crisis
guard goes in front of whichever it is (serve/app.py).

Bad combinations fail here with one ConfigError line naming the command's flags, before any weights load.
"""

from __future__ import annotations

from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.generate import choose_backend
from serve.batching import BatchingEngine
from serve.engine import Engine, VllmEngine, check_model_args
from serve.remote import RemoteEngine


def build_engine(
    *,
    backend: str = "auto",
    model: str | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    upstream: str | None = None,
    upstream_model: str | None = None,
    upstream_api_key: str | None = None,
    max_batch: int = 8,
    batch_window_s: float = 0.005,
):
    """The engine for `backend` ("auto", "transformers", "vllm" or "proxy").

    model, adapter, device, dtype  the local model (--model, --adapter, --device, --dtype); not with proxy
    upstream, upstream_model       with proxy: the server's URL (.../v1) and the model to ask it for (default: its
                                   first)
    upstream_api_key               with proxy: the upstream's key itself (the caller reads it, e.g. from the
                                   environment); None sends a placeholder, as servers without keys take any
    max_batch                      requests generated (or forwarded) at once
    batch_window_s                 how long a batch waits for more requests, in seconds
    """
    if backend == "proxy":
        if not upstream:
            raise ConfigError("--backend proxy needs --upstream URL (an OpenAI-compatible server, e.g. .../v1)")
        if model or adapter:
            raise ConfigError("--backend proxy: the upstream serves its own model; use --upstream-model, not --model")
        return RemoteEngine(upstream, model=upstream_model, api_key=upstream_api_key or "unused", concurrency=max_batch)
    if upstream:
        raise ConfigError("--upstream goes with --backend proxy")
    check_model_args(model or "", adapter or "")  # one line naming --model / --adapter, before weights load
    try:
        chosen = choose_backend(backend)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("eval.backend", "--backend")) from None
    if chosen == "vllm":
        engine = VllmEngine.load(model, adapter or "", dtype=dtype)
    else:
        engine = Engine.load(model, adapter or "", device=device, dtype=dtype)
    return BatchingEngine(engine, max_batch=max_batch, window_s=batch_window_s)
