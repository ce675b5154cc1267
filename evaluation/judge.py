"""The LLM judge of `cbt-llm eval`: an OpenAI-compatible model scores each answer on a rubric
(cbt_llm/domain/rubrics.py: the rubrics, the judge's prompt and the parser of its reply).

A reply that is not JSON, misses a criterion or is out of range is asked again once (a fresh request); a second bad
reply is a counted failure with its raw text kept in judge_failures.jsonl, never a score of 0. HTTP retries
(429/5xx, timeouts) are the openai client's (`max_retries`); `concurrency` requests are in flight.

judge_cache.jsonl (append-only, flushed per judgement) is keyed by judge model, rubric version, sha256 of the
question and of the answer, and the repeat index: a rerun pays for nothing twice and resumes after a failure.
When every request of a run fails at the HTTP level, the run ends with one line naming eval.judge.base_url (the
judgements so far stay in the cache). The API key is never written anywhere.

Repeats: with `repeats: 2+` each answer is judged again with another request seed; `agreement` compares repeat 0
with repeat 1 (Pearson r and mean absolute difference of the totals, exact agreement per criterion).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path

from cbt_llm.core.config import JudgeConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.rubrics import RUBRICS, Rubric, judge_messages, parse_scores
from cbt_llm.inference.endpoint import api_key


class JudgeError(ConfigError):
    """The judge endpoint answered no request: one line naming eval.judge.base_url."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model: str, rubric: Rubric, question: str, answer: str, repeat: int) -> str:
    return _sha(json.dumps([model, rubric.version, _sha(question), _sha(answer), repeat]))


def signature(model: str, rubric: Rubric, repeats: int) -> str:
    return f"judge:{model}|rubric:{rubric.version}|repeats:{repeats}"


def check_judge_config(jc: JudgeConfig) -> None:
    """Before any generation: the URL, the model, the key's variable, the rubrics."""
    if not jc.base_url:
        return
    if not jc.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"eval.judge.base_url: '{jc.base_url}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    if not jc.model:
        raise ConfigError("eval.judge.model: empty; name the judge model sent in each request")
    if not jc.rubrics:
        raise ConfigError(f"eval.judge.rubrics: empty; pick from {list(RUBRICS)}")
    api_key(jc.api_key_env, "eval.judge")


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def agreement(rubric: Rubric, pairs: list[tuple[dict, dict]]) -> dict:
    """Repeat 0 vs repeat 1 over the answers both judged: Pearson r (None when a side is constant or n < 2) and
    mean absolute difference of the aggregate, and the exact-agreement rate of each criterion."""
    a = [rubric.combine(p) for p, _ in pairs]
    b = [rubric.combine(q) for _, q in pairs]
    n = len(pairs)
    return {
        "n": n,
        "pearson": _pearson(a, b),
        "mean_abs_diff": sum(abs(x - y) for x, y in zip(a, b)) / n if n else None,
        "exact": {k: (sum(p[k] == q[k] for p, q in pairs) / n if n else None) for k in rubric.keys},
    }


