"""Benchmark `cbt-llm prepare` (Ray Data, packing) against a plain `datasets` pipeline, same corpus, same tokenizer.

    python bench/prepare_bench.py                       # 1M records
    python bench/prepare_bench.py --num-records 200000  # what fits a 2-core laptop in a few minutes

Corpus: `cbt-llm synth template` (schema v1 records). Tokenizer: `cbt-llm tokenizer train` on the first
50k records (the tokenizer is an input here, not what is measured).

- ours:     `cbt-llm prepare` in a fresh subprocess: validate, dedup, split, chat template, tokenize + mask in
            a Ray actor pool, packing (data.packer, --packer), Parquet shards + manifest.
- baseline: `datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=2)` doing the same chat
            template, tokenization and prompt masking, then naive padding of every example to seq_len, written
            to Parquet. No validation, no dedup, no split, no packing: strictly less work than ours.

Both run as fresh subprocesses timed by wall clock (interpreter, Ray or datasets start-up included).
Peak memory is the peak of the summed PSS (proportional set size, so shared pages such as Ray's object
store are not counted twice) of the whole process tree, sampled every 200 ms. Efficiency is real tokens /
(rows * seq_len). Writes bench/results/prepare.json and prints a markdown table. Work files are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "你是一名经验丰富的心理咨询师,专长于认知行为疗法,以心理咨询师的身份回答以下问题"


def _tree_memory(pid: int) -> int:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd, return wall seconds, exit code and peak PSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            m = _tree_memory(proc.pid)
            n = len(psutil.Process(proc.pid).children(recursive=True)) if proc.poll() is None else 0
            peak[0] = max(peak[0], m)
            peak[1] = max(peak[1], n + 1)
            done.wait(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(out[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark step failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": wall, "peak_pss_mib": peak[0] / 2**20, "max_processes": peak[1], "log_tail": out[-3000:]}


# --------------------------------------------------------------------------------------------------------
# the baseline, run as `prepare_bench.py --baseline ...` in its own process


def baseline_main(files: list[str], tok_dir: str, seq_len: int, num_proc: int, out: str) -> None:
    import datasets

    from data_pipeline.tokenizer import build_user_message, load_tokenizer

    datasets.disable_caching()
    cache = str(Path(out) / "hf-cache")
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    tok_holder: dict = {}

    def fn(batch):
        tok = tok_holder.get("tok")
        if tok is None:
            tok = tok_holder["tok"] = load_tokenizer(tok_dir)
        texts, prompts = [], []
        for q, d, a in zip(batch["question"], batch["description"], batch["answer"]):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": build_user_message(q, d)}]
            prompts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            texts.append(tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=False))
        enc = tok(texts, add_special_tokens=False, truncation=True, max_length=seq_len, padding="max_length")
        plens = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
        labels, real = [], []
        for ids, mask, p in zip(enc["input_ids"], enc["attention_mask"], plens):
            n = sum(mask)
            labels.append([-100] * min(p, n) + ids[p:n] + [-100] * (seq_len - max(p, n)))
            real.append(n)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "n_real": real,
        }

    ds = ds.map(fn, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=ds.column_names)
    ds.to_parquet(str(Path(out) / "baseline.parquet"))
    stats = {"rows": len(ds), "tokens": int(sum(ds["n_real"]))}
    (Path(out) / "baseline_stats.json").write_text(json.dumps(stats))


# --------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cbt_llm.cli", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-records", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--num-proc", type=int, default=2, help="datasets.map num_proc for the baseline")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench-prepare"))
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--ours-only", action="store_true", help="skip the baseline (memory-growth runs at 5M)")
    ap.add_argument("--packer", choices=["best", "bfd"], default="best", help="data.packer for ours")
    ap.add_argument("--baseline", nargs=4, metavar=("FILES_JSON", "TOK", "SEQ_LEN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        files, tok, seq_len, out = args.baseline
        baseline_main(json.loads(files), tok, int(seq_len), args.num_proc, out)
        return 0

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus, tok_dir = work / "corpus", work / "tok"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    try:
        print(f"generating {args.num_records:,} records ...", file=sys.stderr)
        gen = run_measured(
            _cli(
                "synth", "template", "--num-records", str(args.num_records), "--out", str(corpus), "--num-shards", "8"
            ),
            env,
        )
        files = sorted(str(p) for p in corpus.glob("*.jsonl"))
        run_measured(
            _cli(
                "tokenizer",
                "train",
                "--input",
                str(corpus / "*.jsonl"),
                "--out",
                str(tok_dir),
                "tokenizer.max_records=50000",
            ),
            env,
        )

        print("ours: cbt-llm prepare ...", file=sys.stderr)
        ours_out = work / "ours"
        ours = run_measured(
            _cli(
                "prepare",
                f"data.inputs=[{corpus}/*.jsonl]",
                f"data.tokenizer={tok_dir}",
                f"data.out_dir={ours_out}",
                f"data.seq_len={args.seq_len}",
                f"data.packer={args.packer}",
                "data.world_size=2",
            ),
            env,
        )
        man = json.loads((ours_out / "manifest.json").read_text())
        met = json.loads((ours_out / "prepare_metrics.json").read_text())
        c = man["counts"]
        ours_rows = c["rows"]["train"] + c["rows"]["validation"]
        ours_tokens = c["tokens"]["train"] + c["tokens"]["validation"]

        if args.ours_only:
            base, bstats = {"wall_s": float("nan"), "peak_pss_mib": float("nan"), "max_processes": 0}, None
        else:
            print(f"baseline: datasets.map(num_proc={args.num_proc}) + padding ...", file=sys.stderr)
            base_out = work / "baseline"
            base_out.mkdir()
            base = run_measured(
                [
                    sys.executable,
                    __file__,
                    "--num-proc",
                    str(args.num_proc),
                    "--baseline",
                    json.dumps(files),
                    str(tok_dir),
                    str(args.seq_len),
                    str(base_out),
                ],
                env,
            )
            bstats = json.loads((base_out / "baseline_stats.json").read_text())

        n = args.num_records
        result = {
            "num_records": n,
            "seq_len": args.seq_len,
            "machine": {
                "cpus": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
            },
            "corpus_bytes": sum(os.path.getsize(f) for f in files),
            "synth_wall_s": round(gen["wall_s"], 2),
            "ours": {
                "wall_s": round(ours["wall_s"], 2),
                "records_per_s": round(n / ours["wall_s"], 1),
                "tokens_per_s": round(ours_tokens / ours["wall_s"], 1),
                "records_per_s_excl_startup": round(met["records/s"], 1),
                "ray_startup_s": met["ray_startup_s"],
                "pack_s": met.get("pack_s"),
                "peak_pss_mib": round(ours["peak_pss_mib"], 1),
                "max_processes": ours["max_processes"],
                "rows": ours_rows,
                "tokens": ours_tokens,
                "efficiency": round(ours_tokens / (ours_rows * args.seq_len), 4),
                "packer": args.packer,
                "rejected": c["rejected_total"],
            },
            "baseline": None
            if bstats is None
            else {
                "wall_s": round(base["wall_s"], 2),
                "records_per_s": round(n / base["wall_s"], 1),
                "tokens_per_s": round(bstats["tokens"] / base["wall_s"], 1),
                "peak_pss_mib": round(base["peak_pss_mib"], 1),
                "max_processes": base["max_processes"],
                "rows": bstats["rows"],
                "tokens": bstats["tokens"],
                "efficiency": round(bstats["tokens"] / (bstats["rows"] * args.seq_len), 4),
            },
        }
        o, b = result["ours"], result["baseline"]
        result["ratio"] = (
            None
            if b is None
            else {
                "speed(ours/baseline records/s)": round(o["records_per_s"] / b["records_per_s"], 3),
                "memory(ours/baseline peak)": round(o["peak_pss_mib"] / b["peak_pss_mib"], 3),
                "rows(ours/baseline)": round(o["rows"] / b["rows"], 4),
            }
        )
        tag = (
            f"{n // 1000}k-seq{args.seq_len}"
            + ("-ours" if b is None else "")
            + ("-bfd" if args.packer == "bfd" else "")
        )
        out_path = ROOT / "bench" / "results" / f"prepare-{tag}.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

        print(f"\n### prepare: {n:,} records, seq_len {args.seq_len}, {os.cpu_count()} CPUs\n")
        print("| pipeline | wall s | records/s | tokens/s | peak PSS MiB (tree) | rows | efficiency |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        rows = [(f"ours (Ray Data + {args.packer} packing)", o)]
        if b is not None:
            rows.append((f"datasets.map(num_proc={args.num_proc}) + padding", b))
        for name, r in rows:
            print(
                f"| {name} | {r['wall_s']:,.1f} | {r['records_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                f"{r['peak_pss_mib']:,.0f} | {r['rows']:,} | {r['efficiency']:.3f} |"
            )
        if b is not None:
            print(
                f"\nratio ours/baseline: speed {result['ratio']['speed(ours/baseline records/s)']}x, "
                f"memory {result['ratio']['memory(ours/baseline peak)']}x, "
                f"rows {result['ratio']['rows(ours/baseline)']}x"
            )
        print(f"Ray start-up {o['ray_startup_s']} s; wrote {out_path.relative_to(ROOT)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
