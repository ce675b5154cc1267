"""`cbt-llm serve`: the real server (uvicorn in a thread, loopback, a free port) around the tiny random chat model,
driven with the official `openai` client as users drive it, plus raw HTTP for the bad requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here

from cbt_llm.cli import main
from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER, hotline
from cbt_llm.domain.guard import CrisisGuard
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.paths import TEST_DATA

CRISIS_MESSAGE = "我真的不想活了，今晚就想结束自己的生命。"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running(app):
    """`app` under a real uvicorn server in a thread of this process; yields its base URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def server(tiny_model):
    from serve.app import create_app
    from serve.engine import Engine

    model = tiny_model
    # a random model's text is noise the learned layer may read either way: the server's own tests use the patterns
    guard = CrisisGuard(user_model=None, reply_model=None)
    with _running(create_app(Engine.load(str(model), device="cpu"), guard, max_tokens_limit=64)) as base:
        yield base


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


def test_every_labelled_crisis_message_gets_the_block_before_any_model_text_through_serve(server):
    """The 243 crisis messages of the labelled set (tests/data/crisis_messages.jsonl), each as a conversation's
    first user turn over HTTP: every reply starts with the crisis block, hotlines first, before the model's text."""
    rows = [json.loads(x) for x in (TEST_DATA / "crisis_messages.jsonl").read_text().splitlines()]
    crisis = [r["text"] for r in rows if r["label"] == "crisis"]
    assert len(crisis) >= 240
    bodies = [{"messages": [{"role": "user", "content": t}], "max_tokens": 1, "temperature": 0} for t in crisis]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # arrive together: the batching engine answers them too
        replies = list(pool.map(lambda b: httpx.post(server + "/v1/chat/completions", json=b, timeout=120), bodies))
    assert [r.status_code for r in replies] == [200] * len(crisis)
    missing = [
        t for t, r in zip(crisis, replies) if not r.json()["choices"][0]["message"]["content"].startswith(CRISIS_BLOCK)
    ]
    assert missing == []


def test_a_crisis_gets_the_block_first_and_counts_in_metrics_without_text(client, server):
    def crisis_count() -> float:
        page = httpx.get(server + "/metrics").text
        found = re.findall(r'^cbt_llm_guard_crisis_turns_total\{construct="[^"]+"\} (\S+)$', page, re.M)
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
    assert re.search(r"^cbt_llm_guard_patterns_not_corroborated_total \d", page, re.M)  # counted, never shown


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"messages": []}', "messages"),
        (b'{"model": "x"}', "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": ["hi"]}]}', "messages"),
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


# ---- security, bad input and load ----

KEY = "sk-test-0123456789"
GOOD = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}


class SlowEngine:
    """A stand-in model that takes `delay` seconds per reply and counts its calls."""

    name = "slow"

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def generate_one(self, messages, max_new_tokens=16, **_):
        from serve.engine import Completion

        self.calls += 1
        time.sleep(self.delay)
        return Completion("好的。", 3, 2, "stop")


@pytest.fixture
def slow_server():
    """A server around SlowEngine with a key, a queue of 1 and a 4 KiB body limit."""
    from serve.app import create_app

    engine = SlowEngine(0.8)
    app = create_app(engine, api_key=KEY, max_queue=1, max_body_bytes=4096)
    with _running(app) as base:
        yield base, engine


def _auth(key: str = KEY) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_without_or_with_a_wrong_key_a_401_and_with_the_key_a_200(slow_server):
    base, _ = slow_server
    url = base + "/v1/chat/completions"
    for headers in ({}, _auth("wrong"), _auth(KEY + "x"), {"authorization": KEY}):
        r = httpx.post(url, json=GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.post(url, json=GOOD, headers=_auth(), timeout=30).status_code == 200
    # the official client sends the key the same way
    ok = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in ok.models.list()] == ["slow"]
    # health checks and scrapers carry no key
    assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/metrics").status_code == 200


