"""`cbt-llm synth api --agents`: every answer is drafted, critiqued against the eval judge's CBT rubric and revised.

AutoCBT and MADP let a counsellor draft and supervisors critique and revise; here one supervisor scores the whole
rubric (cbt_llm/domain/rubrics.py, "cbt": six criteria, total 0-18). Per question:

    round 1    the draft (synth api's own request, validation and safety rules) is critiqued;
    round r    the total reaches api.agents.threshold: stop ("threshold"); r = api.agents.max_rounds: stop
               ("max_rounds"); else the drafter revises: its draft comes back as its own turn, then feedback naming
               every criterion scored below its maximum (cbt_llm/domain/prompts.py REVISE_PROMPTS), and the revision
               is validated like a draft (crisis support and the professional-help sentence enforced again) and
               critiqued in round r + 1.

Every draft, the first and each revision, passes synth api's acceptor, so the crisis guard's output check too
(client.stop_unsafe): a draft the guard stops is retried, and a revision stopped every time ends the loop as
"revise_failed", keeping the best earlier draft, one the guard passed. So the kept draft has always passed it.

So a record costs at most 2 x max_rounds requests, retries aside. The record written is the best-scoring draft,
the later one on a tie: a revision can score lower than the draft it revised, and every kept draft has scores.

The critic (`Critic`: its rubric's criteria, request messages and reply parser) is by default
cbt_llm.domain.rubrics.RubricCritic on api.agents.rubric: the prompt and parser the eval judge (evaluation/judge.py)
uses too, so a synthesised answer is scored as `cbt-llm eval` would score it; a caller may hand in another. Its requests
go through synth api's client: the same retries and backoff on HTTP faults, the same concurrency bound, key scrubbing
and stop on a 401 before any success, naming api.agents.critic_*. As the eval judge asks: temperature 0, the question's
title (what `cbt-llm eval` shows its judge, so totals compare), and an unusable reply is asked again once; a second is a
critic failure, never a score.

A critic failure on round 1 rejects the question (stage "critic"): no draft has a score, an unscored record would
pass into the corpus unjudged and a rerun skips written ids, so rejecting is what lets the next run try again.
A later critic failure, or a revision whose retries run out, keeps the best draft scored so far (stopped
"critic_failed" or "revise_failed", the reason in meta.agents.error): its scores are known and it is as good as
a record that stopped there.

meta of each record, besides synth api's:
    agents  {rounds, scores (the total of each round), criteria (the kept draft's per-criterion scores), kept (its
             round), stopped, threshold, max_rounds, rubric, critic (model), revise_prompt, requests, error?,
             drafts (every round's answer text, in round order: drafts[i] scored scores[i])}
    judge   {total, rubric, model}: the kept draft's total, where prepare's quality gate reads a judge score.

Preference pairs (pairs.jsonl beside records.jsonl, prepare's data.format: preference): after the run, every record
of records.jsonl that keeps its drafts gives one pair per lower-scored draft, the kept draft chosen and that draft
rejected, when the kept total is at least api.agents.pair_margin higher (pairs_of). The file is rewritten from
records.jsonl each run, so resumed runs and earlier runs' records are covered and it never holds a pair twice. A
pair line: {id "<record id>-r<round>", messages [the user turn: question + description], chosen, rejected, meta
{source "synth-api-agents", record_id, crisis, scores {chosen, rejected}, rounds {chosen, rejected}, margin,
rubric, critic, model}}. Every draft passed the guard's output check, so a rejected answer is a weaker answer, not
an unsafe one.

Resume as synth api: a record is written once, after its last round, so a rerun never asks again for a finished
one; a question cut off mid-round is redone from a new draft.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cbt_llm.core.config import ApiSynthConfig, GuardConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import write_metrics
from cbt_llm.domain.chat_format import build_user_message
from cbt_llm.domain.crisis import corpus_is_crisis
from cbt_llm.domain.guard import CrisisGuard
from cbt_llm.domain.prompts import build_revise_messages, get_revise_prompt
from cbt_llm.domain.rubrics import RUBRICS, RubricCritic
from data_pipeline.io import dumps
from data_pipeline.synth.api import check_config, draft_body, record_acceptor, run_synth_api
from data_pipeline.synth.client import (
    RECORDS_FILE,
    SUMMARY_FILE,
    Endpoint,
    GiveUp,
    Retryable,
    RunContext,
    ask,
    check_endpoint,
    content_of,
    make_endpoint,
    settled,
)

# As evaluation/judge.py: an unusable judge reply is asked again once; the second is a failure.
CRITIC_TRIES = 2
STOPS = ("threshold", "max_rounds", "critic_failed", "revise_failed")
PAIRS_FILE = "pairs.jsonl"
PAIRS_SOURCE = "synth-api-agents"


class Critic(Protocol):
    """A rubric to critique with: `criteria` are (key, lowest, highest, what it rewards), summed into the total;
    `messages` is the request for one (question, answer); `parse` turns a reply into (scores, "") or (None, why)."""

    version: str
    criteria: tuple[tuple[str, int, int, str], ...]

    def messages(self, question: str, answer: str) -> list[dict]: ...

    def parse(self, text: str) -> tuple[dict[str, int] | None, str]: ...


def rubric_range(critic: Critic) -> tuple[int, int]:
    return sum(c[1] for c in critic.criteria), sum(c[2] for c in critic.criteria)


def weak_criteria(critic: Critic, scores: dict[str, int]) -> list[tuple[str, int, int, str]]:
    """(key, score, highest, what it rewards) of every criterion below its maximum: what the reviser is told."""
    return [(key, scores[key], hi, what) for key, _, hi, what in critic.criteria if scores[key] < hi]


def check_agents_config(cfg: ApiSynthConfig, critic: Critic) -> None:
    """Fail early, with one line naming the field and the fix, before any file or network work."""
    ac = cfg.agents
    lo, hi = rubric_range(critic)
    if not lo < ac.threshold <= hi:
        raise ConfigError(
            f"api.agents.threshold: {ac.threshold:g} is outside the {critic.version} rubric's total {lo}-{hi} "
            f"(the round-1 draft would always or never pass); pick a value in ({lo}, {hi}]"
        )
    if ac.critic_base_url or ac.critic_api_key_env:
        check_endpoint(
            ac.critic_base_url or cfg.base_url, ac.critic_api_key_env or cfg.api_key_env, "api.agents.critic_"
        )
    get_revise_prompt(ac.revise_prompt_version)


def critic_endpoint(cfg: ApiSynthConfig) -> Endpoint:
    """The critic's endpoint: its own when api.agents.critic_base_url or critic_api_key_env is set, else the
    drafter's URL and key (read here without a second warning about a missing key)."""
    ac = cfg.agents
    model = ac.critic_model or cfg.model
    if ac.critic_base_url or ac.critic_api_key_env:
        return make_endpoint(
            ac.critic_base_url or cfg.base_url, model, ac.critic_api_key_env or cfg.api_key_env, "api.agents.critic_"
        )
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    return Endpoint(url, model, os.environ.get(cfg.api_key_env) or None, cfg.api_key_env)


