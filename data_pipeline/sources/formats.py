"""Input formats for `cbt-llm prepare`: one parsed record -> conversations (system / user / assistant turns).

Declared with `data.format`:

- cbt       our corpus schema v1 (cbt_llm/domain/record.py): user = question + description, assistant = answer.
- psyqa     PsyQA JSON (a list of {question, description, keywords, questionID, answers[{answer_text}]}),
            one example per answer; a bad answer is rejected alone, its siblings survive. The question
            fields are read by data_pipeline.sources.psyqa.parse_psyqa_question, as `synth api` reads them.
- alpaca    {instruction, input?, output}: user = instruction (+ blank line + input), assistant = output.
- sharegpt  {conversations: [{from: system|human|gpt, value}]}: human/gpt alternate, the last turn is gpt;
            every gpt turn is learned.
- messages  OpenAI-messages JSONL, as `synth template --sessions` and `synth api --sessions` write sessions:
            {id?, messages: [{role: system|user|assistant, content}], meta?}. After an optional system turn,
            user and assistant alternate (either may open: our sessions open with the counsellor), every turn
            is non-empty and at least one is assistant; a last user turn (the offline generator's closing
            feedback) is dropped, as nothing learns from it. Every assistant (counsellor) turn is learned.
            The split key is meta.intake.presenting_problem, else the first user turn (_session_key).
            Sessions longer than data.seq_len are cut on turn boundaries by data_pipeline/prepare/split.py.
- preference  answer pairs for preference optimisation (train.objective: dpo), three shapes detected per record:
            ours {id?, messages: [system?, user, (assistant, user)*], chosen, rejected, meta?} (what
            `synth template --pairs` and `synth api --agents`'s pairs.jsonl write); OpenAI's preference
            fine-tuning {input: {messages}, preferred_output: [{role: assistant, content}], non_preferred_output};
            TRL's {prompt: text | [messages], chosen: text | [messages], rejected: ...} (a text prompt is one user
            turn; a message-list side gives its last assistant message; without `prompt`, TRL's implicit form,
            the prompt is what chosen and rejected share before their last turn). The prompt ends on a user turn;
            a pair whose sides are equal (same_answers) or empty (empty_side) is rejected. The split key is the
            prompt's last user turn (PairExample).

Every problem is a RecordError with a short reason code (counted in the manifest) and a one-line detail
(written to rejects/). The reason codes are the keys of REASONS (cbt_llm/domain/record.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from cbt_llm.domain.cbt import DISTORTIONS
from cbt_llm.domain.chat_format import build_user_message
from cbt_llm.domain.crisis import corpus_is_crisis
from cbt_llm.domain.record import CorpusRecord, RecordError, validate_record
from data_pipeline.sources.psyqa import parse_psyqa_question

FORMATS = ("cbt", "psyqa", "alpaca", "sharegpt", "messages", "preference")


@dataclass
class Example:
    """One training conversation taken from a record."""

    example_id: str
    question: str  # the text the train/validation split is keyed on
    messages: list[dict[str, str]] = field(default_factory=list)
    # the rest of the source record, for heldout.jsonl (a validation example's text, for evaluation)
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    distortions: list[str] = field(default_factory=list)
    crisis: bool = False
    intake: dict | None = None  # a session's intake (meta.intake of the messages format), for session eval

    def chars(self, system_prompt: str) -> int:
        """Characters of content, not counting the shared default system prompt."""
        return sum(
            len(m["content"]) for m in self.messages if not (m["role"] == "system" and m["content"] == system_prompt)
        )

    def messages_json(self) -> str:
        """The conversation as prepare carries it between steps and quotes it in rejects."""
        return json.dumps(self.messages, ensure_ascii=False)

    def content_hash(self, messages_json: str | None = None) -> int:
        """64-bit hash of the exact conversation: equal conversations are duplicates. `messages_json`: this
        example's messages_json() when the caller has it already (prepare's parse step does)."""
        return hash64((messages_json if messages_json is not None else self.messages_json()).encode("utf-8"))

    def heldout_record(self) -> dict:
        """This example as a line of heldout.jsonl (data_pipeline/shards.py): the question and its context as
        the asker wrote them, and the last assistant turn as the reference answer (a session: no reference,
        its intake and turn count instead)."""
        reference = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        if self.intake is not None:
            # a session's last counsellor turn is its summary, not an answer to the presenting problem: a
            # single-turn score against it would mislead, so sessions carry their intake instead
            return {**self._heldout_fields(""), "intake": self.intake, "turns": len(self.messages) - 1}
        return self._heldout_fields(reference)

    def _heldout_fields(self, reference: str) -> dict:
        return {
            "id": self.example_id,
            "question": self.question,
            "description": self.description,
            "keywords": self.keywords,
            "reference": reference,
            "crisis": self.crisis,
            "distortions": self.distortions,
        }


@dataclass
class PairExample(Example):
    """One preference pair: `messages` is the prompt (the conversation before the answer, system turn first),
    `chosen` and `rejected` the two answers to it, `meta` the record's meta (source, scores, ...)."""

    chosen: str = ""
    rejected: str = ""
    meta: dict = field(default_factory=dict)

    def chars(self, system_prompt: str) -> int:
        return super().chars(system_prompt) + len(self.chosen) + len(self.rejected)

    def messages_json(self) -> str:
        """The pair as prepare carries it between steps: {prompt, chosen, rejected} (tokens.Tokenize reads it);
        two pairs are duplicates when this text is equal."""
        pair = {"prompt": self.messages, "chosen": self.chosen, "rejected": self.rejected}
        return json.dumps(pair, ensure_ascii=False)

    def heldout_record(self) -> dict:
        """heldout.jsonl's line: the prompt's last user turn as the question, the chosen answer as reference."""
        return self._heldout_fields(self.chosen)

    def heldout_pair(self) -> dict:
        """heldout_pairs.jsonl's line (data_pipeline/shards.py): the pair as text, for preference accuracy."""
        return {
            "id": self.example_id,
            "messages": self.messages,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "crisis": self.crisis,
            "meta": self.meta,
        }


