"""Template, tokenize and mask (Ray actors: the tokenizer is loaded once per actor).

The chat template renders each conversation to text, the whole text is tokenized at once (so ids match what the
model sees at inference), and labels keep the token ids of the assistant answers and their end tokens only,
found by character offsets; IGNORE everywhere else. Over-long examples are truncated, rejected or split into
pieces on turn boundaries (data.overlong; split.py).

A preference pair (data.format: preference) becomes two sequences, the prompt followed by the chosen answer and
the prompt followed by the rejected one, each rendered and masked as an SFT conversation whose last turn is the
answer (only that answer and its end token are labels). The row carries them back to back, chosen first, and
`cut` the chosen sequence's length; a pair whose two sequences exceed seq_len together is rejected
(pair_overlong): pairs are packed whole and never truncated.

A batch is handled as flat NumPy arrays (every conversation's tokens back to back, and each one's length), not one
array per conversation: past the tokenizer, the cost per batch is a few vectorised passes rather than Python
work per example, which at ~180 tokens an example would be a fifth of the actor's time.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from cbt_llm.domain.chat_format import chat_renderer
from data_pipeline.prepare.encode import SystemTurns, encode_batch, token_byte_lengths
from data_pipeline.prepare.parse import PARSED_FIELDS, RAW_KEEP_CHARS
from data_pipeline.prepare.split import split_overlong
from data_pipeline.shards import IGNORE


def _list_array(values: np.ndarray, lens: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class Tokenize:
    """Ray Data actor: render the chat template, tokenize, mask prompts, apply the overlong policy."""

    def __init__(
        self, tokenizer: str, seq_len: int, overlong: str, end_token: str, light_file: str = "", pairs: bool = False
    ):
        """`light_file`: tokenizer.json to load without transformers (tokenizer.light_tokenizer_file); `pairs`:
        rows are preference pairs (data.format: preference), see the module docstring."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray already runs one actor per core
        from cbt_llm.inference.tokenizer import load_tokenizer
        from data_pipeline.tokenizer import ChatMLTokenizer

        # by name, not by value: a pickled tokenizer would ride in the object store, which Ray warns
        # makes actor restarts fragile; the driver checked the same path loads.
        self.tok = ChatMLTokenizer(light_file) if light_file else load_tokenizer(tokenizer)
        self.render = chat_renderer(self.tok)
        self.system_turns = SystemTurns.for_tokenizer(self.tok, self.render)
        self.byte_lengths = token_byte_lengths(self.tok)
        self.seq_len, self.overlong, self.end_token = seq_len, overlong, end_token
        self.pairs = pairs

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.pairs:
            return self._pairs(table)
        n = table.num_rows
        rows = np.flatnonzero(table.column("ok").to_numpy(zero_copy_only=False))
        messages = table.column("messages").to_pylist()
        lens = np.zeros(n, np.int64)
        ids = labels = np.zeros(0, np.int32)
        starts = np.zeros(0, np.int64)
        if len(rows):
            convs = [json.loads(messages[i]) for i in rows]
            ids, labels, lens[rows], starts = encode_batch(
                self.tok,
                self.render,
                convs,
                self.end_token,
                starts=True,
                system_turns=self.system_turns,
                byte_lengths=self.byte_lengths,
            )
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

    def _pairs(self, table: pa.Table) -> pa.Table:
        """Preference rows: each pair's chosen and rejected sequences back to back, `cut` the chosen length."""
        n = table.num_rows
        rows = np.flatnonzero(table.column("ok").to_numpy(zero_copy_only=False))
        messages = table.column("messages").to_pylist()
        lens = np.zeros(n, np.int64)
        cut = np.zeros(n, np.int32)
        ids = labels = np.zeros(0, np.int32)
        rejects: dict[int, tuple] = {}
        if len(rows):
            convs, learn_from = [], []
            for i in rows:
                pair = json.loads(messages[i])
                for side in ("chosen", "rejected"):
                    convs.append(pair["prompt"] + [{"role": "assistant", "content": pair[side]}])
                    learn_from.append(len(pair["prompt"]))
            ids, labels, side_lens = encode_batch(
                self.tok,
                self.render,
                convs,
                self.end_token,
                learn_from=learn_from,
                system_turns=self.system_turns,
                byte_lengths=self.byte_lengths,
            )
            lc, lr = side_lens[0::2], side_lens[1::2]
            lens[rows], cut[rows] = lc + lr, lc
            keep = np.ones(len(ids), dtype=bool)
            starts = np.zeros(len(rows), np.int64)
            np.cumsum((lc + lr)[:-1], out=starts[1:])
            for k in np.flatnonzero(lc + lr > self.seq_len):
                i = int(rows[k])
                rejects[i] = (
                    "pair_overlong",
                    f"chosen {lc[k]} + rejected {lr[k]} tokens > data.seq_len {self.seq_len} (pairs are packed whole)",
                )
                keep[starts[k] : starts[k] + lens[i]] = False
            ids, labels = ids[keep], labels[keep]
        out = {name: table.column(name) for name in table.column_names if name != "messages"}
        if rejects:
            out.update(self._rejected(table, messages, rejects))
            lens[list(rejects)] = 0
            cut[list(rejects)] = 0
        out["input_ids"] = _list_array(ids, lens)
        out["labels"] = _list_array(labels, lens)
        out["truncated"] = pa.array(np.zeros(n, dtype=bool), pa.bool_())
        out["pieced"] = pa.array(np.zeros(n, dtype=bool), pa.bool_())
        out["cut"] = pa.array(cut, pa.int32())
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
