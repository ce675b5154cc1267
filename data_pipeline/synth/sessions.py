"""`cbt-llm synth template --sessions`: an offline generator of multi-turn CBT counselling sessions.

One session is an intake (persona, setting, presenting problem, situation, automatic thought, distortion and a
planned technique) and 8-40 alternating turns, counsellor first, that follow the session arc

    agenda -> explore -> identify -> socratic -> technique -> homework -> summary

(agenda and rapport, the situation, the automatic thought, Socratic questioning, a CBT technique, homework,
summary and feedback). Short sessions fold neighbouring stages into one turn (meta.arc says "homework+summary");
long ones add follow-up turns inside explore, socratic and technique. Some clients resist ("这没用", "我做不到")
and the counsellor's next turn, in the same stage, meets it with a smaller step. A `crisis_fraction` of sessions
are crisis sessions: the client discloses suicidal or self-harm thoughts early, and the counsellor's next turn
asks about safety directly and gives the hotlines of cbt_llm/domain/crisis.py; the session stays on safety before any
technique, the homework keeps the safety plan and the summary repeats the national line.

Text is composed, not templated whole: the topic banks of data_pipeline.synth.banks.records (personas, situations,
feelings, thoughts per distortion, strategies) fill the slots of this module's session banks, so a session
varies in wording, length, stage split and technique. Output: OpenAI-messages JSONL, one session per line:
{"id", "messages": [system, assistant, user, ...], "meta": {"intake", "arc" (stage per counsellor turn),
"crisis", "seed", ...}}.

Determinism, sharding, workers, zstd, progress and summary follow data_pipeline.synth.template: session i is a
pure function of (seed, i, crisis_fraction, min_turns, max_turns); its draws come from BLAKE2b digests of
(seed, i, block), read as a mixed-radix number; shard k of n holds a contiguous range of sessions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cbt_llm.core.config import SynthConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary
from cbt_llm.domain.cbt import DISTORTIONS
from cbt_llm.domain.prompts import SESSION_SYSTEM_PROMPT
from data_pipeline.synth.banks import records as C
from data_pipeline.synth.banks import sessions as B
from data_pipeline.synth.draws import PPM
from data_pipeline.synth.shard_writer import ShardWriter
from data_pipeline.synth.template import (
    _encode,
    generate_shards,
    shard_jobs,
    write_summary,
)

PROMPT_VERSION = "sessions-v1"
SOURCE = "synth-template-sessions"
STAGES = ("agenda", "explore", "identify", "socratic", "technique", "homework", "summary")
SAFETY = "safety"
_BATCH = 512  # sessions per write (about 1.5 MB)
_RESIST_PPM = 350_000  # share of sessions (with a spare turn) in which the client resists once


# ---------------------------------------------------------------------------------------------- draws


class _Draw:
    """Uniform choices read from BLAKE2b digests of (prefix, index, block) as one mixed-radix number.

    A 512-bit block gives about 60 choices; when fewer than 64 bits are left, the next block of the same
    session is read, so the draws depend on nothing but (seed, index)."""

    __slots__ = ("h", "key", "block")

    def __init__(self, key: bytes):
        self.key = key
        self.block = 0
        self.h = self._next()

    def _next(self) -> int:
        self.block += 1
        return int.from_bytes(hashlib.blake2b(self.key + bytes([self.block]), digest_size=64).digest(), "little")

    def below(self, n: int) -> int:
        if self.h < 1 << 64:
            self.h = self._next()
        self.h, r = divmod(self.h, n)
        return r

    def pick(self, options):
        return options[self.below(len(options))]


def _seed_prefix(seed: int) -> bytes:
    return f"cbt-llm/synth-sessions/v1/{seed}/".encode()


def _topic_table() -> tuple[tuple, ...]:
    """Per topic: key, zh, (persona, group) pairs, cores, situations, feelings, burden, area, others,
    strategies, thoughts per distortion and techniques per distortion."""
    rows = []
    for key, t in C.TOPICS.items():
        personas = tuple((p, g) for g in t["groups"] for p in C.PERSONA_GROUPS[g])
        thoughts = tuple(t["thoughts"][d] for d in DISTORTIONS)
        feelings = tuple(t["feelings"]) + C.GENERAL_FEELINGS
        techs = tuple(
            B.TECHNIQUES_FOR[d] + (("behavioural_activation",) if key in B.LOW_MOOD_TOPICS else ()) for d in DISTORTIONS
        )
        rows.append(
            (key, t["zh"], personas, t["cores"], t["situations"], feelings, t["burden"], t["area"])
            + (t["others"], t["strategies"], thoughts, techs)
        )
    return tuple(rows)


_TOPICS = _topic_table()


# ---------------------------------------------------------------------------------------------- the arc

# Short sessions fold stages together in this order (homework into summary first); safety never folds.
_FOLDS = (
    ("homework", "summary"),
    ("agenda", "explore"),
    ("identify", "socratic"),
    ("explore", "identify"),
    ("technique", "homework"),
    ("socratic", "technique"),
)
_FOLLOWS = ("explore", "socratic", "technique")  # stages that take follow-up turns
_RESISTED = ("socratic", "technique", "homework")  # stages a client may push back on


def plan_arc(n: int, crisis_after: int | None, safety_turns: int) -> list[list[str]]:
    """The stages of each of n counsellor turns before any follow-up: STAGES, with `safety_turns` safety turns
    after turn `crisis_after` (crisis sessions), folded together until they fit in n turns."""
    units = [[s] for s in STAGES]
    if crisis_after is not None:
        units[crisis_after + 1 : crisis_after + 1] = [[SAFETY] for _ in range(safety_turns)]
    while len(units) > n:
        for a, b in _FOLDS:
            i = next((i for i in range(len(units) - 1) if units[i][-1] == a and units[i + 1][0] == b), None)
            if i is not None:
                units[i : i + 2] = [units[i] + units[i + 1]]
                break
        else:
            units.remove([SAFETY])  # everything folded: keep one safety turn, drop the plan turn
    return units


def _turn_specs(d: _Draw, turns: int, crisis: bool) -> tuple[list[tuple[list[str], str]], int | None, int | None]:
    """The counsellor turns as (stages, kind) with kind main/follow/meet/closing, the index of the turn whose
    reply discloses the crisis, and the index of the turn whose reply resists."""
    n_counsellor = (turns + 1) // 2
    closing = turns % 2  # an odd count ends on the counsellor: a closing turn after the client's feedback
    n = n_counsellor - closing
    crisis_after = d.below(2) if crisis else None
    units = plan_arc(n, crisis_after, 2 if n >= 8 else 1)
    disclose = next(i for i, u in enumerate(units) if u[0] == SAFETY) - 1 if crisis else None
    extra = n - len(units)  # > 0 only when nothing was folded
    resist = None
    if extra and d.below(PPM) < _RESIST_PPM:
        resist = d.pick([i for i, u in enumerate(units) if u[-1] in _RESISTED])
        extra -= 1
    follow = [0] * len(units)
    eligible = [i for i, u in enumerate(units) if u[-1] in _FOLLOWS]
    for _ in range(extra):
        follow[d.pick(eligible)] += 1
    out: list[tuple[list[str], str]] = []
    disclose_at = resist_at = None
    for i, u in enumerate(units):
        out.append((u, "main"))
        if i == resist:
            resist_at = len(out) - 1
            out.append(([u[-1]], "meet"))
        out.extend(([u[-1]], "follow") for _ in range(follow[i]))
        if i == disclose:
            disclose_at = len(out) - 1  # the reply just before the safety turns
    if closing:
        out.append((["summary"], "closing"))
    return out, disclose_at, resist_at


# ---------------------------------------------------------------------------------------------- text


def _intake(d: _Draw, crisis_ppm: int) -> dict:
    """The drawn intake and the slots the session's text is filled from."""
    crisis = d.below(PPM) < crisis_ppm
    key, zh, personas, cores, situations, feelings, burden, area, others, strategies, thoughts, techs = d.pick(_TOPICS)
    di = d.below(len(DISTORTIONS))
    (full, bare, lo, hi), group = d.pick(personas)
    age = lo + d.below(hi - lo + 1)
    i = d.below(len(feelings))
    j = d.below(len(feelings) - 1)
    s1 = d.pick(strategies)
    tech = d.pick(techs[di])
    b1 = 60 + 5 * d.below(8)
    slots = {
        "age": age,
        "full": full,
        "bare": bare,
        "setting": d.pick(B.SETTINGS[group]),
        "topic": zh,
        "core": d.pick(cores),
        "situation": d.pick(situations),
        "f1": feelings[i],
        "f2": feelings[j + (j >= i)],
        "burden": burden,
        "area": area,
        "others": others,
        "s1": s1,
        "dur": d.pick(C.DURATIONS),
        "thought": d.pick(thoughts[di]),
        "balanced": d.pick(B.BALANCED_THOUGHTS),
        "b1": b1,
        "b2": b1 - 20 - 5 * d.below(6),
        "b3": 10 + 5 * d.below(5),
        "emo": 60 + 5 * d.below(8),
        "conf": 6 + d.below(4),
        "tech": B.TECHNIQUES[tech]["zh"],
        "hw": d.pick(B.TECHNIQUES[tech]["homework"]),
        "lines": B.LINES,
        "national": B.NATIONAL,
        "emergency": B.EMERGENCY,
        "who": d.pick(B.CONFIDANTS),
    }
    intake = {
        "age_band": f"{age // 10 * 10}-{age // 10 * 10 + 9}",
        "role": bare,
        "setting": slots["setting"],
        "topic": key,
        "presenting_problem": slots["core"],
        "situation": slots["situation"],
        "automatic_thought": slots["thought"],
        "distortion": DISTORTIONS[di],
        "technique": tech,
    }
    return {"crisis": crisis, "d": di, "tech": tech, "slots": slots, "intake": intake}


