"""`cbt-llm chat`: a conversation in the terminal with a local model, through the same crisis guard as the server
(serve/guarded.py). Plain input(): /reset starts a new conversation, /exit or Ctrl-D ends it. The conversation
lives in this process only; nothing is written to disk."""

from __future__ import annotations

from collections.abc import Callable

from cbt_llm.guard import CrisisGuard
from serve.guarded import guarded_reply

PROMPT = "你> "
BANNER = "cbt-llm chat: 输入消息后回车；/reset 开始新的对话，/exit 或 Ctrl-D 退出。"


def run_chat(
    engine,
    guard: CrisisGuard | None = None,
    *,
    system: str = "",
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    **gen,
) -> int:
    """The read-answer loop; `gen`: engine.generate_one's options (max_new_tokens, temperature, ...)."""
    guard = guard or CrisisGuard()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(BANNER)
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            write("（新的对话）")
            continue
        messages.append({"role": "user", "content": line})
        reply = guarded_reply(engine, guard, messages, **gen)
        # the reply as shown is kept: a crisis block in it keeps the conversation in crisis mode (the guard reads it)
        messages.append({"role": "assistant", "content": reply.text})
        write(f"助手> {reply.text}\n")
