"""Question sets for evaluation, the guard that keeps training questions out of them, and prediction files.

A model is evaluated on questions it was not trained on. prepare writes the validation split as text
(heldout.jsonl) and the train split as question fingerprints (train_questions.u64; data_pipeline/shards.py);
check_no_train_overlap refuses any question set that shares a normalised question with the train split, by the
same normalisation and hash prepare used (data_pipeline.sources.formats.normalise_question / question_hash).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.record import RecordError
from data_pipeline.io import iter_lines, open_binary_read
from data_pipeline.shards import HELDOUT_FILE, load_manifest, train_question_hashes
from data_pipeline.sources.formats import question_hash
from data_pipeline.sources.psyqa import parse_psyqa_question, parse_question


class TrainOverlapError(ConfigError):
    """A question set that shares questions with the train split: one line with the count and an example."""


def train_overlap(questions: Iterable[str], data_dir: str | Path) -> list[int]:
    """Indices of `questions` whose normalised form is a question of the train split prepared in `data_dir`."""
    man = load_manifest(data_dir)
    train = train_question_hashes(data_dir, man)
    hashes = np.fromiter((question_hash(q) for q in questions), np.int64)
    if not len(train) or not len(hashes):
        return []
    pos = np.minimum(np.searchsorted(train, hashes), len(train) - 1)
    return np.flatnonzero(train[pos] == hashes).tolist()


def check_no_train_overlap(questions: Iterable[str], data_dir: str | Path, what: str = "questions") -> None:
    """Raise TrainOverlapError when any question (after normalisation: NFKC, case-folded, whitespace removed)
    is in the train split of the prepared data in `data_dir`; `what` names the set in the message.

    Also raises ManifestError (a ConfigError) when `data_dir` holds no manifest or one without fingerprints.
    """
    qs = list(questions)
    hits = train_overlap(qs, data_dir)
    if hits:
        example = " ".join(qs[hits[0]].split())
        example = example if len(example) <= 40 else example[:40] + "..."
        raise TrainOverlapError(
            f"{what}: {len(hits)} of {len(qs)} questions are in the train split of '{data_dir}' (e.g. '{example}'); "
            f"evaluate on {Path(data_dir) / HELDOUT_FILE} or remove them"
        )


def load_heldout(data_dir: str | Path) -> list[dict]:
    """The held-out records prepare wrote (heldout.jsonl, data_pipeline/shards.py), in file order."""
    man = load_manifest(data_dir)
    if "heldout" not in man:
        raise ConfigError(f"'{data_dir}' has no {HELDOUT_FILE} (made by an older prepare); re-run `cbt-llm prepare`")
    path = Path(data_dir) / man["heldout"]["path"]
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------------- question files


@dataclass
class EvalQuestion:
    """One question to answer: what the model is asked, the reference answer to score against (may be empty),
    and the crisis flag when the source states one (None: decided from the text by the safety module)."""

    id: str
    question: str
    description: str = ""
    reference: str = ""
    crisis: bool | None = None


def _reject(source: str, reason: str, rid: Any = None) -> dict:
    return {
        "id": rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None,
        "source": source,
        "reason": reason,
    }


def _reference_of(obj: dict) -> str:
    """heldout.jsonl's `reference`, our corpus's `answer`, or PsyQA's first non-empty answer_text."""
    for key in ("reference", "answer"):
        if isinstance(obj.get(key), str):
            return obj[key].strip()
    for ans in obj.get("answers") or []:
        if isinstance(ans, dict) and isinstance(ans.get("answer_text"), str) and ans["answer_text"].strip():
            return ans["answer_text"].strip()
    return ""


def _crisis_of(obj: dict) -> bool | None:
    flag = obj.get("crisis", (obj.get("meta") or {}).get("crisis") if isinstance(obj.get("meta"), dict) else None)
    return flag if isinstance(flag, bool) else None


