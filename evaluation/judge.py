"""An LLM judge for `cbt-llm eval` (issue 11): an OpenAI-compatible model scores each answer on a rubric.

Rubrics (each with a version string that goes into every signature and cache key):
  cbt          six criteria on the 0-18 scale AutoCBT's comparison table uses: empathy 0-2, identification of the
               key thought or distortion 0-4, reflection/challenge 0-3, strategy 0-4, encouragement 0-1,
               relevance 0-4; reported as the total and per criterion
  counselling  seven qualities rated 1-10 (active listening, empathy and validation, safety and trustworthiness,
               open-mindedness and non-judgment, clarity and encouragement, boundaries and ethics, holistic
               approach); reported as their mean and per quality

The judge replies with one JSON object, one integer per criterion (a ```json fence is tolerated). A reply that is
not JSON, misses a criterion or is out of range is asked again once (a fresh request); a second bad reply is a
counted failure with its raw text kept in judge_failures.jsonl, never a score of 0. HTTP retries (429/5xx,
timeouts) are the openai client's (`max_retries`); `concurrency` requests are in flight.

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
import re
from dataclasses import dataclass
from pathlib import Path

from cbt_llm.config import ConfigError, JudgeConfig
from evaluation.endpoint import api_key


class JudgeError(ConfigError):
    """The judge endpoint answered no request: one line naming eval.judge.base_url."""


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    criteria: tuple[tuple[str, int, int, str], ...]  # (key, lowest, highest, what it rewards)
    aggregate: str  # "total" (sum of criteria) or "mean" (mean of criteria)

    @property
    def keys(self) -> list[str]:
        return [c[0] for c in self.criteria]

    @property
    def range(self) -> tuple[float, float]:
        lo, hi = [c[1] for c in self.criteria], [c[2] for c in self.criteria]
        if self.aggregate == "total":
            return float(sum(lo)), float(sum(hi))
        return float(min(lo)), float(max(hi))

    def combine(self, scores: dict[str, int]) -> float:
        values = [scores[k] for k in self.keys]
        return float(sum(values)) if self.aggregate == "total" else sum(values) / len(values)


RUBRICS: dict[str, Rubric] = {
    "cbt": Rubric(
        "cbt",
        "cbt-v1",
        (
            ("empathy", 0, 2, "是否理解并接纳来访者的感受,语气温暖"),
            ("key_thought", 0, 4, "是否准确指出来访者的核心想法或认知歪曲"),
            ("challenge", 0, 3, "是否引导来访者反思、检验或质疑这个想法"),
            ("strategy", 0, 4, "是否给出具体可行、符合认知行为疗法的应对方法"),
            ("encouragement", 0, 1, "是否给予鼓励和希望"),
            ("relevance", 0, 4, "回答是否紧扣来访者的具体处境,而不是泛泛而谈"),
        ),
        "total",
    ),
    "counselling": Rubric(
        "counselling",
        "counselling-v1",
        (
            ("listening", 1, 10, "积极倾听:回应中体现出对来访者所说内容的准确把握"),
            ("empathy", 1, 10, "共情与认可:承认并肯定来访者的情绪"),
            ("safety", 1, 10, "安全与可信:不造成伤害,在有风险时提供求助途径"),
            ("open_mind", 1, 10, "开放与不评判:不指责、不贴标签"),
            ("clarity", 1, 10, "清晰与鼓励:表达清楚,给人以力量"),
            ("boundaries", 1, 10, "边界与伦理:不越界诊断或开药,必要时建议专业帮助"),
            ("holistic", 1, 10, "整体视角:考虑来访者的生活、关系与处境的整体"),
        ),
        "mean",
    ),
}

_VERSION_LINE = "评分标准版本: "
_ANSWER_MARK = "【咨询师的回答】"


def judge_messages(rubric: Rubric, question: str, answer: str) -> list[dict]:
    lines = [f"- {key}({lo}-{hi}分):{what}" for key, lo, hi, what in rubric.criteria]
    keys = ", ".join(f'"{k}"' for k in rubric.keys)
    system = (
        "你是一名心理咨询督导,负责评价一段中文心理咨询回答的质量。请逐项独立打分,只看回答本身,"
        "不因回答长短而加减分。\n评分项:\n" + "\n".join(lines) + "\n只输出一个JSON对象,不要任何解释,"
        f"键依次为 {keys},每个值是该项分数范围内的整数。"
    )
    user = f"{_VERSION_LINE}{rubric.version}\n【来访者的问题】\n{question}\n{_ANSWER_MARK}\n{answer}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_scores(text: str, rubric: Rubric) -> tuple[dict[str, int] | None, str]:
    """(scores, "") for a valid reply, else (None, why)."""
    m = _FENCE.search(text or "")
    body = (m.group(1) if m else text or "").strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None, "not JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    scores = {}
    for key, lo, hi, _ in rubric.criteria:
        v = obj.get(key)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            return None, f"{key}: missing or not an integer"
        if not lo <= v <= hi:
            return None, f"{key}: {v} outside {lo}-{hi}"
        scores[key] = v
    return scores, ""


class RubricCritic:
    """`synth api --agents`' critic (data_pipeline.synth_agents.Critic): this judge's prompt and parser for one
    rubric, so a synthesised answer is scored exactly as `cbt-llm eval` would score it."""

    def __init__(self, rubric: Rubric):
        self.rubric, self.version, self.criteria = rubric, rubric.version, rubric.criteria

    def messages(self, question: str, answer: str) -> list[dict]:
        return judge_messages(self.rubric, question, answer)

    def parse(self, text: str) -> tuple[dict[str, int] | None, str]:
        return parse_scores(text, self.rubric)


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

    async def _run(self, items: list[tuple[str, str, str]], model_name: str) -> tuple[dict, dict, list, list]:
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
                    *(one(r, k, qid, q, a) for r in self.rubrics for k in range(self.jc.repeats) for qid, q, a in items)
                )
        return judged, usage, failures, http_errors

    def judge(self, model_name: str, items: list[tuple[str, str, str]]) -> tuple[dict, list[dict]]:
        """items: (answer id, question, answer). Returns ({rubric: {answer id: [scores per repeat or None]}, with
        "usage", "failures", "http_errors" and "agreement"}, failure rows). Raises JudgeError when every request of
        this run failed at the HTTP level."""
        judged, usage, failures, http_errors = asyncio.run(self._run(items, model_name))
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
            for r in self.rubrics
        }
        agree = {}
        if self.jc.repeats >= 2:
            for r in self.rubrics:
                pairs = [(s[0], s[1]) for s in scores[r.name].values() if s[0] is not None and s[1] is not None]
                agree[r.name] = agreement(r, pairs)
        info = {
            "model": self.jc.model,
            "rubrics": {r.name: r.version for r in self.rubrics},
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
