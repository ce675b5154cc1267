"""What fits the model's context (serve/context.py), the request fields of OpenAI's API (serve/protocol.py) and n
choices (serve/guarded.py), on stand-in engines whose tokens are characters, so every count is known."""

from __future__ import annotations

import pytest

from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard, message_text
from serve.context import ReplyBudget, turn_groups
from serve.engine import Completion, PromptTooLong
from serve.guarded import GuardedStream, guarded_replies, guarded_reply
from serve.protocol import IGNORED, APIError, Limits, parse_chat_request

CRISIS = "我不想活了，今晚就想结束自己的生命。"


class CharEngine:
    """A model whose tokens are characters (a turn is its role's first letter and its text): a context of
    `context`, the reply `reply` cut to max_new_tokens, and every call's messages and options kept in `seen`."""

    name = "chars"

    def __init__(self, context: int | None, reply: str = "嗯，我在听。"):
        self.context_length, self.reply, self.seen = context, reply, []

    def prompt_ids(self, messages):
        return list("".join(m["role"][0] + message_text(m) for m in messages))

    def generate_one(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, stop=None):
        self.seen.append({"messages": messages, "max_new_tokens": max_new_tokens, "seed": seed})
        text = f"{self.reply}{seed}" if temperature > 0 else self.reply
        n = min(len(text), max_new_tokens)
        return Completion(text[:n], len(self.prompt_ids(messages)), n, "stop")

    def deltas(self, messages, run, **gen):
        yield self.generate_one(messages, **gen).text


def _patterns_only() -> CrisisGuard:
    return CrisisGuard(user_model=None, reply_model=None)


def _talk(turns: int, size: int = 20, system: str = "系统") -> list[dict]:
    """A conversation of `turns` user turns (each `size` characters), a reply after each but the last."""
    msgs = [{"role": "system", "content": system}] if system else []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"{i}" * size})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": f"r{i}" * (size // 2)})
    return msgs


# -- the reply length ---------------------------------------------------------------------------------------------


def test_a_request_without_a_length_gets_what_the_context_has_left_at_most_the_cap():
    msgs = [{"role": "user", "content": "你好"}]  # 3 tokens
    assert ReplyBudget(CharEngine(100), cap=4096)(msgs).max_new_tokens == 97
    assert ReplyBudget(CharEngine(100), cap=40)(msgs).max_new_tokens == 40
    # an explicit length that fits is kept as asked
    assert ReplyBudget(CharEngine(100), cap=4096)(msgs, 97).max_new_tokens == 97


def test_an_explicit_length_that_does_not_fit_names_its_field_and_a_full_prompt_names_messages():
    budget = ReplyBudget(CharEngine(100), cap=4096)
    with pytest.raises(PromptTooLong) as exc:
        budget([{"role": "user", "content": "你好"}], 98, field="max_completion_tokens")
    assert exc.value.param == "max_completion_tokens" and "leaves 97" in str(exc.value)
    with pytest.raises(PromptTooLong) as exc:
        budget([{"role": "user", "content": "字" * 99}])  # 100 tokens: no room at all
    assert exc.value.param == "messages" and "no room" in str(exc.value)
    # without trimming a long conversation is refused, however many turns could go
    with pytest.raises(PromptTooLong) as exc:
        budget(_talk(6))
    assert exc.value.param == "messages"


def test_an_engine_of_unknown_context_gets_the_fallback_and_an_upstream_sizes_the_reply_itself():
    from serve.remote import RemoteEngine

    msgs = [{"role": "user", "content": "你好"}]
    assert ReplyBudget(CharEngine(None), cap=64)(msgs).max_new_tokens == 64  # the fallback (512), at most the cap
    assert ReplyBudget(CharEngine(None), cap=4096, fallback=300)(msgs, 7).max_new_tokens == 7
    remote = object.__new__(RemoteEngine)
    assert ReplyBudget(remote, cap=4096)(msgs).max_new_tokens is None  # nothing sent: the server says what fits
    assert ReplyBudget(remote, cap=4096)(msgs, 12).max_new_tokens == 12


# -- trimming -------------------------------------------------------------------------------------------------------


def test_turn_groups_keep_system_turns_and_the_latest_user_turn_and_drop_a_turn_with_its_replies():
    msgs = [
        {"role": "assistant", "content": "a0"},
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "assistant", "content": "a1b"},
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "u2"},
        {"role": "user", "content": "u3"},
    ]
    assert turn_groups(msgs) == [[0], [2, 3, 4], [6]]