def _question_of(obj: Any, psyqa: bool, source: str) -> tuple[EvalQuestion | None, dict | None]:
    """One entry -> (question, None) or (None, reject), by the question reader prepare and `synth api` use."""
    try:
        q = parse_psyqa_question(obj) if psyqa else parse_question(obj, "id", "", chinese=False)
    except RecordError as exc:
        return None, _reject(source, exc.detail, obj.get("id") if isinstance(obj, dict) else None)
    return EvalQuestion(q["id"], q["question"], q["description"], _reference_of(obj), _crisis_of(obj)), None


def _entries(path: Path, fmt: str) -> Iterator[tuple[str, Any, str | None]]:
    """(source, parsed entry or None, reason when the line is not JSON) of a PsyQA JSON list or a JSONL file."""
    if fmt == "psyqa":
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"eval.questions: '{path}' is not valid PsyQA JSON ({exc})") from None
        if not isinstance(data, list):
            raise ConfigError(f"eval.questions: '{path}' must be a JSON list of PsyQA questions")
        for i, obj in enumerate(data):
            yield f"{path}#{i}", obj, None
        return
    for n, line in iter_lines(path):
        try:
            yield f"{path}:{n}", json.loads(line.decode("utf-8")), None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield f"{path}:{n}", None, f"not valid JSON ({exc})"


def question_format(path: Path, declared: str) -> str:
    """heldout / cbt JSONL or a PsyQA JSON list: the declared format, else by the file's first bytes."""
    if declared != "auto":
        return declared
    with open_binary_read(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "psyqa" if head.startswith(b"[") else "cbt"


def load_eval_questions(path: str | Path, fmt: str = "auto", limit: int = 0) -> tuple[list[EvalQuestion], list[dict]]:
    """The questions of a heldout.jsonl, our corpus JSONL or a PsyQA JSON, in file order, and the rejects (bad
    lines, missing or repeated ids) with their reasons. Raises ConfigError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"eval.questions: '{path}' not found; run `cbt-llm prepare` (it writes heldout.jsonl) "
            f"or point eval.questions at a PsyQA JSON or a JSONL of questions"
        )
    fmt = question_format(path, fmt)
    questions: list[EvalQuestion] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    for source, obj, bad_json in _entries(path, fmt):
        if bad_json:
            rejects.append(_reject(source, bad_json))
            continue
        q, rej = _question_of(obj, fmt == "psyqa", source)
        if rej is None and q.id in seen:
            rej = _reject(source, f"duplicate id {q.id}", q.id)
        if rej is not None:
            rejects.append(rej)
            continue
        seen.add(q.id)
        questions.append(q)
        if limit and len(questions) >= limit:
            break
    return questions, rejects


# ----------------------------------------------------------------------------------------- predictions


def _prediction_of(obj: Any, source: str) -> tuple[dict | None, dict | None]:
    if not isinstance(obj, dict):
        return None, _reject(source, f"entry is not a JSON object ({type(obj).__name__})")
    rid = obj.get("id")
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        return None, _reject(source, f"missing or invalid 'id' (got {rid!r})")
    output = obj.get("output")
    if not isinstance(output, str):
        return None, _reject(source, f"'output' must be a string (got {type(output).__name__})", rid)
    ref = obj.get("reference")
    if ref is not None and not isinstance(ref, str):
        return None, _reject(source, f"'reference' must be a string (got {type(ref).__name__})", rid)
    return {"id": str(rid).strip(), "output": output, "reference": ref}, None


def load_predictions(path: str | Path) -> tuple[list[dict], list[dict]]:
    """A JSONL of {id, output, reference?} another system produced: (predictions in file order, rejects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"eval.predictions (--predictions): '{path}' not found; a JSONL of {{id, output, reference?}}"
        )
    preds: list[dict] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    for source, obj, bad_json in _entries(path, "jsonl"):
        pred, rej = (None, _reject(source, bad_json)) if bad_json else _prediction_of(obj, source)
        if rej is None and pred["id"] in seen:
            rej = _reject(source, f"duplicate id {pred['id']}", pred["id"])
        if rej is not None:
            rejects.append(rej)
            continue
        seen.add(pred["id"])
        preds.append(pred)
    return preds, rejects
