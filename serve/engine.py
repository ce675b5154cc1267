"""Chat completions with the transformers backend (VllmEngine, at the end, is the same on vLLM): the model and
tokenizer of the inference library's HFGenerator (cbt_llm/inference/hf.py), plus what a chat server needs and eval
does not (sampling with temperature / top_p / seed, stop strings).

    engine = Engine.load("exported/", adapter="", device=None)
    out = engine.generate_one(messages, max_new_tokens=256, temperature=0.7, top_p=0.9, seed=1, stop=["\\n\\n"])

temperature 0 is greedy, exactly as `cbt-llm eval` decodes. Stop strings are applied to the decoded text after
generation (the model may run past one; its tokens still count in completion_tokens, as they were computed).
generate_greedy answers several greedy requests in one left-padded batch (serve/batching.py collects them).
Not thread-safe: one call on the model at a time (serve/batching.py holds a lock around it).

A prompt whose tokens plus max_new_tokens do not fit the model's context (config.max_position_embeddings) raises
PromptTooLong before anything is generated; the server answers it with a 400 naming `messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import is_local_path
from cbt_llm.domain.guard import message_text
from cbt_llm.inference.hf import HFGenerator
from cbt_llm.inference.models import exported_system_prompt, resolve_model
from cbt_llm.inference.prompt import Prompt


@dataclass
class Completion:
    """One reply: text (stop strings cut off), prompt and completion token counts, finish "stop" or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str


class PromptTooLong(ValueError):
    """The prompt's tokens plus max_new_tokens exceed the model's context. `param` is what to change: "messages"
    (no room for a reply) or "max_tokens" (an explicit reply length that does not fit); `message` replaces the
    default wording (serve/context.py words its own)."""

    def __init__(
        self,
        prompt_tokens: int,
        max_new_tokens: int,
        context: int,
        *,
        param: str = "messages",
        message: str | None = None,
    ):
        super().__init__(
            message
            or f"the messages are {prompt_tokens} tokens; with max_tokens {max_new_tokens} that is more than the "
            f"model's context of {context} tokens: shorten the messages or lower max_tokens"
        )
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        self.param = param


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

    def decoding_config(self, max_new_tokens: int, temperature: float, top_p: float):
        if temperature <= 0:
            return self.gen.decoding_config(max_new_tokens)  # greedy, as eval decodes
        cfg = self.gen.decoding_config(max_new_tokens)
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = True, float(temperature), float(top_p), 0
        return cfg

    def check_fits(self, ids: list[int], max_new_tokens: int) -> None:
        if self.context_length and len(ids) + max_new_tokens > self.context_length:
            raise PromptTooLong(len(ids), max_new_tokens, self.context_length)

    def _completion(self, ids: list[int], toks: list[int], finish: str, stop: list[str] | None) -> Completion:
        """Decode the new tokens and cut the text at the first stop string."""
        return finish_completion(self.gen.tokenizer, len(ids), toks, finish, stop)

    def generate_one(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion:

        from cbt_llm.inference.prompt import cut_at_stop

        ids = self.start(messages, max_new_tokens, seed)
        out = self.run_generate(ids, max_new_tokens, temperature, top_p)
        toks, finish = cut_at_stop(out[0, len(ids) :].tolist(), self.gen.stop_ids)
        return self._completion(ids, toks, finish, stop)

    def start(self, messages: list[dict], max_new_tokens: int, seed: int | None) -> list[int]:
        """The prompt ids of one request, checked against the context; the sampler seeded when a seed is given."""
        import torch

        ids = self.prompt_ids(messages)
        self.check_fits(ids, max_new_tokens)
        if seed is not None:
            torch.manual_seed(seed)  # seeds CUDA too; only one generation runs at a time, so this is per request
        return ids

    def run_generate(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, **generate_kwargs):
        """model.generate on one prompt with this request's decoding (greedy or sampled); generate_kwargs pass on
        (e.g. chat's streamer and stopping criteria). Returns the output ids, prompt included."""
        import torch

        x = torch.tensor([ids], device=self.gen.device)
        with torch.inference_mode():
            return self.gen.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                generation_config=self.decoding_config(max_new_tokens, temperature, top_p),
                **generate_kwargs,
            )

    def generate_greedy(self, requests: list[dict]) -> list:
        """Greedy replies to several requests ({messages, max_new_tokens, stop}) in one left-padded batch, each
        cut to its own max_new_tokens and stop strings: a Completion per request, or the exception (PromptTooLong)
        that request alone gets. Greedy rows do not depend on each other, so each text is the one it gets alone."""
        return greedy_in_one_call(self, requests, self.gen.generate_ids)


