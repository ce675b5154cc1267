"""Config section of `cbt-llm serve`: the model or upstream behind the server, batching, where it listens, and the
limits and authentication of its HTTP layer. Every `cbt-llm serve` flag is a shorthand for one of these fields."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cbt_llm.core.config.base import Section


class ServeConfig(Section):
    """`cbt-llm serve`: an OpenAI-compatible chat server with the crisis guard on every reply."""

    model: str = Field("", description="Exported model folder (`cbt-llm export`) or base model.")
    adapter: str = Field("", description="A LoRA adapter folder on top of model.")
    device: str = Field("", description="cpu, cuda or cuda:N (empty: cuda when available).")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16.")
    backend: Literal["auto", "transformers", "vllm", "proxy"] = Field(
        "auto",
        description="auto (vllm when installed and on CUDA, else transformers), transformers, vllm, or proxy "
        "(forward to upstream).",
    )
    max_batch: int = Field(8, ge=1, description="Requests generated together at most.")
    batch_window_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests, in ms.")
    upstream: str = Field("", description="With backend proxy: the OpenAI-compatible server's URL (ending in /v1).")
    upstream_model: str = Field("", description="Model name to ask the upstream for (empty: its first).")
    upstream_api_key_env: str = Field("", description="Environment variable that holds the upstream's key.")
    host: str = Field("127.0.0.1", description="Address to listen on (default: loopback only).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_tokens_limit: int = Field(
        4096,
        ge=1,
        description="Largest max_tokens a request may ask for; a request without one gets what the model's context "
        "has left after the prompt, at most this.",
    )
    trim_history: bool = Field(
        False,
        description="Drop a conversation's oldest turns (never the system turn, the crisis state or the latest user "
        "turn) when it no longer fits the model's context; off: such a request is a 400 naming messages (the client "
        "owns the history).",
    )
    api_key_env: str = Field(
        "",
        description="Require `Authorization: Bearer <key>` on /v1/*, the key read from this environment variable "
        "(empty: no authentication).",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Listen beyond loopback without api_key_env (refused otherwise: a counselling chat open to the "
        "network with no authentication).",
    )
    max_queue: int = Field(64, ge=0, description="Requests that may wait; more get a 503.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Larger request bodies get a 413.")
    graceful_timeout: int = Field(30, ge=0, description="Seconds in-flight requests get on SIGTERM.")
