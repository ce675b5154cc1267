"""Training on multi-turn sessions (data.format messages, data.overlong split): prepare end to end on template
sessions, in one prepare run, and the splitter and the format's validation without Ray.

What must hold: after splitting and packing, the labelled tokens of a session's pieces are exactly its counsellor
turns and their end tokens, each once; client turns and the system prompt are never labelled; every piece is the
system prompt and whole consecutive turns (never a cut turn); a unit that cannot fit is rejected alone; bad
sessions are rejected with their reason; the manifest counts the split sessions and their pieces.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from cbt_llm.core.config import Config
from cbt_llm.domain.chat_format import IM_END, chat_renderer, render_chatml
from cbt_llm.domain.prompts import SESSION_SYSTEM_PROMPT
from cbt_llm.domain.record import REASONS, RecordError
from cbt_llm.inference.tokenizer import load_tokenizer
from data_pipeline.packing import split_by_position_ids
from data_pipeline.prepare import run_prepare
from data_pipeline.prepare.encode import encode_batch
from data_pipeline.prepare.split import Piece, overlong_policy, plan_pieces, split_conversation, units_of
from data_pipeline.shards import IGNORE
from data_pipeline.sources.formats import normalise_question, question_hash, to_examples
from data_pipeline.synth.sessions import session_at
from data_pipeline.tokenizer import train_tokenizer_from_texts

SEQ_LEN = 512
DEFAULT_SYSTEM = "你是一名心理咨询师。"


def _bad_records() -> list[tuple[dict | list, str]]:
    ok = [{"role": "assistant", "content": "你好"}, {"role": "user", "content": "我睡不着"}]
    return [
        ({"id": "two-users", "messages": [ok[1], ok[1], ok[0]]}, "turn_order"),
        ({"id": "late-system", "messages": [*ok, {"role": "system", "content": "规则"}]}, "turn_order"),
        ({"id": "client-only", "messages": [ok[1]]}, "turn_order"),
        ({"id": "empty-turn", "messages": [ok[0], {"role": "user", "content": "  "}, ok[0]]}, "empty_field"),
        ({"id": "bad-role", "messages": [ok[0], {"role": "client", "content": "我"}, ok[0]]}, "invalid_value"),
        ({"id": "no-messages", "turns": ok}, "missing_field"),
    ]


def _trimmed(messages: list[dict], system: str = DEFAULT_SYSTEM) -> list[dict]:
    """The conversation the messages format trains on: a system turn first, a last client turn dropped."""
    msgs = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
    return msgs[:-1] if msgs[-1]["role"] == "user" else msgs


@pytest.fixture(scope="module")
def sessions_run(tmp_path_factory):
    """One prepare run over 16 template sessions, a session with one over-long counsellor turn, a short one that
    opens with the client (fits: not split) and the bad records."""
    d = tmp_path_factory.mktemp("sessions")
    good = [session_at(0, i) for i in range(16)]
    huge = session_at(0, 100)
    huge["id"] = "huge-turn"
    huge["messages"][5] = {"role": "assistant", "content": "我们慢慢来，先深呼吸。" * 120}
    short = {
        "id": "short",
        "messages": [
            {"role": "user", "content": "最近总是失眠，怎么办？"},
            {"role": "assistant", "content": "失眠一定让你很疲惫。能说说睡前你都在想什么吗？"},
        ],
    }
    good += [huge, short]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines += [json.dumps(r, ensure_ascii=False) for r, _ in _bad_records()]
    (d / "sessions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [m["content"] for s in good[:16] for m in s["messages"]]
    tok_dir = train_tokenizer_from_texts(texts, 1000, d / "tok")
    data = {
        "inputs": [str(d / "sessions.jsonl")],
        "out_dir": str(d / "out"),
        "tokenizer": str(tok_dir),
        "format": "messages",  # data.overlong stays auto: split
        "system_prompt": DEFAULT_SYSTEM,
        "seq_len": SEQ_LEN,
        "pack_window": 64,
        "val_fraction": 0.3,
        "world_size": 2,
    }
    man = run_prepare(Config.model_validate({"data": data}))
    return {"out": d / "out", "man": man, "good": {r["id"]: r for r in good}, "tok": load_tokenizer(str(tok_dir))}


def _examples(out: Path, man: dict, split: str):
    """(example_id, input_ids, labels) of every example in the split's packed rows."""
    for sh in man["splits"][split]["shards"]:
        for r in pq.read_table(out / sh["path"]).to_pylist():
            for eid, (s, e) in zip(r["example_ids"], split_by_position_ids(r["position_ids"])):
                yield eid, r["input_ids"][s:e], r["labels"][s:e]