def test_a_body_over_the_limit_is_a_413_by_content_length_or_as_read(slow_server):
    base, engine = slow_server
    big = {"messages": [{"role": "user", "content": "字" * 3000}]}  # 9 kB of UTF-8
    r = httpx.post(base + "/v1/chat/completions", json=big, headers=_auth())
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
    payload = json.dumps(big).encode()

    def chunks():  # chunked transfer: no Content-Length to go by
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    r = httpx.post(base + "/v1/chat/completions", content=chunks(), headers=_auth())
    assert r.status_code == 413 and engine.calls == 0
    assert httpx.post(base + "/v1/chat/completions", json=GOOD, headers=_auth(), timeout=30).status_code == 200


def test_a_prompt_longer_than_the_context_is_a_400_naming_messages(server):
    # the tiny model's context is 4096 positions; a few thousand Chinese characters are more tokens than that
    long = {"messages": [{"role": "user", "content": "我最近睡不好觉，" * 1200}], "max_tokens": 8}
    r = httpx.post(server + "/v1/chat/completions", json=long, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "context" in err["message"]
    assert httpx.post(server + "/v1/chat/completions", json=GOOD, timeout=30).status_code == 200


def test_a_full_queue_is_a_503_with_retry_after(slow_server):
    base, _ = slow_server

    def post(_):
        return httpx.post(base + "/v1/chat/completions", json=GOOD, headers=_auth(), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(post, range(5)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 2  # one running, one waiting
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
    assert post(0).status_code == 200


def test_a_client_gone_while_queued_is_skipped_and_the_server_keeps_serving(slow_server):
    base, engine = slow_server
    url = base + "/v1/chat/completions"
    first = threading.Thread(target=lambda: httpx.post(url, json=GOOD, headers=_auth(), timeout=30))
    first.start()
    time.sleep(0.2)  # the first request holds the model
    with pytest.raises(httpx.ReadTimeout):  # a streaming client that gives up while it waits
        with httpx.stream("POST", url, json={**GOOD, "stream": True}, headers=_auth(), timeout=0.3) as r:
            r.read()
    first.join()
    ok = httpx.post(url, json=GOOD, headers=_auth(), timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert engine.calls == 2  # the abandoned request was never generated
    assert 'cbt_llm_requests_total{status="499"} 1.0' in httpx.get(base + "/metrics").text


def test_a_streaming_client_that_disconnects_mid_stream_leaves_the_server_serving(server):
    url = server + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "我很焦虑。"}], "max_tokens": 32, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_bytes())  # one chunk, then hang up
    r = httpx.post(url, json=GOOD, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_an_api_key_env_that_is_empty_fails_at_start_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CBT_TEST_KEY", "")
    assert main(["serve", "--model", str(tmp_path), "--api-key-env", "CBT_TEST_KEY"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--api-key-env" in err and "CBT_TEST_KEY" in err
    monkeypatch.delenv("CBT_TEST_KEY")
    assert main(["serve", "--model", str(tmp_path), "--api-key-env", "CBT_TEST_KEY"]) == 2
    assert "CBT_TEST_KEY" in capsys.readouterr().err


LOAD_CLIENTS, LOAD_SECONDS = 32, 30  # what the issue asks


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """The tiny model behind a queue of 16: 32 clients overflow it, so the load test sees 503s too."""
    from serve.app import create_app
    from serve.engine import Engine

    model = tiny_chat_model(tmp_path_factory.mktemp("load_model"))
    with _running(create_app(Engine.load(str(model), device="cpu"), max_tokens_limit=64, max_queue=16)) as base:
        yield base


def test_32_streaming_clients_for_30_seconds_no_5xx_other_than_503_and_flat_memory(load_server):
    import psutil

    server = load_server
    proc = psutil.Process()  # the server runs in a thread of this process
    statuses: dict = {}
    bad: list = []

    async def one(client) -> None:
        try:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "我总是拖延，怎么办？"}], max_tokens=16, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            statuses[200] = statuses.get(200, 0) + 1
            assert text
        except openai.APIStatusError as exc:
            code = exc.status_code
            statuses[code] = statuses.get(code, 0) + 1
            if code != 503 or "retry-after" not in exc.response.headers:
                bad.append(code)
            else:  # a polite client waits as told
                await asyncio.sleep(float(exc.response.headers["retry-after"]))

    async def run(seconds: float) -> None:
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def loop(deadline: float) -> None:
            while time.monotonic() < deadline:
                await one(client)

        deadline = time.monotonic() + seconds
        await asyncio.gather(*(loop(deadline) for _ in range(LOAD_CLIENTS)))
        await client.close()

    asyncio.run(run(2))  # warm-up
    gc.collect()
    rss_start = proc.memory_info().rss
    asyncio.run(run(LOAD_SECONDS))
    gc.collect()
    rss_end = proc.memory_info().rss
    print(f"load: {statuses} rss start {rss_start / 2**20:.0f} MiB end {rss_end / 2**20:.0f} MiB")
    assert not bad and statuses.get(200, 0) > LOAD_CLIENTS
    assert rss_end - rss_start < 100 * 2**20


def test_sigterm_lets_the_requests_in_flight_finish_then_exits(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    model = tiny_chat_model(tmp_path / "m")
    port = _free_port()
    cmd = [sys.executable, "-m", "cbt_llm.cli", "serve", "--model", str(model), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([*cmd, "--port", str(port), "--graceful-timeout", "60"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "我最近睡不好觉，" * 200}], "max_tokens": 64}

        def post(_):
            try:
                return httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code
            except httpx.TransportError:  # a connection the server had read no request from when it stopped
                return "closed"

        def received() -> int:  # requests the server has read: waiting for the model or generating
            page = httpx.get(base + "/metrics").text
            found = re.findall(r"^cbt_llm_(?:queue_depth|in_flight) (\S+)$", page, re.M)
            return int(sum(float(x) for x in found))

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, i) for i in range(12)]
            seen = 0
            while seen < 3 and not all(f.done() for f in futures):
                seen = received()
            proc.send_signal(signal.SIGTERM)
            codes = [f.result() for f in futures]
        print(f"sigterm: {seen} requests received at the signal; outcomes {codes}")
        assert set(codes) <= {200, "closed"}  # no request is cut off or answered with an error
        assert codes.count(200) >= seen  # every request already received was answered
        # after the drain uvicorn re-raises the signal it caught, so the exit status says "ended by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- backends: batched transformers, vLLM (a stand-in), proxy ----

BATCH_QUESTIONS = [
    ("我最近睡不好觉。", 12, None),
    ("和父母总是吵架，怎么办？", 6, None),
    ("工作压力太大了，我很焦虑。", 16, None),
    ("我觉得自己什么都做不好。", 9, None),
    ("怎样才能不拖延？", 12, "的"),
    ("朋友不回我消息，我很难过。", 3, None),
]


def _post_all(base: str, bodies: list[dict], together: bool) -> list[dict]:
    def post(body):
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"], out["usage"]

    if not together:
        return [post(b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _bodies() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}], "max_tokens": n, "temperature": 0, **({"stop": s} if s else {})}
        for q, n, s in BATCH_QUESTIONS
    ]