def run_synth_api_agents(
    cfg: ApiSynthConfig, critic: Critic | None = None, guard: GuardConfig | CrisisGuard | None = None
) -> dict:
    """`synth api` with every answer critiqued by `critic` (default: the judge's own api.agents.rubric, the prompt
    and parser `cbt-llm eval` scores with) and revised; `guard` as run_synth_api's (every draft passes its output
    check). Returns run_synth_api's summary, whose "agents" entry counts the rounds, stops and totals of this run's
    records."""
    check_config(cfg)
    critic = critic or RubricCritic(RUBRICS[cfg.agents.rubric])
    check_agents_config(cfg, critic)
    out = Path(cfg.out_dir)
    try:
        summary = run_synth_api(cfg, agents=AgentLoop(cfg, critic, critic_endpoint(cfg)), guard=guard)
    except BaseException:
        if (out / RECORDS_FILE).is_file():  # the records written so far still give their pairs
            write_pairs(out, cfg.agents.pair_margin)
        raise
    summary["pairs"] = write_pairs(out, cfg.agents.pair_margin)
    write_metrics(out / SUMMARY_FILE, summary)
    print(f"synth api --agents: {summary['pairs']['pairs']} preference pairs in {out / PAIRS_FILE}", flush=True)
    return summary


def pairs_of(record: dict, margin: float) -> list[dict]:
    """The preference pairs of one agents record: its kept draft against each draft whose total is lower by at
    least `margin` (none when the record keeps no drafts: made before they were kept)."""
    agents = record.get("meta", {}).get("agents", {})
    drafts, scores = agents.get("drafts"), agents.get("scores")
    if not isinstance(drafts, list) or not isinstance(scores, list) or len(drafts) != len(scores):
        return []
    kept = agents.get("kept", 0) - 1
    if not 0 <= kept < len(drafts):
        return []
    best = scores[kept]
    user = build_user_message(record["question"], record.get("description", ""))
    pairs = []
    for i, (text, total) in enumerate(zip(drafts, scores)):
        if i == kept or not isinstance(text, str) or best - total < margin or total >= best or text == drafts[kept]:
            continue
        pairs.append(
            {
                "id": f"{record['id']}-r{i + 1}",
                "messages": [{"role": "user", "content": user}],
                "chosen": drafts[kept],
                "rejected": text,
                "meta": {
                    "source": PAIRS_SOURCE,
                    "record_id": record["id"],
                    "crisis": bool(record.get("meta", {}).get("crisis")),
                    "scores": {"chosen": best, "rejected": total},
                    "rounds": {"chosen": kept + 1, "rejected": i + 1},
                    "margin": best - total,
                    "rubric": agents.get("rubric"),
                    "critic": agents.get("critic"),
                    "model": record.get("meta", {}).get("model"),
                },
            }
        )
    return pairs


