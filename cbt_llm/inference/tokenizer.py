"""Loading a tokenizer (a local folder or a Hugging Face id) and the hash that says two tokenizers give the same ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cbt_llm.core.fileio import is_local_path


def load_tokenizer(name_or_path: str):
    """Load a tokenizer folder or Hugging Face id. Fails with one line when it is missing or has no template."""
    from transformers import AutoTokenizer

    if is_local_path(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"tokenizer '{name_or_path}' not found; run `cbt-llm tokenizer train` or give a Hugging Face id"
        )
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer '{name_or_path}' has no chat template; use an instruct/chat model's tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok) -> str:
    """Content hash of what decides token ids: vocabulary, merges, special tokens and the chat template."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    payload = {
        "model": backend.get("model"),
        "added_tokens": backend.get("added_tokens"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "normalizer": backend.get("normalizer"),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": tok.chat_template,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