_SPACE = re.compile(r"\s+")


def hash64(blob: bytes) -> int:
    """Signed 64-bit BLAKE2b of `blob` (signed: it is stored as Parquet's int64): prepare's one hash for dedup
    keys, question fingerprints and near-duplicate bands."""
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True)


@lru_cache(maxsize=4096)  # prepare asks twice per example (its split and its fingerprint)
def normalise_question(text: str) -> str:
    """Key for the split: NFKC (full/half-width alike), case-folded, whitespace removed."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text).casefold())


def split_of(question: str, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'validation', by a hash of the normalised question: every answer to one question lands on
    the same side, whatever file or order it comes in."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.sha256(f"{seed}\x00{normalise_question(question)}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


def question_hash(question: str) -> int:
    """64-bit fingerprint of the normalised question (signed, as Parquet's int64): prepare lists the train
    split's in train_questions.u64, so a question set can be checked against it without the text."""
    return hash64(normalise_question(question).encode("utf-8"))


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _get_str(obj: dict, key: str, *, required: bool = True, allow_empty: bool = False, where: str = "") -> str:
    name = f"{where}{key}"
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise RecordError("missing_field", f"missing '{name}'")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise RecordError("wrong_type", f"'{name}' must be a string (got {_type_name(v)})")
    v = v.strip()
    if not v and not allow_empty:
        raise RecordError("empty_field", f"'{name}' is empty")
    return v


def _get_list(obj: dict, key: str) -> list:
    """A required, non-empty list field."""
    if key not in obj:
        raise RecordError("missing_field", f"missing '{key}'")
    v = obj[key]
    if not isinstance(v, list):
        raise RecordError("wrong_type", f"'{key}' must be a list (got {_type_name(v)})")
    if not v:
        raise RecordError("empty_field", f"'{key}' is empty")
    return v


def _cbt_reason(obj: dict) -> str:
    """Map the first pydantic error of the schema to a reason code."""
    try:
        CorpusRecord.model_validate(obj)
    except ValidationError as err:
        e = err.errors()[0]
        t = e["type"]
        if t == "missing":
            return "missing_field"
        if t == "extra_forbidden":
            return "unknown_field"
        if t in ("string_too_short", "too_short"):
            return "empty_field"
        if t.endswith("_type") or t.endswith("_parsing"):
            return "wrong_type"
        if "is empty" in str(e.get("msg", "")):
            return "empty_field"
    return "invalid_value"


def _cbt(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    rec, reason = validate_record(obj)
    if reason is not None:
        return [RecordError(_cbt_reason(obj), reason)]
    user = build_user_message(rec["question"], rec["description"])
    msgs = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user},
        {"role": "assistant", "content": rec["answer"]},
    ]
    return [
        Example(
            rec["id"],
            rec["question"],
            msgs,
            rec["description"],
            rec["keywords"],
            rec["distortions"],
            bool(rec["meta"].get("crisis")),
        )
    ]