def _batches(base: str) -> float:
    return float(re.search(r"^cbt_serve_batches_total (\S+)$", httpx.get(base + "/metrics").text, re.M).group(1))


def test_greedy_requests_arriving_together_are_batched_and_each_gets_its_text_alone(tiny_model):
    from serve.app import create_app
    from serve.batching import BatchingEngine
    from serve.engine import Engine

    engine = BatchingEngine(Engine.load(str(tiny_model), device="cpu"), max_batch=8, window_s=0.05)
    with _running(create_app(engine, max_tokens_limit=64)) as base:
        alone = _post_all(base, _bodies(), together=False)
        assert _batches(base) == len(BATCH_QUESTIONS)  # one at a time: one generate call each
        together = _post_all(base, _bodies(), together=True)
        calls = _batches(base) - len(BATCH_QUESTIONS)
        # sampled requests with a seed run alone, so the seed repeats its reply while greedy ones are batched
        sampled = {"messages": [{"role": "user", "content": "怎样才能不拖延？"}], "max_tokens": 8, "temperature": 1.5}
        seeded = _post_all(base, [*_bodies(), {**sampled, "seed": 7}, {**sampled, "seed": 7}], together=True)
        assert seeded[-1] == seeded[-2] and seeded[: len(BATCH_QUESTIONS)] == alone
    print(f"batching: {len(BATCH_QUESTIONS)} concurrent greedy requests in {calls:.0f} generate calls")
    assert together == alone  # text (stop string cut included), finish and usage, request by request
    assert calls < len(BATCH_QUESTIONS)
    assert engine.requests == 3 * len(BATCH_QUESTIONS) + 2
    assert [u["completion_tokens"] <= n for (_, _, u), (_, n, _) in zip(alone, BATCH_QUESTIONS)] == [True] * 6


