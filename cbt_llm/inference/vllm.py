"""The vLLM generator: vLLM's offline engine, when vLLM is installed and CUDA is there, given the same prompt ids
and stop tokens as the transformers generator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.models import (
    DTYPES,
    ModelSource,
    chat_ids,
    config_eos,
    load_chat_tokenizer,
    read_json,
    resolve_model,
    stop_token_ids,
)
from cbt_llm.inference.prompt import Generation, Prompt, sample_seed

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class GreedyParams:
    """The fields of vllm.SamplingParams this module sets, for an injected engine when vLLM is not installed."""

    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    seed: int = 0


@dataclass
class LoraSpec:
    """The fields of vllm.lora.request.LoRARequest, for an injected engine when vLLM is not installed."""

    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class SampledParams(GreedyParams):
    """GreedyParams for one sampled answer (`cbt-llm pairs`): temperature, top_p and the answer's own seed."""

    top_p: float = 1.0


def sampling_params(max_tokens: int, stop_ids: list[int], **sampled):
    """vllm.SamplingParams (or its stand-in without vLLM): greedy, or with `sampled` (temperature, top_p, seed)
    one sampled answer."""
    kind = SampledParams if sampled else GreedyParams
    kwargs = asdict(kind(max_tokens, list(stop_ids), **sampled))
    try:
        from vllm import SamplingParams
    except ImportError:
        return kind(**kwargs)
    return SamplingParams(**kwargs)


def _lora_request(adapter: str):
    try:
        from vllm.lora.request import LoRARequest
    except ImportError:
        return LoraSpec("adapter", 1, adapter)
    return LoRARequest("adapter", 1, adapter)


class VllmGenerator:
    """Greedy generation with vLLM's offline engine: the same prompt ids and stop tokens as HFGenerator."""

    backend = "vllm"
    batches_internally = True  # vLLM schedules its own batches: give it every prompt at once

    def __init__(
        self,
        path: str,
        *,
        adapter: str = "",
        dtype: str = "auto",
        engine=None,
        trust_remote_code: bool = False,
        field: str = "model",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
        source = resolve_model(path, adapter, field)
        self.tokenizer = load_chat_tokenizer(source, field)
        self.name = source.name
        self.stop_ids = stop_token_ids(self.tokenizer, config_eos(source.base))
        self.lora = _lora_request(source.adapter) if source.adapter else None
        if engine is None:
            engine = _vllm_engine(
                source,
                dtype,
                trust_remote_code,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
            )
        self.engine = engine

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the engine is given for `prompt` (the same as HFGenerator's)."""
        return chat_ids(self.tokenizer, prompt)

    def generate_batch(
        self, prompts: list[Prompt], max_new_tokens: int, prompt_ids: list[list[int]] | None = None
    ) -> list[Generation]:
        """Answer `prompts` (any number: vLLM batches them itself); outputs come back in prompt order."""
        ids = prompt_ids if prompt_ids is not None else [self.prompt_ids(p) for p in prompts]
        # token ids, not text: vLLM would otherwise tokenize the rendered template again, maybe differently
        requests = [{"prompt_token_ids": x} for x in ids]
        params = sampling_params(max_new_tokens, self.stop_ids)
        outs = self.engine.generate(requests, params, lora_request=self.lora)
        return [_from_request_output(p, o) for p, o in zip(prompts, outs)]

    def sample(
        self,
        prompts: list[Prompt],
        n: int,
        max_new_tokens: int,
        *,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[Generation]]:
        """`n` sampled answers to each prompt, all in one engine call: answer k of a prompt is its own request
        seeded by sample_seed(seed, prompt id, k), so it repeats whatever else is in the batch."""
        if temperature <= 0 or n < 1:
            raise ValueError(f"sampling needs temperature > 0 and n >= 1 (got {temperature}, {n})")
        ids = [self.prompt_ids(p) for p in prompts]
        requests = [{"prompt_token_ids": x} for x in ids for _ in range(n)]
        params = [
            sampling_params(
                max_new_tokens, self.stop_ids, temperature=temperature, top_p=top_p, seed=sample_seed(seed, p.id, k)
            )
            for p in prompts
            for k in range(n)
        ]
        outs = self.engine.generate(requests, params, lora_request=self.lora)
        flat = [_from_request_output(p, o) for p, o in zip((p for p in prompts for _ in range(n)), outs)]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def _vllm_engine(source: ModelSource, dtype: str, trust_remote_code: bool, **kwargs):
    from vllm import LLM

    if source.adapter:
        rank = int(read_json(Path(source.adapter) / "adapter_config.json").get("r", 16))
        # vLLM accepts only these max_lora_rank values; the adapter's own rank may lie between them
        kwargs.update(enable_lora=True, max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), rank))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return LLM(
        model=source.base,
        tokenizer=source.tokenizer,
        dtype=dtype,
        seed=0,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


def _from_request_output(prompt: Prompt, out) -> Generation:
    """vLLM's RequestOutput -> Generation; its token_ids hold the stop token, as HFGenerator counts it."""
    best = out.outputs[0]
    finish = "length" if best.finish_reason == "length" else "stop"
    return Generation(prompt.id, best.text.strip(), len(out.prompt_token_ids), len(best.token_ids), finish)


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