def _psyqa(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    q = parse_psyqa_question(obj)
    answers = _get_list(obj, "answers")
    user = build_user_message(q["question"], q["description"])
    crisis = corpus_is_crisis(q["question"], q["description"])
    out: list[Example | RecordError] = []
    for k, ans in enumerate(answers):
        try:
            if not isinstance(ans, dict):
                raise RecordError("wrong_type", f"answers[{k}] must be an object (got {_type_name(ans)})")
            text = _get_str(ans, "answer_text", where=f"answers[{k}].")
        except RecordError as exc:
            out.append(exc)
            continue
        msgs = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": user},
            {"role": "assistant", "content": text},
        ]
        out.append(Example(f"{q['id']}-{k}", q["question"], msgs, q["description"], q["keywords"], crisis=crisis))
    return out


def _record_id(obj: dict, fallback_id: str) -> str:
    rid = obj.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
        return str(rid).strip()
    return fallback_id


def _alpaca(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    instruction = _get_str(obj, "instruction")
    extra = _get_str(obj, "input", required=False, allow_empty=True)
    output = _get_str(obj, "output")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    msgs = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return [Example(_record_id(obj, fallback_id), user, msgs, crisis=corpus_is_crisis(user))]


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _sharegpt(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    turns = _get_list(obj, "conversations")
    msgs: list[dict[str, str]] = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError("wrong_type", f"conversations[{k}] must be an object (got {_type_name(t)})")
        who = _get_str(t, "from", where=f"conversations[{k}].")
        if who not in _SHAREGPT_ROLES:
            raise RecordError("invalid_value", f"conversations[{k}].from is '{who}', expected human, gpt or system")
        role = _SHAREGPT_ROLES[who]
        value = _get_str(t, "value", where=f"conversations[{k}].")
        if role == "system" and k != 0:
            raise RecordError("invalid_value", f"conversations[{k}]: a system turn may only come first")
        msgs.append({"role": role, "content": value})
    if msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    body = msgs[1:]
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError(
                "invalid_value", "turns must alternate human, gpt, human, gpt ... after an optional system turn"
            )
    if not body or body[-1]["role"] != "assistant":
        raise RecordError("invalid_value", "the last turn must be gpt (an answer to learn)")
    return [
        Example(_record_id(obj, fallback_id), body[0]["content"], msgs, crisis=corpus_is_crisis(body[0]["content"]))
    ]


_MESSAGE_ROLES = ("system", "user", "assistant")


def _message_turns(turns: list) -> list[dict[str, str]]:
    """messages[k] -> {role, content}, each checked (object, known role, non-empty text, system only first)."""
    msgs = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError("wrong_type", f"messages[{k}] must be an object (got {_type_name(t)})")
        role = _get_str(t, "role", where=f"messages[{k}].")
        if role not in _MESSAGE_ROLES:
            raise RecordError("invalid_value", f"messages[{k}].role is '{role}', expected system, user or assistant")
        if role == "system" and k:
            raise RecordError("turn_order", f"messages[{k}]: a system turn may only come first")
        msgs.append({"role": role, "content": _get_str(t, "content", where=f"messages[{k}].")})
    return msgs


def _check_alternation(body: list[dict[str, str]]) -> None:
    """User and assistant alternate, either opening (our sessions open with the counsellor's greeting)."""
    if not body:
        raise RecordError("turn_order", "no turns besides the system prompt")
    for k in range(1, len(body)):
        if body[k]["role"] == body[k - 1]["role"]:
            raise RecordError("turn_order", f"turns {k} and {k + 1} are both {body[k]['role']}; roles must alternate")


def _session_key(body: list[dict[str, str]], intake: dict) -> str:
    """The split key: the intake's presenting problem when the record has one, else the first user turn.
    Sessions drawn from one presenting problem (the offline bank has 60; a PsyQA-seeded API session uses the
    question itself) then all land on one side, so session eval from held-out intakes never meets a problem
    the model trained on, and a PsyQA-seeded session falls with that question's single-turn answers."""
    problem = intake.get("presenting_problem")
    if isinstance(problem, str) and problem.strip():
        return problem.strip()
    return next((m["content"] for m in body if m["role"] == "user"), body[0]["content"])


def _messages(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    msgs = _message_turns(_get_list(obj, "messages"))
    if msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    _check_alternation(msgs[1:])
    if msgs[-1]["role"] == "user" and len(msgs) > 2:
        # the offline generator ends a session of even length on the client's feedback: nothing is learned from
        # a last client turn, and no counsellor turn follows it to need it as context
        msgs.pop()
    body = msgs[1:]
    if body[-1]["role"] != "assistant":
        raise RecordError("turn_order", "no assistant turn: a session needs a counsellor turn to learn")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    intake = meta.get("intake") if isinstance(meta.get("intake"), dict) else {}
    users = [m["content"] for m in body if m["role"] == "user"]
    crisis = meta.get("crisis") is True or any(corpus_is_crisis(u) for u in users)
    distortion = intake.get("distortion")
    keywords = intake.get("keywords")
    return [
        Example(
            _record_id(obj, fallback_id),
            _session_key(body, intake),
            msgs,
            intake.get("situation") if isinstance(intake.get("situation"), str) else "",
            [k for k in keywords if isinstance(k, str)] if isinstance(keywords, list) else [],
            [distortion] if distortion in DISTORTIONS else [],
            crisis,
            intake=intake,
        )
    ]


def _pair_side(obj: dict, key: str, where: str = "") -> str:
    """One answer of a pair: a string, or a message list whose last assistant message is the answer."""
    name = f"{where}{key}"
    if key not in obj or obj[key] is None:
        raise RecordError("missing_field", f"missing '{name}'")
    v = obj[key]
    if isinstance(v, list):
        if not all(isinstance(m, dict) for m in v):
            raise RecordError("wrong_type", f"'{name}' must be a string or a list of messages")
        answers = [m.get("content") for m in v if m.get("role") == "assistant"]
        if not answers:
            raise RecordError("empty_side", f"'{name}' has no assistant message")
        v = answers[-1]
    if not isinstance(v, str):
        raise RecordError("wrong_type", f"'{name}' must be a string (got {_type_name(v)})")
    if not v.strip():
        raise RecordError("empty_side", f"'{name}' is empty")
    return v.strip()


def _pair_prompt(turns: list, where: str) -> list[dict[str, str]]:
    if not turns:
        raise RecordError("empty_field", f"'{where}' is empty")
    try:
        msgs = _message_turns(turns)
    except RecordError as err:
        raise RecordError(err.reason, f"{where}: {err.detail}") from None
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    _check_alternation(body)
    if body[-1]["role"] != "user":
        raise RecordError("turn_order", f"'{where}' must end with a user turn (the answers answer it)")
    return msgs


def _preference(obj: dict, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    if any(k in obj for k in ("input", "preferred_output", "non_preferred_output")):  # OpenAI preference fine-tuning
        inp = obj.get("input")
        if not isinstance(inp, dict):
            reason = "missing_field" if inp is None else "wrong_type"
            raise RecordError(reason, "'input' must be an object with messages")
        prompt = _pair_prompt(_get_list(inp, "messages"), "input.messages")
        chosen, rejected = _pair_side(obj, "preferred_output"), _pair_side(obj, "non_preferred_output")
    elif "messages" in obj:  # ours
        prompt = _pair_prompt(_get_list(obj, "messages"), "messages")
        chosen, rejected = _pair_side(obj, "chosen"), _pair_side(obj, "rejected")
    elif "prompt" in obj:  # TRL, explicit prompt
        p = obj["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise RecordError("empty_field", "'prompt' is empty")
            prompt = [{"role": "user", "content": p.strip()}]
        elif isinstance(p, list):
            prompt = _pair_prompt(p, "prompt")
        else:
            raise RecordError("wrong_type", f"'prompt' must be a string or a list of messages (got {_type_name(p)})")
        chosen, rejected = _pair_side(obj, "chosen"), _pair_side(obj, "rejected")
    elif isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):  # TRL, implicit prompt
        c, r = obj["chosen"], obj["rejected"]
        if not c or not r or c[:-1] != r[:-1]:
            raise RecordError("invalid_value", "implicit prompt: chosen and rejected differ before their last turn")
        prompt = _pair_prompt(c[:-1], "chosen[:-1]")
        chosen, rejected = _pair_side(obj, "chosen"), _pair_side(obj, "rejected")
    else:
        raise RecordError(
            "missing_field", "no 'messages', 'input' or 'prompt': not a preference pair (ours, OpenAI's or TRL's)"
        )
    if chosen == rejected:
        raise RecordError("same_answers", "chosen and rejected are the same text")
    if prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system_prompt})
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    users = [m["content"] for m in prompt if m["role"] == "user"]
    crisis = meta["crisis"] if isinstance(meta.get("crisis"), bool) else any(corpus_is_crisis(u) for u in users)
    return [
        PairExample(
            _record_id(obj, fallback_id), users[-1], prompt, crisis=crisis, chosen=chosen, rejected=rejected, meta=meta
        )
    ]


_CONVERTERS = {
    "cbt": _cbt,
    "psyqa": _psyqa,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "preference": _preference,
}


def to_examples(obj: Any, fmt: str, system_prompt: str, fallback_id: str) -> list[Example | RecordError]:
    """One parsed record -> its examples. A RecordError in the list rejects one example (a PsyQA answer);
    a RecordError raised rejects the whole record."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"data.format '{fmt}' unknown; use one of {', '.join(FORMATS)}")
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"record is a JSON {_type_name(obj)}, not an object")
    return _CONVERTERS[fmt](obj, system_prompt, fallback_id)
