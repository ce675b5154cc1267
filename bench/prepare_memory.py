"""Where `cbt-llm prepare`'s memory goes: per-process PSS over time, by role, plus the driver's own counters.

    python bench/prepare_memory.py --corpus 'runs/mem/c1m/*.jsonl' --tokenizer runs/mem/tok --out runs/mem/p1m \
        --csv runs/mem/prof/1000k.csv

Runs `cbt-llm prepare` in a fresh subprocess (the same as prepare_bench.py's "ours") and every --interval seconds
writes one CSV row: elapsed seconds, the summed PSS of the process tree, the PSS of each role (driver, raylet,
gcs, ray workers/actors by their `ray::` title, other), and what the driver reports about itself
(records read so far, Arrow pool bytes, driver RSS), which a thread started inside the driver writes to a
side file. A role whose PSS climbs with records read is what makes peak memory grow with corpus size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the driver: a daemon thread that appends the driver's own counters to a JSON-lines file.
_DRIVER_HOOK = r"""
import json, os, sys, threading, time
import pyarrow as pa, psutil
path, interval = os.environ["CBT_MEM_SIDE"], float(os.environ["CBT_MEM_INTERVAL"])
def _watch():
    me = psutil.Process()
    import tqdm
    while True:
        bars = [b for b in list(getattr(tqdm.tqdm, "_instances", [])) if getattr(b, "desc", "") == "prepare"]
        st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if l.startswith("Rss"))
        rec = {"t": time.time(), "rss": me.memory_info().rss, "arrow": pa.total_allocated_bytes(),
               "anon": int(st["RssAnon"].split()[0]) * 1024, "shmem": int(st["RssShmem"].split()[0]) * 1024,
               "py_blocks": sys.getallocatedblocks(), "read": bars[0].n if bars else 0}
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        time.sleep(interval)
threading.Thread(target=_watch, daemon=True).start()
from cbt_llm.cli import main
sys.argv = ["cbt-llm"] + sys.argv[1:]
sys.exit(main())
"""


def role(p: psutil.Process, driver_pid: int) -> str:
    if p.pid == driver_pid:
        return "driver"
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    line = " ".join(cmd)
    if cmd and cmd[0].startswith("ray::"):
        title = cmd[0][5:].split(".")[0].split("(")[0].strip() or "worker"
        return "ray::" + title
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in line:
            return key
    if "default_worker.py" in line:
        return "ray::worker"
    return "other"


def sample(driver_pid: int) -> dict[str, int]:
    try:
        root = psutil.Process(driver_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out: dict[str, int] = {}
    for p in procs:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        r = role(p, driver_pid)
        out[r] = out.get(r, 0) + getattr(info, "pss", info.rss)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="glob of the input files")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True, help="data.out_dir (deleted first)")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--interval", type=float, default=3.0)
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for prepare")
    args = ap.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    side = Path(args.csv).with_suffix(".driver.jsonl")
    side.unlink(missing_ok=True)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        CBT_MEM_SIDE=str(side),
        CBT_MEM_INTERVAL=str(args.interval),
    )
    cmd = [
        sys.executable,
        "-c",
        _DRIVER_HOOK,
        "prepare",
        f"data.inputs=[{args.corpus}]",
        f"data.tokenizer={args.tokenizer}",
        f"data.out_dir={args.out}",
        "data.seq_len=1024",
        "data.world_size=2",
        *args.overrides,
    ]
    t0 = time.time()
    log = open(Path(args.csv).with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rows: list[dict] = []
    peak = 0
    while proc.poll() is None:
        s = sample(proc.pid)
        drv: dict = {}
        if side.exists():
            lines = side.read_text().splitlines()
            if lines:
                drv = json.loads(lines[-1])
        total = sum(s.values())
        peak = max(peak, total)
        rows.append(
            {
                "t": round(time.time() - t0, 1),
                "total": total,
                **s,
                "driver_rss": drv.get("rss", 0),
                "driver_anon": drv.get("anon", 0),
                "driver_shmem": drv.get("shmem", 0),
                "arrow_pool": drv.get("arrow", 0),
                "py_blocks": drv.get("py_blocks", 0),
                "records_read": drv.get("read", 0),
            }
        )
        time.sleep(args.interval)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    mib = lambda v: round(v / 2**20, 1) if isinstance(v, int) and v > 4096 else v  # noqa: E731
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (mib(r.get(k, 0)) if k not in ("t", "records_read", "py_blocks") else r.get(k, 0)) for k in keys}
            )
    print(
        f"exit {proc.returncode}, {time.time() - t0:.1f} s, peak tree PSS {peak / 2**20:.0f} MiB; "
        f"wrote {args.csv} (MiB)"
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
