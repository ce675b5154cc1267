"""data.overlong: split. A conversation longer than data.seq_len becomes pieces cut on turn boundaries.

A multi-turn session (data.format messages) runs to thousands of tokens; truncating it would cut a turn in half
and lose every later counsellor turn, rejecting it would lose the session. Instead each piece is

    the system prompt + preceding turns as masked context + the next counsellor turn(s), learned

and every counsellor turn is learned in exactly one piece. A unit is a counsellor turn with the client turn
before it (the opening counsellor turn is a unit alone); a unit that cannot fit even with no context goes to
rejects (turn_overlong) and the rest of the session still trains. The first piece is the longest prefix of units
that fits. Every later piece takes new units up to NEW_SHARE of the room (at least one), then as many turns
before them as still fit as context: taking all the room for new turns would leave the first counsellor turn
of a piece answering a client it has never met, taking one unit per piece would repeat the context of each and
multiply the tokens. At 0.5 a long session costs about twice its tokens.

Pieces are ordinary examples from here on (packing keeps each whole). The planner (plan_pieces) is plain
arithmetic on token counts; split_overlong, in the tokenizer actor, measures the turns on the session's own
tokens, makes each piece's tokens (sliced out of the session's under ChatML, where that equals tokenizing the
piece; rendered and tokenized on its own under any other template) and replaces the session's row by one row
per piece or rejected unit, in session order (`sub` = their index, so the record is still counted once). On the
sessions demo's 5,000 sessions at seq_len 512 (993 split) the tokenizer actor spends ~10% more CPU than with
truncation; tokenizing each piece again instead would cost ~75% more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cbt_llm.domain.chat_format import render_chatml
from data_pipeline.prepare.encode import encode_batch
from data_pipeline.prepare.parse import RAW_KEEP_CHARS
from data_pipeline.shards import IGNORE
from data_pipeline.sources.formats import hash64

NEW_SHARE = 0.5  # the share of a later piece's room its new (learned) turns may take; the rest is context


def overlong_policy(dc) -> str:
    """data.overlong with auto resolved: split for sessions (format messages), truncate for the rest, as before
    the split policy existed (so their shards are unchanged)."""
    if dc.overlong != "auto":
        return dc.overlong
    return "split" if dc.format == "messages" else "truncate"


@dataclass(frozen=True)
class Piece:
    """Turns [context, end) of a conversation's body; the assistant turns in [start, end) are learned."""

    context: int
    start: int
    end: int