def test_trimming_drops_the_oldest_turns_until_the_reply_has_its_reserve():
    budget = ReplyBudget(CharEngine(200), cap=4096, trim=True)
    assert budget.reserve == 100  # half the context, at most the cap
    msgs = _talk(6)  # 3 + 5 * (21 + 21) + 21 = 234 tokens
    fitted = budget(msgs)
    kept = fitted.messages
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]  # the system turn and the latest user turn
    assert kept == [msgs[0], *msgs[len(msgs) - len(kept) + 1 :]]  # the newest turns, in order, a user turn first
    assert kept[1]["role"] == "user" and fitted.dropped == len(msgs) - len(kept) > 0
    n = len(budget._ids(kept))
    assert n + budget.reserve <= 200 and fitted.max_new_tokens == 200 - n
    # as few dropped as that takes: one more turn would not leave the reserve
    one_more = [msgs[0], *msgs[fitted.dropped - 1 :]]
    assert len(budget._ids(one_more)) + budget.reserve > 200
    # a conversation that leaves the reserve is not touched
    assert budget(_talk(2)).dropped == 0


def test_trimming_makes_room_for_an_explicit_length_or_fails_naming_what_to_change():
    budget = ReplyBudget(CharEngine(200), cap=4096, trim=True)
    fitted = budget(_talk(6), 150, field="max_tokens")
    assert fitted.max_new_tokens == 150 and len(budget._ids(fitted.messages)) + 150 <= 200
    with pytest.raises(PromptTooLong) as exc:  # the system turn and the latest turn alone leave less than asked
        budget(_talk(6), 190, field="max_tokens")
    assert exc.value.param == "max_tokens"
    with pytest.raises(PromptTooLong) as exc:  # the latest turn alone is longer than the context
        budget(_talk(3, size=250))
    assert exc.value.param == "messages" and "dropped" in str(exc.value)
    # a latest turn that leaves less than the reserve but some room: every older turn goes, the reply gets the rest
    fitted = budget(_talk(4, size=150))
    assert [m["role"] for m in fitted.messages] == ["system", "user"] and fitted.max_new_tokens == 200 - 3 - 151


# -- crisis mode survives trimming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["turn", "reply"])
def test_a_conversation_in_crisis_mode_stays_in_it_after_its_crisis_turns_are_trimmed(how):
    """The guard reads the whole conversation before the fit; the model gets the guard's note in the kept system
    turn, and the person gets the crisis block first, though the model no longer sees the crisis turn."""
    if how == "turn":  # a crisis user turn, long ago
        start = [{"role": "user", "content": CRISIS}, {"role": "assistant", "content": f"{CRISIS_BLOCK}\n\n嗯。"}]
    else:  # no user turn the patterns read as a crisis, but a reply the guard replaced with the block
        start = [{"role": "user", "content": "睡不着"}, {"role": "assistant", "content": CRISIS_BLOCK}]
    msgs = [{"role": "system", "content": "系统"}, *start, *_talk(12, size=40)[1:]]
    engine = CharEngine(1000)  # the conversation is some 1150 tokens, the guard's note 200 more
    fit = ReplyBudget(engine, cap=4096, trim=True)
    reply = guarded_reply(engine, _patterns_only(), msgs, fit=fit)
    seen = engine.seen[-1]["messages"]
    assert 2 < reply.dropped < len(msgs) - 2 and all(m["content"] not in (CRISIS, CRISIS_BLOCK) for m in seen)
    assert reply.verdict.crisis and reply.verdict.source == ("earlier_turn" if how == "turn" else "earlier_reply")
    assert reply.text.startswith(CRISIS_BLOCK) and "【安全提示】" in seen[0]["content"] and seen[0]["role"] == "system"
    # streamed, the same
    stream = GuardedStream(lambda m, **g: engine.deltas(m, None, **g), _patterns_only(), msgs, fit=fit)
    shown = "".join(stream)
    assert shown.startswith(CRISIS_BLOCK) and shown == stream.reply.text and stream.dropped == reply.dropped
    assert "【安全提示】" in engine.seen[-1]["messages"][0]["content"]


