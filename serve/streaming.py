"""The model's text in pieces as it is made: one path for the server's SSE stream (serve/serving.py) and the
terminal chat (serve/chat.py), both of which show it through the crisis guard (serve/guarded.py's GuardedStream).

    run = Generation()                      # optional: stop it from another thread; its token counts afterwards
    deltas = model_deltas(engine, run)      # deltas(messages, **gen) -> the text in pieces
    for piece in deltas(messages, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, stop=None): ...

By engine:
    serve.engine.Engine                 its tokens as they are decoded (local_deltas; the model in a thread)
    BatchingEngine around an Engine     the same, holding the model alone between batches (BatchingEngine.alone),
                                        as a sampled request does: streamed requests are not batched
    RemoteEngine                        the server's SSE chunks (remote_deltas)
    one with .deltas(messages, run, **gen)   its own pieces (a stand-in model)
    any other (VllmEngine, ...)         the whole reply at once (engine.generate_one)

A prompt that does not fit the model's context raises PromptTooLong when deltas(...) is called, before any text
(the server answers it with a 400 before the stream starts); the model starts when the pieces are first read.
Closing the pieces, or run.cancel() from any thread, stops the model after its next token.

Stop strings are cut as Engine.generate_one cuts them (the text up to the earliest one; text that may be the start
of one waits for what follows), and the model stops there. Token counts (run.completion_tokens) are the tokens the
model generated, by generate_one's rule (up to and including its stop token), read off the generated ids: the same
count as the non-streamed reply, except that a stop string or a stop ends the model early instead of letting it
run to its end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

from cbt_llm.domain.crisis import DISCLAIMER
from serve.batching import BatchingEngine
from serve.engine import Engine
from serve.remote import RemoteEngine

Deltas = Callable[..., Iterable[str]]


class Generation:
    """One generation seen from outside its stream: `cancel()` (any thread) stops the model after its next token;
    once the pieces are read, `prompt_tokens`, `completion_tokens` and `finish` ("stop" or "length")."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish = "stop"

    def cancel(self) -> None:
        self.cancelled.set()


def model_deltas(engine, run: Generation | None = None) -> Deltas:
    """deltas(messages, **gen) for GuardedStream: what `engine` says, in the pieces it comes in; `run` gets the
    counts and carries the stop from outside."""
    run = run or Generation()
    if isinstance(engine, RemoteEngine):
        return lambda messages, **gen: remote_deltas(engine, messages, run=run, **gen)
    if isinstance(engine, Engine):
        return lambda messages, **gen: local_deltas(engine, messages, run=run, **gen)
    if isinstance(engine, BatchingEngine) and isinstance(engine.engine, Engine):
        return lambda messages, **gen: local_deltas(engine.engine, messages, run=run, hold=engine.alone, **gen)
    if hasattr(engine, "deltas"):
        return lambda messages, **gen: engine.deltas(messages, run, **gen)
    return lambda messages, **gen: whole_deltas(engine, messages, run=run, **gen)


# -- a local transformers model ------------------------------------------------------------------------------------


def local_deltas(
    engine: Engine,
    messages,
    max_new_tokens=256,
    temperature=0.0,
    top_p=1.0,
    seed=None,
    stop=None,
    *,
    run: Generation | None = None,
    hold: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Iterator[str]:
    """A local transformers model's text as its tokens are made: Engine.generate_one's prompt, context check and
    decoding (greedy or sampled) with a streamer, the model running in a thread of its own (under `hold()`, e.g.
    the batching engine's model lock, when given). The prompt is checked now (PromptTooLong); the model starts
    when the text is first read, and stops after its next token once the pieces are closed or `run` cancelled."""
    ids = engine.prompt_ids(messages)
    engine.check_fits(ids, max_new_tokens)
    run = run or Generation()
    run.prompt_tokens = len(ids)
    return _local_pieces(engine, ids, max_new_tokens, temperature, top_p, seed, stop, run, hold)


def _local_pieces(engine: Engine, ids, max_new_tokens, temperature, top_p, seed, stop, run: Generation, hold):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from cbt_llm.inference.prompt import cut_at_stop

    streamer = TextIteratorStreamer(engine.gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    done, failed = threading.Event(), []

    def stopped() -> bool:
        return done.is_set() or run.cancelled.is_set()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stopped(), dtype=torch.bool, device=input_ids.device)

    def generate() -> None:
        try:
            with hold() if hold is not None else contextlib.nullcontext():
                if stopped():  # the reader left while this one waited for the model
                    streamer.end()
                    return
                if seed is not None:
                    torch.manual_seed(seed)  # with the model held: no other generation draws from it meanwhile
                stopping = StoppingCriteriaList([Stop()])
                out = engine.run_generate(
                    ids, max_new_tokens, temperature, top_p, streamer=streamer, stopping_criteria=stopping
                )
            toks, run.finish = cut_at_stop(out[0, len(ids) :].tolist(), engine.gen.stop_ids)
            run.completion_tokens = len(toks)
        except Exception as exc:  # raised in the reader's thread below, not lost in this one
            failed.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate, name="cbt-generate", daemon=True)
    worker.start()
    try:
        cut = yield from until_stop(streamer, stop)
    finally:
        done.set()
        worker.join()
    if failed:
        raise failed[0]
    if cut:
        run.finish = "stop"


