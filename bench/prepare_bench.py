"""Benchmark `cbt-llm prepare` (Ray Data, packing) against a plain `datasets` pipeline, same corpus, same tokenizer.

    python bench/prepare_bench.py                       # 1M records
    python bench/prepare_bench.py --num-records 200000  # what fits a 2-core laptop in a few minutes

Corpus: `cbt-llm synth template` (schema v1 records). Tokenizer: `cbt-llm tokenizer train` on the first
50k records (the tokenizer is an input here, not what is measured).

- ours:     `cbt-llm prepare` in a fresh subprocess: validate, dedup, split, chat template, tokenize + mask in
            one Ray actor pool, packing (data.packer, --packer), Parquet shards + manifest.
- baseline: `datasets.load_dataset("json")` + `Dataset.map(batched=True, num_proc=2)` doing the same chat
            template, tokenization and prompt masking, then naive padding of every example to seq_len, written
            to Parquet. No validation, no dedup, no split, no packing: strictly less work than ours.
- raw:      `tokenizers`' `encode_batch` alone over exactly the texts ours tokenizes (the chat template of every
            valid example), on --num-proc threads: the tokenizer's own speed, the ceiling of any pipeline. Only
            the encode_batch calls are timed (the texts are rendered beforehand, untimed). A second line times
            `encode_batch_fast` (no character offsets) on the same texts: what ours calls on byte-level BPE
            tokenizers, also without the system turn it reuses, so ours can pass the first line.
- --profile-stages: prepare's stage functions run in order on one thread without Ray, each timed (where the
            CPU time of a record goes; Ray's own share is the real run's time beyond it).

Both run as fresh subprocesses timed by wall clock (interpreter, Ray or datasets start-up included).
Peak memory is the peak of the summed PSS (proportional set size, so shared pages such as Ray's object
store are not counted twice) of the whole process tree, sampled once a second (_SAMPLE_S). Efficiency is real tokens /
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


# The kernel walks every page table of a process to sum its PSS: ~45 ms for Ray's ~20 processes on this machine.
# Every 200 ms that took 15 CPU-s of a 75 s prepare run (the many-process pipeline paid, datasets' 3 did not);
# once a second it is ~3 CPU-s, and the memory curves are smooth at that resolution.
_SAMPLE_S = 1.0


def _tree_memory(pid: int) -> int:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    return sum(_pss(p) for p in procs)


def _pss(p: psutil.Process) -> int:
    """A process's PSS from the kernel's own sum (/proc/PID/smaps_rollup). psutil's memory_full_info parses every
    mapping of /proc/PID/smaps in Python: sampling Ray's ~20 processes with it every 200 ms took 22 CPU-s of a
    2-core machine during one prepare run (run 116 s against ~75 s unwatched), a cost only the many-process
    pipeline paid."""
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return 0  # the process ended
    except OSError:
        pass
    try:
        info = p.memory_full_info()
        return getattr(info, "pss", info.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def fresh_workdir(path: str) -> tuple[Path, dict]:
    """An emptied work folder and the environment every prepare-bench subprocess runs with (Ray without token
    auth; the tokenizer's own threads off, as in prepare's actors)."""
    work = Path(path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work, dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")


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
            done.wait(_SAMPLE_S)

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

    from cbt_llm.domain.chat_format import build_user_message
    from cbt_llm.inference.tokenizer import load_tokenizer

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
# the raw tokenizer, run as `prepare_bench.py --raw-encode ...` in its own process


def _kept_conversations(files: list[str], seq_len: int):
    """The conversations prepare tokenizes, in its order and batches: Parse's output (validated, split), the
    same data config as `ours`. Untimed: it is what the raw line is given, not what it measures."""
    from cbt_llm.core.config import Config
    from data_pipeline.prepare.parse import Parse
    from data_pipeline.prepare.read import iter_file

    dc = Config.model_validate({"data": {"inputs": files, "system_prompt": SYSTEM, "seq_len": seq_len}}).data
    parse = Parse(dc.format, dc.system_prompt, dc.max_chars, dc.val_fraction, dc.seed, [Path(f).name for f in files])
    for i, f in enumerate(files):
        for block in iter_file(f, i, dc.ray_read_lines):
            t = parse(block)
            yield [json.loads(m) for ok, m in zip(t.column("ok").to_pylist(), t.column("messages").to_pylist()) if ok]


def raw_encode_main(files: list[str], tok_dir: str, seq_len: int, threads: int, out: str) -> None:
    """`encode_batch` over exactly the texts prepare tokenizes (chat template of every valid example), on
    `threads` threads: the tokenizer's own speed, the ceiling of any pipeline around it. Only encode_batch is
    timed; the texts are rendered beforehand, a batch at a time, so memory stays one batch."""
    from cbt_llm.inference.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encode_s, fast_s, texts_n, tokens = 0.0, 0.0, 0, 0
    for convs in _kept_conversations(files, seq_len):
        texts = [tok.apply_chat_template(m, tokenize=False) for m in convs]
        t0 = time.perf_counter()
        encs = backend.encode_batch(texts, add_special_tokens=False)
        t1 = time.perf_counter()
        # the same texts without character offsets (ours asks for none on byte-level BPE: prepare/tokens.py)
        backend.encode_batch_fast(texts, add_special_tokens=False)
        fast_s += time.perf_counter() - t1
        encode_s += t1 - t0
        texts_n += len(texts)
        tokens += sum(len(e.ids) for e in encs)
    stats = {"texts": texts_n, "tokens": tokens, "encode_s": encode_s, "fast_encode_s": fast_s, "threads": threads}
    (Path(out) / "raw_stats.json").write_text(json.dumps(stats))


# --------------------------------------------------------------------------------------------------------
# where the time goes, run as `prepare_bench.py --profile ...` in its own process


class _Clock:
    """Seconds per stage; `wrap` times every call of a function under a stage name."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, stage: str, dt: float) -> None:
        self.s[stage] = self.s.get(stage, 0.0) + dt

    def wrap(self, stage: str, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return timed


class _TimedJson:
    """Stands in for the json module inside one prepare module, timing loads and dumps."""

    def __init__(self, clock: _Clock, loads_stage: str, dumps_stage: str):
        self.loads = clock.wrap(loads_stage, json.loads)
        self.dumps = clock.wrap(dumps_stage, json.dumps)
        self.JSONDecodeError = json.JSONDecodeError


class _TimedBackend:
    """The Rust tokenizer with encode_batch timed (everything else passed through)."""

    def __init__(self, real, clock: _Clock):
        self._real, self.encode_batch = real, clock.wrap("tokenize (encode_batch)", real.encode_batch)
        self.encode_batch_fast = clock.wrap("tokenize (encode_batch_fast)", real.encode_batch_fast)

    def __getattr__(self, name):
        return getattr(self._real, name)


def profile_main(files: list[str], tok_dir: str, seq_len: int, out: str) -> None:
    """Prepare's own stage functions, in order, on one thread and without Ray, each timed: what every record
    costs in CPU seconds per stage. Ray's share (object transfer, scheduling, the actor pool) is what the real
    run's stream time adds on top, times its cores."""
    import data_pipeline.sources.formats as F
    from cbt_llm.core.config import Config
    from cbt_llm.domain.chat_format import IM_END
    from data_pipeline.prepare import consume as C
    from data_pipeline.prepare import encode as E
    from data_pipeline.prepare import parse as P
    from data_pipeline.prepare import tokens as T
    from data_pipeline.prepare import write as W
    from data_pipeline.prepare.dedup import FirstSeen
    from data_pipeline.prepare.read import iter_file
    from data_pipeline.prepare.split import overlong_policy
    from data_pipeline.shards import SPLITS

    clock = _Clock()
    work = Path(out)
    dc = Config.model_validate(
        {"data": {"inputs": files, "tokenizer": tok_dir, "system_prompt": SYSTEM, "seq_len": seq_len, "world_size": 2}}
    ).data
    # the stage functions, timed where the modules call them
    P.json = _TimedJson(clock, "parse: JSON decode", "parse: JSON encode (messages, heldout)")
    P.to_examples = clock.wrap("validate (schema, to_examples)", P.to_examples)
    P.split_of = clock.wrap("split + hashes", P.split_of)
    P.question_hash = clock.wrap("split + hashes", P.question_hash)
    F.Example.content_hash = clock.wrap("split + hashes", F.Example.content_hash)
    if hasattr(E, "json"):
        E.json = _TimedJson(clock, "tokenize actor: JSON re-parse", "tokenize actor: JSON encode")
    W.SplitPacker.flush = clock.wrap("pack + spool write", W.SplitPacker.flush)
    parse = P.Parse(dc.format, dc.system_prompt, dc.max_chars, dc.val_fraction, dc.seed, [Path(f).name for f in files])
    tokenize = T.Tokenize(tok_dir, dc.seq_len, overlong_policy(dc), IM_END)
    tokenize.tok._tokenizer = _TimedBackend(tokenize.tok._tokenizer, clock)
    tokenize.tok.apply_chat_template = clock.wrap("chat template", tokenize.tok.apply_chat_template)
    if hasattr(E, "label_spans"):
        E.label_spans = clock.wrap("mask: label spans", E.label_spans)

    staging = work / "profile"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "rejects").mkdir(exist_ok=True)
    packers = {s: W.SplitPacker(s, dc, 0, staging / f"spool-{s}.parquet") for s in SPLITS}
    rejects = C.Rejects(staging / "rejects" / "r.jsonl", files, False)
    questions, seen = W.QuestionFiles(staging), FirstSeen()
    counts = {"read": 0, "kept": 0, "truncated": 0, "split_sessions": 0, "split_pieces": 0}
    totals = _Clock()
    t_all = time.perf_counter()
    for i, f in enumerate(files):
        blocks = iter_file(f, i, dc.ray_read_lines)
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            totals.add("read", time.perf_counter() - t0)
            if block is None:
                break
            for start in range(0, block.num_rows, dc.ray_tokenize_batch):
                t0 = time.perf_counter()
                parsed = parse(block.slice(start, dc.ray_tokenize_batch))
                t1 = time.perf_counter()
                for k in range(0, parsed.num_rows, dc.ray_tokenize_batch):
                    t2 = time.perf_counter()
                    tokenized = tokenize(parsed.slice(k, dc.ray_tokenize_batch))
                    t3 = time.perf_counter()
                    counts["read"] += C.consume_batch(tokenized, seen, packers, rejects, counts, questions)
                    totals.add("tokenize actor (all)", t3 - t2)
                    totals.add("driver: dedup + pack + spool (all)", time.perf_counter() - t3)
                totals.add("parse task (all)", t1 - t0)
    rejects.close()
    questions.close()
    for p in packers.values():
        p.close()
    t0 = time.perf_counter()
    W.write_shards(packers["train"].spool_path, staging, "train", 8, 0, True)
    totals.add("write shards", time.perf_counter() - t0)
    totals.add("total", time.perf_counter() - t_all)
    result = {"records": counts["read"], "kept": counts["kept"], "stages_s": clock.s, "totals_s": totals.s}
    (work / "profile.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cbt_llm.cli", *args]


