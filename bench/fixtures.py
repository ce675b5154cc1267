"""Tiny packed shards + manifest in the prepare -> train contract (data_pipeline/shards.py), for the trainer tests
and bench/train_bench.py; and a tiny random chat model folder (ChatML tokenizer trained here + Qwen2) for the
eval tests and bench/eval_bench.py.

Here rather than under tests/ because bench/ may not import tests/ (tests/test_layers.py holds that rule);
tests/train_fixtures.py and tests/eval_fixtures.py re-export it.

The data is synthetic but learnable: each example is a random prompt (labels -100) followed by an answer
drawn from a small slice of the vocabulary in a pattern set by the prompt's first token, so a 2-layer model's
loss visibly falls within a few optimizer steps. Every row is identified by `example_ids`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from cbt_llm.inference.tokenizer import tokenizer_hash

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 96


def write_tiny_tokenizer(out_dir: Path) -> Path:
    """A word-level tokenizer over 'w3'..'w95' plus the ChatML specials; loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def _example(rng: random.Random, lengths: tuple[int, int, int, int] = (3, 8, 4, 10)) -> tuple[list[int], list[int]]:
    """lengths = (prompt min, prompt max, answer min, answer max) in tokens."""
    prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(lengths[0], lengths[1]))]
    start = prompt[1]
    answer = [3 + (start + i) % 12 for i in range(rng.randint(lengths[2], lengths[3]))] + [2]
    return prompt + answer, [-100] * len(prompt) + answer


def _pack(examples, seq_len: int, pad_id: int, packing: bool):
    """Greedy in-order packing; enough for a fixture (prepare uses best-fit-decreasing)."""
    rows, cur = [], None
    for ex_id, (ids, labels) in examples:
        if cur is None or not packing or len(cur["input_ids"]) + len(ids) > seq_len:
            if cur is not None:
                rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "num_examples": 0, "example_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
        cur["num_examples"] += 1
        cur["example_ids"].append(ex_id)
    rows.append(cur)
    if not packing:
        for r in rows:
            n = seq_len - len(r["input_ids"])
            r["input_ids"] += [pad_id] * n
            r["labels"] += [-100] * n
            r["position_ids"] += list(range(n))
    return rows


def _write_split(out: Path, split: str, rows: list[dict], num_shards: int) -> list[dict]:
    (out / split).mkdir(parents=True, exist_ok=True)
    shards = []
    per = len(rows) // num_shards
    for k in range(num_shards):
        part = rows[k * per : (k + 1) * per]
        rel = f"{split}/part-{k:05d}-of-{num_shards:05d}.parquet"
        table = pa.table(
            {
                "input_ids": pa.array([r["input_ids"] for r in part], pa.list_(pa.int32())),
                "labels": pa.array([r["labels"] for r in part], pa.list_(pa.int32())),
                "position_ids": pa.array([r["position_ids"] for r in part], pa.list_(pa.int32())),
                "num_examples": pa.array([r["num_examples"] for r in part], pa.int32()),
                "example_ids": pa.array([r["example_ids"] for r in part], pa.list_(pa.string())),
            }
        )
        pq.write_table(table, out / rel)
        shards.append(
            {
                "path": rel,
                "rows": len(part),
                "examples": sum(r["num_examples"] for r in part),
                "tokens": sum(len(r["input_ids"]) for r in part),
                "label_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in part),
                "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest(),
            }
        )
    return shards


def make_shards(
    out: Path,
    *,
    rows_per_shard: int = 4,
    train_shards: int = 4,
    val_rows: int = 6,
    seq_len: int = 64,
    packing: bool = True,
    seed: int = 0,
    lengths: tuple[int, int, int, int] = (3, 8, 4, 10),
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write tokenizer/, train/, validation/ and manifest.json under `out`; returns `out`. `tokenizer_dir`: record
    that tokenizer instead (e.g. write_chat_tokenizer's, for tests that prompt the model; its vocabulary must cover
    the fixture's token ids, 0..95)."""
    out = Path(out)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else write_tiny_tokenizer(out / "tokenizer")
    rng = random.Random(seed)
    need = {"train": rows_per_shard * train_shards, "validation": val_rows}
    splits, counts = {}, {"examples": {}, "rows": {}, "tokens": {}, "label_tokens": {}}
    for split, n_rows in need.items():
        rows: list[dict] = []
        i = 0
        while len(rows) <= n_rows:  # the last row may be partial: pack one spare
            batch = [(f"{split}-{i + j}", _example(rng, lengths)) for j in range(64)]
            i += 64
            rows += _pack(batch, seq_len, 0, packing)
        rows = rows[:n_rows]
        shards = _write_split(out, split, rows, train_shards if split == "train" else 1)
        splits[split] = {"shards": shards}
        for key in counts:
            counts[key][split] = sum(s[key] for s in shards)
    manifest = {
        "schema_version": 1,
        "seq_len": seq_len,
        "packing": packing,
        "pad_token_id": 0,
        "tokenizer": {"name_or_path": str(tok_dir), "hash": tokenizer_hash(AutoTokenizer.from_pretrained(tok_dir))},
        "config_hash": "fixture",
        "system_prompt": "",
        "format": "cbt",
        "counts": {"read": 0, "kept": 0, "rejected": {}, "rejected_total": 0, "truncated": 0, **counts},
        "packing_efficiency": {s: counts["tokens"][s] / (counts["rows"][s] * seq_len) for s in splits},
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def write_chat_tokenizer(out_dir: Path, *, records: int = 200, vocab_size: int = 600) -> Path:
    """A byte-level BPE with the ChatML template (data_pipeline/tokenizer.py), trained on `records` template-corpus
    records: Chinese text tokenizes as it would for a small real tokenizer, and nothing is downloaded."""
    from data_pipeline.synth.template import iter_records
    from data_pipeline.tokenizer import train_tokenizer_from_texts

    texts = (r[k] for r in iter_records(0, 0, records) for k in ("question", "description", "answer"))
    return train_tokenizer_from_texts(texts, vocab_size, out_dir)


def write_tiny_qwen2(
    out_dir: Path, tokenizer_dir: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0, init_std: float = 0.02
) -> Path:
    """A random Qwen2ForCausalLM sized to the tokenizer, saved with the tokenizer as a model folder (config.json,
    safetensors, generation_config.json, tokenizer files), as `cbt-llm export` writes one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=init_std,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    print(make_shards(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fixture")))
