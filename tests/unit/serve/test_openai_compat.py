"""The OpenAI compatibility real clients use, through the official `openai` client against a real server on
loopback, around a tiny random model whose context is small (128 positions), so that the defaults have to fit it:
a request without max_tokens, max_completion_tokens, the developer role, n > 1 (plain and streamed), harmless
fields ignored, and a conversation longer than the context (a 400 naming messages, or answered with
serve.trim_history)."""

from __future__ import annotations

import json

import openai
import pytest

from cbt_llm.cli import main
from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard
from tests.fixtures.eval import tiny_chat_model
from tests.unit.serve.test_serve import _running

CONTEXT = 128
CRISIS = "我不想活了，今晚就想结束自己的生命。"
HELLO = [{"role": "user", "content": "最近总是失眠，怎么办？"}]


def small_context_model(root):
    """The tiny random chat model with a context of CONTEXT positions (its config says so; nothing else changes)."""
    model = tiny_chat_model(root)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config))
    return model


def _long_talk(turns: int = 6) -> list[dict]:
    """A conversation far longer than CONTEXT tokens, the latest turn short."""
    msgs = []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"第{i}件事：最近工作压力很大，晚上总是睡不着，白天也没有精神。"})
        msgs.append({"role": "assistant", "content": "听起来你最近很辛苦。能多说说是什么让你压力这么大吗？"})
    return [*msgs, {"role": "user", "content": "谢谢你。"}]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return small_context_model(tmp_path_factory.mktemp("small_context"))


def _app(model, **kw):
    from serve.app import create_app
    from serve.batching import BatchingEngine
    from serve.engine import Engine

    engine = BatchingEngine(Engine.load(str(model), device="cpu"), max_batch=4, window_s=0.005)
    # random-model text is noise the learned layer may read either way: the patterns' verdicts only
    return create_app(engine, CrisisGuard(user_model=None, reply_model=None), **kw)


@pytest.fixture(scope="module")
def client(small_model):
    with _running(_app(small_model)) as base:  # serve's defaults: max_tokens_limit 4096, no trimming
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def trimming(small_model):
    with _running(_app(small_model, trim_history=True)) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_request_without_max_tokens_gets_what_the_context_has_left(client):
    out = client.chat.completions.create(model="tiny", messages=HELLO)
    u = out.usage
    assert out.choices[0].message.content.endswith(DISCLAIMER)
    assert 0 < u.completion_tokens <= CONTEXT - u.prompt_tokens and u.total_tokens <= CONTEXT
    assert out.choices[0].finish_reason == "stop" or u.completion_tokens == CONTEXT - u.prompt_tokens
    # streamed, the same reply and usage
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == u.completion_tokens


def test_max_completion_tokens_sizes_the_reply_and_one_that_does_not_fit_is_a_400_naming_it(client):
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=5)
    assert 0 < out.usage.completion_tokens <= 5
    for field in ("max_completion_tokens", "max_tokens"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=HELLO, **{field: CONTEXT})
        assert exc.value.param == field and field in exc.value.message


def test_a_developer_message_is_a_system_turn(client):
    def ask(role):
        msgs = [{"role": role, "content": "你是一名认知行为疗法心理咨询助手。"}, *HELLO]
        return client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8)

    developer = ask("developer")
    assert developer.choices[0].message.content == ask("system").choices[0].message.content
    assert developer.usage.prompt_tokens == ask("system").usage.prompt_tokens


def test_n_sampled_choices_each_guarded_and_n_greedy_choices_the_same_reply(client):
    out = client.chat.completions.create(model="tiny", messages=HELLO, n=3, temperature=1.5, seed=11, max_tokens=12)
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and all(t.endswith(DISCLAIMER) for t in texts)
    assert len(set(texts)) > 1  # sampled with seeds 11, 12, 13
    again = client.chat.completions.create(model="tiny", messages=HELLO, n=3, temperature=1.5, seed=11, max_tokens=12)
    assert [c.message.content for c in again.choices] == texts
    assert 3 <= out.usage.completion_tokens <= 36
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, n=2, temperature=0, max_tokens=12)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_n_streamed_choices_come_with_their_index_and_join_to_the_plain_choices(client):
    kw = {"model": "tiny", "messages": HELLO, "n": 2, "temperature": 1.5, "seed": 3, "max_tokens": 12}
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]
    assert set(finish) == {0, 1} and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_harmless_fields_are_ignored_and_ones_asking_for_what_it_cannot_do_are_a_400(client):
    out = client.chat.completions.create(
        model="whatever-the-client-calls-it",
        messages=HELLO,
        max_tokens=4,
        user="u-1",
        metadata={"app": "test"},
        store=False,
        logprobs=False,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        frequency_penalty=0,
        presence_penalty=0,
        service_tier="auto",
        extra_body={"top_k": 5, "repetition_penalty": 1.0},  # another server's extensions
    )
    assert out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, logprobs=True)
    assert exc.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4, response_format={"type": "json_object"}
        )
    assert exc.value.param == "response_format"