def _raw_encode(files: list[str], tok_dir: Path, seq_len: int, threads: int, work: Path, env: dict) -> dict:
    """The raw-tokenizer line: encode_batch on `threads` threads (the cores the others get)."""
    print(f"raw: encode_batch on {threads} threads ...", file=sys.stderr)
    out = work / "raw"
    out.mkdir()
    raw_env = dict(env, TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--num-proc", str(threads), "--raw-encode", json.dumps(files)]
    run_measured(cmd + [str(tok_dir), str(seq_len), str(out)], raw_env)
    st = json.loads((out / "raw_stats.json").read_text())
    return {
        **st,
        "encode_s": round(st["encode_s"], 2),
        "records_per_s": round(st["texts"] / st["encode_s"], 1),
        "tokens_per_s": round(st["tokens"] / st["encode_s"], 1),
        "fast_encode_s": round(st["fast_encode_s"], 2),
        "fast_records_per_s": round(st["texts"] / st["fast_encode_s"], 1),
        "fast_tokens_per_s": round(st["tokens"] / st["fast_encode_s"], 1),
    }


def _profile(files: list[str], tok_dir: Path, seq_len: int, work: Path, env: dict) -> dict:
    print("profile: prepare's stages on one thread ...", file=sys.stderr)
    out = work / "profile"
    out.mkdir()
    run_measured([sys.executable, __file__, "--profile", json.dumps(files), str(tok_dir), str(seq_len), str(out)], env)
    prof = json.loads((out / "profile.json").read_text())
    prof["stages_s"] = {k: round(v, 2) for k, v in prof["stages_s"].items()}
    prof["totals_s"] = {k: round(v, 2) for k, v in prof["totals_s"].items()}
    return prof


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-records", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--num-proc", type=int, default=2, help="datasets.map num_proc for the baseline")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench-prepare"))
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--ours-only", action="store_true", help="skip the baseline (memory-growth runs at 5M)")
    ap.add_argument("--packer", choices=["best", "bfd"], default="best", help="data.packer for ours")
    ap.add_argument("--profile-stages", action="store_true", help="also time prepare's stages on one thread")
    sub = dict(nargs=4, metavar=("FILES_JSON", "TOK", "SEQ_LEN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", **sub)
    ap.add_argument("--raw-encode", **sub)
    ap.add_argument("--profile", **sub)
    args = ap.parse_args()
    for mode, fn in (("baseline", baseline_main), ("raw_encode", raw_encode_main), ("profile", profile_main)):
        if getattr(args, mode):
            files, tok, seq_len, out = getattr(args, mode)
            extra = (args.num_proc,) if mode != "profile" else ()
            fn(json.loads(files), tok, int(seq_len), *extra, out)
            return 0

    load_start = [round(x, 2) for x in os.getloadavg()]
    work, env = fresh_workdir(args.workdir)
    corpus, tok_dir = work / "corpus", work / "tok"
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
        raw = None if args.ours_only else _raw_encode(files, tok_dir, args.seq_len, args.num_proc, work, env)
        profile = _profile(files, tok_dir, args.seq_len, work, env) if args.profile_stages else None

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
        result["raw_encode_batch"] = raw
        result["profile"] = profile
        result["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
        o, b = result["ours"], result["baseline"]
        result["ratio"] = (
            None
            if b is None
            else {
                "speed(ours/baseline records/s)": round(o["records_per_s"] / b["records_per_s"], 3),
                "speed(ours/raw encode_batch records/s)": round(o["records_per_s"] / raw["records_per_s"], 3),
                "speed(ours/raw encode_batch_fast records/s)": round(o["records_per_s"] / raw["fast_records_per_s"], 3),
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
        if raw is not None:
            print(
                f"| raw `encode_batch`, {raw['threads']} threads (tokenizer time only) | {raw['encode_s']:,.1f} | "
                f"{raw['records_per_s']:,.0f} | {raw['tokens_per_s']:,.0f} | | | |"
            )
            print(
                f"| raw `encode_batch_fast` (no offsets), {raw['threads']} threads | {raw['fast_encode_s']:,.1f} | "
                f"{raw['fast_records_per_s']:,.0f} | {raw['fast_tokens_per_s']:,.0f} | | | |"
            )
        if b is not None:
            print(
                f"\nratio ours/raw encode_batch: {result['ratio']['speed(ours/raw encode_batch records/s)']}x records/s"
                f" (ours/raw encode_batch_fast: {result['ratio']['speed(ours/raw encode_batch_fast records/s)']}x)"
            )
            print(
                f"ratio ours/baseline: speed {result['ratio']['speed(ours/baseline records/s)']}x, "
                f"memory {result['ratio']['memory(ours/baseline peak)']}x, "
                f"rows {result['ratio']['rows(ours/baseline)']}x"
            )
        if profile is not None:
            print("\n| stage (one thread, no Ray) | seconds |\n|---|---:|")
            for stage, sec in {**profile["stages_s"], **profile["totals_s"]}.items():
                print(f"| {stage} | {sec:,.1f} |")
        print(f"load average {result['load_average']}")
        print(f"Ray start-up {o['ray_startup_s']} s; wrote {out_path.relative_to(ROOT)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