def write_pairs(out: Path, margin: float) -> dict:
    """Rewrite out/pairs.jsonl from out/records.jsonl (pairs_of each record, in file order; a line that does not
    parse, such as a crash-cut last one, is skipped); returns {pairs, records_with_pairs, margin, path}."""
    records_path, path = out / RECORDS_FILE, out / PAIRS_FILE
    tmp = path.with_name(f".{PAIRS_FILE}.inprogress")
    n = with_pairs = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        if records_path.is_file():
            with open(records_path, encoding="utf-8") as src:
                for line in src:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    pairs = pairs_of(record, margin) if isinstance(record, dict) else []
                    fh.writelines(dumps(p) + "\n" for p in pairs)
                    n += len(pairs)
                    with_pairs += bool(pairs)
    os.replace(tmp, path)
    return {"pairs": n, "records_with_pairs": with_pairs, "margin": margin, "path": str(path)}


@dataclass
class _Round:
    record: dict
    scores: dict[str, int]
    total: int


@dataclass
class _Tally:
    """This run's records and failures, for the summary."""

    stopped: Counter = field(default_factory=Counter)
    rounds: Counter = field(default_factory=Counter)
    first: list[int] = field(default_factory=list)
    final: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    critic_failures: int = 0
    revise_failures: int = 0


