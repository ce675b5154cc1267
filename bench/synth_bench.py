"""Benchmark `cbt-llm synth template` (and `--sessions`): records/s, MB/s and peak RSS, single core and default.

    python bench/synth_bench.py                      # 1M records, modes: single-core, default, default-zstd
    python bench/synth_bench.py --modes sessions-single-core,sessions-default-zstd   # 1M multi-turn sessions
    python bench/synth_bench.py --num-records 200000 --modes single-core
    python bench/synth_bench.py --rss-records 5000000  # also one zstd run at 5M, to show memory stays flat

Each mode runs the real CLI in a fresh subprocess. records/s is the generator's own figure (generation,
encoding, compression and writing; interpreter start-up excluded), wall_s includes start-up. Peak RSS
comes two ways: exact `ru_maxrss` of the main process and of its largest worker (read inside the child),
and the peak of the summed RSS of the whole process tree, sampled every 50 ms with psutil.
"single-core" pins the subprocess to one CPU (sched_setaffinity) and uses one process.
Prints a markdown table and writes bench/results/synth.json. Generated shards are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the benchmarked subprocess: the CLI, then its own exact peak RSS figures.
_CHILD = """
import json, os, resource, sys
from cbt_llm.cli import main
rc = main(sys.argv[1:])
with open(os.environ["SYNTH_BENCH_RUSAGE"], "w") as fh:
    json.dump({"rc": rc,
               "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, fh)
sys.exit(rc)
"""

MODES = {
    # name: (workers, compress, pin to one CPU, sessions)
    "single-core": (1, "none", True, False),
    "default": (0, "none", False, False),
    "default-zstd": (0, "zstd", False, False),
    "sessions-single-core": (1, "none", True, True),
    "sessions-default-zstd": (0, "zstd", False, True),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker exited between listing and reading
            pass
    return total


def run_mode(name: str, num_records: int, num_shards: int, work: Path, seed: int) -> dict:
    workers, compress, pin, sessions = MODES[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    rusage_file = work / f"{name}.rusage.json"
    log_file = work / f"{name}.log"
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        "synth",
        "template",
        "--num-records",
        str(num_records),
        "--num-shards",
        str(num_shards),
        "--workers",
        str(workers),
        "--compress",
        compress,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ] + (["--sessions"] if sessions else [])
    env = dict(os.environ, SYNTH_BENCH_RUSAGE=str(rusage_file))
    cpu0 = sorted(os.sched_getaffinity(0))[0]
    preexec = (lambda: os.sched_setaffinity(0, {cpu0})) if pin else None
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
        ps = psutil.Process(proc.pid)
        peak_tree = 0
        while proc.poll() is None:
            try:
                peak_tree = max(peak_tree, _tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-2000:]
        raise SystemExit(f"mode {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    ru = json.loads(rusage_file.read_text())
    summary = json.loads((out / "synth_summary.json").read_text(encoding="utf-8"))
    shutil.rmtree(out, ignore_errors=True)  # 1M uncompressed records are ~3 GB, 1M sessions ~4.5 GB
    unit = "sessions" if sessions else "records"
    # the template's summary has no uncompressed size; uncompressed, it is the file size
    jsonl_bytes = summary.get("jsonl_bytes", summary["bytes"] if compress == "none" else None)
    return {
        "mode": name,
        "unit": unit,
        "records": summary[unit],
        "workers": summary["workers"],
        "shards": summary["shards"],
        "compress": compress,
        "pinned_to_one_cpu": pin,
        "wall_s": round(wall, 2),
        "gen_s": summary["seconds"],
        "records_per_s": summary[f"{unit}_per_s"],
        "records_per_cpu_s": summary[f"{unit}_per_cpu_s"],
        "jsonl_mb_per_s": round(jsonl_bytes / 2**20 / summary["seconds"], 1) if jsonl_bytes else None,
        "bytes": summary["bytes"],
        "bytes_per_record": round(summary["bytes"] / summary[unit], 1),
        "peak_rss_main_mb": round(ru["self_maxrss_kb"] / 1024, 1),
        "peak_rss_largest_worker_mb": round(ru["children_maxrss_kb"] / 1024, 1) if summary["workers"] > 1 else None,
        "peak_rss_tree_sampled_mb": round(peak_tree / 2**20, 1),
        "crisis": summary["crisis"],
    }


def markdown(rows: list[dict]) -> str:
    head = [
        "mode",
        "records (or sessions)",
        "workers",
        "shards",
        "compress",
        "records/s",
        "records/s per CPU",
        "JSONL MB/s",
        "wall s",
        "peak RSS main MB",
        "peak RSS largest worker MB",
        "peak RSS tree MB (sampled)",
        "output MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["mode"],
            f"{r['records']:,}" + (" sessions" if r["unit"] == "sessions" else ""),
            r["workers"],
            r["shards"],
            r["compress"],
            f"{r['records_per_s']:,.0f}",
            f"{r['records_per_cpu_s']:,.0f}",
            r["jsonl_mb_per_s"] or "-",
            f"{r['wall_s']:.1f}",
            r["peak_rss_main_mb"],
            r["peak_rss_largest_worker_mb"] or "-",
            r["peak_rss_tree_sampled_mb"],
            f"{r['bytes'] / 2**20:,.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-records", type=int, default=1_000_000)
    ap.add_argument("--num-shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--modes", default="single-core,default,default-zstd", help=f"comma-separated, from {', '.join(MODES)}"
    )
    ap.add_argument(
        "--rss-records",
        type=int,
        default=0,
        help="also run default-zstd at this many records (e.g. 5000000) to check memory stays flat",
    )
    ap.add_argument("--work-dir", default=None, help="scratch folder for the shards (default: a temp folder)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "synth.json"))
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="synth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for m in modes:
            print(f"running {m} at {args.num_records:,} records ...", file=sys.stderr, flush=True)
            rows.append(run_mode(m, args.num_records, args.num_shards, work, args.seed))
        if args.rss_records:
            print(f"running default-zstd at {args.rss_records:,} records (RSS check) ...", file=sys.stderr, flush=True)
            rows.append(run_mode("default-zstd", args.rss_records, args.num_shards, work, args.seed))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    table = markdown(rows)
    print(table)
    result = {
        "benchmark": "synth template",
        "machine": {
            "cpu": _cpu_model(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": rows,
        "markdown": table,
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
