"""`cbt-llm synth template`: an offline generator of a large, varied synthetic CBT corpus (schema v1).

Each record is composed from the phrase banks in `data_pipeline.synth.banks.records`: a persona, a situation and
its feelings, and an automatic thought showing one of the eight cognitive distortions; the five-part answer
quotes that thought back, names the distortion and challenges it with a question aimed at that distortion.
Each part is composed from clauses (an opener, a reflection, a question, connectives, optional remarks), some in
drawn order, with slots filled from the record's own persona, keywords and feelings.
A `crisis_fraction` of questions mention suicide or self-harm; they are flagged (meta.crisis) and their
answer carries cbt_llm.domain.crisis.CRISIS_SUPPORT_SENTENCE. Every answer says more professional help may be
needed.

Determinism: record i is a pure function of (seed, i, crisis_fraction). All of its choices come from one
512-bit BLAKE2b digest of (seed, i), read as a mixed-radix number (each choice takes `digest mod n` and
divides it out), so there is no per-record PRNG to build and nothing depends on which process or shard
produced the record. Shard k of n holds the contiguous index range [k*N//n, (k+1)*N//n), so concatenating
the (uncompressed) shards in order gives exactly the one-shard file, byte for byte.

Streaming: records are encoded and written in small batches; memory stays flat whatever num_records is.
Records are not validated with pydantic here (that would cost more than generating them);
tests/unit/data_pipeline/test_synth_template.py validates thousands of them against schema v1 instead.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from cbt_llm.core.config import SynthConfig
from cbt_llm.core.config.synth import DEFAULT_FLAWED_MIX
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from cbt_llm.domain.cbt import CBT_PARTS, DISTORTIONS
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE
from cbt_llm.domain.record import SCHEMA_VERSION
from data_pipeline.synth.banks import records as C
from data_pipeline.synth.draws import PPM, digest
from data_pipeline.synth.flaws import CorpusFlaws
from data_pipeline.synth.shard_writer import ShardWriter

# Versions (meta.prompt_version of every record):
# template-v3: every answer part is composed from clauses (data_pipeline/synth/banks/records.py's template-v3
# banks) with slots filled from the record's own draws, so answers are far less predictable (bench/RESULTS.md,
# "Corpus diversity").
# template-v2: the crisis-support sentence takes its hotlines from cbt_llm/domain/crisis.py (the 2025 national
# line); template-v1 gave the older line (id hope24 in cbt_llm/domain/crisis_hotlines.json).
PROMPT_VERSION = "template-v3"
SOURCE = "synth-template"
SUMMARY_NAME = "synth_summary.json"
SUCCESS_NAME = "_SUCCESS"
_BATCH = 2048  # records per write; bounds memory to a few MB

# Same bytes as data_pipeline.io.dumps, without building a new JSONEncoder on every call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _topic_table() -> tuple[tuple, ...]:
    """Flatten the topic banks into tuples once, so the hot loop does index lookups only."""
    rows = []
    for key, t in C.TOPICS.items():
        personas = tuple(p for g in t["groups"] for p in C.PERSONA_GROUPS[g])
        thoughts = tuple(t["thoughts"][d] for d in DISTORTIONS)
        rows.append(
            (
                key,
                personas,
                t["keywords"],
                t["cores"],
                t["situations"],
                tuple(t["feelings"]) + C.GENERAL_FEELINGS,
                t["burden"],
                t["area"],
                t["others"],
                t["strategies"],
                thoughts,
            )
        )
    return tuple(rows)


_TOPICS = _topic_table()
_N_TOPICS = len(_TOPICS)
_N_DIST = len(DISTORTIONS)
_TOOLS = tuple(C.DISTORTION_TOOLS[d] for d in DISTORTIONS)
_PRO = C.PROFESSIONAL_HELP + C.PROFESSIONAL_HELP_MORE
# template-v3's clause banks per part, in the order _clauses joins them
_EMPATHY_RV = (C.EMPATHY_OPENERS, C.EMPATHY_REFLECTIONS, C.EMPATHY_VALIDATIONS)
_EMPATHY_VR = (C.EMPATHY_OPENERS, C.EMPATHY_VALIDATIONS, C.EMPATHY_REFLECTIONS)
_KEY_THOUGHT = tuple((C.KEY_THOUGHT_LEADS, C.KEY_THOUGHT_EXPLANATIONS[d], C.KEY_THOUGHT_REMARKS) for d in DISTORTIONS)
_CHALLENGE = tuple(
    (C.CHALLENGE_LEADS, C.CHALLENGE_TEMPLATES[d] + C.CHALLENGE_EXTRA[d], C.CHALLENGE_FOLLOWUPS) for d in DISTORTIONS
)
_ENCOURAGEMENT = (C.ENCOURAGEMENT_OPENERS, C.ENCOURAGEMENT_HOPES)
_QUESTION_ENDS = C.QUESTION_ENDINGS + C.QUESTION_DOUBTS


def _seed_prefix(seed: int) -> bytes:
    return f"cbt-llm/synth-template/v1/{seed}/".encode()


def _crisis_ppm(crisis_fraction: float) -> int:
    return round(crisis_fraction * PPM)


def _compose(h: int, seed: int, index: int, crisis_ppm: int) -> tuple[dict, int]:
    """Build record `index` from the random integer h; returns (record, the unused part of h).

    Every `h, r = divmod(h, n)` draws a uniform choice among n and consumes it from h.
    """
    h, r = divmod(h, PPM)
    crisis = r < crisis_ppm
    h, r = divmod(h, _N_TOPICS)
    key, personas, keywords, cores, situations, feelings, burden, area, others, strategies, thoughts = _TOPICS[r]
    h, d = divmod(h, _N_DIST)

    # persona
    h, r = divmod(h, len(personas))
    full, bare, lo, hi = personas[r]
    h, r = divmod(h, hi - lo + 1)
    age = lo + r
    h, r = divmod(h, len(C.DURATIONS))
    dur = C.DURATIONS[r]
    # two different feelings
    n = len(feelings)
    h, i = divmod(h, n)
    h, j = divmod(h, n - 1)
    f1, f2 = feelings[i], feelings[j + (j >= i)]
    h, r = divmod(h, 2)
    thought = thoughts[d][r]

    # question
    h, r = divmod(h, len(C.QUESTION_PREFIXES))
    prefix = C.QUESTION_PREFIXES[r]
    if "{" in prefix:
        prefix = prefix.format(age=age, bare=bare, dur=dur)
    h, r = divmod(h, len(cores))
    core = cores[r]
    if crisis:
        h, r = divmod(h, len(C.CRISIS_QUESTION_PHRASES))
        middle = C.CRISIS_QUESTION_PHRASES[r]
        h, r = divmod(h, len(C.QUESTION_ENDINGS))
        ending = C.QUESTION_ENDINGS[r]
        question = f"{prefix}{core}，{middle}，{ending}"
    else:
        h, r = divmod(h, len(_QUESTION_ENDS))
        ending = _QUESTION_ENDS[r]
        h, r = divmod(h, 2)
        question = f"{prefix}{core}，{f1}，{ending}" if r else f"{prefix}{core}，{ending}"

    # description
    h, r = divmod(h, len(C.INTRO_TEMPLATES))
    intro = C.INTRO_TEMPLATES[r].format(age=age, full=full, bare=bare)
    h, r = divmod(h, len(C.STORY_OPENERS))
    opener = C.STORY_OPENERS[r]
    h, r = divmod(h, len(situations))
    situation = situations[r]
    h, r = divmod(h, len(C.THOUGHT_OPENERS))
    t_open = C.THOUGHT_OPENERS[r]
    h, r = divmod(h, len(C.CLOSINGS))
    closing = C.CLOSINGS[r]
    crisis_d = ""
    if crisis:
        h, r = divmod(h, len(C.CRISIS_DESCRIPTION_SENTENCES))
        crisis_d = C.CRISIS_DESCRIPTION_SENTENCES[r]
    description = f"{intro}{opener}{situation}。{dur}，我{f1}，{f2}。{t_open}“{thought}。”{crisis_d}{closing}"

    # keywords: three different topic keywords, in drawn order
    kw = list(keywords)
    picked = []
    for _ in range(3):
        h, r = divmod(h, len(kw))
        picked.append(kw.pop(r))
    if crisis:
        picked.extend(C.CRISIS_KEYWORDS_EXTRA)

    # answer: each part composed from clauses (template-v3), its slots filled from this record's own draws
    h, r = divmod(h, 3)
    slots = {"burden": burden, "dur": dur, "f1": f1, "f2": f2, "bare": bare, "kw": picked[r], "area": area}
    slots["others"], slots["thought"] = others, thought
    h, empathy = _empathy(h, slots)
    if crisis:
        h, r = divmod(h, len(C.CRISIS_EMPATHY))
        empathy = f"{empathy}{C.CRISIS_EMPATHY[r]}{CRISIS_SUPPORT_SENTENCE}"
    # key_thought: the thought quoted back, the distortion named, an optional remark; challenge: an optional
    # lead, a question aimed at the distortion, an optional follow-up
    h, key_thought = _clauses(h, _KEY_THOUGHT[d], slots)
    h, challenge = _clauses(h, _CHALLENGE[d], slots)
    h, strategy = _strategy(h, d, strategies, slots)
    if crisis:
        h, r = divmod(h, len(C.CRISIS_PROFESSIONAL))
        pro = C.CRISIS_PROFESSIONAL[r]
    else:
        h, r = divmod(h, len(_PRO))
        pro = _PRO[r]
    h, encouragement = _clauses(h, _ENCOURAGEMENT, slots)
    encouragement += pro  # the professional-help sentence always last

    cbt = {
        "empathy": empathy,
        "key_thought": key_thought,
        "challenge": challenge,
        "strategy": strategy,
        "encouragement": encouragement,
    }
    return _record(seed, index, key, crisis, d, question, description, picked, cbt), h


def _pick(h: int, bank: tuple[str, ...], slots: dict) -> tuple[int, str]:
    """One entry of bank, its slots filled; consumes the draw from h."""
    h, r = divmod(h, len(bank))
    text = bank[r]
    return h, (text.format_map(slots) if "{" in text else text)  # most clauses have no slot; skip the parse


def _clauses(h: int, banks: tuple[tuple[str, ...], ...], slots: dict) -> tuple[int, str]:
    """One entry of each bank, slots filled, joined in bank order (one loop: this runs 4 times per record)."""
    out = ""
    for bank in banks:
        h, r = divmod(h, len(bank))
        text = bank[r]
        out += text.format_map(slots) if "{" in text else text
    return h, out


def _empathy(h: int, slots: dict) -> tuple[int, str]:
    """Opener (may be empty), then a reflection of this record's burden and feelings and a validation, in
    either order."""
    h, r = divmod(h, 2)
    return _clauses(h, _EMPATHY_RV if r else _EMPATHY_VR, slots)


def _strategy(h: int, d: int, strategies: tuple[str, ...], slots: dict) -> tuple[int, str]:
    """Two different topic strategies joined by a connective, the distortion's tool before or after them, and an
    optional closer."""
    n = len(strategies)
    h, i = divmod(h, n)
    h, j = divmod(h, n - 1)
    s1, s2 = strategies[i], strategies[j + (j >= i)]
    h, intro = _pick(h, C.STRATEGY_INTROS, slots)
    h, r = divmod(h, len(C.STRATEGY_LINKS))
    body = f"{intro}{s1}{C.STRATEGY_LINKS[r]}{s2}。"
    h, r = divmod(h, len(_TOOLS[d]))
    h, lead = _pick(h, C.STRATEGY_TOOL_LEADS, slots)
    tool = lead + _TOOLS[d][r]
    h, closer = _pick(h, C.STRATEGY_CLOSERS, slots)
    h, r = divmod(h, 3)
    return h, (tool + body if r == 0 else body + tool) + closer


def _record(
    seed: int,
    index: int,
    topic: str,
    crisis: bool,
    d: int,
    question: str,
    description: str,
    keywords: list[str],
    cbt: dict[str, str],
) -> dict:
    """The schema v1 record of _compose's drawn parts."""
    return {
        "id": f"synth-{seed}-{index:09d}",
        "question": question,
        "description": description,
        "keywords": keywords,
        "cbt": cbt,
        # == cbt_llm.domain.cbt.join_answer(cbt): the parts carry no surrounding whitespace to strip
        "answer": "\n\n".join(cbt[p] for p in CBT_PARTS),
        "distortions": [DISTORTIONS[d]],
        "source": SOURCE,
        "meta": {
            "generator": "template",
            "prompt_version": PROMPT_VERSION,
            "seed": seed,
            "topic": topic,
            "crisis": crisis,
            "schema_version": SCHEMA_VERSION,
        },
    }


