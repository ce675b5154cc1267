"""Parse and validate (Ray tasks): raw record bytes -> one row per example, or per bad record with its reason.

A record may give several examples (a PsyQA question, one per answer) and a bad answer rejects only itself, so
the rows are keyed (file_idx, line, sub). Each good example gets its split (a hash of its question), the
content hash that dedup compares, the fingerprint of its question (train_questions.u64) and, in the validation
split, its source text as a heldout.jsonl line (and a preference pair's as a heldout_pairs.jsonl line).
"""

from __future__ import annotations

import json

import pyarrow as pa

from cbt_llm.domain.record import RecordError, judge_total
from data_pipeline.sources.formats import Example, PairExample, question_hash, split_of, to_examples

RAW_KEEP_CHARS = 1000  # how much of a bad record the rejects file keeps

# the columns of a parsed block; tokens.Tokenize replaces `messages` with input_ids, labels and truncated
PARSED_FIELDS = [
    ("ok", pa.bool_()),
    ("file_idx", pa.int32()),
    ("line", pa.int64()),
    ("sub", pa.int32()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("raw", pa.string()),
    ("example_id", pa.string()),
    ("split", pa.string()),
    ("chash", pa.int64()),
    ("qhash", pa.int64()),
    ("heldout", pa.string()),  # the heldout.jsonl line of a validation example, "" otherwise
    ("heldout_pair", pa.string()),  # the heldout_pairs.jsonl line of a validation preference pair, "" otherwise
    ("messages", pa.string()),
    ("judge", pa.float64()),  # the record's meta.judge.total (cbt_llm.domain.record.judge_total), null when it has none
]


def _short(raw: bytes) -> str:
    """The start of a bad record as the rejects file keeps it (made for bad records only: most are good)."""
    return raw[: RAW_KEEP_CHARS * 4].decode("utf-8", errors="replace")[:RAW_KEEP_CHARS]


class Parse:
    """Raw bytes -> one row per example (ok) or per bad record / bad answer (not ok, with reason)."""

    def __init__(self, fmt: str, system_prompt: str, max_chars: int, val_fraction: float, seed: int, stems: list[str]):
        self.fmt, self.system_prompt, self.max_chars = fmt, system_prompt, max_chars
        self.val_fraction, self.seed, self.stems = val_fraction, seed, stems

    def __call__(self, table: pa.Table) -> pa.Table:
        cols: dict[str, list] = {name: [] for name, _ in PARSED_FIELDS}

        def add(ok, fidx, line, sub, reason="", detail="", raw="", ex: Example | None = None, split="", judge=None):
            messages = ex.messages_json() if ex else ""
            for k, v in (
                ("ok", ok),
                ("file_idx", fidx),
                ("line", line),
                ("sub", sub),
                ("reason", reason),
                ("detail", detail),
                ("raw", raw),
            ):
                cols[k].append(v)
            cols["example_id"].append(ex.example_id if ex else "")
            cols["split"].append(split)
            cols["chash"].append(ex.content_hash(messages) if ok else 0)
            cols["qhash"].append(question_hash(ex.question) if ex else 0)
            cols["heldout"].append(json.dumps(ex.heldout_record(), ensure_ascii=False) if split == "validation" else "")
            pair = split == "validation" and isinstance(ex, PairExample)
            cols["heldout_pair"].append(json.dumps(ex.heldout_pair(), ensure_ascii=False) if pair else "")
            cols["messages"].append(messages)
            cols["judge"].append(judge)

        d = table.to_pydict()
        for fidx, line, raw, pre_r, pre_d in zip(d["file_idx"], d["line"], d["raw"], d["pre_reason"], d["pre_detail"]):
            if pre_r:
                add(False, fidx, line, 0, pre_r, pre_d, _short(raw))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                add(False, fidx, line, 0, "invalid_utf8", f"{exc.reason} at byte {exc.start}", _short(raw))
                continue
            try:
                obj = json.loads(text.lstrip("\ufeff"))
            except json.JSONDecodeError as exc:
                add(False, fidx, line, 0, "malformed_json", f"{exc.msg} at column {exc.colno}", _short(raw))
                continue
            try:
                results = to_examples(obj, self.fmt, self.system_prompt, f"{self.stems[fidx]}:{line}")
            except RecordError as err:
                add(False, fidx, line, 0, err.reason, err.detail, _short(raw))
                continue
            for sub, res in enumerate(results):
                if isinstance(res, RecordError):
                    add(False, fidx, line, sub, res.reason, res.detail, _short(raw))
                    continue
                chars = res.chars(self.system_prompt)
                if chars > self.max_chars:
                    add(
                        False,
                        fidx,
                        line,
                        sub,
                        "too_long",
                        f"{chars} characters > data.max_chars {self.max_chars}",
                        _short(raw),
                    )
                    continue
                add(
                    True,
                    fidx,
                    line,
                    sub,
                    ex=res,
                    split=split_of(res.question, self.val_fraction, self.seed),
                    judge=judge_total(obj),
                )
        return pa.table({name: pa.array(cols[name], typ) for name, typ in PARSED_FIELDS})