def until_stop(pieces: Iterable[str], stop: list[str] | None) -> Iterator[str]:
    """`pieces` up to the earliest stop string, as generate_one cuts the whole text; returns (as a generator's
    value) True when a stop string ended it. Text that may still become the start of a stop string waits."""
    stops = [s for s in stop or [] if s]
    if not stops:
        yield from pieces
        return False
    held = ""
    for piece in pieces:
        held += piece
        cut, found = _stop_cut(held, stops, final=False)
        if cut:
            yield held[:cut]
            held = held[cut:]
        if found:
            return True
    cut, found = _stop_cut(held, stops, final=True)
    if cut:
        yield held[:cut]
    return found


def _stop_cut(text: str, stops: list[str], final: bool) -> tuple[int, bool]:
    """(how much of `text` may be shown, whether a stop string ends the reply right there): the earliest stop
    string in it, unless a longer one may still begin before it (and the text goes on)."""
    hits = [text.find(s) for s in stops if s in text]
    limit = min(hits) if hits else len(text)
    if not final:
        longest = max(len(s) for s in stops)
        for j in range(max(0, len(text) - longest + 1), limit):
            tail = text[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in stops):
                return j, False
    return limit, bool(hits)


# -- an OpenAI-compatible server -------------------------------------------------------------------------------------


def remote_deltas(
    engine: RemoteEngine,
    messages,
    max_new_tokens=256,
    temperature=0.0,
    top_p=1.0,
    seed=None,
    stop=None,
    *,
    run: Generation | None = None,
) -> Iterator[str]:
    """The server's SSE chunks, as RemoteEngine.generate_one reads them, less a guarded server's disclaimer (the
    local guard adds its own by the same rule): text that could be the start of it waits for what follows. The
    server cuts at the stop strings; its usage chunk gives the counts."""
    run = run or Generation()
    stream = engine.stream(messages, max_new_tokens, temperature, top_p, seed, stop)
    held = ""
    try:
        for chunk in stream:
            if usage := getattr(chunk, "usage", None):
                run.prompt_tokens, run.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            for choice in chunk.choices:
                held += choice.delta.content or ""
                run.finish = choice.finish_reason or run.finish
            if cut := _disclaimer_start(held):
                yield held[:cut]
                held = held[cut:]
            if run.cancelled.is_set():
                return
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


# -- any other engine: the whole reply at once ----------------------------------------------------------------------


def whole_deltas(engine, messages, *, run: Generation | None = None, **gen) -> Iterator[str]:
    """engine.generate_one's whole reply as one piece (an engine without a token stream: vLLM's offline engine, a
    stand-in). The prompt is checked now when the engine can (PromptTooLong); the model runs when it is read."""
    inner = engine.engine if isinstance(engine, BatchingEngine) else engine
    if hasattr(inner, "prompt_ids") and hasattr(inner, "check_fits"):
        inner.check_fits(inner.prompt_ids(messages), gen.get("max_new_tokens", 256))
    return _whole(engine, messages, run or Generation(), gen)


def _whole(engine, messages, run: Generation, gen: dict) -> Iterator[str]:
    out = engine.generate_one(messages, **gen)
    run.prompt_tokens, run.completion_tokens, run.finish = out.prompt_tokens, out.completion_tokens, out.finish
    yield out.text