def _corpus_flaws(seed: int, flawed_fraction: float, flawed_mix: dict[str, float] | None):
    """synth.flawed_fraction's per-record flaws (data_pipeline/synth/flaws.py), None when it is 0."""
    if not flawed_fraction:
        return None
    return CorpusFlaws(seed, flawed_fraction, flawed_mix or DEFAULT_FLAWED_MIX)


def record_at(
    seed: int,
    index: int,
    crisis_fraction: float = 0.02,
    flawed_fraction: float = 0.0,
    flawed_mix: dict[str, float] | None = None,
) -> dict:
    """The record at `index` for `seed`: a pure function of its arguments (flawed_*: synth.flawed_fraction and
    synth.flawed_mix; None: its default)."""
    return next(iter_records(seed, index, index + 1, crisis_fraction, flawed_fraction, flawed_mix))


def iter_records(
    seed: int,
    start: int,
    stop: int,
    crisis_fraction: float = 0.02,
    flawed_fraction: float = 0.0,
    flawed_mix: dict[str, float] | None = None,
):
    """Yield records start..stop-1 one at a time (nothing is accumulated); a flawed one names its flaw in
    meta.flaw."""
    prefix, ppm = _seed_prefix(seed), _crisis_ppm(crisis_fraction)
    flaws = _corpus_flaws(seed, flawed_fraction, flawed_mix)
    for i in range(start, stop):
        rec = _compose(digest(prefix, i), seed, i, ppm)[0]
        if flaws:
            flaws.apply(rec, i)
        yield rec


