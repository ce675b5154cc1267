"""`cbt-llm chat`: a conversation in the terminal with a local model (--model) or any OpenAI-compatible server
(--url, serve/remote.py's RemoteEngine), through the same crisis guard as the server (serve/guarded.py), applied
here on the client side whatever the server does. Plain input(): /reset starts a new conversation, /exit or
Ctrl-D ends it. The conversation lives in this process only; nothing is written to disk. --batch (run_batch)
answers a JSONL file of conversations, one per line, through the same guard.

Replies are shown as the model makes them (serve/guarded.py's GuardedStream): the crisis block before any model
text, then the model's text a sentence at a time, a little behind the model (the guard's OutputStream releases a
sentence once every layer of the output check has read the text up to it), then the disclaimer.
serve/streaming.py's model_deltas gives the text in pieces, as it does for the server's SSE stream: tokens from a
local transformers model, SSE chunks from a server, or the whole reply at once from any other engine."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from cbt_llm.domain.guard import CrisisGuard
from serve.guarded import GuardedStream, guarded_reply
from serve.streaming import model_deltas

PROMPT = "你> "
BANNER = "cbt-llm chat: 输入消息后回车；/reset 开始新的对话，/exit 或 Ctrl-D 退出。"


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # a piece of a reply must reach the terminal now, not when the line ends


def run_chat(
    engine,
    guard: CrisisGuard | None = None,
    *,
    system: str = "",
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _show,
    **gen,
) -> int:
    """The read-answer loop; `gen`: engine.generate_one's options (max_new_tokens, temperature, top_p, seed).
    `write` gets text with its own line ends, a reply in the pieces it is shown in."""
    guard = guard or CrisisGuard()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(BANNER + "\n")
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            write("（新的对话）\n")
            continue
        messages.append({"role": "user", "content": line})
        stream = GuardedStream(model_deltas(engine), guard, messages, **gen)
        write("助手> ")
        for piece in stream:
            write(piece)
        write("\n\n")
        # the guarded reply is kept: a crisis block in it keeps the conversation in crisis mode (the guard reads it)
        messages.append({"role": "assistant", "content": stream.reply.text})


# -- scripted use: one conversation per line --------------------------------------------------------------------


def batch_messages(item) -> list[dict]:
    """The conversation of one --batch input line ({id?, messages} or {id?, text}); ValueError names what is wrong."""
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}].role must be system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must be a user turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("needs 'messages' or a non-empty 'text'")
    return [{"role": "user", "content": text}]


def run_batch(engine, in_path, out_path, guard: CrisisGuard | None = None, *, system: str = "", **gen) -> dict:
    """Answer every line of `in_path` through the guard, one line of `out_path` per input line, in order:
    {"line", "id", "reply", "crisis", "replaced"} or, for a line that could not be answered, {"line", "id",
    "error"}. Returns the counts {"answered", "bad"}."""
    guard = guard or CrisisGuard()
    counts = {"answered": 0, "bad": 0}
    with open(in_path, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as dst:
        for n, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            row: dict = {"line": n, "id": None}
            try:
                item = json.loads(raw)
                if isinstance(item, dict):
                    row["id"] = item.get("id")
                messages = batch_messages(item)
                if system and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": system}, *messages]
                reply = guarded_reply(engine, guard, messages, **gen)
                row.update(reply=reply.text, crisis=reply.verdict.crisis, replaced=reply.replaced)
                counts["answered"] += 1
            except Exception as exc:  # a bad line (or a failed request) is written with its reason, never fatal
                reason = f"invalid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                row["error"] = reason if isinstance(exc, ValueError) else f"{exc.__class__.__name__}: {reason}"
                counts["bad"] += 1
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts
