"""Requests that arrive together, generated together: a batching loop in front of an engine (serve.engine.Engine
or VllmEngine), behind the same `generate_one` the guard calls (serve/guarded.py), so the guard stays in front.

    engine = BatchingEngine(Engine.load("exported/"), max_batch=8, window_s=0.005)
    engine.generate_one(messages, max_new_tokens=64)   # thread-safe; blocks until its batch is done

Greedy requests (temperature 0) wait in a queue; a loop thread takes the first one, collects the others that come
within `window_s` (at most `max_batch` in all) and answers them with one `engine.generate_greedy` call: one
left-padded batch, each request cut to its own max_tokens and stop strings, with its own usage. Greedy rows do
not depend on each other, so every reply is the text the request gets alone.

Sampled requests (temperature > 0) run alone, one at a time, between batches: a seed must give the same reply
whatever else is being served, and torch's random generator is one per process.

Streamed requests (serve/streaming.py) are not batched either: each takes the model alone (`alone()`, the same lock)
for as long as its tokens come, through the underlying engine's own token stream, greedy or sampled, and counts as
one generate call. They wait for the model in the same `concurrency` slots of the server as everything else.

`batches` counts the engine's generate calls (batches and lone sampled requests), `requests` the requests they
answered; /metrics shows both (cbt_serve_batches_total, cbt_serve_batched_requests_total).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future


class BatchingEngine:
    def __init__(self, engine, max_batch: int = 8, window_s: float = 0.005):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.name = engine.name
        self.concurrency = max_batch  # requests create_app lets through to generate_one at once
        self.batches = 0
        self.requests = 0
        self._model = threading.Lock()  # one generate call on the model at a time
        self._counts = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="cbt-serve-batcher", daemon=True).start()

    def _count(self, n: int) -> None:
        with self._counts:
            self.batches += 1
            self.requests += n

    @contextlib.contextmanager
    def alone(self):
        """The underlying engine, held for one generation of its own between batches (a sampled request, or a
        streamed one); counted as one generate call when it succeeds."""
        with self._model:
            yield self.engine
        self._count(1)

    def generate_one(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ):
        if temperature > 0:  # sampled: alone, so its seed means the same thing every time
            with self.alone() as engine:
                return engine.generate_one(messages, max_new_tokens, temperature, top_p, seed, stop)
        done: Future = Future()
        self._queue.put(({"messages": messages, "max_new_tokens": max_new_tokens, "stop": stop}, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                with self._model:
                    results = self.engine.generate_greedy([req for req, _ in batch])
                self._count(len(batch))
            except Exception as exc:  # the whole call failed: every request in it gets the error
                results = [exc] * len(batch)
            for (_, done), res in zip(batch, results):
                if isinstance(res, BaseException):
                    done.set_exception(res)
                else:
                    done.set_result(res)