def _stage_text(d: _Draw, stage: str, kind: str, k: int, ctx: dict) -> tuple[str, str]:
    """(statement, question) of one stage in a counsellor turn; k counts this stage's earlier turns."""
    tech = B.TECHNIQUES[ctx["tech"]]
    if stage == "agenda":
        return d.pick(B.GREETINGS) + d.pick(B.RAPPORT), d.pick(B.AGENDA_QUESTIONS)
    if stage == "explore":
        if kind == "follow":
            return d.pick(B.ACKS), B.EXPLORE_FOLLOWUPS[(ctx["start"] + k) % len(B.EXPLORE_FOLLOWUPS)]
        return d.pick(B.REFLECTIONS) + d.pick(B.AGENDA_CONFIRM), d.pick(B.EXPLORE_QUESTIONS)
    if stage == "identify":
        return d.pick(B.IDENTIFY_REFLECTIONS) + d.pick(B.IDENTIFY_LEADS), d.pick(B.IDENTIFY_QUESTIONS)
    if stage == "socratic":
        if kind == "follow":
            q = (C.CHALLENGE_TEMPLATES[DISTORTIONS[ctx["d"]]] + B.SOCRATIC_QUESTIONS)[(ctx["start"] + k) % 7]
            return d.pick(B.ACKS), q
        key = C.KEY_THOUGHT_TEMPLATES[DISTORTIONS[ctx["d"]]]
        return d.pick(key), d.pick(B.SOCRATIC_QUESTIONS)
    if stage == "technique":
        if kind == "follow":
            return d.pick(B.ACKS), tech["steps"][min(k, len(tech["steps"]) - 1)]
        return d.pick(B.TECHNIQUE_LEADS) + d.pick(tech["intro"]), tech["steps"][0]
    if stage == "homework":
        body = d.pick(B.HOMEWORK_BODIES)
        if ctx["crisis"]:
            body += f"还有，最重要的一项：{B.CRISIS_HOMEWORK}。"
        return d.pick(B.HOMEWORK_LEADS) + body, d.pick(B.HOMEWORK_QUESTIONS)
    if stage == "summary":
        note = d.pick(B.CRISIS_SUMMARY_NOTES) if ctx["crisis"] else d.pick(B.PROFESSIONAL_NOTES)
        return d.pick(B.SUMMARY_LEADS) + d.pick(B.SUMMARY_BODIES) + note, d.pick(B.FEEDBACK_QUESTIONS)
    # safety: the first safety turn asks directly and gives the hotlines; a second one makes a safety plan
    if k == 0:
        return d.pick(B.SAFETY_ACKS) + d.pick(B.SAFETY_LINES), d.pick(B.SAFETY_QUESTIONS)
    return d.pick(B.SAFETY_PLAN_EXTRAS), d.pick(B.SAFETY_PLANS)