class AgentLoop:
    """run_synth_api's per-question process when api.agents is on: draft, then critique and revise in rounds."""

    def __init__(self, cfg: ApiSynthConfig, critic: Critic, critic_ep: Endpoint):
        self.ac, self.critic, self.critic_ep = cfg.agents, critic, critic_ep
        self.maximum = rubric_range(critic)[1]
        self.tally = _Tally()

    @property
    def key(self) -> str:
        return self.critic_ep.key or ""

    async def process(self, ctx: RunContext, q: dict, ep: Endpoint) -> None:
        record = await settled(ctx, q["id"], self._rounds(ctx, q, ep))
        if record is not None:
            await ctx.queue.put(("record", record))

    async def _rounds(self, ctx: RunContext, q: dict, ep: Endpoint) -> dict:
        spent = [0]  # this record's requests, retries included
        record = await self._ask(ctx, ep, draft_body(ctx.cfg, q), record_acceptor(ctx, q), spent)
        rounds: list[_Round] = []
        while True:
            try:
                scores = await self._ask(ctx, self.critic_ep, self._critique_body(q, record), self._accept(ctx), spent)
            except GiveUp as exc:
                self.tally.critic_failures += 1
                if not rounds:
                    raise GiveUp(f"critic: {exc.reason}", exc.attempts, exc.errors, stage="critic") from None
                return self._finish(rounds, "critic_failed", spent[0], f"critic, round {len(rounds) + 1}: {exc.reason}")
            rounds.append(_Round(record, scores, sum(scores.values())))
            if rounds[-1].total >= self.ac.threshold:
                return self._finish(rounds, "threshold", spent[0])
            if len(rounds) == self.ac.max_rounds:
                return self._finish(rounds, "max_rounds", spent[0])
            try:
                body = draft_body(ctx.cfg, q, self._revise_messages(ctx.cfg, q, rounds[-1]))
                record = await self._ask(ctx, ep, body, record_acceptor(ctx, q), spent)
            except GiveUp as exc:
                self.tally.revise_failures += 1
                return self._finish(rounds, "revise_failed", spent[0], f"revision {len(rounds)}: {exc.reason}")

    @staticmethod
    async def _ask(ctx: RunContext, ep: Endpoint, body: dict, accept, spent: list[int]):
        """synth api's ask, adding the requests it took (retries included) to `spent`."""

        def counted(data: dict, attempt: int):
            value = accept(data, attempt)
            spent[0] += attempt
            return value

        try:
            return await ask(ctx, ep, body, counted)
        except GiveUp as exc:
            spent[0] += exc.attempts
            raise

    def _critique_body(self, q: dict, record: dict) -> dict:
        return {
            "model": self.critic_ep.model,
            "messages": self.critic.messages(q["question"], record["answer"]),
            "temperature": 0.0,
            "max_tokens": self.ac.critic_max_tokens,
        }

    def _accept(self, ctx: RunContext):
        """The critic's acceptor: the scores, Retryable for a first unusable reply, GiveUp for the second."""
        unusable: list[str] = []

        def accept(data: dict, attempt: int) -> dict[str, int]:
            content, finish = content_of(data)
            scores, why = self.critic.parse(content if isinstance(content, str) else "")
            if scores is not None:
                return scores
            hint = " (finish_reason=length: raise api.agents.critic_max_tokens)" if finish == "length" else ""
            unusable.append(ctx.redact(f"critic reply unusable: {why}{hint}"))
            if len(unusable) < CRITIC_TRIES:
                raise Retryable("critic_invalid", unusable[-1])
            ctx.stats.errors["critic_invalid"] += 1
            raise GiveUp(f"{unusable[-1]} ({CRITIC_TRIES} replies)", attempt, ["critic_invalid"] * CRITIC_TRIES)

        return accept

    def _revise_messages(self, cfg: ApiSynthConfig, q: dict, last: _Round) -> list[dict]:
        record = last.record
        return build_revise_messages(
            q["question"],
            q["description"],
            q["keywords"],
            crisis=corpus_is_crisis(q["question"], q["description"]),
            draft={**record["cbt"], "distortions": record["distortions"]},
            weak=weak_criteria(self.critic, last.scores),
            total=last.total,
            maximum=self.maximum,
            version=cfg.prompt_version,
            revise_version=self.ac.revise_prompt_version,
        )

    def _finish(self, rounds: list[_Round], stopped: str, requests: int, error: str | None = None) -> dict:
        """The best-scoring draft (the later on a tie) with its rounds and scores in meta."""
        kept = max(range(len(rounds)), key=lambda i: (rounds[i].total, i))
        best = rounds[kept]
        agents = {
            "rounds": len(rounds),
            "scores": [r.total for r in rounds],
            "criteria": best.scores,
            "kept": kept + 1,
            "stopped": stopped,
            "threshold": self.ac.threshold,
            "max_rounds": self.ac.max_rounds,
            "rubric": self.critic.version,
            "critic": self.critic_ep.model,
            "revise_prompt": self.ac.revise_prompt_version,
            "requests": requests,
        }
        if error:
            agents["error"] = error
        agents["drafts"] = [r.record.get("answer") for r in rounds]  # every round's text: pairs_of reads them
        record = best.record
        record["meta"]["agents"] = agents
        record["meta"]["judge"] = {"total": best.total, "rubric": self.critic.version, "model": self.critic_ep.model}
        t = self.tally
        t.stopped[stopped] += 1
        t.rounds[len(rounds)] += 1
        t.first.append(rounds[0].total)
        t.final.append(best.total)
        t.requests.append(requests)
        return record

    def summary(self) -> dict:
        """This run's records: how they stopped, how many rounds, totals of the first and of the kept draft."""
        t = self.tally

        def mean(xs: list[int]) -> float | None:
            return round(sum(xs) / len(xs), 3) if xs else None

        return {
            "rubric": self.critic.version,
            "critic_model": self.critic_ep.model,
            "threshold": self.ac.threshold,
            "max_rounds": self.ac.max_rounds,
            "stopped": {s: t.stopped[s] for s in STOPS},
            "rounds": {str(k): t.rounds[k] for k in sorted(t.rounds)},
            "mean_first_total": mean(t.first),
            "mean_final_total": mean(t.final),
            "requests_per_record": mean(t.requests),
            "critic_failures": t.critic_failures,
            "revise_failures": t.revise_failures,
        }

    @staticmethod
    def rows(s: dict) -> dict:
        return {
            "reached threshold": s["stopped"]["threshold"],
            "mean judge total (first -> kept)": f"{s['mean_first_total']} -> {s['mean_final_total']}",
            "requests per record": s["requests_per_record"],
            "critic failures": s["critic_failures"],
        }