def test_the_vllm_backend_with_a_stand_in_engine_answers_as_transformers_does_behind_the_guard(tiny_model, server):
    from serve.app import create_app
    from serve.batching import BatchingEngine
    from serve.engine import VllmEngine
    from tests.fixtures.eval import StandInEngine

    stand_in = StandInEngine(base=_hf_generator(tiny_model))
    engine = BatchingEngine(VllmEngine.load(str(tiny_model), engine=stand_in), max_batch=8, window_s=0.05)
    # random-model text, compared with the patterns-only server fixture's answers: the same guard on both
    with _running(create_app(engine, _patterns_only(), max_tokens_limit=64)) as base:
        vllm = _post_all(base, _bodies(), together=True)
        crisis = _post_all(base, [{"messages": [{"role": "user", "content": CRISIS_MESSAGE}], "max_tokens": 8}], False)
    hf = _post_all(server, _bodies(), together=False)  # the plain transformers engine, one at a time
    assert vllm == hf
    assert len(stand_in.calls) < len(BATCH_QUESTIONS) + 1  # vLLM got the greedy requests together
    assert all("prompt_token_ids" in p for c in stand_in.calls for p in c["prompts"])
    text = crisis[0][0]
    assert text.startswith(CRISIS_BLOCK) and text.endswith(DISCLAIMER)


def _hf_generator(model):
    """The transformers generator the stand-in for vLLM answers with."""
    from cbt_llm.inference.hf import HFGenerator

    return HFGenerator(str(model), device="cpu")


