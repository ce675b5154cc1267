"""Which model to load and how: an exported folder (`cbt-llm export`: full, merged, or a LoRA adapter whose
adapter_config.json names its base), a base model folder or Hugging Face id, optionally with a LoRA adapter on
top; its tokenizer, stop tokens and dtype. Bad paths fail with one line naming the config field (`field`), before
any weights load."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import is_local_path
from cbt_llm.domain.chat_format import IM_END
from cbt_llm.inference.prompt import Prompt
from cbt_llm.inference.tokenizer import load_tokenizer

EXPORT_FILE = "export.json"


DTYPES = ("auto", "float32", "bfloat16", "float16")


def exported_system_prompt(path: str | Path) -> str | None:
    """The system prompt a model exported by `cbt-llm export` was trained with (export.json), or None when the
    folder has no export.json or it does not record one (an export made before it did, or a base model)."""
    meta = Path(path) / EXPORT_FILE
    if not meta.is_file():
        return None
    value = json.loads(meta.read_text(encoding="utf-8")).get("system_prompt")
    return value if isinstance(value, str) else None


def note(message: str) -> None:
    """One line to stderr from rank 0 only (the caller may run this on every rank of a torchrun job)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"eval: {message}", file=sys.stderr, flush=True)


@dataclass
class ModelSource:
    """What to load: base weights (a folder or Hugging Face id), an optional LoRA adapter folder, and where the
    tokenizer is (the adapter folder when `cbt-llm export` saved one there, else the base)."""

    base: str
    adapter: str = ""
    tokenizer: str = ""

    @property
    def name(self) -> str:
        base = Path(self.base).name if Path(self.base).exists() else self.base
        return f"{base}+{Path(self.adapter).name}" if self.adapter else base


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc.__class__.__name__})") from None


def _check_base(path: str, what: str) -> None:
    """A local base must be a model folder; a Hugging Face id is checked when it loads."""
    p = Path(path)
    if not p.exists():
        if is_local_path(path):
            raise ConfigError(f"{what}: '{path}' not found; pass an exported folder or a Hugging Face id")
        return
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{what}: '{path}' is not a model folder (no config.json); pass an exported folder or a Hugging Face id"
        )


def _check_adapter(adapter: str, what: str) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        state = "not found" if not Path(adapter).exists() else "is not a LoRA adapter folder (no adapter_config.json)"
        raise ConfigError(f"{what}: '{adapter}' {state}; pass the folder `cbt-llm export` wrote for a LoRA run")


def resolve_model(path: str, adapter: str = "", field: str = "model") -> ModelSource:
    """Check the folders and say what to load; raises ConfigError naming `{field}.path` or `{field}.adapter`."""
    if not path:
        raise ConfigError(f"{field}.path: empty; pass an exported folder (`cbt-llm export`) or a Hugging Face id")
    p = Path(path)
    if not adapter and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        # an exported LoRA adapter on its own: its config names the base it was trained on
        base = read_json(p / "adapter_config.json").get("base_model_name_or_path") or ""
        if not base:
            raise ConfigError(f"{field}.path: adapter '{path}' names no base_model_name_or_path; set {field}.adapter")
        _check_base(base, f"{field}.path (base_model_name_or_path of the adapter '{path}')")
        adapter, path = path, base
    else:
        _check_base(path, f"{field}.path")
        if adapter:
            _check_adapter(adapter, f"{field}.adapter")
    has_own_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").is_file()
    return ModelSource(base=path, adapter=adapter, tokenizer=adapter if has_own_tokenizer else path)


def load_chat_tokenizer(source: ModelSource, field: str = "model"):
    """The tokenizer with its chat template, padding on the left; ConfigError naming the field otherwise."""
    try:
        tok = load_tokenizer(source.tokenizer)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"{field}.path: {first}") from None
    tok.padding_side = "left"
    return tok


def stop_token_ids(tokenizer, config_eos: int | list[int] | None = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, <|im_end|> when the vocabulary has it (a base model's
    eos is <|endoftext|> while its chat turns end with <|im_end|>), and the model's generation_config eos ids."""
    ids = [tokenizer.eos_token_id, tokenizer.get_vocab().get(IM_END)]
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


def config_eos(base: str) -> int | list[int] | None:
    """generation_config.json's eos_token_id of a local model folder (None for a Hub id or no file)."""
    path = Path(base) / "generation_config.json"
    return read_json(path).get("eos_token_id") if path.is_file() else None


def chat_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids as the chat template renders them, ending with the assistant turn's opening; the
    template's text is tokenized without added special tokens, as prepare tokenized training text."""
    return list(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, return_dict=False))


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        # bf16 where the card does it; on CPU float32, which is faster there than bf16 and exact
        cuda = device.startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def check_vocab(tokenizer, model, source: ModelSource, field: str) -> None:
    """A tokenizer with ids the model has no embedding for is another model's tokenizer: it would answer garbage
    (or index out of range), so it fails here, before any question, with one line."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"{field}.path: the tokenizer in '{source.tokenizer or source.base}' has {len(tokenizer)} tokens but the "
            f"model has {rows} embeddings: tokenizer and model do not match; pass the folder `cbt-llm export` wrote "
            f"(it carries the training tokenizer)"
        )