def _counsellor(d: _Draw, stages: list[str], kind: str, seen: dict, s: dict, ctx: dict) -> str:
    if kind == "closing":
        return d.pick(B.CLOSINGS)
    if kind == "meet":
        return d.pick(B.RESISTANCE[ctx["resist"]][1]) + d.pick(B.SMALLER_STEPS[stages[-1]])
    text = ""
    for i, st in enumerate(stages):
        if i and st in B.FOLD_QUESTIONS:
            text += d.pick(B.FOLD_QUESTIONS[st])
        else:
            statement, question = _stage_text(d, st, kind, seen.get(st, 0), ctx)
            text += statement + (question if _asked(stages, i) else "")
        seen[st] = seen.get(st, 0) + 1
    return text.format_map(s)


def _asked(stages: list[str], i: int) -> bool:
    """Is stage i's question asked in a (folded) turn: it is the last, or the next stage only adds a question."""
    return i == len(stages) - 1 or stages[i + 1] in B.FOLD_QUESTIONS


def _client(d: _Draw, stage: str, kind: str, k: int, s: dict, ctx: dict) -> str:
    """The client's answer to a counsellor turn whose last stage is `stage`."""
    if kind == "meet":  # agrees to the smaller step; in a technique, takes it at once
        text = d.pick(B.AFTER_MEET[stage])
        if stage == "technique":
            text += B.TECHNIQUES[ctx["tech"]]["answers"][0]
        return text.format_map(s)
    if stage == "agenda":
        text = d.pick(C.INTRO_TEMPLATES) + "{dur}我{core}，{f1}。" + d.pick(B.GOALS)
    elif stage == "explore":
        if kind == "follow":
            text = B.EXPLORE_FOLLOW_ANSWERS[(ctx["start"] + k - 1) % len(B.EXPLORE_FOLLOW_ANSWERS)]
        else:
            text = d.pick(B.EXAMPLE_OPENERS) + "{situation}。当时我{f1}，{f2}。"
    elif stage == "identify":
        text = d.pick(C.THOUGHT_OPENERS) + "“{thought}。”" + d.pick(B.BELIEFS)
    elif stage == "socratic":
        text = B.SOCRATIC_ANSWERS[(ctx["start"] + k) % len(B.SOCRATIC_ANSWERS)]
    elif stage == "technique":
        answers = B.TECHNIQUES[ctx["tech"]]["answers"]
        text = answers[min(k - 1, len(answers) - 1)]
    elif stage == "homework":
        text = d.pick(B.HOMEWORK_ANSWERS)
    elif stage == "summary":
        text = d.pick(B.FEEDBACK)
    elif k == 1:
        text = d.pick(B.SAFETY_ANSWERS)
    else:
        text = d.pick(B.SAFETY_PLAN_ANSWERS)
    return text.format_map(s)