def test_an_explicit_vllm_backend_without_vllm_fails_at_start_with_one_line(tiny_model, capsys, monkeypatch):
    import cbt_llm.inference.generate as generate

    monkeypatch.setattr(generate, "vllm_importable", lambda: False)
    assert main(["serve", "--model", str(tiny_model), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend" in err and "vllm is not installed" in err
    assert main(["serve", "--backend", "proxy"]) == 2
    assert "--upstream" in capsys.readouterr().err


def _plain_upstream(text: str, seen: list):
    """An OpenAI-compatible server that knows nothing of the guard: it streams `text` whatever it is asked."""
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "upstream-lora", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)

        def events():
            base = {"id": "u", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            for i in range(0, len(text), 3):
                part = {**base, "choices": [{"index": 0, "delta": {"content": text[i : i + 3]}}]}
                yield f"data: {json.dumps(part)}\n\n"
            done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(done)}\n\n"
            usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_the_proxy_backend_puts_the_guard_in_front_of_an_upstream_that_knows_nothing_of_it(monkeypatch):
    from serve.app import create_app
    from serve.remote import RemoteEngine

    seen: list = []
    reply = "我们可以一起看看这个想法。"
    monkeypatch.setenv("CBT_UPSTREAM_KEY", "sk-upstream")
    with _running(_plain_upstream(reply, seen)) as upstream:
        import os

        from serve.engines import build_engine

        engine = build_engine(
            backend="proxy", upstream=upstream + "/v1", upstream_model=None, model=None, adapter=None,
            upstream_api_key=os.environ["CBT_UPSTREAM_KEY"], max_batch=4,
        )  # fmt: skip
        assert isinstance(engine, RemoteEngine) and engine.name == "upstream-lora" and engine.concurrency == 4
        with _running(create_app(engine)) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
            crisis = _ask(client, [{"role": "user", "content": CRISIS_MESSAGE}])
            plain = _ask(client, [{"role": "user", "content": "我最近睡不好觉。"}])
    text = crisis.choices[0].message.content
    assert text == f"{CRISIS_BLOCK}\n\n{reply}\n\n{DISCLAIMER}"
    assert plain.choices[0].message.content == f"{reply}\n\n{DISCLAIMER}"
    assert crisis.usage.prompt_tokens == 11 and crisis.usage.completion_tokens == 7
    # the upstream saw the guard's note for the model on the crisis turn, and the request's own settings
    assert seen[0]["messages"][0]["role"] == "system" and seen[0]["model"] == "upstream-lora"
    assert len(seen[1]["messages"]) == 1 and seen[1]["max_tokens"] == 12


# ---- token streaming through the guard ----

SENTENCES = [  # each well over the guard's hold-back (OUTPUT_HOLD_BACK letters), so each releases the one before
    "谢谢你愿意把这些说出来，最近睡不好一定让你白天也很辛苦，我们可以慢慢来看看。",
    "你可以先回想一下，这几天晚上躺下以后，脑子里最常出现的是哪些念头和画面呢？",
    "把这些念头写在纸上，看看哪些是事实，哪些是担心，这样往往会让心里轻松一些。",
    "也可以试着每天固定时间起床，白天少喝咖啡，睡前一小时放下手机，给身体一点准备。",
]
SAFE_TEXT = "我明白你现在很难受，很多人在压力大的时候都会睡不好，这很正常，并不说明你有什么问题，我们慢慢来。"
HELD_TEXT = "如果实在睡不着，"  # within the hold-back window when the unsafe text completes: never sent
UNSAFE_TEXT = "安眠药吃30片就会死。"


class PacedEngine:
    """A stand-in model with a token stream of its own (serve.streaming.model_deltas reads `.deltas`): `script`
    pieces, each after `pause` seconds. Records the messages it was asked, how many pieces each stream handed out
    when it was closed, and stops when the server cancels its run (as a local model's stopping criteria do)."""

    name = "paced"

    def __init__(self, script: list[str], pause: float):
        self.script, self.pause = script, pause
        self.asked: list[list[dict]] = []
        self.closed: list[int] = []

    def generate_one(self, messages, max_new_tokens=16, **_):
        from serve.engine import Completion

        self.asked.append(messages)
        return Completion("".join(self.script).strip(), 7, len(self.script), "stop")

    def deltas(self, messages, run, max_new_tokens=16, **_):
        self.asked.append(messages)
        run.prompt_tokens = 7
        return self._pieces(run)

    def _pieces(self, run):
        sent = 0
        try:
            for piece in self.script:
                if run.cancelled.is_set():
                    return
                time.sleep(self.pause)
                if isinstance(piece, Exception):  # the model fails here
                    raise piece
                sent += 1
                run.completion_tokens = sent
                yield piece
        finally:
            self.closed.append(sent)


def _patterns_only():
    """The guard with its patterns only: what these tests check is the stream, not the learned layers' verdicts
    (tests/unit/domain holds those), and the patterns catch UNSAFE_TEXT and CRISIS_MESSAGE."""
    from cbt_llm.domain.guard import CrisisGuard

    return CrisisGuard(user_model=None, reply_model=None)


@contextlib.contextmanager
def _paced(script: list[str], pause: float):
    from serve.app import create_app

    engine = PacedEngine(script, pause)
    with _running(create_app(engine, _patterns_only())) as base:
        yield base, engine, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


def _timed_stream(client, messages, **kw) -> tuple[list[tuple[float, str]], list, float]:
    """[(seconds since the request, content)] of the content chunks, all chunks, and the seconds to the end."""
    t0 = time.perf_counter()
    timed, chunks = [], []
    for chunk in client.chat.completions.create(model="x", messages=messages, max_tokens=64, stream=True, **kw):
        chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta.content:
                timed.append((time.perf_counter() - t0, choice.delta.content))
    return timed, chunks, time.perf_counter() - t0


def test_a_streamed_reply_comes_a_sentence_at_a_time_while_the_model_is_still_writing():
    pause = 0.5
    with _paced(SENTENCES, pause) as (_, engine, client):
        timed, chunks, end = _timed_stream(client, [{"role": "user", "content": "最近总是睡不好，怎么办？"}])
        plain = _ask(client, [{"role": "user", "content": "最近总是睡不好，怎么办？"}]).choices[0].message.content
    first_at, first = timed[0]
    print(f"streaming: first sentence at {first_at:.2f} s, whole reply at {end:.2f} s")
    # the first sentence is out once the second is written (the guard has read past it), long before the end
    assert first == SENTENCES[0] and first_at < end - pause
    assert [text for _, text in timed[:3]] == SENTENCES[:3]  # a sentence a chunk
    assert "".join(text for _, text in timed) == plain == "".join(SENTENCES) + f"\n\n{DISCLAIMER}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless stream_options asks for one
    assert engine.closed[0] == len(SENTENCES)


def test_the_crisis_block_is_streamed_first_before_the_model_writes_anything():
    pause = 0.4
    with _paced(SENTENCES[:2], pause) as (_, engine, client):
        timed, _, _ = _timed_stream(client, [{"role": "user", "content": CRISIS_MESSAGE}])
    (block_at, block), (model_at, model) = timed[:2]
    assert block == CRISIS_BLOCK and block_at < pause <= model_at  # before the model's first piece exists
    assert model == "\n\n" + SENTENCES[0]
    assert "".join(text for _, text in timed) == f"{CRISIS_BLOCK}\n\n{''.join(SENTENCES[:2])}\n\n{DISCLAIMER}"
    assert "【安全提示】" in engine.asked[0][0]["content"]  # the model was told of the risk


def test_a_stream_that_turns_unsafe_shows_the_crisis_block_and_none_of_the_unsafe_sentence():
    script = [SAFE_TEXT, HELD_TEXT, UNSAFE_TEXT, "后面的话。", "还有更多的话。"]
    with _paced(script, 0.05) as (base, engine, client):
        timed, chunks, _ = _timed_stream(client, [{"role": "user", "content": "还是睡不着。"}])
        page = httpx.get(base + "/metrics").text
    text = "".join(t for _, t in timed)
    shown, replacement = text.split(CRISIS_BLOCK)
    # safe text already sent stays; the replacement follows; the held-back and the unsafe text are never sent
    assert SAFE_TEXT.startswith(shown.rstrip("\n")) and replacement == f"\n\n{DISCLAIMER}"
    assert HELD_TEXT not in text and "安眠药" not in text and "后面" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert engine.closed == [3]  # the model was stopped right after the unsafe sentence
    assert re.search(r"^cbt_llm_guard_output_replaced_total\{reason=\"\w+\"\} 1\.0$", page, re.M)


def test_a_client_that_hangs_up_mid_stream_stops_the_model_and_frees_its_slot():
    pause = 0.1
    with _paced(SENTENCES * 10, pause) as (base, engine, client):
        stream = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "睡不着。"}], max_tokens=64, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # one sentence, then hang up
        stream.close()
        deadline = time.monotonic() + 10
        while not engine.closed:
            assert time.monotonic() < deadline, "the model was not stopped"
            time.sleep(0.05)
        assert engine.closed[0] < 10  # stopped within a few pieces of the hang-up, not after all 40
        _wait_for_metric(base, "cbt_llm_in_flight 0.0")  # the stream gave its slot back
        engine.script = SENTENCES[:1]
        assert _ask(client, [{"role": "user", "content": "你好"}]).choices[0].message.content.startswith(SENTENCES[0])


