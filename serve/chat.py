"""`cbt-llm chat`: a conversation in the terminal with a local model (--model) or any OpenAI-compatible server
(--url, serve/remote.py's RemoteEngine), through the same crisis guard as the server (serve/guarded.py), applied
here on the client side whatever the server does. Plain input(): /reset starts a new conversation, /exit or
Ctrl-D ends it. The conversation lives in this process only; nothing is written to disk. --batch (run_batch)
answers a JSONL file of conversations, one per line, through the same guard.

Replies are shown as the model makes them (serve/guarded.py's GuardedStream): the crisis block before any model
text, then the model's text a little behind the model (the guard's OutputStream holds back the end until the
output check has seen enough after it), then the disclaimer. model_deltas gives the text in pieces: tokens from
a local transformers model, SSE chunks from a server, or the whole reply at once from any other engine."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator

from cbt_llm.domain.crisis import DISCLAIMER
from cbt_llm.domain.guard import CrisisGuard
from serve.engine import Engine
from serve.guarded import GuardedStream, guarded_reply
from serve.remote import RemoteEngine

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


# -- the model's text in pieces ----------------------------------------------------------------------------------


def model_deltas(engine) -> Callable[..., Iterator[str]]:
    """deltas(messages, **gen) for GuardedStream: what `engine` says, in the pieces it comes in."""
    if isinstance(engine, RemoteEngine):
        return lambda messages, **gen: remote_deltas(engine, messages, **gen)
    if isinstance(engine, Engine):
        return lambda messages, **gen: local_deltas(engine, messages, **gen)
    return lambda messages, **gen: iter([engine.generate_one(messages, **gen).text])  # no token stream


def remote_deltas(
    engine: RemoteEngine, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None
) -> Iterator[str]:
    """The server's SSE chunks, as RemoteEngine.generate_one reads them, less a guarded server's disclaimer (the
    local guard adds its own by the same rule): text that could be the start of it waits for what follows."""
    kw = {"seed": seed} if seed is not None else {}
    stream = engine.client.chat.completions.create(
        model=engine.name,
        messages=messages,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stream=True,
        **kw,
    )
    held = ""
    try:
        for chunk in stream:
            held += "".join(choice.delta.content or "" for choice in chunk.choices)
            if cut := _disclaimer_start(held):
                yield held[:cut]
                held = held[cut:]
    finally:
        getattr(stream, "close", lambda: None)()  # the guard stopped reading: the server stops generating
    held = held.rstrip()
    yield held[: -len(DISCLAIMER)] if held.endswith(DISCLAIMER) else held


def _disclaimer_start(text: str) -> int:
    """Where the end of `text` (trailing whitespace aside) may be the start of DISCLAIMER; its length if nowhere."""
    body = text.rstrip()
    k = body.find(DISCLAIMER[0], max(0, len(body) - len(DISCLAIMER)))
    while k != -1 and not DISCLAIMER.startswith(body[k:]):
        k = body.find(DISCLAIMER[0], k + 1)
    return len(body) if k == -1 else k


def local_deltas(engine: Engine, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None):
    """A local transformers model's text as its tokens are made: Engine.generate_one's prompt, context check and
    decoding (greedy or sampled) with a streamer, the model running in a worker thread. Closing the generator
    stops the model after its next token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    ids = engine.start(messages, max_new_tokens, seed)
    streamer = TextIteratorStreamer(engine.gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, failed = threading.Event(), []

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def generate() -> None:
        try:
            stopping = StoppingCriteriaList([Stop()])
            engine.run_generate(ids, max_new_tokens, temperature, top_p, streamer=streamer, stopping_criteria=stopping)
        except Exception as exc:  # raised in the reader's thread below, not lost in this one
            failed.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate, name="cbt-chat-generate", daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if failed:
        raise failed[0]


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
