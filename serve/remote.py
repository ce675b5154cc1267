"""An OpenAI-compatible server (`cbt-llm serve`, vLLM with LoRA modules, ...) as an engine: `cbt-llm chat --url`
and `cbt-llm serve --backend proxy --upstream URL` both put the local crisis guard (serve/guarded.py) in front of
it, whatever the upstream does."""

from __future__ import annotations

from cbt_llm.domain.crisis import DISCLAIMER


class RemoteEngine:
    """An OpenAI-compatible server (`cbt-llm serve`, vLLM, ...) behind engine.generate_one, through the openai
    client, so the local guard (serve/guarded.py) wraps its replies exactly as it wraps a local model's.

    generate_one returns the whole reply (serve --backend proxy, chat --batch); `cbt-llm chat --url` and a streamed
    request to `serve --backend proxy` stream it instead through serve/streaming.py, text shown only as the guard's
    OutputStream (cbt_llm.domain.guard) releases it. A guarded server's own disclaimer is dropped here, since the
    local guard adds it by the same rule; a crisis block the server put first is kept, and the local guard does
    not add a second one."""

    def __init__(
        self, url: str, model: str | None = None, api_key: str = "unused", timeout: float = 600.0, concurrency: int = 1
    ):
        import openai

        self.concurrency = concurrency  # requests `cbt-llm serve --backend proxy` forwards at once (the client is
        # thread-safe; the upstream batches them itself)
        self.client = openai.OpenAI(base_url=url.rstrip("/"), api_key=api_key, max_retries=0, timeout=timeout)
        self.name = model or self._first_model()

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except Exception:  # a server without /v1/models: any name will do for servers serving one model
            return "default"
        return models[0].id if models else "default"

    @staticmethod
    def options(max_new_tokens: int | None, seed: int | None) -> dict:
        """The optional fields of a request upstream: max_tokens (None: none sent, the server sizes the reply to
        what fits its model, as vLLM and OpenAI do) and seed."""
        kw = {"max_tokens": max_new_tokens} if max_new_tokens is not None else {}
        return kw | ({"seed": seed} if seed is not None else {})

    def stream(self, messages, max_new_tokens, temperature, top_p, seed, stop):
        """The server's reply as SSE chunks, the last of them with the token counts (usage)."""
        return self.client.chat.completions.create(
            model=self.name,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            stop=stop or None,
            stream=True,
            stream_options={"include_usage": True},
            **self.options(max_new_tokens, seed),
        )

    def generate_one(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, stop=None):
        from serve.engine import Completion

        stream = self.stream(messages, max_new_tokens, temperature, top_p, seed, stop)
        parts, finish, usage = [], "stop", None
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        text = "".join(parts).strip()
        if text.endswith(DISCLAIMER):
            text = text[: -len(DISCLAIMER)].rstrip()
        prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        return Completion(text, prompt, completion, finish)
