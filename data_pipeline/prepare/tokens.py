"""Template, tokenize and mask (Ray actors: the tokenizer is loaded once per actor).

The chat template renders each conversation to text, the whole text is tokenized at once (so ids match what the
model sees at inference), and labels keep the token ids of the assistant answers and their end tokens only,
found by character offsets; IGNORE everywhere else. Over-long examples are truncated or rejected (data.overlong).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from data_pipeline.prepare.parse import PARSED_FIELDS, RAW_KEEP_CHARS
from data_pipeline.shards import IGNORE


def label_spans(text: str, messages: list[dict[str, str]], end_token: str) -> list[tuple[int, int]]:
    """Character spans of the learned text in a rendered conversation: each assistant answer plus the end
    token right after it. Messages are located in order, so text repeated in an earlier turn is skipped."""
    spans = []
    cursor = 0
    for m in messages:
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise ValueError(f"chat template changed a {m['role']} message; cannot locate it to build the label mask")
        end = pos + len(m["content"])
        cursor = end
        if m["role"] == "assistant":
            if end_token and text.startswith(end_token, end):
                end += len(end_token)
                cursor = end
            spans.append((pos, end))
    return spans


def tokenize_conversation(tok, messages: list[dict[str, str]], end_token: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 everywhere but the assistant answers and
    their end tokens. Tokenizes the whole rendered text at once (so ids match what the model sees at
    inference) and masks by character offsets."""
    ids, labels = _tokenize_many(tok, [messages], end_token)
    return ids[0], labels[0]


def _tokenize_many(tok, conversations: list[list[dict]], end_token: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    texts = [tok.apply_chat_template(m, tokenize=False) for m in conversations]
    # the Rust tokenizer directly: transformers' per-encoding conversion cost ~20% more and adds nothing here
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    out_ids, out_labels = [], []
    for text, msgs, enc in zip(texts, conversations, encodings):
        ids = np.asarray(enc.ids, dtype=np.int32)
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        learn = np.zeros(len(ids), dtype=bool)
        for s, e in label_spans(text, msgs, end_token):
            learn |= (starts >= s) & (starts < e)
        out_ids.append(ids)
        out_labels.append(np.where(learn, ids, IGNORE).astype(np.int32))
    return out_ids, out_labels


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class Tokenize:
    """Ray Data actor: render the chat template, tokenize, mask prompts, apply the overlong policy."""

    def __init__(self, tokenizer: str, seq_len: int, overlong: str, end_token: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray already runs one actor per core
        from data_pipeline.tokenizer import load_tokenizer

        # by name, not by value: a pickled tokenizer would ride in the object store, which Ray warns
        # makes actor restarts fragile; the driver checked the same path loads.
        self.tok = load_tokenizer(tokenizer)
        self.seq_len, self.overlong, self.end_token = seq_len, overlong, end_token

    def __call__(self, table: pa.Table) -> pa.Table:
        d = table.to_pydict()
        n = table.num_rows
        ok_idx = [i for i in range(n) if d["ok"][i]]
        ids_all: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        lab_all: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        truncated = [False] * n
        if ok_idx:
            ids, labs = _tokenize_many(self.tok, [json.loads(d["messages"][i]) for i in ok_idx], self.end_token)
            for i, a, b in zip(ok_idx, ids, labs):
                if len(a) > self.seq_len:
                    if self.overlong == "reject":
                        self._reject(d, i, "overlong", f"{len(a)} tokens > data.seq_len {self.seq_len}")
                        continue
                    a, b = a[: self.seq_len], b[: self.seq_len]
                    if not (b != IGNORE).any():
                        self._reject(d, i, "prompt_overlong", f"prompt fills all {self.seq_len} tokens")
                        continue
                    truncated[i] = True
                ids_all[i], lab_all[i] = a, b
        out = {name: pa.array(d[name], typ) for name, typ in PARSED_FIELDS if name != "messages"}
        out["input_ids"] = _list_array(ids_all)
        out["labels"] = _list_array(lab_all)
        out["truncated"] = pa.array(truncated, pa.bool_())
        return pa.table(out)

    @staticmethod
    def _reject(d: dict, i: int, reason: str, detail: str) -> None:
        d["ok"][i] = False
        d["reason"][i] = reason
        d["detail"][i] = f"{d['example_id'][i]}: {detail}"
        d["raw"][i] = d["messages"][i][:RAW_KEEP_CHARS]