def finish_completion(tokenizer, n_prompt: int, toks: list[int], finish: str, stop: list[str] | None) -> Completion:
    text = tokenizer.decode(toks, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop or [] if s and s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return Completion(text.strip(), n_prompt, len(toks), finish)


def greedy_in_one_call(engine, requests: list[dict], generate_ids) -> list:
    """The shared part of the greedy batch of Engine and VllmEngine: tokenize and check every request, answer the
    good ones with one `generate_ids(prompt_ids, max_new_tokens)` call at the largest max_new_tokens, then cut
    each row to its request's own limit."""
    results: list = [None] * len(requests)
    todo = []
    for k, r in enumerate(requests):
        try:
            ids = engine.prompt_ids(r["messages"])
            engine.check_fits(ids, r["max_new_tokens"])
        except Exception as exc:  # this request's failure only
            results[k] = exc
            continue
        todo.append((k, ids))
    if todo:
        longest = max(requests[k]["max_new_tokens"] for k, _ in todo)
        outs = generate_ids([ids for _, ids in todo], longest)
        for (k, ids), (toks, finish) in zip(todo, outs):
            limit = requests[k]["max_new_tokens"]
            if len(toks) > limit:
                toks, finish = toks[:limit], "length"
            results[k] = engine._completion(ids, toks, finish, requests[k].get("stop"))
    return results


class VllmEngine:
    """The same chat engine on vLLM's offline engine (cbt_llm.inference.vllm.VllmGenerator: the same prompt ids and
    stop tokens as the transformers backend, a LoRA adapter as a LoRA request), for `cbt-llm serve --backend vllm`
    on a CUDA machine. Greedy requests go to vLLM together (generate_greedy, from serve/batching.py); a sampled one
    gets its own SamplingParams with its temperature, top_p and seed. Not thread-safe, like Engine."""

    def __init__(self, generator, system_prompt: str | None = None, context_length: int | None = None):
        self.gen = generator
        self.name = generator.name
        self.system_prompt = system_prompt
        self.context_length = context_length

    @classmethod
    def load(cls, model: str, adapter: str = "", dtype: str = "auto", engine=None) -> VllmEngine:
        """`engine`: an object with vLLM's LLM.generate (tests inject tests/eval_fixtures.StandInEngine)."""
        import json

        from cbt_llm.inference.vllm import VllmGenerator

        check_model_args(model, adapter)
        gen = VllmGenerator(model, adapter=adapter, dtype=dtype, engine=engine)
        config = Path(resolve_model(model, adapter, "model").base) / "config.json"
        context = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
        return cls(gen, exported_system_prompt(adapter or model), context)

    prompt_ids = Engine.prompt_ids
    check_fits = Engine.check_fits
    _completion = Engine._completion

    def _params(self, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        from cbt_llm.inference.vllm import sampling_params

        params = sampling_params(max_tokens, self.gen.stop_ids)
        if temperature > 0:
            params.temperature, params.seed = float(temperature), seed
            if hasattr(params, "top_p"):
                params.top_p = float(top_p)
        return params

    def _generate_ids(
        self, prompt_ids: list[list[int]], max_new_tokens: int, **sampling
    ) -> list[tuple[list[int], str]]:
        requests = [{"prompt_token_ids": x} for x in prompt_ids]
        outs = self.gen.engine.generate(requests, self._params(max_new_tokens, **sampling), lora_request=self.gen.lora)
        rows = []
        for out in outs:
            best = out.outputs[0]
            rows.append((list(best.token_ids), "length" if best.finish_reason == "length" else "stop"))
        return rows

    def generate_greedy(self, requests: list[dict]) -> list:
        """As Engine.generate_greedy: one vLLM call for all of them, each cut to its own limits."""
        return greedy_in_one_call(self, requests, self._generate_ids)

    def generate_one(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        if temperature <= 0:
            (out,) = self.generate_greedy([{"messages": messages, "max_new_tokens": max_new_tokens, "stop": stop}])
            if isinstance(out, Exception):
                raise out
            return out
        ids = self.prompt_ids(messages)
        self.check_fits(ids, max_new_tokens)
        ((toks, finish),) = self._generate_ids([ids], max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return self._completion(ids, toks, finish, stop)
