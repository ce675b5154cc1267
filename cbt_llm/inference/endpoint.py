"""Answers from an OpenAI-compatible endpoint (a served model, or an API model as a baseline).

The official `openai` client does the HTTP, and its retries: exponential backoff with jitter on 408/409/429/5xx,
timeouts and dropped connections, honouring Retry-After (`max_retries`). What is ours: bounded concurrency, the
request the eval makes (greedy: temperature 0, the same system prompt and user turn as a local model gets), and
turning a question that still fails into a counted failure with its reason instead of ending the run - unless
every question fails, which means the endpoint is unusable and the run stops with one line saying so.
The API key is read from the environment variable the config names and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time

from tqdm import tqdm

from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.prompt import Generation, Prompt


class EndpointError(ConfigError):
    """The endpoint answered no question at all: one line with the first failure."""


def api_key(api_key_env: str, field: str) -> str:
    """The key from the environment (a local server needs none: a placeholder the client accepts)."""
    if not api_key_env:
        return "not-needed"
    key = os.environ.get(api_key_env, "")
    if not key:
        raise ConfigError(f"{field}.api_key_env: environment variable {api_key_env} is not set; export it first")
    return key


class EndpointGenerator:
    """generate_all over an OpenAI-compatible /v1/chat/completions, `concurrency` requests in flight."""

    backend = "endpoint"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        field: str = "model",
        url_key: str = "endpoint",
    ) -> None:
        # url_key: the config key of the URL under `field`, named in errors (eval.models[i].endpoint, or the
        # session client simulator's eval.sessions.client.base_url)
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{field}.{url_key}: '{base_url}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self.base_url, self.name, self.field, self.url_key = base_url.rstrip("/"), model, field, url_key
        self.key = api_key(api_key_env, field)
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries

    async def _one(self, client, sem: asyncio.Semaphore, prompt: Prompt, max_new_tokens: int) -> Generation:
        async with sem:
            try:
                reply = await client.chat.completions.create(
                    model=self.name, messages=prompt.messages, max_tokens=max_new_tokens, temperature=0.0
                )
                choice = reply.choices[0]
                usage = reply.usage
                return Generation(
                    prompt.id,
                    (choice.message.content or "").strip(),
                    usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0,
                    "length" if choice.finish_reason == "length" else "stop",
                )
            except Exception as exc:  # noqa: BLE001 - any failure of one question is counted, the run goes on
                return Generation(prompt.id, "", 0, 0, "error", error=f"{type(exc).__name__}: {exc}"[:300])

    async def _run(self, prompts: list[Prompt], max_new_tokens: int, bar: tqdm) -> list[Generation]:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.concurrency)
        async with AsyncOpenAI(
            base_url=self.base_url, api_key=self.key, timeout=self.timeout_s, max_retries=self.max_retries
        ) as client:
            tasks = [asyncio.ensure_future(self._one(client, sem, p, max_new_tokens)) for p in prompts]
            for t in asyncio.as_completed(tasks):
                await t
                bar.update(1)
            return [t.result() for t in tasks]

    def generate_all(self, prompts: list[Prompt], *, max_new_tokens: int = 512, progress: bool = True, **_) -> tuple:
        """(generations in prompt order, stats); failed questions have finish "error" and their reason."""
        start = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"eval {self.name}", unit="q", disable=not progress, leave=False) as bar:
            gens = asyncio.run(self._run(prompts, max_new_tokens, bar))
        failed = [g for g in gens if g.finish == "error"]
        if prompts and len(failed) == len(prompts):
            raise EndpointError(
                f"{self.field}.{self.url_key}: {self.base_url} answered none of {len(prompts)} questions "
                f"(first failure: {failed[0].error}); check the URL, the model name and the key"
            )
        seconds = time.perf_counter() - start
        new = sum(g.new_tokens for g in gens)
        stats = {
            "questions": len(prompts),
            "failed": len(failed),
            "prompt_tokens": sum(g.prompt_tokens for g in gens),
            "new_tokens": new,
            "seconds": seconds,
            "tokens_per_s": new / seconds if seconds > 0 else 0.0,
            "backend": self.backend,
        }
        return gens, stats
