"""Peak memory of the loss (forward + backward from the last hidden state) on CPU: the full-logits path
(`masked_ce_sum` over fp32 logits of every position, what the trainer did before) against the chunked path
(`chunked_ce_sum`, train.loss_chunk_tokens), at Qwen2.5's vocabulary (152,064) and a 4,096-token row.

Each variant runs in a fresh process; its peak RSS above the RSS after building the inputs is the number.

    .venv/bin/python bench/loss_memory_bench.py [--vocab 152064 --seq 4096 --hidden 1024 --chunks 1024,4096]

Writes bench/results/loss-memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def worker(args) -> None:
    """One measurement: prints a JSON line with the loss, the time and the peak RSS above the baseline."""
    import torch

    from train.model import masked_ce_sum
    from train.step import chunked_ce_sum

    torch.manual_seed(0)
    torch.set_num_threads(1)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.seq, args.hidden, requires_grad=True)
    labels = torch.randint(0, args.vocab, (1, args.seq))
    labels[0, : args.seq // 4] = -100  # a prompt
    pos = torch.arange(args.seq)[None]
    base = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.chunk:
        loss = chunked_ce_sum(hidden, head, labels, pos, args.chunk)
    else:
        loss = masked_ce_sum(head(hidden), labels, pos, count=False)[0]
    loss.backward()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "chunk": args.chunk,
                "loss": loss.item(),
                "seconds": secs,
                "peak_above_inputs_mib": peak - max(base, peak_before),
                "grad_norm": float(head.weight.grad.norm()),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunks", default="1024,4096", help="chunk sizes to measure besides the full-logits path")
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from cbt_llm.core.report import print_summary, write_metrics

    rows = {}
    for chunk in [0] + [int(c) for c in args.chunks.split(",") if c]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            f"--vocab={args.vocab}",
            f"--seq={args.seq}",
            f"--hidden={args.hidden}",
            f"--chunk={chunk}",
        ]
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        rows[chunk] = json.loads(out.strip().splitlines()[-1])
    full = rows[0]
    result = {
        "vocab": args.vocab,
        "seq": args.seq,
        "hidden": args.hidden,
        "device": "cpu, fp32, one thread",
        "full_logits": full,
    }
    for chunk, r in rows.items():
        if chunk:
            r["memory_ratio_vs_full"] = r["peak_above_inputs_mib"] / full["peak_above_inputs_mib"]
            r["loss_rel_diff"] = abs(r["loss"] - full["loss"]) / abs(full["loss"])
            r["grad_norm_rel_diff"] = abs(r["grad_norm"] - full["grad_norm"]) / full["grad_norm"]
            result[f"chunked_{chunk}"] = r
    write_metrics(ROOT / "bench" / "results" / "loss-memory.json", result)
    table = {
        "full logits: peak MiB above inputs": round(full["peak_above_inputs_mib"]),
        "full logits: seconds": round(full["seconds"], 2),
    }
    for chunk, r in rows.items():
        if chunk:
            table[f"chunk {chunk}: peak MiB (ratio)"] = (
                f"{r['peak_above_inputs_mib']:.0f} ({r['memory_ratio_vs_full']:.3f}x)"
            )
            table[f"chunk {chunk}: seconds / loss rel diff"] = f"{r['seconds']:.2f} / {r['loss_rel_diff']:.1e}"
    print_summary(f"loss memory, vocab {args.vocab}, seq {args.seq}, hidden {args.hidden}", table)


if __name__ == "__main__":
    main()
