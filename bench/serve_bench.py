"""Load on `cbt-llm serve`: N concurrent clients against one-request-at-a-time, in one run, on a tiny random model
(or the model you name), and how soon a streamed reply starts against when it ends.

    python bench/serve_bench.py                       # 8 clients, 20 s a side, bench/results/serve.json
    python bench/serve_bench.py --clients 4 --seconds 10 --max-tokens 32
    python bench/serve_bench.py --model runs/demo/export --max-tokens 256 --out bench/results/serve-demo.json

The server runs as a subprocess (`cbt-llm serve --device cpu` on a free loopback port). By default it serves a tiny
random Qwen2 (hidden 32, 2 layers, built by tests/fixtures/tiny.py as the eval tests' tiny_chat_model), so the
numbers measure the server's own overhead, its one-generation-at-a-time lock and the guard, not a real model's
compute. --model serves a model folder instead, e.g. `make demo`'s trained export (runs/demo/export: the demo's
size, hidden 64, 2 layers, 1.1M parameters), whose replies are sentences. Clients are threads, each with its own
official `openai` client, sending streamed requests (stream_options.include_usage) of template-corpus questions
back to back for the time given: first one client alone, then N together.

Per side: requests/s, generated (completion) tokens/s from the usage chunk, latency p50/p99 (request sent to
[DONE]: the whole reply) and time to first content p50/p99 (request sent to the first chunk with content), and
first content / whole reply per request (p50). The server streams the model's text as the guard releases it, a
sentence at a time once the output check has read past it (serve/serving.py), so the first content comes with
the first sentence (and the hold-back after it), not with the end; a random model's text has no sentence ends, so
with the default model it comes at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.synth.template import iter_records  # noqa: E402
from tests.fixtures.tiny import write_chat_tokenizer, write_tiny_qwen2  # noqa: E402

OUT = ROOT / "bench" / "results" / "serve.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_chat_model(root: Path) -> Path:
    """The tests' tiny chat model, built from tests/fixtures/tiny.py."""
    tok = write_chat_tokenizer(root / "tokenizer")
    return write_tiny_qwen2(root / "model", tok, hidden=32, layers=2, seed=0, init_std=0.2)


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    argv = [sys.executable, "-m", "cbt_llm.cli", "serve", "--model", str(model), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("cbt-llm serve did not start")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base + "/v1"
        except httpx.HTTPError:
            time.sleep(0.2)


def one_request(client, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    ttft = first if first is not None else latency
    return {"latency": latency, "ttft": ttft, "ttft_share": ttft / latency, "tokens": tokens}


def run_side(url: str, clients: int, seconds: float, max_tokens: int, questions: list[str]) -> dict:
    import openai

    results: list[dict] = []
    errors = [0]
    lock = threading.Lock()
    t_end = time.perf_counter() + seconds

    def worker(k: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        i = k
        while time.perf_counter() < t_end:
            try:
                r = one_request(client, questions[i % len(questions)], max_tokens)
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                results.append(r)
            i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # requests started before the end finish: they count, over the true wall time

    def pct(key: str, q: float) -> float | None:
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "clients": clients,
        "wall_s": wall,
        "requests": len(results),
        "errors": errors[0],
        "requests_per_s": len(results) / wall,
        "completion_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": pct("latency", 0.5),
        "latency_p99_s": pct("latency", 0.99),
        "ttft_p50_s": pct("ttft", 0.5),
        "ttft_p99_s": pct("ttft", 0.99),
        "ttft_share_p50": pct("ttft_share", 0.5),  # first content / whole reply, per request
        "tokens_p50": pct("tokens", 0.5),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="a model folder to serve (default: the tiny random one)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    questions = [r["question"][: 8 + (k * 13) % 52] for k, r in enumerate(iter_records(1, 0, 64))]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model or tiny_chat_model(Path(tmp)))
        try:
            run_side(url, 1, 2.0, args.max_tokens, questions)  # warm-up, not reported
            sides = [run_side(url, n, args.seconds, args.max_tokens, questions) for n in (1, args.clients)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    model = str(args.model) if args.model else "tiny random Qwen2 (hidden 32, 2 layers)"
    print(f"machine: {machine}; model {model}; max_tokens {args.max_tokens}, {args.seconds:g} s a side")
    print("| clients | requests | req/s | gen tok/s | latency p50 / p99 (ms) | TTFT p50 / p99 (ms) | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in sides:
        ms = {k: 1000 * s[k] for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s")}
        print(
            f"| {s['clients']} | {s['requests']} | {s['requests_per_s']:.1f} | {s['completion_tokens_per_s']:.0f} | "
            f"{ms['latency_p50_s']:.0f} / {ms['latency_p99_s']:.0f} | {ms['ttft_p50_s']:.0f} / {ms['ttft_p99_s']:.0f} "
            f"| {s['errors']} |"
        )
    print()
    print("| clients | first content p50 / p99 (ms) | whole reply p50 / p99 (ms) | first / whole p50 | tokens p50 |")
    print("|---:|---:|---:|---:|---:|")
    for s in sides:
        ms = {k: 1000 * s[k] for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s")}
        print(
            f"| {s['clients']} | {ms['ttft_p50_s']:.0f} / {ms['ttft_p99_s']:.0f} | "
            f"{ms['latency_p50_s']:.0f} / {ms['latency_p99_s']:.0f} | {s['ttft_share_p50']:.2f} | {s['tokens_p50']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "model": model, "max_tokens": args.max_tokens, "sides": sides}
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
