"""`cbt-llm chat`: the terminal chat driven through a pseudo-terminal (stdlib pty), as a person types into it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbt_llm.crisis import CRISIS_BLOCK, DISCLAIMER, hotline
from serve.chat import PROMPT
from tests.eval_fixtures import tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]


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
