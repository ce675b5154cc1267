"""Encode conversations to token ids and labels, the one encoder that tokenizing (tokens.py) and splitting long
sessions (split.py) share: the chat template renders each conversation, the whole text is tokenized at once (so
ids match what the model sees at inference), and labels keep the assistant answers and their end tokens only.

For byte-level BPE tokenizers the token start positions come from the bytes behind the ids (no tokenizer offsets),
and each distinct system turn is tokenized once (SystemTurns); both fall back to the offsets path where they
cannot be exact.
"""

from __future__ import annotations

import json
import unicodedata
from itertools import chain

import numpy as np

from cbt_llm.domain.chat_format import IM_END, IM_START, chat_renderer, label_spans, render_chatml
from data_pipeline.shards import IGNORE


def tokenize_conversation(tok, messages: list[dict[str, str]], end_token: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for one conversation; labels are -100 everywhere but the assistant answers and
    their end tokens. Tokenizes the whole rendered text at once (so ids match what the model sees at
    inference) and masks by character offsets."""
    ids, labels, _ = encode_batch(tok, chat_renderer(tok), [messages], end_token)
    return ids, labels


class SystemTurns:
    """The tokens of each distinct rendered system turn, encoded once and reused for every conversation that
    starts with it: most of a corpus shares one system prompt, ~18% of an example's tokens at the default
    prompt on the bench corpus, which the tokenizer would otherwise encode again for every record.

    Exact, not approximate: in our ChatML text a system turn ends `<|im_end|>\\n` and the next turn starts with
    `<|im_start|>`, and a tokenizer splits its input at added tokens before anything else, so the ids of the
    turn followed by the ids of the rest are the ids of the whole. That holds only when neither token strips
    the whitespace beside it (`lstrip`/`rstrip`) and the text is our own template's, so `for_tokenizer` turns
    the reuse off otherwise, and each new turn is checked once against encoding it with a following turn."""

    LIMIT = 4096  # distinct system turns kept; past it the rest are encoded with their conversation as before

    def __init__(self, backend):
        self.backend = backend
        self.turns: dict[str, tuple[list[int], list[int]] | None] = {}

    @classmethod
    def for_tokenizer(cls, tok, render) -> SystemTurns | None:
        if render is not render_chatml:
            return None
        added = {t.content: t for t in tok.backend_tokenizer.get_added_tokens_decoder().values()}
        if any(m not in added or added[m].lstrip or added[m].rstrip for m in (IM_START, IM_END)):
            return None
        return cls(tok.backend_tokenizer)

    def prefix(self, messages: list[dict[str, str]]) -> str:
        """The rendered system turn this conversation starts with, when its tokens can be reused; else ""."""
        if not messages or messages[0]["role"] != "system":
            return ""
        turn = render_chatml(messages[:1])
        if turn not in self.turns:
            if len(self.turns) >= self.LIMIT:
                return ""
            self.turns[turn] = self._encode_checked(turn)
        return turn if self.turns[turn] is not None else ""

    def _encode_checked(self, turn: str) -> tuple[list[int], list[int]] | None:
        alone = self.backend.encode(turn, add_special_tokens=False)
        probe_rest = render_chatml([{"role": "user", "content": "x"}])
        whole = self.backend.encode(turn + probe_rest, add_special_tokens=False).ids
        if whole != alone.ids + self.backend.encode(probe_rest, add_special_tokens=False).ids:
            return None
        return alone.ids, [o[0] for o in alone.offsets]


def encode_batch(
    tok,
    render,
    conversations: list[list[dict]],
    end_token: str,
    learn_from: list[int] | None = None,
    starts=False,
    system_turns: SystemTurns | None = None,
    byte_lengths: np.ndarray | None = None,
):
    """(input_ids, labels, lengths): every conversation's ids and labels back to back (int32) and its token
    count. `render` is formats.chat_renderer(tok); `learn_from[i]` is conversation i's first learned message.
    With `starts`, also each token's first character in its rendered text (the splitter measures turns by it).
    With `system_turns`, a system turn already seen is not tokenized again (SystemTurns); with `byte_lengths`
    (token_byte_lengths), token positions come from the ids and the tokenizer skips its offsets."""
    texts = [render(m) for m in conversations]
    prefixes = [system_turns.prefix(m) for m in conversations] if system_turns else [""] * len(texts)
    rests = [t[len(p) :] for t, p in zip(texts, prefixes)]
    # the Rust tokenizer directly: transformers' per-encoding conversion cost ~20% more and adds nothing here
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    first = None
    if byte_lengths is not None and _byte_exact(backend, texts):
        # offsets are a fifth of encode_batch's time (bench/RESULTS.md, "Prepare")
        ids, _, lens = _join(backend.encode_batch_fast(rests, add_special_tokens=False), prefixes, system_turns, False)
        first = _starts_from_bytes(texts, ids, lens, byte_lengths)
    if first is None:
        ids, first, lens = _join(backend.encode_batch(rests, add_special_tokens=False), prefixes, system_turns, True)
    froms = learn_from or [0] * len(texts)
    spans = [label_spans(t, m, end_token, f) for t, m, f in zip(texts, conversations, froms)]
    labels = np.where(_learned(first, lens, spans), ids, IGNORE).astype(np.int32)
    return (ids, labels, lens, first) if starts else (ids, labels, lens)


def token_byte_lengths(tok) -> np.ndarray | None:
    """UTF-8 bytes of text behind each token id, for a byte-level BPE tokenizer (GPT-2 / Qwen / Llama-3 style:
    every token is a run of the input's bytes, so a conversation's tokens tile its text byte for byte);
    None for any other kind, whose positions then come from the tokenizer's offsets."""
    from tokenizers.pre_tokenizers import ByteLevel

    spec = json.loads(tok.backend_tokenizer.to_str())
    kind = spec["model"]["type"], (spec.get("decoder") or {}).get("type")
    if kind != ("BPE", "ByteLevel") or (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        return None
    added = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()}
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    alphabet = set(ByteLevel.alphabet())
    lengths = np.zeros(max(vocab.values()) + 1, np.int64)
    for piece, i in vocab.items():
        if piece in added:
            lengths[i] = len(piece.encode("utf-8"))
        elif set(piece) <= alphabet:
            lengths[i] = len(piece)  # one alphabet character per byte
        else:
            return None
    return lengths


def _byte_exact(backend, texts: list[str]) -> bool:
    """Whether the tokenizer sees these texts unchanged: an NFC normalizer (Qwen's) leaves NFC text alone."""
    spec = backend.normalizer
    return spec is None or all(unicodedata.is_normalized("NFC", t) for t in texts)


def _starts_from_bytes(texts: list[str], ids: np.ndarray, lens: np.ndarray, byte_lengths: np.ndarray):
    """Each token's first character in its conversation's text, from the bytes behind the ids; None when a
    conversation's tokens do not add up to its text's bytes (then the caller asks the tokenizer for offsets)."""
    blob = "".join(texts).encode("utf-8")
    token_bytes = byte_lengths[ids]
    ends = np.cumsum(token_bytes)
    conv_ends = np.cumsum(lens) - 1
    text_bytes = np.cumsum(np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts)))
    if len(ids) == 0 or not np.array_equal(ends[conv_ends[lens > 0]], text_bytes[lens > 0]):
        return None
    # global char index of every byte: count the bytes that start a UTF-8 character
    char_of_byte = np.cumsum((np.frombuffer(blob, np.uint8) & 0xC0) != 0x80) - 1
    first = char_of_byte[ends - token_bytes]
    char_base = np.zeros(len(texts), np.int64)
    np.cumsum(np.fromiter((len(t) for t in texts), np.int64, len(texts))[:-1], out=char_base[1:])
    return first - np.repeat(char_base, lens)


