"""Test helpers for the eval tests: a tiny random chat model folder (from bench/fixtures.py, which
bench/eval_bench.py shares), a LoRA adapter on it with its merged twin, questions of different lengths, and a
stand-in for vLLM's offline engine that answers with the transformers model.

Nothing downloads: the tokenizer is a small byte-level BPE trained on the template corpus with the ChatML template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.fixtures import write_chat_tokenizer, write_tiny_qwen2
from data_pipeline.synth.template import iter_records

__all__ = [
    "StandInEngine",
    "tiny_chat_model",
    "tiny_questions",
    "write_chat_tokenizer",
    "write_lora",
    "write_tiny_qwen2",
]


def tiny_chat_model(root: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """root/tokenizer and root/model: a random Qwen2 (hidden 32, 2 layers by default) saved with its tokenizer."""
    tok = write_chat_tokenizer(Path(root) / "tokenizer")
    # initializer std 0.2 (not 0.02): wider logit gaps, so greedy choices never hinge on float rounding
    return write_tiny_qwen2(Path(root) / "model", tok, hidden=hidden, layers=layers, seed=seed, init_std=0.2)


def tiny_questions(n: int, seed: int = 1, max_chars: int = 60) -> list[tuple[str, str]]:
    """n (question, description) pairs from the template corpus, cut to different lengths (at most max_chars)."""
    out = []
    for k, rec in enumerate(iter_records(seed, 0, n)):
        keep = 8 + (k * 13) % max(1, max_chars - 8)
        out.append((rec["question"][:keep], rec["description"][: keep // 2]))
    return out


def write_lora(model_dir: Path, adapter_dir: Path, merged_dir: Path, *, seed: int = 0, scale: float = 1.0) -> None:
    """A LoRA adapter on `model_dir` with nonzero lora_B (a trained one changes the model; a fresh one does not),
    saved as `cbt-llm export` saves one (adapter + tokenizer, base_model_name_or_path set), and the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    model.save_pretrained(adapter_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.save_pretrained(adapter_dir)
    model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class _RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


@dataclass
class StandInEngine:
    """vLLM's `LLM.generate(prompts, sampling_params, lora_request=None)` answered by transformers generators, one
    prompt at a time: `base` without a LoRA request, `lora` with one. Records every call's arguments."""

    base: object
    lora: object = None
    calls: list[dict] = field(default_factory=list)

    def generate(self, prompts, sampling_params, lora_request=None):
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora_request": lora_request})
        gen = self.lora if lora_request is not None else self.base
        outs = []
        for p in prompts:
            ((toks, finish),) = gen.generate_ids([p["prompt_token_ids"]], sampling_params.max_tokens)
            # vLLM's text leaves special tokens out and is not stripped
            text = gen.tokenizer.decode(toks, skip_special_tokens=sampling_params.skip_special_tokens)
            outs.append(_RequestOutput(list(p["prompt_token_ids"]), [_Completion(text, toks, finish)]))
        return outs
