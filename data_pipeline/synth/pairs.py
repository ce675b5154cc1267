"""`cbt-llm synth template --pairs`: offline preference pairs (prepare's data.format: preference) for the demo and
tests: a template record's five-part answer (chosen) against a flawed answer to the same question (rejected).

Each pair draws one flaw from synth.pair_flaws (weights, normalised), one of data_pipeline/synth/flaws.py's:
a part missing, the parts out of order, no empathy, a crisis question without crisis support (the record is then
drawn as a crisis question), an unsafe line. A missing part is never empathy on a crisis question and no_empathy is
drawn on non-crisis questions only: the empathy part holds the crisis support, and a pair should differ one way.

The chosen answer is exactly data_pipeline.synth.template's record answer (template-v3: five parts, crisis support on
crisis questions, professional help in the encouragement). A pair line:

    {"id": "pair-<seed>-<index>", "messages": [{"role": "user", "content": question + description}],
     "chosen": "...", "rejected": "...",
     "meta": {"source": "synth-template-pairs", "generator", "prompt_version", "template_version", "seed", "index",
              "flaw", "flaw_detail", "crisis", "topic", "distortions"}}

No system turn: prepare puts data.system_prompt first. flaw_detail: missing_part {"part"}, order {"order": [parts]},
no_empathy {"order"}, no_crisis_support {"removed": the sentence}, unsafe {"line": the line added}.

Determinism as the template generator: pair i is a pure function of (seed, i, crisis_fraction, pair_flaws), from its
own BLAKE2b digest (another prefix than the records', so pair i is not record i); shard k of n holds a contiguous
index range, so the shards concatenated are the one-shard output. synth_summary.json lists each shard's records,
bytes and content SHA-256 as the template's does, so prepare checks the files the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from cbt_llm.core.config import SynthConfig
from cbt_llm.core.config.synth import DEFAULT_PAIR_FLAWS
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary
from cbt_llm.domain.chat_format import build_user_message
from cbt_llm.domain.record import SCHEMA_VERSION
from data_pipeline.synth.draws import PPM, digest
from data_pipeline.synth.flaws import FLAWS, flaw_thresholds, flawed_parts
from data_pipeline.synth.shard_writer import ShardWriter
from data_pipeline.synth.template import (
    PROMPT_VERSION,
    _compose,
    _crisis_ppm,
    _encode,
    generate_shards,
    shard_jobs,
    write_summary,
)

PAIRS_VERSION = "template-pairs-v1"
SOURCE = "synth-template-pairs"
_BATCH = 2048


def _pair_prefix(seed: int) -> bytes:
    return f"cbt-llm/synth-template-pairs/v1/{seed}/".encode()


def _compose_pair(h: int, seed: int, index: int, crisis_ppm: int, thresholds: list[tuple[int, str]]) -> dict:
    h, r = divmod(h, PPM)
    flaw = next(f for bound, f in thresholds if r < bound)
    if flaw == "no_crisis_support":
        crisis_ppm = PPM  # drawn as a crisis question
    elif flaw == "no_empathy":
        crisis_ppm = 0
    record, h = _compose(h, seed, index, crisis_ppm)
    h, rejected, detail = flawed_parts(h, record["cbt"], record["meta"]["crisis"], flaw)
    crisis = record["meta"]["crisis"]
    return {
        "id": f"pair-{seed}-{index:09d}",
        "messages": [{"role": "user", "content": build_user_message(record["question"], record["description"])}],
        "chosen": record["answer"],
        "rejected": "\n\n".join(rejected),
        "meta": {
            "source": SOURCE,
            "generator": "template-pairs",
            "prompt_version": PAIRS_VERSION,
            "template_version": PROMPT_VERSION,
            "seed": seed,
            "index": index,
            "flaw": flaw,
            "flaw_detail": detail,
            "crisis": crisis,
            "topic": record["meta"]["topic"],
            "distortions": record["distortions"],
            "schema_version": SCHEMA_VERSION,
        },
    }


def pair_at(seed: int, index: int, crisis_fraction: float = 0.02, mix: dict[str, float] | None = None) -> dict:
    """Pair `index` for `seed`: a pure function of its arguments (mix: synth.pair_flaws; None: its default)."""
    thresholds = flaw_thresholds(mix or DEFAULT_PAIR_FLAWS)
    return _compose_pair(digest(_pair_prefix(seed), index), seed, index, _crisis_ppm(crisis_fraction), thresholds)


def iter_pairs(seed: int, start: int, stop: int, crisis_fraction: float = 0.02, mix: dict[str, float] | None = None):
    """Yield pairs start..stop-1 one at a time."""
    thresholds = flaw_thresholds(mix or DEFAULT_PAIR_FLAWS)
    prefix, ppm = _pair_prefix(seed), _crisis_ppm(crisis_fraction)
    for i in range(start, stop):
        yield _compose_pair(digest(prefix, i), seed, i, ppm, thresholds)


def _write_pair_shard(job: dict, progress: Callable[[int], None] | None = None) -> dict:
    """Pairs [start, stop) into one shard (ShardWriter)."""
    flaws = dict.fromkeys(FLAWS, 0)
    crisis = 0
    with ShardWriter(job, progress, _BATCH) as shard:
        for pair in iter_pairs(job["seed"], job["start"], job["stop"], job["crisis_fraction"], job["pair_flaws"]):
            shard.add(_encode(pair))
            flaws[pair["meta"]["flaw"]] += 1
            crisis += pair["meta"]["crisis"]
    return shard.result(crisis=crisis, flaws=flaws)


def run_synth_pairs(cfg: SynthConfig) -> dict:
    """Generate cfg.num_records pairs into cfg.num_shards shards under cfg.out_dir, then synth_summary.json and
    _SUCCESS; returns the summary. ConfigError on a bad out_dir or shard count before any work."""
    if cfg.sessions:
        raise ConfigError("synth.pairs and synth.sessions: pairs are single-turn; pick one")
    out, jobs = shard_jobs(cfg, pair_flaws=dict(cfg.pair_flaws))
    results, seconds, workers = generate_shards(cfg, jobs, _write_pair_shard, "pair", "synth pairs")
    flaws = dict.fromkeys(FLAWS, 0)
    for r in results:
        for k, v in r.pop("flaws").items():
            flaws[k] += v
    records = sum(r["records"] for r in results)
    summary = {
        "records": records,
        "pairs": records,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds, 1) if seconds > 0 else None,
        "workers": workers,
        "shards": cfg.num_shards,
        "compress": cfg.compress,
        "bytes": sum(r["bytes"] for r in results),
        "crisis": sum(r["crisis"] for r in results),
        "crisis_fraction": cfg.crisis_fraction,
        "seed": cfg.seed,
        "source": SOURCE,
        "prompt_version": PAIRS_VERSION,
        "template_version": PROMPT_VERSION,
        "pair_flaws": dict(cfg.pair_flaws),
        "flaws": flaws,
        "files": sorted(results, key=lambda r: r["shard"]),
    }
    write_summary(out, summary)
    print_summary(
        "synth template --pairs",
        {
            "pairs": records,
            "seconds": round(seconds, 2),
            "pairs/s": round(records / seconds) if seconds > 0 else 0,
            "crisis pairs": summary["crisis"],
            **{f"flaw {k}": v for k, v in flaws.items()},
            "out_dir": str(out),
        },
    )
    return summary
