"""Template, tokenize and mask (Ray actors: the tokenizer is loaded once per actor).

The chat template renders each conversation to text, the whole text is tokenized at once (so ids match what the
model sees at inference), and labels keep the token ids of the assistant answers and their end tokens only,
found by character offsets; IGNORE everywhere else. Over-long examples are truncated, rejected or split into
pieces on turn boundaries (data.overlong; split.py).

A batch is handled as flat NumPy arrays (every conversation's tokens back to back, and each one's length), not one
array per conversation: past the tokenizer, the cost per batch is a few vectorised passes rather than Python
work per example, which at ~180 tokens an example was a fifth of the actor's time.
"""

from __future__ import annotations

import json
import os
from itertools import chain

import numpy as np
import pyarrow as pa

from data_pipeline.formats import chat_renderer
from data_pipeline.prepare.parse import PARSED_FIELDS, RAW_KEEP_CHARS
from data_pipeline.prepare.split import split_overlong
from data_pipeline.shards import IGNORE


def label_spans(
    text: str, messages: list[dict[str, str]], end_token: str, learn_from: int = 0
) -> list[tuple[int, int]]:
    """Character spans of the learned text in a rendered conversation: each assistant answer from message
    `learn_from` on (a split piece's earlier turns are context) plus the end token right after it. Messages are
    located in order, so text repeated in an earlier turn is skipped."""
    spans = []
    cursor = 0
    for k, m in enumerate(messages):
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise ValueError(f"chat template changed a {m['role']} message; cannot locate it to build the label mask")
        end = pos + len(m["content"])
        cursor = end
        if m["role"] == "assistant" and k >= learn_from:
            if end_token and text.startswith(end_token, end):
                end += len(end_token)
                cursor = end
            spans.append((pos, end))
    return spans