class Judge:
    """Judges (question, answer) pairs on the configured rubrics, with its cache and failure log in out_dir."""

    def __init__(self, jc: JudgeConfig, out_dir: str | Path) -> None:
        check_judge_config(jc)
        self.jc = jc
        self.key = api_key(jc.api_key_env, "eval.judge")
        self.rubrics = [RUBRICS[r] for r in dict.fromkeys(jc.rubrics)]
        self.out = Path(out_dir)
        self.cache_path = self.out / "judge_cache.jsonl"
        self.failures_path = self.out / "judge_failures.jsonl"
        self.failures_path.unlink(missing_ok=True)  # this run's failures only (successes stay in the cache)
        self.cache: dict[str, dict] = {}
        if self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.cache[row["key"]] = row["scores"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: judged again

    def _scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key and self.key != "not-needed" else text

    async def _ask(self, client, sem, rubric: Rubric, q: str, a: str, repeat: int, usage: dict):
        """(scores | None, failure | None, http_error | None)."""
        raws = []
        for _ in range(2):  # one fresh request after a bad reply
            async with sem:
                try:
                    reply = await client.chat.completions.create(
                        model=self.jc.model,
                        messages=judge_messages(rubric, q, a),
                        max_tokens=self.jc.max_tokens,
                        temperature=0.0,
                        seed=repeat,
                    )
                except Exception as exc:  # noqa: BLE001 - counted; the run stops only if every request fails
                    return None, None, self._scrub(f"{type(exc).__name__}: {exc}")[:300]
            if reply.usage:
                usage["prompt_tokens"] += reply.usage.prompt_tokens or 0
                usage["completion_tokens"] += reply.usage.completion_tokens or 0
            usage["requests"] += 1
            text = (reply.choices[0].message.content or "") if reply.choices else ""
            scores, why = parse_scores(text, rubric)
            if scores is not None:
                return scores, None, None
            raws.append({"raw": text, "why": why})
        return None, raws, None

    async def _run(self, items: list[tuple[str, str, str]], model_name: str, rubrics: list[Rubric]) -> tuple:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.jc.concurrency)
        usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached": 0}
        judged: dict[tuple[str, int, str], dict] = {}  # (rubric, repeat, answer id) -> scores
        failures, http_errors = [], []
        self.out.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a", encoding="utf-8") as cache_file:

            async def one(rubric: Rubric, repeat: int, qid: str, q: str, a: str) -> None:
                key = cache_key(self.jc.model, rubric, q, a, repeat)
                if key in self.cache:
                    usage["cached"] += 1
                    judged[(rubric.name, repeat, qid)] = self.cache[key]
                    return
                scores, bad, err = await self._ask(client, sem, rubric, q, a, repeat, usage)
                if scores is not None:
                    self.cache[key] = scores
                    judged[(rubric.name, repeat, qid)] = scores
                    row = {"key": key, "judge": self.jc.model, "rubric": rubric.version, "repeat": repeat}
                    cache_file.write(json.dumps({**row, "scores": scores}) + "\n")
                    cache_file.flush()
                elif bad is not None:
                    failures.append(
                        {"model": model_name, "id": qid, "rubric": rubric.version, "repeat": repeat, "replies": bad}
                    )
                else:
                    http_errors.append({"model": model_name, "id": qid, "rubric": rubric.version, "error": err})

            async with AsyncOpenAI(
                base_url=self.jc.base_url, api_key=self.key, timeout=self.jc.timeout_s, max_retries=self.jc.max_retries
            ) as client:
                await asyncio.gather(
                    *(one(r, k, qid, q, a) for r in rubrics for k in range(self.jc.repeats) for qid, q, a in items)
                )
        return judged, usage, failures, http_errors

    def judge(
        self, model_name: str, items: list[tuple[str, str, str]], rubrics: list[str] | None = None
    ) -> tuple[dict, list[dict]]:
        """items: (answer id, question, answer); rubrics: names in RUBRICS (default: eval.judge.rubrics; a session
        transcript is judged on ["ctrs"]). Returns ({rubric: {answer id: [scores per repeat or None]}, with
        "usage", "failures", "http_errors" and "agreement"}, failure rows). Raises JudgeError when every request of
        this run failed at the HTTP level."""
        chosen = [RUBRICS[r] for r in rubrics] if rubrics else self.rubrics
        judged, usage, failures, http_errors = asyncio.run(self._run(items, model_name, chosen))
        if http_errors and usage["requests"] == 0:
            raise JudgeError(
                f"eval.judge.base_url: {self.jc.base_url} answered none of {len(http_errors)} judge requests "
                f"(first failure: {http_errors[0]['error']}); {len(judged)} judgements are kept in "
                f"{self.cache_path}, a rerun resumes from there"
            )
        if failures:
            with self.failures_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in failures)
        scores = {
            r.name: {qid: [judged.get((r.name, k, qid)) for k in range(self.jc.repeats)] for qid, _, _ in items}
            for r in chosen
        }
        agree = {}
        if self.jc.repeats >= 2:
            for r in chosen:
                pairs = [(s[0], s[1]) for s in scores[r.name].values() if s[0] is not None and s[1] is not None]
                agree[r.name] = agreement(r, pairs)
        info = {
            "model": self.jc.model,
            "rubrics": {r.name: r.version for r in chosen},
            "repeats": self.jc.repeats,
            "usage": usage,
            "failures": len(failures),
            "http_errors": len(http_errors),
            "agreement": agree,
        }
        return {"scores": scores, "info": info}, failures


def judge_metrics(judged: dict, jc: JudgeConfig) -> dict[str, dict]:
    """Metric results (no interval yet) from Judge.judge's scores: per answer the mean over its judged repeats;
    an answer no repeat judged is left out and counted in the note."""
    out = {}
    for name, by_id in judged["scores"].items():
        r = RUBRICS[name]
        sig = signature(jc.model, r, jc.repeats)
        per_answer = [[s for s in reps if s is not None] for reps in by_id.values()]
        ok = [reps for reps in per_answer if reps]
        missing = len(per_answer) - len(ok)
        note = f"judged {len(ok)} of {len(per_answer)} answers; {missing} failed (not scored)"
        agg = "total" if r.aggregate == "total" else "mean"
        series = {f"judge-{name}-{agg}": (r.range, [sum(r.combine(s) for s in reps) / len(reps) for reps in ok])}
        for key, lo, hi, _ in r.criteria:
            series[f"judge-{name}-{key}"] = ((lo, hi), [sum(s[key] for s in reps) / len(reps) for reps in ok])
        for metric, ((lo, hi), values) in series.items():
            out[metric] = {
                "score": sum(values) / len(values) if values else None,
                "n": len(values),
                "per_sample": [float(v) for v in values],
                "signature": f"{sig}|scale {lo:g}-{hi:g}",
                "note": note if values else f"not computed: {note}",
            }
    return out
