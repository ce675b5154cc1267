"""Eval generation throughput: `generate_all` (token-batched, left padded) vs a one-question-at-a-time loop.

The baseline is what a user would write: for each question, apply the chat template and call `model.generate`
(greedy, the same max_new_tokens). Both answer the same questions with the same random Qwen2-architecture model
and weights, in one run, one after the other; both get one untimed warm-up call first. Reported: new tokens per
second of wall time (stop tokens counted, as Generation.new_tokens counts them), the ratio, and whether both gave
the same answers (greedy, so they should; padding can flip a near-tie on reduced-precision GPUs).

A random model rarely makes its stop token, so nearly every answer runs to max_new_tokens: the bench measures
decoding speed at full length, not at a trained model's answer lengths.

    python bench/eval_bench.py                    # CPU: hidden 256, 4 layers, 64 questions, 128 new tokens
    python bench/eval_bench.py --device cuda      # one GPU (bf16), writes bench/results/eval_bench-gpu.json
    python bench/eval_bench.py --smoke            # a few seconds: 8 questions, 16 new tokens, hidden 64

The questions are template-corpus questions with their descriptions (92-168 characters) after the default system
prompt, tokenized by a BPE trained here on that corpus (8,000 tokens). Writes bench/results/eval_bench.json (CPU)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbt_llm.core.config import DataConfig  # noqa: E402
from cbt_llm.inference.generate import generate_all  # noqa: E402
from cbt_llm.inference.hf import HFGenerator  # noqa: E402
from cbt_llm.inference.prompt import Prompt, plan_batches, prompt_messages  # noqa: E402
from data_pipeline.synth.template import iter_records  # noqa: E402
from tests.fixtures.tiny import write_chat_tokenizer, write_tiny_qwen2  # noqa: E402


def _prompts(n: int) -> list[Prompt]:
    system = DataConfig().system_prompt
    return [Prompt(r["id"], prompt_messages(r["question"], r["description"], system)) for r in iter_records(7, 0, n)]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_loop(path: Path, prompts: list[Prompt], max_new: int, device: str, dtype) -> tuple[list[str], int, float]:
    """The baseline: one `model.generate` per question, as a user writes it. Returns (texts, new tokens, seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def answer(p: Prompt) -> tuple[str, int]:
        enc = tok.apply_chat_template(p.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = enc.to(device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
        new = out[0, enc["input_ids"].shape[1] :]
        return tok.decode(new, skip_special_tokens=True).strip(), len(new)

    answer(prompts[0])  # warm-up, untimed
    _sync(device)
    t0 = time.perf_counter()
    results = [answer(p) for p in prompts]
    _sync(device)
    seconds = time.perf_counter() - t0
    return [t for t, _ in results], sum(n for _, n in results), seconds


def run_ours(path: Path, prompts: list[Prompt], max_new: int, batch_tokens: int, device: str) -> tuple[list, dict]:
    gen = HFGenerator(str(path), device=device)
    gen.generate_batch(prompts[:1], max_new)  # warm-up, untimed
    _sync(device)
    gens, stats = generate_all(gen, prompts, max_new_tokens=max_new, batch_tokens=batch_tokens, progress=False)
    lengths = [len(gen.prompt_ids(p)) for p in prompts]
    plan = plan_batches(lengths, max_new, batch_tokens)
    stats["batch_sizes"] = [len(b) for b in plan]
    stats["prompt_tokens_min_mean_max"] = [min(lengths), round(statistics.fmean(lengths), 1), max(lengths)]
    stats["dtype"] = str(gen.model.dtype).replace("torch.", "")
    return gens, stats


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="8 questions, 16 new tokens, hidden 64, 2 layers")
    ap.add_argument("--out", default="", help="results JSON (default bench/results/eval_bench[-gpu].json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.questions, args.max_new_tokens, args.hidden, args.layers = 8, 16, 64, 2
    out = Path(args.out or ROOT / "bench" / "results" / f"eval_bench{'-gpu' if args.device != 'cpu' else ''}.json")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = write_chat_tokenizer(Path(tmp) / "tokenizer", records=2000, vocab_size=8000)
        model = write_tiny_qwen2(Path(tmp) / "model", tok, hidden=args.hidden, layers=args.layers)
        print(f"tokenizer + model built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        prompts = _prompts(args.questions)
        gens, ours = run_ours(model, prompts, args.max_new_tokens, args.batch_tokens, args.device)
        dtype = getattr(__import__("torch"), ours["dtype"])
        texts, loop_tokens, loop_seconds = run_loop(model, prompts, args.max_new_tokens, args.device, dtype)
    same = sum(g.text == t for g, t in zip(gens, texts))
    loop_tps = loop_tokens / loop_seconds
    result = {
        "device": _device_name(args.device),
        "model": f"random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab 8000",
        "questions": args.questions,
        "max_new_tokens": args.max_new_tokens,
        "batch_tokens": args.batch_tokens,
        "decoding": "greedy",
        "ours": ours,
        "loop": {"new_tokens": loop_tokens, "seconds": round(loop_seconds, 3), "tokens_per_s": round(loop_tps, 1)},
        "ratio": round(ours["tokens_per_s"] / loop_tps, 2),
        "same_texts": same,
        "stopped_early": sum(g.finish == "stop" for g in gens),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _print_table(result)
    return result


def _print_table(r: dict) -> None:
    o, lp = r["ours"], r["loop"]
    print(f"\n{r['device']}; {r['model']}; {r['questions']} questions, {r['max_new_tokens']} new tokens, {o['dtype']}")
    print("| path | new tokens | seconds | new tokens/s |\n| --- | ---: | ---: | ---: |")
    rows = [
        (f"generate_all, batches of {o['batch_sizes']}", o["new_tokens"], o["seconds"], o["tokens_per_s"]),
        ("model.generate, one question at a time", lp["new_tokens"], lp["seconds"], lp["tokens_per_s"]),
    ]
    for name, n, sec, tps in rows:
        print(f"| {name} | {n:,} | {sec:.1f} | {tps:,.1f} |")
    print(f"ratio {r['ratio']}x; identical answers {r['same_texts']}/{r['questions']}", end="; ")
    print(f"stopped early: {r['stopped_early']}")


if __name__ == "__main__":
    main()