def shard_ranges(num_records: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges, one per shard, sizes differing by at most one."""
    return [(k * num_records // num_shards, (k + 1) * num_records // num_shards) for k in range(num_shards)]


def shard_name(k: int, num_shards: int, compress: str) -> str:
    """File name of shard k of num_shards, e.g. part-00000-of-00004.jsonl(.zst)."""
    return f"part-{k:05d}-of-{num_shards:05d}.jsonl" + (".zst" if compress == "zstd" else "")


def _write_shard(job: dict, progress: Callable[[int], None] | None = None) -> dict:
    """Generate records [start, stop) into one shard (ShardWriter)."""
    records = iter_records(
        job["seed"],
        job["start"],
        job["stop"],
        job["crisis_fraction"],
        job.get("flawed_fraction", 0.0),
        job.get("flawed_mix"),
    )
    topics: dict[str, int] = {}
    dists: dict[str, int] = {}
    crisis = 0
    flawed: dict[str, int] = {}
    with ShardWriter(job, progress, _BATCH) as shard:
        for rec in records:
            shard.add(_encode(rec))
            meta = rec["meta"]
            if "flaw" in meta:
                flawed[meta["flaw"]] = flawed.get(meta["flaw"], 0) + 1
            t = meta["topic"]
            topics[t] = topics.get(t, 0) + 1
            dd = rec["distortions"][0]
            dists[dd] = dists.get(dd, 0) + 1
            crisis += meta["crisis"]
    return shard.result(crisis=crisis, topics=topics, distortions=dists, flaws=flawed)


# Worker-process side of the parallel mode: one shared counter slot per shard, polled by the parent.
_PROGRESS = None


def _init_worker(progress_array) -> None:
    global _PROGRESS
    _PROGRESS = progress_array


def _worker_job(write_shard: Callable[[dict, Callable[[int], None]], dict], job: dict) -> dict:
    slot = job["shard"]

    def bump(n: int) -> None:
        _PROGRESS[slot] += n  # only this process writes this slot

    return write_shard(job, bump)


def run_shard_jobs(
    jobs: list[dict], write_shard: Callable[..., dict], workers: int, total: int, unit: str, desc: str
) -> list[dict]:
    """write_shard(job, progress) for every job ({"shard": k, ...}), in this process (workers=1) or in a pool of
    spawned processes, with one progress bar over `total` items; returns the results in job order. write_shard
    must be a module-level function (the pool pickles it by name)."""
    bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr, mininterval=0.5)
    if workers == 1:
        results = [write_shard(job, bar.update) for job in jobs]
    else:
        # spawn: workers start clean (no inherited threads or locks from the parent)
        ctx = mp.get_context("spawn")
        progress = ctx.Array("q", len(jobs), lock=False)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(progress,)) as pool:
            pending = pool.map_async(functools.partial(_worker_job, write_shard), jobs, chunksize=1)
            while not pending.ready():
                pending.wait(0.25)
                bar.update(sum(progress) - bar.n)
            results = pending.get()  # re-raises a worker's exception here
        bar.update(sum(progress) - bar.n)
    bar.close()
    return results


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def generate_shards(
    cfg: SynthConfig, jobs: list[dict], write_shard: Callable[..., dict], unit: str, desc: str
) -> tuple[list[dict], float, int]:
    """run_shard_jobs over cfg.workers processes (0: one per CPU; never more than there are shards):
    (the results, the seconds it took, the workers)."""
    workers = max(1, min(cfg.workers or _available_cpus(), cfg.num_shards))
    t0 = time.perf_counter()
    results = run_shard_jobs(jobs, write_shard, workers, cfg.num_records, unit, desc)
    return results, time.perf_counter() - t0, workers


def write_summary(out: Path, summary: dict) -> None:
    """synth_summary.json, then the empty _SUCCESS marker: a reader that finds the marker finds the run complete."""
    write_metrics(out / SUMMARY_NAME, summary)
    (out / SUCCESS_NAME).write_text("")


def shard_jobs(cfg: SynthConfig, **extra) -> tuple[Path, list[dict]]:
    """The checked output folder (an earlier run's files removed) and one job per shard: its index range,
    path, seed, crisis fraction and compression, plus `extra` (what a generator needs besides)."""
    out = _check(cfg)
    removed = _remove_stale(out)
    if removed:
        print(f"synth: removed {removed} file(s) of an earlier run in {out}", file=sys.stderr)
    jobs = [
        {
            "shard": k,
            "start": a,
            "stop": b,
            "path": str(out / shard_name(k, cfg.num_shards, cfg.compress)),
            "seed": cfg.seed,
            "crisis_fraction": cfg.crisis_fraction,
            "compress": cfg.compress,
            **extra,
        }
        for k, (a, b) in enumerate(shard_ranges(cfg.num_records, cfg.num_shards))
    ]
    return out, jobs


def _check(cfg: SynthConfig) -> Path:
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth.out_dir: '{out}' is a file; pass a folder for the shards")
    if cfg.num_shards > cfg.num_records:
        raise ConfigError(
            f"synth.num_shards ({cfg.num_shards}) is larger than synth.num_records ({cfg.num_records}); "
            "lower num_shards so no shard is empty"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"synth.out_dir: cannot create '{out}' ({exc.strerror}); pass a writable folder") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"synth.out_dir: '{out}' is not writable; pass a writable folder")
    return out


def _remove_stale(out: Path) -> int:
    """Remove shards, markers and temp files of an earlier run, so a glob never mixes two runs."""
    stale = [out / SUCCESS_NAME] + list(out.glob("part-*-of-*.jsonl")) + list(out.glob("part-*-of-*.jsonl.zst"))
    stale += list(out.glob(".part-*-of-*.inprogress"))
    n = 0
    for p in stale:
        if p.is_file():
            p.unlink()
            n += 1
    return n


def run_synth_template(cfg: SynthConfig) -> dict:
    """Generate cfg.num_records records into cfg.num_shards shards under cfg.out_dir; return the summary.

    Writes the shards, `synth_summary.json` (counts, records/s, topic and distortion histograms, per-shard
    sizes and content hashes) and an empty `_SUCCESS` marker last. Raises ConfigError on a bad out_dir or
    shard count before any work.
    """
    out, jobs = shard_jobs(cfg, flawed_fraction=cfg.flawed_fraction, flawed_mix=dict(cfg.flawed_mix))
    results, seconds, workers = generate_shards(cfg, jobs, _write_shard, "rec", "synth template")
    topics = {k: 0 for k in C.TOPICS}
    dists = {d: 0 for d in DISTORTIONS}
    flawed: dict[str, int] = {}
    for r in results:
        for k, v in r.pop("flaws").items():
            flawed[k] = flawed.get(k, 0) + v
        for k, v in r.pop("topics").items():
            topics[k] += v
        for k, v in r.pop("distortions").items():
            dists[k] += v
    records = sum(r["records"] for r in results)
    crisis = sum(r["crisis"] for r in results)
    total_bytes = sum(r["bytes"] for r in results)
    cpu_seconds = sum(r["cpu_seconds"] for r in results)
    summary = {
        "records": records,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds, 1) if seconds > 0 else None,
        "records_per_cpu_s": round(records / cpu_seconds, 1) if cpu_seconds > 0 else None,
        "workers": workers,
        "shards": cfg.num_shards,
        "compress": cfg.compress,
        "bytes": total_bytes,
        "crisis": crisis,
        "crisis_fraction": cfg.crisis_fraction,
        "seed": cfg.seed,
        "source": SOURCE,
        "prompt_version": PROMPT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "topics": topics,
        "distortions": dists,
        "files": sorted(results, key=lambda r: r["shard"]),
    }
    if cfg.flawed_fraction:  # only then: the summary of an unflawed corpus keeps its keys
        summary["flawed_fraction"] = cfg.flawed_fraction
        summary["flawed_mix"] = dict(cfg.flawed_mix)
        summary["flawed"] = sum(flawed.values())
        summary["flaws"] = {f: flawed.get(f, 0) for f in cfg.flawed_mix}
    write_summary(out, summary)
    print_summary(
        "synth template",
        {
            "records": records,
            "seconds": round(seconds, 2),
            "records/s": round(records / seconds) if seconds > 0 else 0,
            "records/s per CPU": round(records / cpu_seconds) if cpu_seconds > 0 else 0,
            "workers": workers,
            "shards": cfg.num_shards,
            "bytes": total_bytes,
            "crisis records": crisis,
            **({"flawed records": sum(flawed.values())} if cfg.flawed_fraction else {}),
            "topics": len([t for t in topics.values() if t]),
            "out_dir": str(out),
        },
    )
    return summary