def _compose(d: _Draw, seed: int, index: int, crisis_ppm: int, min_turns: int, max_turns: int) -> dict:
    """One session: the intake, the turn plan, then counsellor and client turns in order from the same draws."""
    it = _intake(d, crisis_ppm)
    turns = min_turns + d.below(max_turns - min_turns + 1)
    specs, crisis_at, resist_at = _turn_specs(d, turns, it["crisis"])
    s = it["slots"]
    ctx = {"tech": it["tech"], "d": it["d"], "crisis": it["crisis"], "start": d.below(7)}
    messages = [{"role": "system", "content": SESSION_SYSTEM_PROMPT}]
    arc, seen = [], {}
    resisted, crisis_turn = [], None
    for t, (stages, kind) in enumerate(specs):
        text = _counsellor(d, stages, kind, seen, s, ctx)
        if t and specs[t - 1][0] == [SAFETY] and stages != [SAFETY]:
            text = d.pick(B.AFTER_SAFETY) + text  # back to the session's arc once the safety turns are done
        messages.append({"role": "assistant", "content": text})
        arc.append("+".join(stages))
        if len(messages) - 1 == turns:
            break
        if t == resist_at:
            ctx["resist"] = d.below(len(B.RESISTANCE))  # the meeting turn answers this push-back
            text = B.RESISTANCE[ctx["resist"]][0].format(why=d.pick(B.RESISTANCE_WHY))
            resisted.append(len(messages))
        else:  # a folded turn is answered stage by stage, for each question it asked
            text = "".join(_client(d, st, kind, seen[st], s, ctx) for i, st in enumerate(stages) if _asked(stages, i))
        if t == crisis_at:
            text += d.pick(B.CRISIS_DISCLOSURES)
            crisis_turn = len(messages)
        messages.append({"role": "user", "content": text})
    return {
        "id": f"session-{seed}-{index:09d}",
        "messages": messages,
        "meta": {
            "intake": it["intake"],
            "arc": arc,
            "crisis": it["crisis"],
            "crisis_turn": crisis_turn,
            "resistance_turns": resisted,
            "turns": turns,
            "seed": seed,
            "generator": "template-sessions",
            "prompt_version": PROMPT_VERSION,
        },
    }


