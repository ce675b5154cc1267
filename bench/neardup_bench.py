"""Benchmark prepare's near-duplicate pass (data.near_dup) and quality gate (data.quality): cost and accuracy.

    python bench/neardup_bench.py                         # 200k records (+1% planted near-copies)
    python bench/neardup_bench.py --num-records 1000000   # ~25 min on 2 shared cores
    python bench/neardup_bench.py --index-only            # the driver index's memory against datasketch's LSH

Corpus: `synth template` records (seed 0), and after every 100th one an edited copy of a random earlier record
(a planted near-duplicate, id `planted-<k>`): a few characters of its answer replaced, a phrase inserted, its
punctuation swapped plus one character changed, or a short span deleted, in turn. The truth is the list of
planted ids and their originals. Runs, each `cbt-llm prepare` in a fresh subprocess (bench/prepare_bench.py's
run_measured: wall time with Ray start-up, peak PSS of the process tree):

- off:      the pass off (the shards of a run without it);
- near_dup: data.near_dup.enabled (threshold 0.8, 128 permutations, 5-character shingles);
- gate:     near_dup + data.quality.min_structure_coverage=4 (at --gate-records only: the scorer reads every
            answer in Python and is the slow part).

Accuracy of the near_dup run: recall = planted copies rejected as near_duplicate / planted; precision = rejects
whose exact shingle Jaccard with the kept example they name reaches the threshold / rejects (LSH can pair
examples below it); the planted rejects that name their own original; and the template corpus's own
near-duplicates (rejects that were not planted). Index memory (--index-only, or always at the end): bytes held
by NearDupIndex against datasketch's MinHashLSH after inserting the same number of kept examples, by
tracemalloc. Writes bench/results/neardup-<N>k.json and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prepare_bench import _cli, fresh_workdir, run_measured  # noqa: E402
from cbt_llm.domain.chat_format import build_user_message  # noqa: E402
from data_pipeline.prepare.neardup import NearDupIndex, conversation_text, lsh_params, shingles  # noqa: E402
from data_pipeline.synth.scorer import load_or_train  # noqa: E402
from data_pipeline.synth.template import iter_records  # noqa: E402

PLANT_EVERY = 100
# characters an edit may put in: common, and none that could complete a crisis keyword (死, 活, 自, 杀 left out)
_POOL = "的一是在不了有和人这中大为上个我以要他时来用们到作地于出就分对成会可主发年同工也能下过子说种面而方后多定行学"
_PHRASE = ("其实", "说真的", "慢慢来", "换个角度看")
_PUNCT = str.maketrans({"，": ",", "。": ".", "？": "?", "：": ":", "；": ";", "“": '"', "”": '"'})


def edit(answer: str, kind: int, rng: random.Random) -> str:
    """A near-copy of an answer: kind 0 replaces 3 characters, 1 inserts a phrase, 2 swaps punctuation to
    half-width and replaces 1 character, 3 deletes a span of 8 characters."""
    chars = list(answer)
    if kind == 0:
        for _ in range(3):
            chars[rng.randrange(len(chars))] = rng.choice(_POOL)
    elif kind == 1:
        chars.insert(rng.randrange(len(chars)), rng.choice(_PHRASE))
    elif kind == 2:
        chars = list(answer.translate(_PUNCT))
        chars[rng.randrange(len(chars))] = rng.choice(_POOL)
    else:
        at = rng.randrange(len(chars) - 8)
        del chars[at : at + 8]
    return "".join(chars)


def write_corpus(n: int, out: Path, shards: int = 8, seed: int = 0) -> dict[str, str]:
    """n template records in `shards` JSONL files plus 1% planted near-copies; returns {planted id: original id}."""
    out.mkdir(parents=True)
    rng = random.Random(seed)
    truth: dict[str, str] = {}
    per = -(-n // shards)
    recent: list[dict] = []  # a bounded pool of earlier records to copy from (memory flat at any n)
    for k in range(shards):
        with open(out / f"part-{k:05d}.jsonl", "w", encoding="utf-8") as fh:
            for rec in iter_records(seed, k * per, min(n, (k + 1) * per)):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if len(recent) < 20_000:
                    recent.append(rec)
                elif rng.random() < 0.05:
                    recent[rng.randrange(len(recent))] = rec
                i = int(rec["id"].rsplit("-", 1)[1])
                if i % PLANT_EVERY == PLANT_EVERY // 2:
                    orig = rng.choice(recent)
                    pid = f"planted-{len(truth)}"
                    copy = dict(orig, id=pid, answer=edit(orig["answer"], len(truth) % 4, rng))
                    truth[pid] = orig["id"]
                    fh.write(json.dumps(copy, ensure_ascii=False) + "\n")
    return truth


def _text(rec: dict) -> str:
    msgs = [{"role": "user", "content": build_user_message(rec["question"], rec["description"])}]
    return conversation_text(msgs + [{"role": "assistant", "content": rec["answer"]}])


def _jaccard(a: dict, b: dict, k: int = 5) -> float:
    sa, sb = shingles(_text(a), k), shingles(_text(b), k)
    return len(sa & sb) / len(sa | sb)


def accuracy(out: Path, corpus: Path, truth: dict[str, str], threshold: float) -> dict:
    """Recall and precision of the near_duplicate rejects of the run in `out` against the planted truth."""
    pairs = {}
    for line in (out / "rejects" / "rejects-00000.jsonl").read_text("utf-8").splitlines():
        r = json.loads(line)
        if r["reason"] == "near_duplicate":
            head, tail = r["detail"].split(": near-duplicate of ", 1)
            pairs[head] = tail.split(" (", 1)[0]
    recs = _records_by_id(corpus, set(pairs) | set(pairs.values()))
    sims = {a: _jaccard(recs[a], recs[b]) for a, b in pairs.items()}
    found = [p for p in truth if p in pairs]
    planted_by_id = dict(zip(truth, _jaccard_truth(corpus, truth)))
    true_pairs = [a for a, s in sims.items() if s >= threshold]
    planted_sims = sorted(planted_by_id.values())
    return {
        "planted": len(truth),
        "near_duplicate_rejects": len(pairs),
        "recall": round(len(found) / max(1, len(truth)), 4),
        "precision(jaccard>=threshold)": round(len(true_pairs) / max(1, len(pairs)), 4),
        "planted_naming_their_original": sum(pairs[p] == truth[p] for p in found),
        "unplanted_rejects": len(pairs) - len(found),
        "unplanted_below_threshold": sum(1 for a, s in sims.items() if a not in truth and s < threshold),
        "missed_planted_jaccard": sorted(round(s, 3) for p, s in planted_by_id.items() if p not in pairs)[:20],
        "planted_jaccard_min_median": [round(planted_sims[0], 3), round(planted_sims[len(planted_sims) // 2], 3)]
        if planted_sims
        else None,
    }


def _jaccard_truth(corpus: Path, truth: dict[str, str]) -> list[float]:
    """Each planted copy's exact Jaccard with its original, in truth's order."""
    recs = _records_by_id(corpus, set(truth) | set(truth.values()))
    return [_jaccard(recs[p], recs[o]) for p, o in truth.items()]


def _records_by_id(corpus: Path, wanted: set[str]) -> dict[str, dict]:
    """The corpus records whose id is in `wanted`, by id (one pass over the shards)."""
    recs = {}
    for f in sorted(corpus.glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            rec = json.loads(line)
            if rec["id"] in wanted:
                recs[rec["id"]] = rec
    return recs


def index_memory(n: int, threshold: float = 0.8, num_perm: int = 128) -> dict:
    """Bytes held after indexing n kept examples: NearDupIndex against datasketch's MinHashLSH (random
    signatures: the structures' cost does not depend on the values)."""
    import numpy as np
    import pyarrow as pa
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    bands, rows = lsh_params(threshold, num_perm)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    idx = NearDupIndex()
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        col = pa.array(rng.integers(-(2**63), 2**63 - 1, (m, bands)).tolist(), pa.list_(pa.int64()))
        sk = pa.array([rng.integers(0, 256, num_perm, dtype=np.uint8).tobytes() for _ in range(m)], pa.binary())
        idx.begin_batch(col, sk)
        for i in range(m):
            idx.add(i, f"synth-0-{start + i:09d}", start + i)
        idx.end_batch()
    ours = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del idx
    tracemalloc.start()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    template = MinHash(num_perm=num_perm)
    for i in range(n):
        hv = rng.integers(0, 2**32 - 1, num_perm, dtype=np.uint64)
        lsh.insert(
            f"synth-0-{i:09d}", LeanMinHash(seed=1, hashvalues=hv, scheme=template.scheme), check_duplication=False
        )
    theirs = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "kept_examples": n,
        "bands": bands,
        "ours_mib": round(ours / 2**20, 1),
        "ours_bytes_per_example": round(ours / n, 1),
        "datasketch_mib": round(theirs / 2**20, 1),
        "datasketch_bytes_per_example": round(theirs / n, 1),
    }


