"""The LLM judge of `cbt-llm pairs` (data_pipeline/synth/model_pairs.py, with pairs.judge.base_url): each sampled
answer's cbt-rubric total (0-18) from an OpenAI-compatible model, by the prompt and parser of `eval.judge`."""

from __future__ import annotations

import asyncio
from collections import Counter

from cbt_llm.core.config import PairsJudgeConfig
from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.rubrics import RUBRICS, judge_messages, parse_scores
from cbt_llm.inference.endpoint import api_key


class PairJudge:
    """The answers' cbt-rubric totals from an OpenAI-compatible judge: the eval judge's prompt and parser
    (cbt_llm.domain.rubrics), temperature 0, an unusable reply asked again once; `concurrency` requests in flight,
    HTTP retries by the openai client."""

    def __init__(self, jc: PairsJudgeConfig):
        if not jc.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"pairs.judge.base_url: '{jc.base_url}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)"
            )
        if not jc.model:
            raise ConfigError("pairs.judge.model: empty; name the judge model sent in each request")
        self.jc, self.rubric = jc, RUBRICS[jc.rubric]
        self.key = api_key(jc.api_key_env, "pairs.judge")
        self.usage = Counter()

    def _scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key and self.key != "not-needed" else text

    async def _one(self, client, sem, question: str, answer: str) -> tuple[dict | None, str]:
        why = ""
        for _ in range(2):  # one fresh request after an unusable reply
            async with sem:
                try:
                    reply = await client.chat.completions.create(
                        model=self.jc.model,
                        messages=judge_messages(self.rubric, question, answer),
                        max_tokens=self.jc.max_tokens,
                        temperature=0.0,
                        seed=0,
                    )
                except Exception as exc:  # noqa: BLE001 - counted; the run stops only if no request succeeds
                    self.usage["http_errors"] += 1
                    return None, self._scrub(f"{type(exc).__name__}: {exc}")[:300]
            self.usage["requests"] += 1
            text = (reply.choices[0].message.content or "") if reply.choices else ""
            scores, why = parse_scores(text, self.rubric)
            if scores is not None:
                return {"total": int(self.rubric.combine(scores)), "criteria": scores}, ""
            self.usage["unusable_replies"] += 1
        return None, f"judge reply unusable twice: {why}"

    async def _all(self, items: list[tuple[str, str]]) -> list[tuple[dict | None, str]]:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.jc.concurrency)
        async with AsyncOpenAI(
            base_url=self.jc.base_url, api_key=self.key, timeout=self.jc.timeout_s, max_retries=self.jc.max_retries
        ) as client:
            return await asyncio.gather(*(self._one(client, sem, q, a) for q, a in items))

    def judge(self, items: list[tuple[str, str]]) -> list[tuple[dict | None, str]]:
        """(question, answer) -> ({"total", "criteria"} or None, why not). Raises ConfigError when no request of a
        run has ever been answered and every one of these failed at the HTTP level."""
        if not items:
            return []
        out = asyncio.run(self._all(items))
        if self.usage["requests"] == 0 and all(j is None for j, _ in out):
            raise ConfigError(
                f"pairs.judge.base_url: {self.jc.base_url} answered none of {len(items)} judge requests (first "
                f"failure: {out[0][1]}); check the URL, pairs.judge.model and the key"
            )
        return out