def _join(encodings, prefixes: list[str], system_turns: SystemTurns | None, with_offsets: bool):
    """Flat ids (and, `with_offsets`, token start characters; else None) of whole conversations: each one's
    reused system-turn tokens (if any) followed by its encoded rest, whose offsets move past the turn."""
    rest_lens = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    rest_ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int32, int(rest_lens.sum()))
    rest_off = None
    if with_offsets:
        rest_off = np.fromiter((o[0] for e in encodings for o in e.offsets), np.int64, len(rest_ids))
    if not any(prefixes):
        return rest_ids, rest_off, rest_lens
    turns = {p: system_turns.turns[p] for p in set(prefixes) if p}
    pre_lens = np.fromiter((len(turns[p][0]) if p else 0 for p in prefixes), np.int64, len(prefixes))
    lens = rest_lens + pre_lens
    conv_start = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=conv_start[1:])
    rest_start = np.zeros(len(lens), np.int64)
    np.cumsum(rest_lens[:-1], out=rest_start[1:])
    ids = np.empty(int(lens.sum()), np.int32)
    offsets = np.empty(len(ids), np.int64) if with_offsets else None
    # the rest of each conversation, after its turn's tokens, offsets shifted by the turn's characters
    at = np.repeat(conv_start + pre_lens, rest_lens) + np.arange(len(rest_ids)) - np.repeat(rest_start, rest_lens)
    ids[at] = rest_ids
    if with_offsets:
        offsets[at] = rest_off + np.repeat(np.fromiter(map(len, prefixes), np.int64, len(prefixes)), rest_lens)
    for p, (turn_ids, turn_off) in turns.items():
        rows = np.flatnonzero(np.fromiter((q == p for q in prefixes), bool, len(prefixes)))
        at = conv_start[rows][:, None] + np.arange(len(turn_ids))
        ids[at] = turn_ids
        if with_offsets:
            offsets[at] = turn_off
    return ids, offsets, lens


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
