"""`cbt-llm chat`: a conversation in the terminal with a local model (--model) or any OpenAI-compatible server
(--url, serve/remote.py's RemoteEngine), through the same crisis guard as the server (serve/guarded.py), applied
here on the client side whatever the server does. Plain input(): /reset starts a new conversation, /exit or
Ctrl-D ends it. The conversation lives in this process only; nothing is written to disk. --batch (run_batch)
answers a JSONL file of conversations, one per line, through the same guard.

Replies are shown as the model makes them (serve/guarded.py's GuardedStream): the crisis block before any model
text, then the model's text a sentence at a time, a little behind the model (the guard's OutputStream releases a
sentence once every layer of the output check has read the text up to it), then the disclaimer.
serve/streaming.py's model_deltas gives the text in pieces, as it does for the server's SSE stream: tokens from a
local transformers model, SSE chunks from a server, or the whole reply at once from any other engine.

The reply length and a long conversation (serve/context.py's ReplyBudget, passed as `fit`): each reply gets what
the model's context has left after the prompt, at most --max-tokens; once the conversation no longer leaves room,
its oldest turns are dropped from what the model sees (the system prompt, the guard's crisis note and the latest
turn always kept; the guard itself reads the whole conversation, which stays here, so crisis mode holds), and one
line says so, once per conversation. A turn that fails (a message too long for the model, a server that refuses
or is gone) is one line; the conversation goes on without it, except in a crisis: the crisis block is shown before
that line and kept as the turn's reply, so the conversation stays in crisis mode."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from cbt_llm.domain.crisis import CRISIS_BLOCK
from cbt_llm.domain.guard import CrisisGuard
from serve.engine import PromptTooLong
from serve.guarded import GuardedStream, guarded_reply
from serve.streaming import model_deltas

PROMPT = "你> "
BANNER = "cbt-llm chat: 输入消息后回车；/reset 开始新的对话，/exit 或 Ctrl-D 退出。"
SILENT = "（模型这次没有给出回复，请再说一次或换个说法）"
TRIMMED = "（对话已超出模型的上下文：最早的几轮不再发给模型；系统提示、危机状态和最新一轮都保留。/reset 开始新的对话）"


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # a piece of a reply must reach the terminal now, not when the line ends


def run_chat(
    engine,
    guard: CrisisGuard | None = None,
    *,
    system: str = "",
    fit=None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _show,
    **gen,
) -> int:
    """The read-answer loop; `gen`: engine.generate_one's options (max_new_tokens, temperature, top_p, seed);
    `fit`: serve/context.py's ReplyBudget (or None: the messages and max_new_tokens go to the engine as they are).
    `write` gets text with its own line ends, a reply in the pieces it is shown in."""
    guard = guard or CrisisGuard()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    told = False  # the trim line was shown in this conversation
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
            messages, told = list(start), False
            write("（新的对话）\n")
            continue
        messages.append({"role": "user", "content": line})
        stream = GuardedStream(model_deltas(engine), guard, messages, fit=fit, **gen)
        pieces = None
        try:
            stream.start()
            if stream.dropped and not told:
                write(TRIMMED + "\n")
                told = True
            write("助手> ")
            pieces = iter(stream)
            said = False
            for piece in pieces:
                write(piece)
                said = said or bool(piece.strip())
            if not said:  # the model stopped before its first word: say so, rather than show nothing
                write(SILENT)
        except (Exception, KeyboardInterrupt) as exc:  # one line, never a traceback; Ctrl-C stops this reply only
            if pieces is not None:
                pieces.close()  # the model stops
            stream.reply = None
            said = "已停止这次回复" if isinstance(exc, KeyboardInterrupt) else _failed(exc)
            crisis = stream.verdict is not None and stream.verdict.crisis
            if crisis and pieces is None:  # the crisis lines are shown whatever became of the model
                write(f"助手> {CRISIS_BLOCK}")
            write(("\n" if pieces is not None or crisis else "") + f"（{said}）\n\n")
            if crisis:  # kept with the block as its reply: the conversation stays in crisis mode
                messages.append({"role": "assistant", "content": CRISIS_BLOCK})
                continue
        if stream.reply is None:  # the turn is forgotten, the conversation goes on
            messages.pop()
            continue
        write("\n\n")
        # the guarded reply is kept: a crisis block in it keeps the conversation in crisis mode (the guard reads it)
        messages.append({"role": "assistant", "content": stream.reply.text})


def _failed(exc: Exception) -> str:
    """One line for a turn that could not be answered."""
    if isinstance(exc, PromptTooLong):
        return f"这条消息没有发给模型：{exc}"
    body = getattr(exc, "body", None)  # the openai client's error from a server: its own reason
    reason = body.get("message") if isinstance(body, dict) and body.get("message") else str(exc) or "no detail"
    return f"这条消息没有得到回复：{exc.__class__.__name__}: {reason}"


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


def run_batch(
    engine, in_path, out_path, guard: CrisisGuard | None = None, *, system: str = "", fit=None, **gen
) -> dict:
    """Answer every line of `in_path` through the guard, one line of `out_path` per input line, in order:
    {"line", "id", "reply", "crisis", "replaced"} (and "dropped": the oldest messages `fit` kept from the model,
    when any) or, for a line that could not be answered, {"line", "id", "error"}. Returns the counts {"answered",
    "bad"}."""
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
                reply = guarded_reply(engine, guard, messages, fit=fit, **gen)
                row.update(reply=reply.text, crisis=reply.verdict.crisis, replaced=reply.replaced)
                if reply.dropped:
                    row["dropped"] = reply.dropped
                counts["answered"] += 1
            except Exception as exc:  # a bad line (or a failed request) is written with its reason, never fatal
                reason = f"invalid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                row["error"] = reason if isinstance(exc, ValueError) else f"{exc.__class__.__name__}: {reason}"
                counts["bad"] += 1
            dst.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts
