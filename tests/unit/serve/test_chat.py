"""`cbt-llm chat`: the terminal chat driven through a pseudo-terminal (stdlib pty), as a person types into it, with a
local model or against `cbt-llm serve` (--url); and --batch for scripted use."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cbt_llm.domain.crisis import CRISIS_BLOCK, DISCLAIMER, hotline
from serve.chat import PROMPT
from tests.fixtures.eval import tiny_chat_model
from tests.fixtures.paths import ROOT


class Terminal:
    """A child process on a pseudo-terminal: send lines, read until a marker shows."""

    def __init__(self, argv: list[str]):
        self.master, slave = os.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "PYTHONIOENCODING": "utf-8"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 60) -> str:
        """Everything read up to and including the next `marker`."""
        deadline, buf = time.monotonic() + timeout, b""
        while marker not in buf.decode("utf-8", "ignore"):
            assert time.monotonic() < deadline, f"no {marker!r} in {buf.decode('utf-8', 'ignore')[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    buf += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    break
        text = buf.decode("utf-8", "ignore").replace("\r\n", "\n")
        self.seen += text
        return text

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=20)
        finally:
            os.close(self.master)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("chat_model"))


def test_chat_in_a_terminal_keeps_the_guard(model):
    term = Terminal([sys.executable, "-m", "cbt_llm.cli", "chat", "--model", str(model), "--max-tokens", "8"])
    term.read_until(PROMPT)
    term.send("最近总是失眠，怎么办？")
    first = term.read_until(PROMPT)
    assert "助手> " in first and DISCLAIMER in first and CRISIS_BLOCK.splitlines()[0] not in first
    term.send("谢谢，我会试试。")
    second = term.read_until(PROMPT)
    assert "助手> " in second and DISCLAIMER not in second
    term.send("我不想活了，今晚就想结束自己的生命。")
    crisis = term.read_until(PROMPT)
    reply = crisis.split("助手> ", 1)[1]
    # the crisis block (with the national hotline) comes first, before any model text
    assert reply.startswith(CRISIS_BLOCK.splitlines()[0]) and hotline("national").number in reply.splitlines()[3]
    term.send("/reset")
    term.read_until(PROMPT)
    term.send("你好")
    assert DISCLAIMER in term.read_until(PROMPT)  # a new conversation: its first reply again
    term.send("/exit")
    assert term.close() == 0


def test_chat_with_a_missing_model_says_so_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cbt_llm.cli", "chat", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert out.returncode == 2 and "--model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model):
    """`cbt-llm serve` on loopback, as a subprocess, around the tiny model."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    argv = [sys.executable, "-m", "cbt_llm.cli", "serve", "--model", str(model), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "cbt-llm serve did not start"
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield base + "/v1"
    proc.terminate()
    proc.wait(timeout=20)


def test_chat_against_a_server_keeps_the_guard_on_the_client_side(server):
    term = Terminal([sys.executable, "-m", "cbt_llm.cli", "chat", "--url", server, "--max-tokens", "8"])
    term.read_until(PROMPT)
    term.send("最近总是失眠，怎么办？")
    first = term.read_until(PROMPT)
    # the server's disclaimer and the client's are one: shown once
    assert "助手> " in first and first.count(DISCLAIMER) == 1 and CRISIS_BLOCK.splitlines()[0] not in first
    term.send("我不想活了，今晚就想结束自己的生命。")
    reply = term.read_until(PROMPT).split("助手> ", 1)[1]
    assert reply.startswith(CRISIS_BLOCK) and reply.count(CRISIS_BLOCK.splitlines()[0]) == 1
    assert DISCLAIMER not in reply
    term.send("/exit")
    assert term.close() == 0


def _remote(text: str):
    """A RemoteEngine whose server (no guard of its own, a plain model server) streams `text` in 3-character
    chunks, then a usage chunk."""
    from types import SimpleNamespace as NS

    from serve.remote import RemoteEngine

    def create(**kw):
        assert kw["stream"] is True
        for i in range(0, len(text), 3):
            yield NS(usage=None, choices=[NS(delta=NS(content=text[i : i + 3]), finish_reason=None)])
        yield NS(usage=None, choices=[NS(delta=NS(content=None), finish_reason="stop")])
        yield NS(usage=NS(prompt_tokens=5, completion_tokens=7), choices=[])

    engine = object.__new__(RemoteEngine)
    engine.name, engine.client = "plain", NS(chat=NS(completions=NS(create=create)))
    return engine