def session_at(seed: int, index: int, crisis_fraction: float = 0.02, min_turns: int = 8, max_turns: int = 24) -> dict:
    """The session at `index` for `seed`: a pure function of its arguments."""
    d = _Draw(_seed_prefix(seed) + index.to_bytes(8, "little"))
    return _compose(d, seed, index, round(crisis_fraction * PPM), min_turns, max_turns)


def intake_at(seed: int, index: int, crisis_fraction: float = 0.02) -> tuple[dict, dict]:
    """The intake that session_at(seed, index, crisis_fraction) starts from (the same first draws), and the
    client behind it: {crisis, persona, age, feelings, duration}. `synth api --sessions` builds its client
    simulator from these, so the API sessions and the offline ones share one intake distribution."""
    it = _intake(_Draw(_seed_prefix(seed) + index.to_bytes(8, "little")), round(crisis_fraction * PPM))
    s = it["slots"]
    client = {
        "crisis": it["crisis"],
        "persona": s["full"],
        "age": s["age"],
        "feelings": [s["f1"], s["f2"]],
        "duration": s["dur"],
    }
    return it["intake"], client


def iter_sessions(
    seed: int, start: int, stop: int, crisis_fraction: float = 0.02, min_turns: int = 8, max_turns: int = 24
):
    """Yield sessions start..stop-1 one at a time (nothing is accumulated)."""
    for i in range(start, stop):
        yield session_at(seed, i, crisis_fraction, min_turns, max_turns)


# ---------------------------------------------------------------------------------------------- writing