def _runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled positions."""
    runs: list[list[int]] = []
    for i, t in enumerate(labels):
        if t == IGNORE:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _piece_turns(text: str, msgs: list[dict], render) -> tuple[int, int]:
    """(c, e): the piece is msgs[0] (system) + msgs[c:e] exactly, i.e. whole consecutive turns."""
    for c in range(1, len(msgs)):
        for e in range(c + 1, len(msgs) + 1):
            if render([msgs[0], *msgs[c:e]]) == text:
                return c, e
    raise AssertionError(f"piece is not the system prompt + whole consecutive turns: {text[:200]!r}")


def test_labels_are_exactly_the_counsellor_turns_once(sessions_run):
    out, man, good, tok = sessions_run["out"], sessions_run["man"], sessions_run["good"], sessions_run["tok"]
    render = chat_renderer(tok)
    learned: dict[str, list[tuple[int, list[int]]]] = {}
    for split in ("train", "validation"):
        for eid, ids, labels in _examples(out, man, split):
            sid = eid.split("#")[0]
            msgs = _trimmed(good[sid]["messages"])
            assert len(ids) <= SEQ_LEN and ("#" in eid) == (sid != "short")
            c, e = _piece_turns(tok.decode(ids), msgs, render)
            runs = _runs(labels)
            # the learned turns are the piece's last len(runs) counsellor turns: the ones before are context
            turns = [k for k in range(c, e) if msgs[k]["role"] == "assistant"][-len(runs) :]
            assert [tok.decode([ids[i] for i in r]) for r in runs] == [msgs[k]["content"] + IM_END for k in turns]
            assert [labels[i] for r in runs for i in r] == [ids[i] for r in runs for i in r]
            assert turns[-1] == e - 1  # a piece ends on the counsellor turn it learns
            k = int(eid.split("#")[1]) if "#" in eid else 0
            if k and sid != "huge-turn":  # a later piece sees turns before its first new client turn
                assert c < turns[0] - 1
            learned.setdefault(sid, []).append((k, turns))
    for sid, s in good.items():
        msgs = _trimmed(s["messages"])
        want = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and not (sid == "huge-turn" and k == 5)]
        got = [t for _, turns in sorted(learned[sid]) for t in turns]
        assert got == want, sid  # every counsellor turn once, in session order across the pieces
    assert len(learned["short"]) == 1 and all(len(v) >= 2 for sid, v in learned.items() if sid != "short")


def test_manifest_counts_and_rejects(sessions_run):
    out, man, good = sessions_run["out"], sessions_run["man"], sessions_run["good"]
    c = man["counts"]
    bad = _bad_records()
    assert c["read"] == len(good) + len(bad)
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    expected["turn_overlong"] = 1
    assert c["rejected"] == dict(sorted(expected.items()))
    assert c["split_sessions"] == len(good) - 1  # all but "short"
    assert c["split_pieces"] == c["kept"] - 1 == sum(c["examples"].values()) - 1
    assert c["truncated"] == 0
    rejects = [json.loads(line) for line in (out / "rejects" / "rejects-00000.jsonl").open(encoding="utf-8")]
    (over,) = [r for r in rejects if r["reason"] == "turn_overlong"]
    assert over["detail"].startswith("huge-turn#") and "turns 4-5 need" in over["detail"] and over["sub"] > 0
    assert "我们慢慢来" in over["raw"]


def test_split_key_and_heldout_are_per_session(sessions_run):
    out, man, good = sessions_run["out"], sessions_run["man"], sessions_run["good"]
    sides: dict[str, set[str]] = {}
    for split in ("train", "validation"):
        for eid, _, _ in _examples(out, man, split):
            sides.setdefault(eid.split("#")[0], set()).add(split)
    assert all(len(v) == 1 for v in sides.values())  # all pieces of a session on one side
    problems: dict[str, set[str]] = {}
    for sid, (side,) in sides.items():
        key = good[sid].get("meta", {}).get("intake", {}).get("presenting_problem") or good[sid]["messages"][0]
        problems.setdefault(normalise_question(str(key)), set()).add(side)
    assert all(len(v) == 1 for v in problems.values())
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").open(encoding="utf-8")]
    val = sorted(sid for sid, (side,) in sides.items() if side == "validation")
    assert val and sorted(h["id"] for h in heldout) == val  # one line per session, not per piece
    for h in heldout:
        intake = good[h["id"]]["meta"]["intake"]
        assert h["intake"] == intake and h["question"] == intake["presenting_problem"] and h["reference"] == ""
    # the train split's question list holds the train problems only: a held-out problem (its later pieces
    # included) must pass eval's overlap check
    train_hashes = set(np.fromfile(out / "train_questions.u64", dtype="<i8").tolist())
    keys = {sid: to_examples(good[sid], "messages", SESSION_SYSTEM_PROMPT, sid)[0].question for sid in sides}
    assert train_hashes == {question_hash(keys[sid]) for sid, (side,) in sides.items() if side == "train"}
    assert all(question_hash(h["question"]) not in train_hashes for h in heldout)


def test_sliced_pieces_equal_their_own_tokenization(sessions_run):
    """The ChatML fast path (pieces sliced out of the session's tokens) gives the same ids and labels as rendering
    and tokenizing each piece (the path every other chat template takes)."""
    tok = sessions_run["tok"]
    compared = 0
    for seq_len in (SEQ_LEN, 300):
        fast = SimpleNamespace(tok=tok, render=render_chatml, seq_len=seq_len, end_token=IM_END)
        slow = SimpleNamespace(tok=tok, render=lambda m: render_chatml(m), seq_len=seq_len, end_token=IM_END)
        for i in range(16):
            msgs = _trimmed(session_at(0, i)["messages"])
            ids, labels, _, starts = encode_batch(tok, render_chatml, [msgs], IM_END, starts=True)
            a, b = (split_conversation(tz, msgs, (ids, labels, starts)) for tz in (fast, slow))
            assert [r.get("msgs") for r in a] == [r.get("msgs") for r in b]
            for x, y in zip(a, b):
                assert x.get("learn_from") == y.get("learn_from") and x.get("reject") == y.get("reject")
                if "ids" in x:
                    assert x["ids"].tolist() == y["ids"].tolist() and x["labels"].tolist() == y["labels"].tolist()
                    compared += 1
    assert compared > 40


# ----------------------------------------------------------------------------------------------- no Ray


def test_plan_pieces_learns_every_unit_once_and_fits():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 30)
        opener = rng.randint(0, 1)  # sessions open with the counsellor or the client
        roles = ["assistant" if (k + opener) % 2 == 0 else "user" for k in range(n)]
        if roles[-1] == "user":
            roles.pop()
        if not roles:
            continue
        lens = [rng.randint(1, 60) for _ in roles]
        fixed, seq_len = rng.randint(0, 20), rng.randint(40, 300)
        pieces, rejected = plan_pieces(fixed, lens, roles, seq_len)
        room = seq_len - fixed
        covered = sorted([u for p in pieces for u in units_of(roles[: p.end]) if u[0] >= p.start] + rejected)
        assert covered == units_of(roles)  # every unit learned in exactly one piece, or rejected
        for p in pieces:
            assert sum(lens[p.context : p.end]) <= room and roles[p.end - 1] == "assistant"
            if p.context > 0:  # context is as long as fits
                assert sum(lens[p.context - 1 : p.end]) > room
            if p.start:  # a piece with turns before it leaves room for them as context
                first = next(u for u in units_of(roles) if u[0] == p.start)
                assert sum(lens[p.start : p.end]) <= max(room / 2, sum(lens[first[0] : first[1]]))
        for s, e in rejected:
            assert sum(lens[s:e]) > room


def test_plan_pieces_small_cases():
    roles = ["assistant", "user", "assistant", "user", "assistant"]
    assert plan_pieces(5, [10, 10, 10, 10, 10], roles, 100) == ([Piece(0, 0, 5)], [])  # fits: one piece
    # room 45: the first piece takes what fits; the second learns turns 3-4 with turns 1-2 as context
    assert plan_pieces(5, [10, 10, 10, 10, 10], roles, 50) == ([Piece(0, 0, 3), Piece(1, 3, 5)], [])
    # the unit (1, 3) cannot fit even alone: rejected, the turns around it still train
    assert plan_pieces(0, [10, 90, 10, 10, 10], roles, 50) == ([Piece(0, 0, 1), Piece(2, 3, 5)], [(1, 3)])


def _one(obj) -> object:
    try:
        (ex,) = to_examples(obj, "messages", DEFAULT_SYSTEM, "f:1")
    except RecordError as err:
        return err.reason
    return ex


def test_messages_format_validation_and_key():
    for obj, reason in _bad_records():
        assert _one(obj) == reason and reason in REASONS, obj
    assert _one([1, 2]) == "not_object"
    s = session_at(0, 1)  # even turn count: ends on the client's feedback, which is dropped
    assert s["messages"][-1]["role"] == "user"
    ex = _one(s)
    assert ex.messages == s["messages"][:-1] and ex.messages[0]["content"] == SESSION_SYSTEM_PROMPT
    assert ex.question == s["meta"]["intake"]["presenting_problem"] and ex.intake == s["meta"]["intake"]
    assert ex.distortions == [s["meta"]["intake"]["distortion"]] and ex.example_id == s["id"]
    plain = _one({"messages": [{"role": "user", "content": "我很焦虑"}, {"role": "assistant", "content": "嗯"}]})
    assert plain.question == "我很焦虑" and plain.example_id == "f:1" and plain.messages[0]["content"] == DEFAULT_SYSTEM
    held = ex.heldout_record()
    assert held["reference"] == "" and held["intake"] == ex.intake and held["turns"] == len(ex.messages) - 1


def test_overlong_auto_is_split_for_sessions_only():
    def policy(**data):
        return overlong_policy(Config.model_validate({"data": data}).data)

    assert policy(format="messages") == "split" and policy(format="cbt") == "truncate"
    assert policy(format="sharegpt", overlong="split") == "split"
    assert policy(format="messages", overlong="reject") == "reject"