def test_a_conversation_longer_than_the_context_is_a_400_naming_messages_without_trimming(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=_long_talk(), stream=stream)
        assert exc.value.param == "messages" and "trim_history" in exc.value.message
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices  # still serving


def test_with_trim_history_a_long_conversation_is_answered_and_keeps_crisis_mode(trimming):
    out = trimming.chat.completions.create(model="tiny", messages=_long_talk())
    assert out.choices[0].message.content and out.usage.total_tokens <= CONTEXT
    assert DISCLAIMER not in out.choices[0].message.content  # not a first reply, though its first turns were dropped
    streamed = trimming.chat.completions.create(model="tiny", messages=_long_talk(), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content
    # the latest turn alone longer than the context: still a 400 naming messages, never a 500
    with pytest.raises(openai.BadRequestError) as exc:
        trimming.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "睡不着，" * 100}])
    assert exc.value.param == "messages"


def test_with_trim_history_a_crisis_whose_turns_were_dropped_keeps_the_conversation_in_crisis_mode():
    """The guard's note alone is longer than the tiny model's context, so a stand-in model whose tokens are
    characters answers here (tests/unit/serve/test_context.py's CharEngine): it records what it was given."""
    from serve.app import create_app
    from tests.unit.serve.test_context import CharEngine

    engine = CharEngine(400)
    app = create_app(engine, CrisisGuard(user_model=None, reply_model=None), trim_history=True)
    crisis = [{"role": "user", "content": CRISIS}, {"role": "assistant", "content": f"{CRISIS_BLOCK}\n\n嗯。"}]
    with _running(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        for stream in (False, True):
            out = client.chat.completions.create(model="x", messages=[*crisis, *_long_talk(8)], stream=stream)
            text = (
                out.choices[0].message.content
                if not stream
                else "".join(c.choices[0].delta.content or "" for c in out if c.choices)
            )
            seen = engine.seen[-1]["messages"]
            assert text.startswith(CRISIS_BLOCK) and "【安全提示】" in seen[0]["content"]
            assert CRISIS not in [m["content"] for m in seen] and len(seen) < 10  # the crisis turn was dropped
        # every choice of n in crisis mode
        out = client.chat.completions.create(model="x", messages=[*crisis, *_long_talk(8)], n=2, temperature=1)
        assert len(out.choices) == 2 and all(c.message.content.startswith(CRISIS_BLOCK) for c in out.choices)


def test_trim_history_is_a_serve_setting_and_a_flag(capsys):
    assert main(["serve", "--dry-run"]) == 0
    assert "trim_history: false" in capsys.readouterr().out
    assert main(["serve", "--trim-history", "--dry-run"]) == 0
    assert "trim_history: true" in capsys.readouterr().out


def test_a_crisis_with_no_room_left_for_the_model_still_gets_the_crisis_block(client):
    """The guard's note alone overfills this model's context: a crisis gets the block (and the disclaimer), never a
    400 where the hotlines should be; plain and streamed alike. A calm conversation that does not fit is a 400."""
    from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER

    crisis = [{"role": "user", "content": "我已经写好遗书了，今晚就去死。"}]
    out = client.chat.completions.create(model="tiny", messages=crisis)
    text = out.choices[0].message.content
    assert text == f"{CRISIS_BLOCK}\n\n{DISCLAIMER}" and out.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(model="tiny", messages=crisis, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=_long_talk(40))
    assert "messages" in str(err.value)