def test_the_crisis_note_is_kept_without_a_system_prompt_of_its_own():
    msgs = [{"role": "user", "content": CRISIS}, {"role": "assistant", "content": "嗯。"}, *_talk(8, system="")]
    engine = CharEngine(500)  # the guard's note alone is some 200 characters
    reply = guarded_reply(engine, _patterns_only(), msgs, fit=ReplyBudget(engine, cap=4096, trim=True))
    seen = engine.seen[-1]["messages"]
    assert reply.text.startswith(CRISIS_BLOCK) and seen[0]["role"] == "system" and "【安全提示】" in seen[0]["content"]
    assert reply.dropped and seen[-1] == msgs[-1]


# -- n choices --------------------------------------------------------------------------------------------------------


def test_n_sampled_choices_each_get_their_own_seed_and_the_output_check_and_greedy_ones_are_one_reply():
    engine = CharEngine(200)
    guard = _patterns_only()
    msgs = [{"role": "user", "content": "睡不着"}]
    sampled = guarded_replies(engine, guard, msgs, None, 3, temperature=0.9, seed=5, max_new_tokens=20)
    assert [s["seed"] for s in engine.seen] == [5, 6, 7]
    assert [r.text for r in sampled] == [f"嗯，我在听。{s}\n\n{DISCLAIMER}" for s in (5, 6, 7)]
    assert guard.metrics()["user_turns_total"] == 1  # the user turn is read once for all of them
    engine.seen.clear()
    greedy = guarded_replies(engine, guard, msgs, None, 3, temperature=0, max_new_tokens=20)
    assert len(engine.seen) == 1 and [r.text for r in greedy] == [greedy[0].text] * 3
    unsafe = CharEngine(200, reply="安眠药吃30片就会死。")
    replaced = guarded_replies(unsafe, guard, msgs, None, 2, temperature=1.0, max_new_tokens=30)
    assert all(r.replaced and "安眠药" not in r.text for r in replaced)


# -- the request ------------------------------------------------------------------------------------------------------

LIMITS = Limits(max_tokens=64, default_max_tokens=512)
HI = [{"role": "user", "content": "你好"}]


def test_developer_turns_are_system_turns_and_leading_system_turns_are_one():
    req = parse_chat_request(
        {"messages": [{"role": "developer", "content": "甲"}, {"role": "system", "content": "乙"}, *HI]}, LIMITS
    )
    assert req.message_dicts() == [{"role": "system", "content": "甲\n\n乙"}, *HI]
    assert req.reply_tokens is None  # what fits
    later = parse_chat_request({"messages": [*HI, {"role": "assistant", "content": "嗯"}, *HI]}, LIMITS)
    assert [m["role"] for m in later.message_dicts()] == ["user", "assistant", "user"]


def test_max_completion_tokens_is_max_tokens_by_its_newer_name():
    req = parse_chat_request({"messages": HI, "max_completion_tokens": 9}, LIMITS)
    assert (req.reply_tokens, req.reply_tokens_field) == (9, "max_completion_tokens")
    assert parse_chat_request({"messages": HI, "max_tokens": 9, "max_completion_tokens": 9}, LIMITS).reply_tokens == 9
    for body, param in [
        ({"max_completion_tokens": 65}, "max_completion_tokens"),
        ({"max_tokens": 8, "max_completion_tokens": 9}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
    ]:
        with pytest.raises(APIError) as exc:
            parse_chat_request({"messages": HI, **body}, LIMITS)
        assert exc.value.param == param and exc.value.status == 400


HARMLESS = {
    "model": "anything",
    "user": "u-1",
    "metadata": {"k": "v"},
    "store": True,
    "service_tier": "auto",
    "parallel_tool_calls": False,
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "reasoning_effort": "low",
    "verbosity": "low",
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "auto",
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "modalities": ["text"],
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "top_k": 5,  # another server's extension: ignored
}


def test_harmless_fields_are_accepted_and_ignored():
    assert set(IGNORED) <= set(HARMLESS)
    req = parse_chat_request({"messages": HI, **HARMLESS}, LIMITS)
    assert req.message_dicts() == HI and req.n == 1 and req.temperature == 0.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", True),
        ("top_logprobs", 3),
        ("logit_bias", {"12": 5}),
        ("response_format", {"type": "json_object"}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("frequency_penalty", 0.5),
        ("presence_penalty", True),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy"}),
    ],
)
def test_fields_that_ask_for_what_this_server_cannot_do_are_a_400_naming_them(field, value):
    with pytest.raises(APIError) as exc:
        parse_chat_request({"messages": HI, field: value}, LIMITS)
    assert exc.value.param == field and "not supported" in exc.value.message