def tokenize_conversation(tok, messages: list[dict[str, str]], end_token: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for one conversation; labels are -100 everywhere but the assistant answers and
    their end tokens. Tokenizes the whole rendered text at once (so ids match what the model sees at
    inference) and masks by character offsets."""
    ids, labels, _ = encode_batch(tok, chat_renderer(tok), [messages], end_token)
    return ids, labels


def encode_batch(
    tok, render, conversations: list[list[dict]], end_token: str, learn_from: list[int] | None = None, starts=False
):
    """(input_ids, labels, lengths): every conversation's ids and labels back to back (int32) and its token
    count. `render` is formats.chat_renderer(tok); `learn_from[i]` is conversation i's first learned message.
    With `starts`, also each token's first character in its rendered text (the splitter measures turns by it)."""
    texts = [render(m) for m in conversations]
    # the Rust tokenizer directly: transformers' per-encoding conversion cost ~20% more and adds nothing here
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    total = int(lens.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int32, total)
    offsets = np.fromiter((o[0] for e in encodings for o in e.offsets), np.int64, total)
    froms = learn_from or [0] * len(texts)
    spans = [label_spans(t, m, end_token, f) for t, m, f in zip(texts, conversations, froms)]
    labels = np.where(_learned(offsets, lens, spans), ids, IGNORE).astype(np.int32)
    return (ids, labels, lens, offsets) if starts else (ids, labels, lens)


def _learned(starts: np.ndarray, lens: np.ndarray, spans: list[list[tuple[int, int]]]) -> np.ndarray:
    """Tokens whose first character lies in one of their conversation's spans. One vectorised pass per answer
    index (a conversation has one answer, or a few in multi-turn formats), not one per conversation; a
    conversation with fewer answers gets the empty span (0, 0) for the missing ones."""
    conv = np.repeat(np.arange(len(lens)), lens)
    learn = np.zeros(len(starts), dtype=bool)
    for k in range(max((len(s) for s in spans), default=0)):
        lo = np.array([s[k][0] if k < len(s) else 0 for s in spans], np.int64)
        hi = np.array([s[k][1] if k < len(s) else 0 for s in spans], np.int64)
        learn |= (starts >= lo[conv]) & (starts < hi[conv])
    return learn


def _list_array(values: np.ndarray, lens: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class Tokenize:
    """Ray Data actor: render the chat template, tokenize, mask prompts, apply the overlong policy."""

    def __init__(self, tokenizer: str, seq_len: int, overlong: str, end_token: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray already runs one actor per core
        from data_pipeline.tokenizer import load_tokenizer

        # by name, not by value: a pickled tokenizer would ride in the object store, which Ray warns
        # makes actor restarts fragile; the driver checked the same path loads.
        self.tok = load_tokenizer(tokenizer)
        self.render = chat_renderer(self.tok)
        self.seq_len, self.overlong, self.end_token = seq_len, overlong, end_token

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        rows = np.flatnonzero(table.column("ok").to_numpy(zero_copy_only=False))
        messages = table.column("messages").to_pylist()
        lens = np.zeros(n, np.int64)
        ids = labels = np.zeros(0, np.int32)
        starts = np.zeros(0, np.int64)
        if len(rows):
            convs = [json.loads(messages[i]) for i in rows]
            ids, labels, lens[rows], starts = encode_batch(self.tok, self.render, convs, self.end_token, starts=True)
        pieced = np.zeros(n, dtype=bool)
        if self.overlong == "split" and (lens > self.seq_len).any():
            table, messages, ids, labels, lens, pieced = split_overlong(
                self, table, messages, (ids, labels, starts), lens
            )
        keep, truncated, rejects = self._fit(labels, lens)
        # every column but the text passes through (screen.Screen's `bands` included, when it ran)
        out = {name: table.column(name) for name in table.column_names if name != "messages"}
        if rejects:
            out.update(self._rejected(table, messages, rejects))
            lens[list(rejects)] = 0
        lens = np.minimum(lens, self.seq_len)
        out["input_ids"] = _list_array(ids[keep], lens)
        out["labels"] = _list_array(labels[keep], lens)
        out["truncated"] = pa.array(truncated, pa.bool_())
        out["pieced"] = pa.array(pieced, pa.bool_())  # a piece (or rejected unit) of a split conversation
        return pa.table(out)

    def _fit(self, labels: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, tuple]]:
        """The overlong policy for a batch: which tokens stay, which rows were truncated, and the rows it
        rejects ({row: (reason, detail)})."""
        row = np.repeat(np.arange(len(lens)), lens)
        starts = np.zeros(len(lens), np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        within = np.arange(len(labels)) - starts[row] < self.seq_len  # a truncated row keeps its first seq_len
        over = lens > self.seq_len
        rejects: dict[int, tuple] = {}
        if self.overlong == "reject":
            for i in np.flatnonzero(over):
                rejects[int(i)] = ("overlong", f"{lens[i]} tokens > data.seq_len {self.seq_len}")
        else:
            learned = np.bincount(row[within & (labels != IGNORE)], minlength=len(lens))
            for i in np.flatnonzero(over & (learned == 0)):
                rejects[int(i)] = ("prompt_overlong", f"prompt fills all {self.seq_len} tokens")
        dropped = np.zeros(len(lens), dtype=bool)
        dropped[list(rejects)] = True
        truncated = over & ~dropped
        return within & ~dropped[row], truncated, rejects

    @staticmethod
    def _rejected(table: pa.Table, messages: list[str], rejects: dict[int, tuple]) -> dict[str, pa.Array]:
        """The ok/reason/detail/raw columns with the tokenizer's rejects marked."""
        d = table.select(["ok", "reason", "detail", "raw", "example_id"]).to_pydict()
        for i, (reason, detail) in rejects.items():
            d["ok"][i] = False
            d["reason"][i] = reason
            d["detail"][i] = f"{d['example_id'][i]}: {detail}"
            d["raw"][i] = messages[i][:RAW_KEEP_CHARS]
        types = dict(PARSED_FIELDS)
        return {k: pa.array(d[k], types[k]) for k in ("ok", "reason", "detail", "raw")}
