"""Question ingest for `cbt-llm synth api`: PsyQA JSON or our JSONL, normalised to one question shape.

A normalised question is `{id, question, description, keywords: list[str]}`. parse_question is the one
reader of these fields: prepare's `psyqa` format (data_pipeline.sources.formats) reads a PsyQA entry through it too.

- PsyQA (thu-coai/PsyQA, e.g. PsyQA_example.json): one JSON list of objects with `question`, `description`,
  `keywords` (a comma-separated string), `questionID` and `answers`. The id becomes "psyqa-<questionID>";
  the human answers are not used here (the API writes CBT answers).
- Our JSONL ((zstd) one object per line): schema v1 records or plain lines with question/description/keywords/id;
  any existing `cbt`/`answer` is ignored.

Bad entries never stop the ingest: each one comes back as a reject `{id, stage: "input", source, reason}`.
PsyQA needs a signed user agreement, so no PsyQA data ships in this repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cbt_llm.domain.record import RecordError, has_chinese
from data_pipeline.io import expand_inputs, iter_lines, open_binary_read

# PsyQA separates keywords with an ASCII comma; full-width commas and 、 appear in hand-written inputs.
_KEYWORD_SPLIT = re.compile(r"[,\uff0c\u3001;\uff1b]")


def split_keywords(value: Any) -> list[str]:
    """Keywords as a list: split a comma-separated string, keep a list of strings, drop empties and repeats.
    Raises RecordError (a ValueError) for any other type."""
    if value is None:
        return []
    if isinstance(value, str):
        items = _KEYWORD_SPLIT.split(value)
    elif isinstance(value, list) and all(isinstance(k, str) for k in value):
        items = value
    else:
        raise RecordError("wrong_type", f"keywords must be a string or a list of strings (got {type(value).__name__})")
    return list(dict.fromkeys(k.strip() for k in items if k.strip()))


def parse_question(obj: Any, id_key: str, id_prefix: str, *, chinese: bool = True) -> dict:
    """One question entry -> {id: id_prefix + obj[id_key], question, description, keywords: list[str]}.

    The one reader of a question's fields: `synth api`'s ingest (PsyQA and our JSONL) and prepare's `psyqa`
    format both go through it. `chinese` also refuses a question with no Chinese text (the CBT prompt is
    Chinese). Raises RecordError with a reason code and a one-line detail.
    """
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"entry is not a JSON object ({type(obj).__name__})")
    question = obj.get("question")
    if question is None:
        raise RecordError("missing_field", "missing 'question'")
    if not isinstance(question, str):
        raise RecordError("wrong_type", f"'question' must be a string (got {type(question).__name__})")
    question = question.strip()
    if not question:
        raise RecordError("empty_field", "'question' is empty")
    if chinese and not has_chinese(question):
        raise RecordError("invalid_value", "'question' has no Chinese text")
    description = obj.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise RecordError("wrong_type", f"'description' must be a string (got {type(description).__name__})")
    keywords = split_keywords(obj.get("keywords"))
    raw_id = obj.get(id_key)
    # bool is an int subclass: True would silently become id "psyqa-True"
    if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or str(raw_id).strip() == "":
        reason = "missing_field" if raw_id is None else "wrong_type"
        raise RecordError(reason, f"missing or invalid id (got {raw_id!r})")
    return {
        "id": f"{id_prefix}{str(raw_id).strip()}",
        "question": question,
        "description": description.strip(),
        "keywords": keywords,
    }


def parse_psyqa_question(obj: Any, *, chinese: bool = False) -> dict:
    """The question fields of one PsyQA entry; its id is "psyqa-<questionID>". Raises RecordError."""
    return parse_question(obj, "questionID", "psyqa-", chinese=chinese)


def _reject(rid: Any, source: str, reason: str) -> dict:
    return {
        "id": rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None,
        "stage": "input",
        "source": source,
        "reason": reason,
    }


def load_psyqa(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Load a PsyQA JSON list. Returns (questions, rejects); duplicate ids after the first are rejects.

    Raises ValueError (one line) when the file as a whole is not a JSON list.
    """
    with open_binary_read(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid PsyQA JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: PsyQA JSON must be a list of question objects (got {type(data).__name__})")
    questions, rejects, seen = [], [], set()
    for i, obj in enumerate(data):
        src = f"{path}#{i}"
        try:
            q = parse_psyqa_question(obj, chinese=True)
        except RecordError as exc:
            rid = obj.get("questionID") if isinstance(obj, dict) else None
            rejects.append(_reject(f"psyqa-{rid}" if rid is not None else None, src, exc.detail))
            continue
        _keep_unique(q, src, seen, questions, rejects)
    return questions, rejects


def _keep_unique(q: dict, src: str, seen: set, questions: list[dict], rejects: list[dict], note: str = "") -> None:
    """Keep the first question with each id; a repeated id is a reject, never a second record."""
    if q["id"] in seen:
        rejects.append(_reject(q["id"], src, f"duplicate id {q['id']}{note}"))
        return
    seen.add(q["id"])
    questions.append(q)


def load_question_jsonl(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Load our (zstd) JSONL of questions or records. Returns (questions, rejects)."""
    questions, rejects, seen = [], [], set()
    for n, line in iter_lines(path):
        src = f"{path}:{n}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.append(_reject(None, src, "line is not valid UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            rejects.append(_reject(None, src, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            q = parse_question(obj, "id", "")
        except RecordError as exc:
            rejects.append(_reject(obj.get("id") if isinstance(obj, dict) else None, src, exc.detail))
            continue
        _keep_unique(q, src, seen, questions, rejects)
    return questions, rejects


def _looks_like_json_list(path: str) -> bool:
    if path.endswith(".json") or path.endswith(".json.zst"):
        return True
    with open_binary_read(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def load_questions(pattern: str | list[str]) -> tuple[list[dict], list[dict]]:
    """Load every file the glob(s) match, PsyQA JSON or our JSONL (detected per file), in file order.

    Ids must be unique across files: a later duplicate is a reject. Raises FileNotFoundError when a pattern
    matches nothing and ValueError when a .json file is not a JSON list.
    """
    questions, rejects, seen = [], [], set()
    for path in expand_inputs(pattern):
        qs, rj = load_psyqa(path) if _looks_like_json_list(path) else load_question_jsonl(path)
        rejects.extend(rj)
        for q in qs:
            _keep_unique(q, path, seen, questions, rejects, " (already in an earlier input file)")
    return questions, rejects