def units_of(roles: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each unit: the turns up to and including the next assistant turn."""
    units, start = [], 0
    for k, role in enumerate(roles):
        if role == "assistant":
            units.append((start, k + 1))
            start = k + 1
    return units


def plan_pieces(
    fixed: int, turn_lens: list[int], roles: list[str], seq_len: int
) -> tuple[list[Piece], list[tuple[int, int]]]:
    """(pieces, rejected units) for a conversation body whose turns take turn_lens tokens each; `fixed` is what
    every piece carries besides its turns (the system prompt and the template's tail)."""
    room = seq_len - fixed
    cum = np.concatenate([[0], np.cumsum(turn_lens)])
    units = units_of(roles)
    pieces: list[Piece] = []
    rejected: list[tuple[int, int]] = []
    u = 0
    while u < len(units):
        start = units[u][0]
        if cum[units[u][1]] - cum[start] > room:
            rejected.append(units[u])
            u += 1
            continue
        budget = room if start == 0 else max(room * NEW_SHARE, cum[units[u][1]] - cum[start])
        v = u + 1
        while v < len(units) and cum[units[v][1]] - cum[start] <= budget:
            v += 1
        end = units[v - 1][1]
        context = start
        while context > 0 and cum[end] - cum[context - 1] <= room:
            context -= 1
        pieces.append(Piece(context, start, end))
        u = v
    return pieces, rejected


def _boundaries(text: str, messages: list[dict], end_token: str) -> list[int]:
    """The character position just past each message (its content and the end token after it)."""
    out, cursor = [], 0
    for m in messages:
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise ValueError(f"chat template changed a {m['role']} message; cannot locate it to split the session")
        cursor = pos + len(m["content"])
        if end_token and text.startswith(end_token, cursor):
            cursor += len(end_token)
        out.append(cursor)
    return out


def message_cuts(render, messages: list[dict], end_token: str, starts: np.ndarray) -> np.ndarray:
    """For each message, how many of the conversation's tokens (whose first characters are `starts`) come before
    the end of it (its content and end token)."""
    return np.searchsorted(starts, _boundaries(render(messages), messages, end_token))


def turn_lengths(cut: np.ndarray, total: int, first: int) -> tuple[int, list[int]]:
    """(fixed, turn_lens): tokens of each body turn (messages from `first` on; message_cuts gives `cut`) and of
    everything else (the system turn and the template's tail). Exact for ChatML, whose special tokens no merge
    crosses; for other templates an estimate that _encoded checks against the piece's real tokenization."""
    turn_lens = np.diff(cut[first - 1 :] if first else np.concatenate([[0], cut])).tolist()
    return total - sum(turn_lens), turn_lens


def _piece_hash(messages: list[dict], learn_from: int) -> int:
    """The dedup key of a piece: its exact text and where learning starts (Example.content_hash's width)."""
    blob = json.dumps([learn_from, messages], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hash64(blob)


def _sliced(seg: tuple, cut: np.ndarray, p: Piece) -> tuple[np.ndarray, np.ndarray]:
    """A piece's (ids, labels) cut out of the whole conversation's (ChatML, a system turn first): ChatML's
    special tokens delimit every message, so a message's tokens do not depend on its neighbours and the slices
    equal the piece's own tokenization (tests/unit/data_pipeline/test_prepare_sessions.py checks it), without
    tokenizing again."""
    ids, labels = seg
    ctx, new = slice(cut[p.context], cut[p.start]), slice(cut[p.start], cut[p.end])
    parts = (slice(0, cut[0]), ctx, new, slice(cut[-1], len(ids)))  # system, context, learned, tail
    masked = np.full(ctx.stop - ctx.start, IGNORE, np.int32)
    return (
        np.concatenate([ids[x] for x in parts]),
        np.concatenate([labels[parts[0]], masked, labels[new], labels[parts[3]]]),
    )


def _encoded(tz, head: list[dict], body: list[dict], p: Piece) -> tuple[list[dict], int, np.ndarray, np.ndarray]:
    """A piece rendered and tokenized on its own (any chat template): (msgs, learn_from, ids, labels). The plan is
    exact for ChatML; for another template, context is given up a turn at a time until the piece fits."""
    context = p.context
    while True:
        msgs = head + body[context : p.end]
        learn_from = len(head) + p.start - context
        ids, labels, lens = encode_batch(tz.tok, tz.render, [msgs], tz.end_token, [learn_from])
        if lens[0] <= tz.seq_len or context == p.start:
            return msgs, learn_from, ids, labels
        context += 1


def split_conversation(tz, messages: list[dict], seg: tuple) -> list[dict]:
    """One over-long conversation (seg: its ids, labels and token starts) -> its rows in order:
    {msgs, learn_from, ids, labels} per piece, {reject, raw} per rejected unit."""
    ids, labels, starts = seg
    first = 1 if messages[0]["role"] == "system" else 0
    head, body = messages[:first], messages[first:]
    cut = message_cuts(tz.render, messages, tz.end_token, starts)
    fixed, turn_lens = turn_lengths(cut, len(ids), first)
    pieces, rejected = plan_pieces(fixed, turn_lens, [m["role"] for m in body], tz.seq_len)
    rows: list[tuple[int, dict]] = []
    for s, e in rejected:
        need = fixed + sum(turn_lens[s:e])
        detail = f"turns {s + 1}-{e} need {need} tokens with the system prompt > data.seq_len {tz.seq_len}"
        rows.append((s, {"reject": detail, "raw": json.dumps(body[s:e], ensure_ascii=False)}))
    for p in pieces:
        if first and tz.render is render_chatml:
            msgs, learn_from = head + body[p.context : p.end], first + p.start - p.context
            piece_ids, piece_labels = _sliced((ids, labels), cut, p)
        else:
            msgs, learn_from, piece_ids, piece_labels = _encoded(tz, head, body, p)
        if len(piece_ids) > tz.seq_len:
            detail = f"turns {p.start + 1}-{p.end} take {len(piece_ids)} tokens > data.seq_len {tz.seq_len}"
            rows.append((p.start, {"reject": detail, "raw": json.dumps(body[p.start : p.end], ensure_ascii=False)}))
            continue
        rows.append((p.start, {"msgs": msgs, "learn_from": learn_from, "ids": piece_ids, "labels": piece_labels}))
    return [r for _, r in sorted(rows, key=lambda x: x[0])]


def split_overlong(tz, table: pa.Table, messages: list[str], encoded: tuple, lens: np.ndarray):
    """Replace each ok row longer than tz.seq_len by its pieces and rejected units (tz: the Tokenize actor;
    encoded: the batch's flat ids, labels and token starts, as encode_batch gives them). Returns the new
    (table, messages, ids, labels, lens, pieced), pieced marking the rows that came from one."""
    ids, labels, starts = encoded
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    cols = table.select(["ok", "sub", "reason", "detail", "raw", "example_id", "chash", "heldout"]).to_pydict()
    out = {k: [] for k in cols}
    take, new_messages, id_parts, label_parts, new_lens, pieced = [], [], [], [], [], []

    def emit(i: int, over: dict, seg_ids, seg_labels, is_piece: bool) -> None:
        take.append(i)
        for k in out:
            out[k].append(over.get(k, cols[k][i]))
        new_messages.append(messages[i])
        id_parts.append(seg_ids)
        label_parts.append(seg_labels)
        new_lens.append(len(seg_ids))
        pieced.append(is_piece)

    for i in range(len(lens)):
        s, e = offsets[i], offsets[i + 1]
        if lens[i] <= tz.seq_len:
            emit(i, {}, ids[s:e], labels[s:e], False)
            continue
        eid, heldout = cols["example_id"][i], cols["heldout"][i]
        for k, r in enumerate(split_conversation(tz, json.loads(messages[i]), (ids[s:e], labels[s:e], starts[s:e]))):
            over = {"sub": k, "example_id": f"{eid}#{k}", "heldout": ""}
            if "reject" in r:
                over.update(ok=False, reason="turn_overlong", detail=f"{eid}#{k}: {r['reject']}")
                over["raw"] = r["raw"][:RAW_KEEP_CHARS]
                emit(i, over, ids[:0], labels[:0], True)
                continue
            over.update(chash=_piece_hash(r["msgs"], r["learn_from"]), heldout=heldout)
            heldout = ""  # the session's heldout line goes with its first piece
            emit(i, over, r["ids"], r["labels"], True)
    new = table.take(pa.array(take, pa.int64()))
    for k, values in out.items():
        new = new.set_column(new.schema.get_field_index(k), k, pa.array(values, table.schema.field(k).type))
    return (
        new,
        new_messages,
        np.concatenate(id_parts).astype(np.int32),
        np.concatenate(label_parts).astype(np.int32),
        np.asarray(new_lens, np.int64),
        np.asarray(pieced, bool),
    )
