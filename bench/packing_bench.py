"""Benchmark the packers of data_pipeline/packing.py on windows of example lengths, as `cbt-llm prepare` sees them.

    python bench/packing_bench.py                                # corpus lengths from bench/results/
    python bench/packing_bench.py --lengths-from runs/demo/data  # re-read them from a prepared dataset
    python bench/packing_bench.py --sweep                        # where does each target variant lose to BFD?

Distributions (one window of --window examples each, --windows windows drawn with seeds 0, 1, ...):

- corpus:     real example lengths (chat template applied) of `cbt-llm synth template` records tokenized by the
              demo tokenizer, drawn from their histogram in bench/results/packing-corpus-lengths.json
              (--lengths-from DIR re-extracts it from a prepared dataset's train and validation shards).
- uniform:    uniform on 148-246 tokens (the corpus's range, not its shape: the corpus peaks at 175-180).
- longtail:   lognormal(5.5, 0.6) clipped to [20, seq_len] (median ~245, the near-optimality test's lengths).
- psyqa-like: lognormal with median 450, sigma 0.45, clipped to [60, seq_len] (long answers; an assumption,
              not measured on PsyQA).
- --sweep adds normal(200, 10), normal(220, 20), normal(300, 30) (clipped to [150, 2 x mean]), uniform 50-400 and
  a bimodal mix (half normal(120, 15), half normal(600, 100)), and counts, over windows of 30 to 20,000
  examples at seq_len 1024, 2048 and 4096, the windows where each target variant needs more rows than BFD
  (bench/results/packing-sweep.json).

Per packer: rows, efficiency (real tokens / (rows * seq_len)) and milliseconds per window (median of
--repeats). `lower bound` is a bound no packer can beat: the larger of ceil(tokens / seq_len) and a count
bound (a row holding j examples needs their mean <= seq_len / j, so at most the m_j shortest examples can sit
in rows of >= j examples). Writes bench/results/packing.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.packing import pack_best, pack_bfd, pack_target, packing_efficiency  # noqa: E402

HIST = ROOT / "bench" / "results" / "packing-corpus-lengths.json"
PACKERS = {
    "bfd": pack_bfd,
    "target/balanced": lambda L, c: pack_target(L, c, "balanced"),
    "target/extreme": lambda L, c: pack_target(L, c, "extreme"),
    "best (prepare's default)": pack_best,
}


def lengths_from_dataset(data_dir: Path) -> dict[int, int]:
    """Histogram of example lengths in a prepared dataset: examples start where position_ids is 0."""
    import pyarrow.parquet as pq

    hist: dict[int, int] = {}
    files = sorted(data_dir.glob("train/*.parquet")) + sorted(data_dir.glob("validation/*.parquet"))
    if not files:
        raise SystemExit(f"no shards under {data_dir}/train or /validation")
    for f in files:
        for pos in pq.read_table(f, columns=["position_ids"]).column("position_ids").to_pylist():
            p = np.asarray(pos)
            starts = np.flatnonzero(p == 0)
            for n in np.diff(np.r_[starts, len(p)]).tolist():
                hist[n] = hist.get(n, 0) + 1
    return dict(sorted(hist.items()))


def draw(dist: str, n: int, seq_len: int, seed: int, hist: dict[int, int]) -> list[int]:
    rng = np.random.default_rng(seed)
    if dist == "corpus":
        values = np.array(list(hist), dtype=np.int64)
        p = np.array(list(hist.values()), dtype=np.float64)
        x = rng.choice(values, size=n, p=p / p.sum())
    elif dist == "uniform":
        x = rng.integers(148, 247, n)
    elif dist == "longtail":
        x = rng.lognormal(5.5, 0.6, n)
    elif dist == "psyqa-like":
        x = rng.lognormal(np.log(450), 0.45, n)
    elif dist.startswith("normal-"):
        mean, sd = (int(v) for v in dist.split("-")[1:])
        x = np.clip(rng.normal(mean, sd, n), 150, 2 * mean)
    elif dist == "uniform-50-400":
        x = rng.integers(50, 401, n)
    elif dist == "bimodal":
        x = np.where(rng.random(n) < 0.5, rng.normal(120, 15, n), rng.normal(600, 100, n))
    else:
        raise ValueError(dist)
    lo = 60 if dist == "psyqa-like" else 20
    return [int(v) for v in np.clip(x, lo, seq_len)]


def lower_bound(lengths: list[int], seq_len: int) -> int:
    """Rows no packing can go under (see the module docstring)."""
    a = np.sort(np.asarray(lengths, dtype=np.int64))
    tokens = -(-int(a.sum()) // seq_len)
    csum, m = np.cumsum(a), np.arange(1, len(a) + 1)
    jmax = seq_len // int(a[0])
    # s[j]: most examples that can sit in rows of >= j examples (a sorted prefix whose mean is <= seq_len / j)
    s = [0] * (jmax + 2)
    for j in range(1, jmax + 1):
        ok = np.flatnonzero(csum * j <= m * seq_len)
        s[j] = int(ok[-1]) + 1 if len(ok) else 0
    count = sum((s[j] - s[j + 1]) / j for j in range(1, jmax + 1))
    return max(tokens, int(np.ceil(count - 1e-9)))


def sweep(hist: dict[int, int], out: Path) -> None:
    """Windows where a target variant needs more rows than BFD (pack_best keeps BFD's bins there)."""
    dists = [
        "corpus",
        "uniform",
        "longtail",
        "psyqa-like",
        "normal-200-10",
        "normal-220-20",
        "normal-300-30",
        "uniform-50-400",
        "bimodal",
    ]
    windows, losses = 0, {"balanced": [], "extreme": []}
    for n, seeds in ((30, 5), (300, 5), (3000, 5), (20_000, 2)):
        for seed in range(1, seeds + 1):
            for seq_len in (1024, 2048, 4096):
                for dist in dists:
                    w = draw(dist, n, seq_len, seed, hist)
                    bfd = len(pack_bfd(w, seq_len))
                    windows += 1
                    for pairs in losses:
                        rows = len(pack_target(w, seq_len, pairs))
                        if rows > bfd:
                            losses[pairs].append(
                                {"n": n, "seed": seed, "seq_len": seq_len, "dist": dist, "rows": rows, "bfd_rows": bfd}
                            )
    out.write_text(json.dumps({"windows": windows, "target_more_rows_than_bfd": losses}, indent=1) + "\n")
    print(f"{windows} windows; target needs more rows than BFD in: " + json.dumps(losses, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths-from", type=Path, help="prepared dataset to re-read corpus lengths from")
    ap.add_argument("--window", type=int, default=20_000, help="examples per window (data.pack_window)")
    ap.add_argument("--windows", type=int, default=3, help="windows per distribution and seq_len")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per window (median kept)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--sweep", action="store_true", help="count windows where a target variant loses to BFD, then exit")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "packing.json")
    args = ap.parse_args()

    if args.lengths_from:
        hist = lengths_from_dataset(args.lengths_from)
        HIST.write_text(json.dumps({"source": str(args.lengths_from), "lengths": hist}, indent=1) + "\n")
    hist = {int(k): v for k, v in json.loads(HIST.read_text())["lengths"].items()}
    if args.sweep:
        sweep(hist, args.out.with_name("packing-sweep.json"))
        return

    results = []
    for seq_len in args.seq_lens:
        for dist in ("corpus", "uniform", "longtail", "psyqa-like"):
            rec = {"seq_len": seq_len, "dist": dist, "windows": args.windows, "window": args.window, "packers": {}}
            windows = [draw(dist, args.window, seq_len, seed, hist) for seed in range(args.windows)]
            tokens = sum(sum(w) for w in windows)
            rec["mean_length"] = round(tokens / (args.window * args.windows), 1)
            rec["lower_bound_rows"] = sum(lower_bound(w, seq_len) for w in windows)
            rec["ceiling"] = round(packing_efficiency(tokens, rec["lower_bound_rows"], seq_len), 4)
            for name, fn in PACKERS.items():
                rows, ms = 0, []
                for w in windows:
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        bins = fn(w, seq_len)
                        times.append((time.perf_counter() - t0) * 1e3)
                    rows += len(bins)
                    ms.append(statistics.median(times))
                rec["packers"][name] = {
                    "rows": rows,
                    "efficiency": round(packing_efficiency(tokens, rows, seq_len), 4),
                    "ms_per_window": round(statistics.mean(ms), 1),
                }
            results.append(rec)
            effs = ", ".join(f"{k} {v['efficiency']}" for k, v in rec["packers"].items())
            print(f"{seq_len} {dist}: {effs}", flush=True)

    machine = {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "cpu": platform.machine()}
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")

    names = list(PACKERS)
    print(f"\n{args.windows} windows of {args.window:,} examples each; efficiency (ms per window)\n")
    print("| seq_len | lengths | mean | " + " | ".join(names) + " | ceiling (lower bound on rows) |")
    print("| ---: | --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in results:
        cells = [f"{r['packers'][n]['efficiency']:.4f} ({r['packers'][n]['ms_per_window']:.0f})" for n in names]
        cells = [str(r["seq_len"]), r["dist"], str(r["mean_length"]), *cells, f"{r['ceiling']:.4f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
