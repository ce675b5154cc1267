"""One chat completion at a time with the transformers backend: the model and tokenizer of evaluation's HFGenerator,
plus what a chat server needs and eval does not (sampling with temperature / top_p / seed, stop strings).

    engine = Engine.load("exported/", adapter="", device=None)
    out = engine.generate_one(messages, max_new_tokens=256, temperature=0.7, top_p=0.9, seed=1, stop=["\\n\\n"])

temperature 0 is greedy, exactly as `cbt-llm eval` decodes. Stop strings are applied to the decoded text after
generation (the model may run past one; its tokens still count in completion_tokens, as they were computed).
Not thread-safe: the server runs one generation at a time (serve/app.py).

A prompt whose tokens plus max_new_tokens do not fit the model's context (config.max_position_embeddings) raises
PromptTooLong before anything is generated; the server answers it with a 400 naming `messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbt_llm.config import ConfigError
from cbt_llm.guard import message_text
from data_pipeline.shards import is_local_path
from evaluation.generate import HFGenerator, Prompt, exported_system_prompt, resolve_model


@dataclass
class Completion:
    """One reply: text (stop strings cut off), prompt and completion token counts, finish "stop" or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str


class PromptTooLong(ValueError):
    """The prompt's tokens plus max_new_tokens exceed the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int):
        super().__init__(
            f"the messages are {prompt_tokens} tokens; with max_tokens {max_new_tokens} that is more than the "
            f"model's context of {context} tokens: shorten the messages or lower max_tokens"
        )
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context


def check_model_args(model: str, adapter: str = "") -> None:
    """Fail before any weights load, with one line naming the flag (--model or --adapter)."""
    if not model:
        raise ConfigError("--model: empty; pass an exported folder (`cbt-llm export`) or a Hugging Face id")
    if is_local_path(model) and not Path(model).exists():
        raise ConfigError(f"--model: '{model}' not found; pass an exported folder (`cbt-llm export`)")
    try:
        resolve_model(model, adapter, "model")
    except ConfigError as exc:
        msg = str(exc)
        for field, flag in (("model.adapter", "--adapter"), ("model.path", "--model")):
            msg = msg.replace(field, flag)
        raise ConfigError(msg) from None


class Engine:
    """A loaded chat model (an HFGenerator's model and tokenizer) answering one conversation per call."""

    def __init__(self, generator: HFGenerator, system_prompt: str | None = None):
        self.gen = generator
        self.name = generator.name
        # the system prompt an exported model was trained with, used when a request brings none
        self.system_prompt = system_prompt
        # the longest prompt + reply the model takes; None when its config does not say
        self.context_length: int | None = getattr(generator.model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, model: str, adapter: str = "", device: str | None = None, dtype: str = "auto") -> Engine:
        import torch

        check_model_args(model, adapter)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = HFGenerator(model, adapter=adapter, device=device, dtype=dtype)
        return cls(gen, exported_system_prompt(adapter or model))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        msgs = [{"role": m["role"], "content": message_text(m)} for m in messages]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return self.gen.prompt_ids(Prompt("request", msgs))

    def _config(self, max_new_tokens: int, temperature: float, top_p: float):
        if temperature <= 0:
            return self.gen._generation_config(max_new_tokens)  # greedy, as eval decodes
        cfg = self.gen._generation_config(max_new_tokens)
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = True, float(temperature), float(top_p), 0
        return cfg

    def generate_one(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        import torch

        from evaluation.generate import _cut_at_stop

        ids = self.prompt_ids(messages)
        if self.context_length and len(ids) + max_new_tokens > self.context_length:
            raise PromptTooLong(len(ids), max_new_tokens, self.context_length)
        if seed is not None:
            torch.manual_seed(seed)  # seeds CUDA too; only one generation runs at a time, so this is per request
        x = torch.tensor([ids], device=self.gen.device)
        with torch.inference_mode():
            out = self.gen.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                generation_config=self._config(max_new_tokens, temperature, top_p),
            )
        toks, finish = _cut_at_stop(out[0, len(ids) :].tolist(), self.gen.stop_ids)
        text = self.gen.tokenizer.decode(toks, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop or [] if s and s in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return Completion(text.strip(), len(ids), len(toks), finish)
