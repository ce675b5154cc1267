"""Tokenizer: train a byte-level BPE on the corpus for the embedded demo, load any tokenizer, hash it.

Real runs use the base model's own tokenizer and chat template (`data.tokenizer: Qwen/Qwen2.5-7B-Instruct`).
The demo trains one here so nothing needs a download. It uses ChatML, the same template family as Qwen2.5, so
prompt masking behaves the same way on the demo and on real models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from cbt_llm.core.config import TokenizerConfig
from cbt_llm.core.report import print_summary, write_metrics
from cbt_llm.domain.chat_format import CHAT_TEMPLATE, IM_END, PAD_TOKEN, SPECIAL_TOKENS
from cbt_llm.inference.tokenizer import load_tokenizer, tokenizer_hash
from data_pipeline.io import expand_inputs, iter_lines


def _message_texts(messages) -> Iterator[str]:
    """The turns of a session (OpenAI-messages records, as synth --sessions writes them)."""
    for m in messages if isinstance(messages, list) else ():
        text = m.get("content") if isinstance(m, dict) else None
        if isinstance(text, str) and text:
            yield text


def _corpus_texts(files: list[str], max_records: int, counts: dict) -> Iterator[str]:
    """Yield training texts from corpus shards; lines that are not JSON objects are counted, not fatal."""
    seen = 0
    bar = tqdm(total=max_records or None, desc="tokenizer: reading", unit="rec", mininterval=1.0)
    for path in files:
        for _, raw in iter_lines(path):
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                counts["bad_lines"] += 1
                continue
            for key in ("question", "description", "answer"):
                text = rec.get(key)
                if isinstance(text, str) and text:
                    yield text
            yield from _message_texts(rec.get("messages"))
            seen += 1
            counts["records"] = seen
            bar.update(1)
            if max_records and seen >= max_records:
                bar.close()
                return
    bar.close()


def train_tokenizer_from_texts(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2
) -> Path:
    """Train a byte-level BPE on `texts` and save a Hugging Face tokenizer folder with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


class ChatMLTokenizer:
    """What prepare's workers use of a tokenizer (its Rust tokenizer and chat template), loaded from
    tokenizer.json without transformers, whose import and AutoTokenizer cost each worker ~3 s of CPU. Only for a
    folder `light_tokenizer_file` vouched for: the same Rust tokenizer as transformers loads, our template."""

    chat_template = CHAT_TEMPLATE

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(tokenizer_json)


def _id_parts(backend) -> dict:
    spec = json.loads(backend.to_str())
    return {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")}


def light_tokenizer_file(tok, name_or_path: str) -> str:
    """The tokenizer.json a worker can load as ChatMLTokenizer, giving exactly `tok`'s ids and template; "" when
    it cannot (a Hub id, another template, or transformers changed the Rust tokenizer on load)."""
    from tokenizers import Tokenizer

    path = Path(name_or_path) / "tokenizer.json"
    if getattr(tok, "chat_template", None) != CHAT_TEMPLATE or not path.is_file():
        return ""
    return str(path.resolve()) if _id_parts(Tokenizer.from_file(str(path))) == _id_parts(tok.backend_tokenizer) else ""


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """`cbt-llm tokenizer train`: train on the corpus shards matched by cfg.input, save to cfg.out_dir."""
    files = expand_inputs(cfg.input)
    counts = {"records": 0, "bad_lines": 0}
    t0 = time.perf_counter()
    out = train_tokenizer_from_texts(
        _corpus_texts(files, cfg.max_records, counts), cfg.vocab_size, cfg.out_dir, cfg.min_frequency
    )
    seconds = time.perf_counter() - t0
    tok = load_tokenizer(str(out))
    sample = "我最近总是失眠,觉得自己什么都做不好。"
    summary = {
        "files": len(files),
        "records": counts["records"],
        "bad_lines": counts["bad_lines"],
        "vocab_size": len(tok),
        "tokens_per_char(sample)": round(len(tok(sample)["input_ids"]) / len(sample), 3),
        "seconds": round(seconds, 2),
        "hash": tokenizer_hash(tok),
        "out_dir": str(out),
    }
    write_metrics(Path(out) / "train_summary.json", summary)
    print_summary("tokenizer train", summary)
    return summary
