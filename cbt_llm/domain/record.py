"""Corpus record schema v1: the contract between corpus building and everything downstream.

A record (one JSON object per line):

    id            str, unique within a corpus
    question      str, Chinese
    description   str, Chinese (may be empty only when the source had none)
    keywords      list[str]
    cbt           {empathy, key_thought, challenge, strategy, encouragement}: five non-empty Chinese texts
    answer        str, the five parts joined into fluent prose, in order
    distortions   list[str], labels from DISTORTIONS
    source        str, e.g. "synth-template", "api:<model>", "psyqa"
    meta          {generator, prompt_version, seed | model, crisis: bool, schema_version, ...}

Records whose question or description mention suicide or self-harm (crisis.corpus_is_crisis) carry
meta.crisis = true, and their answer must contain a crisis-support sentence (crisis.has_crisis_support). Both
rules, and the hotlines, come from cbt_llm/domain/crisis.py; the five parts and the distortion labels from
cbt_llm/domain/cbt.py.

meta.judge.total (a number, optional): the CBT-rubric judge's total for the answer, as a judged generator (e.g.
`synth api --agents`) records it; prepare's quality gate (data.quality.min_judge_total) reads it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cbt_llm.domain.cbt import CBT_PARTS, DISTORTIONS
from cbt_llm.domain.crisis import corpus_is_crisis, has_crisis_support

SCHEMA_VERSION = 1

_CJK = re.compile(r"[\u4e00-\u9fff]")


def has_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


class CBTParts(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    empathy: str
    key_thought: str
    challenge: str
    strategy: str
    encouragement: str

    @model_validator(mode="after")
    def _non_empty_chinese(self) -> CBTParts:
        for part in CBT_PARTS:
            text = getattr(self, part)
            if not text:
                raise ValueError(f"cbt.{part} is empty")
            if not has_chinese(text):
                raise ValueError(f"cbt.{part} has no Chinese text")
        return self


class CorpusRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    description: str = ""
    keywords: list[str] = Field(default_factory=list)
    cbt: CBTParts
    answer: str = Field(min_length=1)
    distortions: list[str] = Field(default_factory=list)
    source: str = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("question")
    @classmethod
    def _question_chinese(cls, v: str) -> str:
        if not has_chinese(v):
            raise ValueError("question has no Chinese text")
        return v

    @field_validator("distortions")
    @classmethod
    def _known_distortions(cls, v: list[str]) -> list[str]:
        unknown = [d for d in v if d not in DISTORTIONS]
        if unknown:
            raise ValueError(f"unknown distortion labels {unknown}; valid: {', '.join(DISTORTIONS)}")
        return v

    @model_validator(mode="after")
    def _crisis_rules(self) -> CorpusRecord:
        crisis = corpus_is_crisis(self.question, self.description)
        if crisis and not self.meta.get("crisis"):
            raise ValueError("question mentions suicide or self-harm but meta.crisis is not true")
        if self.meta.get("crisis") and not has_crisis_support(self.answer):
            raise ValueError("crisis-flagged record has no crisis-support sentence in its answer")
        return self


def validate_record(obj: Any) -> tuple[dict | None, str | None]:
    """Validate one parsed JSON object. Returns (record dict, None) or (None, one-line reason)."""
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({type(obj).__name__})"
    try:
        rec = CorpusRecord.model_validate(obj)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        return None, f"{loc}: {msg}" if loc else msg
    return rec.model_dump(), None


# Why a record is rejected: reason code -> what it means (prepare's manifest counts rejects by these codes;
# README and the summary table use these words).
REASONS: dict[str, str] = {
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not valid JSON",
    "not_object": "record is not a JSON object",
    "missing_field": "a required field is missing",
    "empty_field": "a required field is empty",
    "wrong_type": "a field has the wrong type",
    "invalid_value": "a field breaks a schema rule (no Chinese text, unknown label, crisis rules, turn order)",
    "unknown_field": "a field the schema does not define",
    "too_long": "more characters than data.max_chars",
    "duplicate": "exact duplicate of an earlier conversation",
    "overlong": "more tokens than data.seq_len (data.overlong=reject)",
    "prompt_overlong": "the prompt alone fills data.seq_len, nothing left to learn",
    "turn_order": "turns out of order: after an optional system turn user and assistant alternate (no assistant: none)",
    "turn_overlong": "a counsellor turn and its client turn need more than data.seq_len (data.overlong=split)",
    "near_duplicate": "near-copy of an earlier kept conversation (data.near_dup: MinHash LSH)",
    "low_quality": "under a data.quality threshold (structure coverage or meta.judge.total)",
    "same_answers": "a preference pair whose chosen and rejected answers are the same text (after strip)",
    "empty_side": "a preference pair with an empty chosen or rejected answer",
    "pair_overlong": "a preference pair's two sequences need more than data.seq_len together (never truncated)",
}


def judge_total(obj: dict) -> float | None:
    """A record's meta.judge.total: None when it has none, NaN when it is not a number (the quality gate
    rejects those rather than guess)."""
    v: Any = obj
    for key in ("meta", "judge", "total"):
        if not isinstance(v, dict) or key not in v:
            return None
        v = v[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return float("nan")
    return float(v)


class RecordError(ValueError):
    """A bad record: `reason` is a code from REASONS, `detail` one line for the rejects file."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