def test_the_client_side_guard_covers_an_unguarded_server():
    from cbt_llm.domain.guard import CrisisGuard
    from serve.guarded import guarded_reply

    guard = CrisisGuard(user_model=None, reply_model=None)  # placeholder model text: the patterns' verdicts
    out = _remote("模型说的话").generate_one([{"role": "user", "content": "你好"}])
    assert (out.text, out.prompt_tokens, out.completion_tokens, out.finish) == ("模型说的话", 5, 7, "stop")
    crisis = guarded_reply(_remote("模型说的话"), guard, [{"role": "user", "content": "我想自杀。"}])
    assert crisis.text == f"{CRISIS_BLOCK}\n\n模型说的话\n\n{DISCLAIMER}"
    # unsafe model text never reaches the person: replaced whole by the crisis block
    unsafe = guarded_reply(_remote("安眠药吃30片就会死。"), guard, [{"role": "user", "content": "睡不着"}])
    assert unsafe.replaced and unsafe.text == f"{CRISIS_BLOCK}\n\n{DISCLAIMER}" and "安眠药" not in unsafe.text
    # a guarded server's own disclaimer is not shown twice
    served = guarded_reply(_remote(f"好的。\n\n{DISCLAIMER}"), guard, [{"role": "user", "content": "你好"}])
    assert served.text.count(DISCLAIMER) == 1


def _batch(model, tmp_path, lines: list[str], *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    argv = [sys.executable, "-m", "cbt_llm.cli", "chat", "--model", str(model), "--device", "cpu", *extra]
    out = subprocess.run(
        [*argv, "--batch", str(src), "--out", str(dst)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out, [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]


def test_batch_answers_each_line_and_writes_bad_lines_with_their_reason(model, tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "最近总是失眠，怎么办？"}, ensure_ascii=False),
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "我想自杀。"}]}, ensure_ascii=False),
        "{not json",
        json.dumps({"id": "d", "messages": [{"role": "assistant", "content": "你好"}]}, ensure_ascii=False),
        json.dumps({"id": "e"}),
        "[1, 2]",
    ]
    out, rows = _batch(model, tmp_path, lines, "--max-tokens", "4")
    assert "2 answered, 4 bad lines" in out.stdout
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["id"] for r in rows] == [
        "a",
        "b",
        None,
        "d",
        "e",
        None,
    ]
    assert rows[0]["reply"].endswith(DISCLAIMER) and not rows[0]["crisis"]
    assert rows[1]["reply"].startswith(CRISIS_BLOCK) and rows[1]["crisis"]
    assert "invalid JSON" in rows[2]["error"] and "user turn" in rows[3]["error"]
    assert "'text'" in rows[4]["error"] and "object" in rows[5]["error"]


def test_every_labelled_crisis_message_gets_the_crisis_block_first_through_chat(model, tmp_path):
    labelled = [json.loads(line) for line in (ROOT / "tests/data/crisis_messages.jsonl").open(encoding="utf-8")]
    crisis = [r for r in labelled if r["label"] == "crisis"]
    lines = [json.dumps({"id": i, "text": r["text"]}, ensure_ascii=False) for i, r in enumerate(crisis)]
    _, rows = _batch(model, tmp_path, lines, "--max-tokens", "2")
    assert len(rows) == len(crisis) > 200
    missed = [crisis[r["id"]]["text"] for r in rows if not r.get("reply", "").startswith(CRISIS_BLOCK)]
    assert not missed, missed[:5]


# -- streaming: the reply is shown as it comes, a little behind the model, through the guard ---------------------


class _PacedServer(ThreadingHTTPServer):
    """An OpenAI-compatible server (POST /v1/chat/completions, SSE only) that streams a script per user message:
    strings are sent in 3-character chunks, a threading.Event is waited for, so a test decides when the rest
    comes."""

    daemon_threads = True

    def __init__(self, scripts: dict[str, list]):
        super().__init__(("127.0.0.1", 0), _PacedHandler)
        self.scripts = scripts
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _PacedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # the test's terminal output stays clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for item in self.server.scripts[body["messages"][-1]["content"]]:
                if isinstance(item, threading.Event):
                    assert item.wait(60), "the test never let the rest of the reply go"
                    continue
                for i in range(0, len(item), 3):
                    self._event({"content": item[i : i + 3]}, None)
            self._event({}, "stop")
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):  # the guard stopped reading: the client hung up
            pass

    def _event(self, delta: dict, finish: str | None) -> None:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "paced"}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()