def test_a_generation_that_fails_mid_stream_ends_it_with_an_error_and_the_server_keeps_serving():
    with _paced([*SENTENCES[:2], RuntimeError("the model broke")], 0.05) as (base, _, client):
        shown = []
        with pytest.raises(openai.APIError, match="generation failed: RuntimeError"):
            for chunk in client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "睡不着。"}], max_tokens=64, stream=True
            ):
                shown.extend(c.delta.content for c in chunk.choices if c.delta.content)
        assert shown == [SENTENCES[0]]  # what the guard had released; nothing more
        _wait_for_metric(base, "cbt_llm_in_flight 0.0")  # the slot came back
        assert 'cbt_llm_requests_total{status="200"} 1.0' in httpx.get(base + "/metrics").text
        assert httpx.get(base + "/health").status_code == 200


def _wait_for_metric(base: str, line: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while line not in httpx.get(base + "/metrics").text:
        assert time.monotonic() < deadline, f"no {line!r} on /metrics"
        time.sleep(0.05)


def test_streamed_and_plain_replies_of_the_batching_engine_are_the_same_text_and_usage(tiny_model):
    """The tiny random model behind the batching loop (`cbt-llm serve`'s engine): a streamed greedy request takes
    the model alone through its token stream; joined, its text is the plain reply's, and so are its usage counts
    (stop strings aside: a streamed reply stops the model at the stop string, a plain one lets it run)."""
    from serve.app import create_app
    from serve.batching import BatchingEngine
    from serve.engine import Engine

    engine = BatchingEngine(Engine.load(str(tiny_model), device="cpu"), max_batch=8, window_s=0.05)
    with _running(create_app(engine, _patterns_only(), max_tokens_limit=64)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        for body in _bodies():
            plain = client.chat.completions.create(model="x", **body)
            chunks = list(
                client.chat.completions.create(model="x", stream=True, stream_options={"include_usage": True}, **body)
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == plain.choices[0].message.content and CRISIS_BLOCK not in text
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            assert finish == plain.choices[0].finish_reason
            usage = chunks[-1].usage
            assert not chunks[-1].choices and usage.prompt_tokens == plain.usage.prompt_tokens
            if "stop" in body:
                assert 0 < usage.completion_tokens <= plain.usage.completion_tokens
            else:
                assert usage.completion_tokens == plain.usage.completion_tokens
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        sampled = {"messages": [{"role": "user", "content": "怎样才能不拖延？"}], "max_tokens": 12}
        sampled |= {"temperature": 1.5, "top_p": 0.9, "seed": 7}
        plain = client.chat.completions.create(model="x", **sampled).choices[0].message.content
        chunks = client.chat.completions.create(model="x", stream=True, **sampled)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain  # the seed holds
        long = {"messages": [{"role": "user", "content": "我最近睡不好觉，" * 1200}], "max_tokens": 8, "stream": True}
        r = httpx.post(base + "/v1/chat/completions", json=long, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"  # before the stream starts
    assert engine.batches >= 2 * len(BATCH_QUESTIONS) + 2  # every streamed request was a generate call of its own


def test_a_streamed_request_through_the_proxy_backend_streams_the_upstream_behind_the_guard():
    from serve.app import create_app
    from serve.remote import RemoteEngine

    seen: list = []
    reply = "我们可以一起看看这个想法。"
    with _running(_plain_upstream(reply, seen)) as upstream:
        with _running(create_app(RemoteEngine(upstream + "/v1"), _patterns_only())) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
            chunks = list(
                _ask(client, [{"role": "user", "content": CRISIS_MESSAGE}], stream=True, stop=["。。"],
                     stream_options={"include_usage": True})
            )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"{CRISIS_BLOCK}\n\n{reply}\n\n{DISCLAIMER}"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 7)  # the upstream's counts
    assert seen[0]["stream"] is True and seen[0]["stop"] == ["。。"] and seen[0]["messages"][0]["role"] == "system"


def test_stop_strings_cut_a_stream_as_they_cut_the_whole_text():
    from serve.streaming import until_stop

    def cut(pieces, stop):
        gen = until_stop(iter(pieces), stop)
        out = []
        try:
            while True:
                out.append(next(gen))
        except StopIteration as end:
            return "".join(out), end.value

    text = "我们先聊聊，最近是什么让你睡不着。然后再看看。"
    for stop in (["睡不着"], ["。"], ["然后", "聊"], ["最近是什么让你睡", "让"], ["没有的"], ["。然后再看看。还有"]):
        whole = min((text.find(s) for s in stop if s in text), default=len(text))
        for size in (1, 2, 3, 7, len(text)):
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            assert cut(pieces, stop) == (text[:whole], whole < len(text)), (stop, size)