def _prepare(name: str, corpus: Path, tok: Path, work: Path, env: dict, extra: list[str]) -> dict:
    print(f"{name}: cbt-llm prepare ...", file=sys.stderr)
    out = work / name
    run = run_measured(
        _cli(
            "prepare",
            f"data.inputs=[{corpus}/*.jsonl]",
            f"data.tokenizer={tok}",
            f"data.out_dir={out}",
            "data.seq_len=1024",
            "data.world_size=2",
            *extra,
        ),
        env,
    )
    man = json.loads((out / "manifest.json").read_text())
    met = json.loads((out / "prepare_metrics.json").read_text())
    return {
        "wall_s": round(run["wall_s"], 1),
        "peak_pss_mib": round(run["peak_pss_mib"], 1),
        "records_per_s_excl_startup": round(met["records/s"], 1),
        "kept": man["counts"]["kept"],
        "rejected": man["counts"]["rejected"],
        "out": out,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-records", type=int, default=200_000)
    ap.add_argument("--gate-records", type=int, default=200_000, help="run the quality gate at or below this size")
    ap.add_argument("--index-only", action="store_true", help="only the index memory comparison")
    ap.add_argument("--skip-off", action="store_true", help="no run with the pass off (one made earlier)")
    ap.add_argument("--index-n", type=int, default=200_000, help="kept examples for the index memory comparison")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench-neardup"))
    args = ap.parse_args()
    n = args.num_records
    result: dict = {"num_records": n, "cpus": os.cpu_count(), "load_start": [round(x, 2) for x in os.getloadavg()]}
    if not args.index_only:
        work, env = fresh_workdir(args.workdir)
        corpus, tok = work / "corpus", work / "tok"
        try:
            t0 = time.perf_counter()
            truth = write_corpus(n, corpus)
            result["corpus"] = {"records": n + len(truth), "planted": len(truth), "write_s": time.perf_counter() - t0}
            run_measured(
                _cli(
                    "tokenizer",
                    "train",
                    "--input",
                    f"{corpus}/*.jsonl",
                    "--out",
                    str(tok),
                    "tokenizer.max_records=50000",
                ),
                env,
            )
            runs = {} if args.skip_off else {"off": _prepare("off", corpus, tok, work, env, [])}
            runs["near_dup"] = _prepare("near_dup", corpus, tok, work, env, ["data.near_dup.enabled=true"])
            result["accuracy"] = accuracy(runs["near_dup"]["out"], corpus, truth, 0.8)
            if n <= args.gate_records:
                scorer = ROOT / "runs" / "structure_scorer.npz"
                load_or_train(scorer)  # built here, untimed, if missing
                gate = ["data.near_dup.enabled=true", "data.quality.min_structure_coverage=4"]
                runs["gate"] = _prepare("gate", corpus, tok, work, env, gate + [f"data.quality.scorer={scorer}"])
            for r in runs.values():
                r.pop("out")
            result["runs"] = runs
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result["index_memory"] = index_memory(args.index_n)
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    name = "neardup-index" if args.index_only else f"neardup-{n // 1000}k" + ("-verified" if args.skip_off else "")
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