def _write_shard(job: dict, progress: Callable[[int], None] | None = None) -> dict:
    """Generate sessions [start, stop) into one shard (ShardWriter)."""
    topics: dict[str, int] = {}
    stages: dict[str, int] = {}
    crisis = resist = turns = 0
    with ShardWriter(job, progress, _BATCH) as shard:
        for i in range(job["start"], job["stop"]):
            rec = session_at(job["seed"], i, job["crisis_fraction"], job["min_turns"], job["max_turns"])
            shard.add(_encode(rec))
            meta = rec["meta"]
            t = meta["intake"]["topic"]
            topics[t] = topics.get(t, 0) + 1
            for a in meta["arc"]:
                for st in a.split("+"):
                    stages[st] = stages.get(st, 0) + 1
            crisis += meta["crisis"]
            resist += bool(meta["resistance_turns"])
            turns += meta["turns"]
    # jsonl_bytes: uncompressed, what MB/s counts
    return shard.result(
        unit="sessions",
        jsonl_bytes=True,
        crisis=crisis,
        resistance=resist,
        turns=turns,
        topics=topics,
        stage_turns=stages,
    )


def check_turns(cfg: SynthConfig) -> None:
    """min_turns <= max_turns (each field's own range is checked by the config type)."""
    if cfg.min_turns > cfg.max_turns:
        raise ConfigError(
            f"synth.min_turns ({cfg.min_turns}) is larger than synth.max_turns ({cfg.max_turns}); "
            "lower min_turns or raise max_turns"
        )


def run_synth_sessions(cfg: SynthConfig) -> dict:
    """Generate cfg.num_records sessions into cfg.num_shards shards under cfg.out_dir; return the summary.

    Writes the shards, `synth_summary.json` (counts, sessions/s, topic and stage histograms, per-shard sizes and
    content hashes) and an empty `_SUCCESS` marker last. Raises ConfigError on bad settings before any work.
    """
    check_turns(cfg)
    out, jobs = shard_jobs(cfg, min_turns=cfg.min_turns, max_turns=cfg.max_turns)
    results, seconds, workers = generate_shards(cfg, jobs, _write_shard, "session", "synth sessions")
    summary = _summary(cfg, results, seconds, workers)
    write_summary(out, summary)
    print_summary(
        "synth template --sessions",
        {
            "sessions": summary["sessions"],
            "seconds": round(seconds, 2),
            "sessions/s": round(summary["sessions"] / seconds) if seconds > 0 else 0,
            "MB/s (JSONL)": round(summary["jsonl_bytes"] / 2**20 / seconds, 1) if seconds > 0 else 0,
            "workers": workers,
            "shards": cfg.num_shards,
            "bytes": summary["bytes"],
            "mean turns": summary["mean_turns"],
            "crisis sessions": summary["crisis"],
            "sessions with resistance": summary["resistance"],
            "out_dir": str(out),
        },
    )
    return summary


def _summary(cfg: SynthConfig, results: list[dict], seconds: float, workers: int) -> dict:
    topics = {k: 0 for k in C.TOPICS}
    stages = {k: 0 for k in (*STAGES, SAFETY)}
    for r in results:
        for k, v in r.pop("topics").items():
            topics[k] += v
        for k, v in r.pop("stage_turns").items():
            stages[k] += v
    sessions = sum(r["sessions"] for r in results)
    cpu_seconds = sum(r["cpu_seconds"] for r in results)
    return {
        "sessions": sessions,
        "seconds": round(seconds, 3),
        "sessions_per_s": round(sessions / seconds, 1) if seconds > 0 else None,
        "sessions_per_cpu_s": round(sessions / cpu_seconds, 1) if cpu_seconds > 0 else None,
        "workers": workers,
        "shards": cfg.num_shards,
        "compress": cfg.compress,
        "bytes": sum(r["bytes"] for r in results),
        "jsonl_bytes": sum(r["jsonl_bytes"] for r in results),
        "crisis": sum(r["crisis"] for r in results),
        "crisis_fraction": cfg.crisis_fraction,
        "resistance": sum(r["resistance"] for r in results),
        "mean_turns": round(sum(r["turns"] for r in results) / sessions, 2),
        "min_turns": cfg.min_turns,
        "max_turns": cfg.max_turns,
        "seed": cfg.seed,
        "source": SOURCE,
        "prompt_version": PROMPT_VERSION,
        "topics": topics,
        "stage_turns": stages,
        "files": sorted(results, key=lambda r: r["shard"]),
    }