EARLY = "谢谢你愿意说出来。失眠确实会让白天也很难熬，我们可以一起看看是什么让你睡不着，也许和最近的压力有关。"
LATE = "先试着每天固定时间起床。"
# two sentences: a stream releases whole sentences, each once enough text follows it to rule out an unsafe match
SAFE = "我明白你现在很难受。很多人在压力大的时候都会睡不好，这很正常，并不说明你有什么问题，我们慢慢来。"
HELD = "如果实在睡不着，"  # within the hold-back window when the unsafe text completes: never shown
UNSAFE = "安眠药吃30片就会死。"


def test_chat_streams_the_reply_and_the_guard_cuts_unsafe_text_mid_stream():
    gate = threading.Event()
    scripts = {"睡不着怎么办？": [EARLY, gate, LATE], "还是睡不着。": [SAFE, HELD, UNSAFE, "后面的话。"]}
    server = _PacedServer(scripts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        term = Terminal([sys.executable, "-m", "cbt_llm.cli", "chat", "--url", server.url])
        term.read_until(PROMPT)
        term.send("睡不着怎么办？")
        # the model is paused mid-reply (gate): what shows now was streamed, not printed once complete
        partial = term.read_until("谢谢你愿意说出来。")  # the first sentence, released while the model is paused
        assert "助手> 谢谢你愿意说出来" in partial and LATE not in partial and DISCLAIMER not in partial
        gate.set()
        reply = term.read_until(PROMPT).split(PROMPT)[0]
        assert (partial + reply).split("助手> ", 1)[1] == f"{EARLY}{LATE}\n\n{DISCLAIMER}\n\n"

        term.send("还是睡不着。")
        cut = term.read_until(PROMPT).split("助手> ", 1)[1].split(PROMPT)[0]
        shown, block = cut.split("\n\n", 1)
        # safe text already released stays, the replacement follows, the held-back and unsafe text never show
        assert len(shown) >= 10 and SAFE.startswith(shown) and block == CRISIS_BLOCK + "\n\n"
        assert HELD not in cut and "安眠药" not in cut and "后面" not in cut
        term.send("/exit")
        assert term.close() == 0
    finally:
        gate.set()
        server.shutdown()
        server.server_close()


def _fed(check, text: str, size: int = 1) -> list[str]:
    return [check.feed(text[i : i + size]) for i in range(0, len(text), size)]


@pytest.mark.parametrize(
    "unsafe, reason",
    [
        ("安眠药吃 3 0 片就会死。", "method_lethality"),  # digits and spaces inside the match
        ("割腕要竖着割，割深一点才能成功。", "method_lethality"),
        ("不要。去看医生，他们只会给你开药。", "secrecy_discourages_help"),  # punctuation does not cut a match
        ("心 理 咨 询 都 是 骗 钱 的。", "secrecy_discourages_help"),
    ],
)
def test_the_output_stream_never_releases_a_character_of_unsafe_text(unsafe, reason):
    from cbt_llm.domain.guard import OUTPUT_HOLD_BACK, CrisisGuard, letters

    guard = CrisisGuard()
    check = guard.output_stream(conversation_id="c")
    released = "".join(_fed(check, SAFE + unsafe + "后面的话。"))
    assert check.replaced and check.reason == reason and check.close() == ""
    # what was shown is safe text only, and at least OUTPUT_HOLD_BACK letters of it were held back
    assert released and SAFE.startswith(released) and letters(check.text[len(released) :]) >= OUTPUT_HOLD_BACK
    assert guard.metrics()["output_replaced_total"] == {reason: 1}  # counted once, as check_model_output counts


def test_the_hold_back_is_derived_from_the_output_patterns():
    import re

    from cbt_llm.domain.guard import OUTPUT_HOLD_BACK, CrisisGuard, OutputStream, letters, output_hold_back

    # the longest output pattern: 吃|吞|服用 (2), digits (0), .{0,3}, 毫克 (2), .{0,12}, 足以 (2), 不会醒 (3): 24
    assert OUTPUT_HOLD_BACK == 24 + 3
    assert output_hold_back((re.compile(r"吃\d+片(?!剂)"),)) == 3 + 3  # digits are not counted, lookaheads are
    assert output_hold_back((re.compile(r"不要.*医生"),)) is None  # no bound: nothing shows before the end
    assert letters("割 腕，１２3 ｍｇ\u0301") == 4  # no spaces, punctuation, digits or marks; NFKC: ｍｇ is mg
    check = CrisisGuard().output_stream()
    pieces = _fed(check, SAFE * 3, 3)
    released = [p for p in pieces if p]
    # a sentence at a time, before the text ends, and all of it in the end
    assert len(released) >= 3 and all(p.endswith("。") for p in released)
    assert "".join(pieces) + check.close() == SAFE * 3
    nothing = OutputStream(CrisisGuard(), hold_back=None)
    assert _fed(nothing, SAFE) == [""] * len(SAFE) and nothing.close() == SAFE


def test_a_guarded_stream_shows_what_guarded_reply_shows(model):
    from cbt_llm.domain.guard import CrisisGuard
    from serve.engine import Engine
    from serve.guarded import GuardedStream, guarded_reply
    from serve.streaming import model_deltas, remote_deltas

    asked = []

    def _patterns_only():  # placeholder and random-model text: the learned layers' verdicts are tested elsewhere
        return CrisisGuard(user_model=None, reply_model=None)

    def deltas(messages, **gen):
        asked.append(messages)
        yield from ("  模型", "说的话  ", " ")

    user = [{"role": "user", "content": "我想自杀。"}]
    stream = GuardedStream(deltas, _patterns_only(), user)
    pieces = iter(stream)
    assert next(pieces) == CRISIS_BLOCK and not asked  # the crisis block shows before the model is asked
    assert CRISIS_BLOCK + "".join(pieces) == stream.reply.text == f"{CRISIS_BLOCK}\n\n模型说的话\n\n{DISCLAIMER}"
    assert "【安全提示】" in asked[0][0]["content"]  # the model was told of the risk
    # a guarded server's own crisis block and disclaimer are shown once, as guarded_reply shows them
    served = f"{CRISIS_BLOCK}\n\n模型说的话\n\n{DISCLAIMER}"
    stream = GuardedStream(lambda m, **g: remote_deltas(_remote(served), m, **g), _patterns_only(), user)
    assert "".join(stream) == stream.reply.text == guarded_reply(_remote(served), _patterns_only(), user).text
    # a local model's tokens arrive one by one and join to its non-streamed reply
    engine = Engine.load(str(model), device="cpu")
    hello = [{"role": "user", "content": "最近总是失眠，怎么办？"}]
    pieces = list(model_deltas(engine)(hello, max_new_tokens=12))
    assert len(pieces) > 2 and "".join(pieces).strip() == engine.generate_one(hello, max_new_tokens=12).text
    stream = GuardedStream(model_deltas(engine), _patterns_only(), hello, max_new_tokens=12)
    assert (
        "".join(stream) == stream.reply.text == guarded_reply(engine, _patterns_only(), hello, max_new_tokens=12).text
    )


def test_a_stream_cut_by_the_guard_stops_the_model_and_keeps_the_conversation_in_crisis_mode():
    from cbt_llm.domain.guard import CrisisGuard
    from serve.guarded import GuardedStream

    closed = []

    def deltas(messages, **gen):
        try:
            yield from (SAFE, HELD, UNSAFE, "后面的话。")
        finally:
            closed.append(True)  # where a real source stops its model

    guard = CrisisGuard()
    turns = [{"role": "user", "content": "睡不着"}, {"role": "assistant", "content": "嗯。"}]
    stream = GuardedStream(deltas, guard, [*turns, {"role": "user", "content": "还是睡不着。"}])
    shown = "".join(stream)
    assert closed and stream.reply.replaced and shown.endswith(f"\n\n{CRISIS_BLOCK}") and HELD not in shown
    # the history keeps what guarded_reply gives for unsafe text: the block first, so crisis mode holds
    assert stream.reply.text == CRISIS_BLOCK
    later = [*turns, {"role": "user", "content": "还是睡不着。"}, {"role": "assistant", "content": stream.reply.text}]
    assert guard.check_user_turn([*later, {"role": "user", "content": "嗯"}]).source == "earlier_reply"
