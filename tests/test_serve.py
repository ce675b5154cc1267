"""`cbt-llm serve`: the real server (uvicorn in a thread, loopback, a free port) around the tiny random chat model,
driven with the official `openai` client as users drive it, plus raw HTTP for the bad requests."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import pytest

from cbt_llm.cli import main
from cbt_llm.crisis import CRISIS_BLOCK, DISCLAIMER, hotline
from tests.eval_fixtures import tiny_chat_model

CRISIS_MESSAGE = "我真的不想活了，今晚就想结束自己的生命。"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from serve.app import create_app
    from serve.engine import Engine

    model = tiny_chat_model(tmp_path_factory.mktemp("serve_model"))
    app = create_app(Engine.load(str(model), device="cpu"), max_tokens_limit=64)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield base
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **kw)


def test_completion_returns_text_and_usage_and_the_first_reply_carries_the_disclaimer(client):
    out = _ask(client, [{"role": "user", "content": "最近总是睡不好，怎么办？"}])
    text = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
    assert text.endswith(DISCLAIMER) and len(text) > len(DISCLAIMER)
    assert CRISIS_BLOCK not in text
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_a_follow_up_with_an_assistant_turn_has_no_disclaimer(client):
    msgs = [
        {"role": "system", "content": "你是一名认知行为疗法心理咨询助手。"},
        {"role": "user", "content": "我很焦虑。"},
        {"role": "assistant", "content": "能多说说是什么让你焦虑吗？"},
        {"role": "user", "content": "工作压力很大。"},
    ]
    text = _ask(client, msgs).choices[0].message.content
    assert text and DISCLAIMER not in text


def test_streaming_chunks_join_to_the_non_streaming_text(client):
    msgs = [{"role": "user", "content": "我和室友相处不好。"}]
    plain = _ask(client, msgs, temperature=0).choices[0].message.content
    chunks = list(_ask(client, msgs, temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really chunked
    assert "".join(deltas) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sampling_with_a_seed_repeats_and_stop_cuts(client):
    msgs = [{"role": "user", "content": "怎样才能不拖延？"}]
    a = _ask(client, msgs, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
    b = _ask(client, msgs, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
    assert a == b
    model_text = a[: -len(DISCLAIMER)].strip()
    if len(model_text) > 2:
        cut = _ask(client, msgs, temperature=1.5, top_p=0.9, seed=7, stop=[model_text[2:4]])
        assert cut.choices[0].message.content.startswith(model_text[:2]) and cut.choices[0].finish_reason == "stop"


def test_a_crisis_gets_the_block_first_and_counts_in_metrics_without_text(client, server):
    def crisis_count() -> float:
        page = httpx.get(server + "/metrics").text
        found = re.findall(r'^cbt_llm_guard_crisis_turns_total\{category="[^"]+"\} (\S+)$', page, re.M)
        return sum(float(x) for x in found)

    before = crisis_count()
    text = _ask(client, [{"role": "user", "content": CRISIS_MESSAGE}]).choices[0].message.content
    national = hotline("national").number
    assert national == "12356"
    assert text.startswith(CRISIS_BLOCK) and text.index(national) < len(CRISIS_BLOCK)
    assert len(text) > len(CRISIS_BLOCK + DISCLAIMER) + 4  # the model's text follows the block
    assert crisis_count() == before + 1
    page = httpx.get(server + "/metrics").text
    assert "不想活" not in page and "结束自己" not in page
    assert 'cbt_llm_requests_total{status="200"}' in page and "cbt_llm_request_seconds_bucket" in page
    assert "cbt_llm_queue_depth 0.0" in page and "cbt_llm_in_flight 0.0" in page
    assert re.search(r'^cbt_llm_tokens_total\{kind="completion"\} [1-9]', page, re.M)


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"messages": []}', "messages"),
        (b'{"model": "x"}', "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, param):
    r = httpx.post(server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    ok = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2},
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=0)


def test_health_and_models(client, server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    ids = [m.id for m in client.models.list()]
    assert ids == ["model"]


def test_a_missing_model_folder_fails_at_start_with_one_line_naming_model(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and "nope" in err
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()  # a folder without config.json
    assert len(err.splitlines()) == 1 and "--model" in err and "not a model folder" in err
