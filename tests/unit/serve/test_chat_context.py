"""`cbt-llm chat` on a conversation longer than the model's context: with its default reply length a person types
on, turn after turn, and the oldest turns are dropped from what the model sees (one line says so), the crisis state
kept; a turn that cannot be answered is one line, never a traceback."""

from __future__ import annotations

import sys

import pytest

from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard
from serve.chat import PROMPT, TRIMMED, run_chat
from serve.context import ReplyBudget
from tests.unit.serve.test_chat import Terminal
from tests.unit.serve.test_context import CharEngine
from tests.unit.serve.test_openai_compat import CONTEXT, small_context_model

CRISIS = "我不想活了，今晚就想结束自己的生命。"
TURNS = [
    "最近总是失眠，怎么办？",
    "工作压力很大，晚上总是想很多事情。",
    "我试过听音乐，但是没有用。",
    "白天也没有精神，上班总是出错。",
    "领导批评了我，我觉得自己什么都做不好。",
    "周末也不想出门，只想躺着。",
    "朋友约我吃饭，我也推掉了。",
    "谢谢你听我说这些。",
]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return small_context_model(tmp_path_factory.mktemp("chat_small_context"))


def test_chat_with_its_defaults_answers_six_turns_past_a_small_context(small_model, tmp_path):
    # the defaults of reply length and trimming; the config only turns the learned guard layer off (random-model
    # text is noise it may read either way)
    config = tmp_path / "guard.yaml"
    config.write_text("guard:\n  learned: false\n")
    term = Terminal([sys.executable, "-m", "cbt_llm.cli", "chat", "--model", str(small_model), "--config", str(config)])
    term.read_until(PROMPT, timeout=120)
    trimmed_at = None
    for i, line in enumerate(TURNS):
        term.send(line)
        shown = term.read_until(PROMPT, timeout=120)
        reply = shown.split("助手> ", 1)[1].split(PROMPT)[0]
        assert reply.strip(), shown  # every turn answered
        assert (DISCLAIMER in reply) == (i == 0)  # the first reply only, though its turn is dropped later
        if TRIMMED in shown:
            trimmed_at = i
    term.send("/exit")
    assert term.close() == 0
    # the context (128) is full after the first reply: six turns and more past it, said once
    assert trimmed_at is not None and len(TURNS) - trimmed_at >= 6
    assert term.seen.count(TRIMMED) == 1
    assert "Traceback" not in term.seen and "error" not in term.seen.lower()
    assert CONTEXT == 128


def _chat(engine, lines: list[str], **kw) -> str:
    fed = iter([*lines, "/exit"])
    out: list[str] = []
    guard = CrisisGuard(user_model=None, reply_model=None)
    fit = ReplyBudget(engine, cap=512, trim=True, advice="写短一些")
    assert run_chat(engine, guard, fit=fit, read=lambda _: next(fed), write=out.append, **kw) == 0
    return "".join(out)


def _replies(text: str) -> list[str]:
    return [part.split(PROMPT)[0] for part in text.split("助手> ")[1:]]


def test_chat_keeps_crisis_mode_after_the_crisis_turn_is_dropped_and_says_so_once():
    engine = CharEngine(1000)  # characters as tokens: the guard's note is some 200, a crisis reply some 160
    lines = ["你好", CRISIS, *[f"第{i}件事：最近很累，晚上睡不着，白天也没有精神。" for i in range(8)]]
    text = _chat(engine, lines)
    replies = _replies(text)
    assert len(replies) == len(lines) and DISCLAIMER in replies[0] and CRISIS_BLOCK not in replies[0]
    assert all(r.startswith(CRISIS_BLOCK) for r in replies[1:])  # crisis mode from the crisis turn on
    assert text.count(TRIMMED) == 1
    last = engine.seen[-1]["messages"]
    assert CRISIS not in [m["content"] for m in last] and "【安全提示】" in last[0]["content"]
    # /reset starts a new conversation: no crisis, and the trim line may show again
    text = _chat(engine, [CRISIS, "/reset", "你好"])
    assert _replies(text)[-1].startswith("嗯") and DISCLAIMER in _replies(text)[-1]


def test_a_turn_that_cannot_be_answered_is_one_line_and_the_chat_goes_on():
    engine = CharEngine(300)
    text = _chat(engine, ["你好", "睡不着。" * 100, "谢谢"])
    lines = [x for x in text.splitlines() if "没有发给模型" in x]
    assert len(lines) == 1 and "写短一些" in lines[0]
    assert _replies(text)[-1].startswith("嗯") and "睡不着。" not in str(engine.seen[-1]["messages"])
    # in a crisis the crisis block shows even so, and the conversation stays in crisis mode
    text = _chat(engine, [CRISIS + "睡不着。" * 100, "谢谢"])
    replies = _replies(text)
    assert replies[0].startswith(CRISIS_BLOCK) and "没有发给模型" in replies[0] and replies[1].startswith(CRISIS_BLOCK)

    class Broken(CharEngine):
        def generate_one(self, *a, **kw):
            raise ConnectionError("the server went away")

    text = _chat(Broken(300), ["你好"])
    assert "这条消息没有得到回复：ConnectionError: the server went away" in text and "Traceback" not in text
