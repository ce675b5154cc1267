"""Loading a tokenizer (a local folder or a Hugging Face id) and the hash that says two tokenizers give the same ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cbt_llm.core.fileio import is_local_path
from cbt_llm.domain.chat_format import IM_END


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer folder or Hugging Face id for chat. Fails with one line when it is missing or has no
    template."""
    if is_local_path(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"tokenizer '{name_or_path}' not found; run `cbt-llm tokenizer train` or give a Hugging Face id"
        )
    tok = open_tokenizer(name_or_path, trust_remote_code)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer '{name_or_path}' has no chat template; use an instruct/chat model's tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def open_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer as its folder's tokenizer.json describes it. Beside a model's config.json, transformers may
    rebuild it as that model type's class: a byte-level BPE trained here, exported with a qwen2 model, comes back as
    a Qwen2Tokenizer whose pre-tokenizer splits every digit, so "2026" gets other ids than the model was trained on.
    When the loaded normalizer or pre-tokenizer differs from the file's, the file's pipeline is loaded as written."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    path = Path(name_or_path) / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)  # None: a slow (Python) tokenizer, which reads no such file
    if backend is None or not (is_local_path(name_or_path) and path.is_file()):
        return tok
    written = json.loads(path.read_text(encoding="utf-8"))
    loaded = json.loads(backend.to_str())
    if all(written.get(k) == loaded.get(k) for k in ("normalizer", "pre_tokenizer")):
        return tok
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(name_or_path)


def end_token_of(tokenizer) -> str:
    """The token an answer ends with, labelled by prepare and scored by eval: <|im_end|> when the vocabulary has
    it, else eos."""
    return IM_END if IM_END in tokenizer.get_vocab() else (tokenizer.eos_token or "")


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
