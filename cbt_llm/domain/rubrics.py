"""The judge's rubrics: what an LLM judge is asked to score, the prompt it gets and the parser of its reply.

Rubrics (each with a version string that goes into every signature and cache key):
  cbt          six criteria on the 0-18 scale AutoCBT's comparison table uses: the five CBT parts (empathy 0-2,
               identification of the key thought or distortion 0-4, reflection/challenge 0-3, strategy 0-4,
               encouragement 0-1) and relevance 0-4; reported as the total and per criterion
  counselling  seven qualities rated 1-10 (active listening, empathy and validation, safety and trustworthiness,
               open-mindedness and non-judgment, clarity and encouragement, boundaries and ethics, holistic
               approach); reported as their mean and per quality
  ctrs         for session transcripts (`cbt-llm eval --sessions`): the six CTRS items Cactus scores sessions on,
               each 0-6 (understanding, interpersonal effectiveness, collaboration, guided discovery, focus on key
               cognitions or behaviours, strategy for change); total 0-36

The judge replies with one JSON object, one integer per criterion (a ```json fence is tolerated); parse_scores says
why a reply is not one. `cbt-llm eval` (evaluation.judge) and `synth api --agents` (its critic) use the same
prompt and parser, so a synthesised answer is scored exactly as eval would score it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cbt_llm.domain.cbt import CBT_PARTS


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    criteria: tuple[tuple[str, int, int, str], ...]  # (key, lowest, highest, what it rewards)
    aggregate: str  # "total" (sum of criteria) or "mean" (mean of criteria)
    # what the judge is asked to read, and the headings of the two parts of its request
    task: str = "评价一段中文心理咨询回答的质量。请逐项独立打分,只看回答本身,不因回答长短而加减分。"
    question_label: str = "【来访者的问题】"
    answer_label: str = "【咨询师的回答】"

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


def _cbt_part_criteria() -> tuple[tuple[str, int, int, str], ...]:
    """The cbt rubric's criteria for the five parts, keyed and ordered by CBT_PARTS."""
    scale = {
        "empathy": (0, 2, "是否理解并接纳来访者的感受,语气温暖"),
        "key_thought": (0, 4, "是否准确指出来访者的核心想法或认知歪曲"),
        "challenge": (0, 3, "是否引导来访者反思、检验或质疑这个想法"),
        "strategy": (0, 4, "是否给出具体可行、符合认知行为疗法的应对方法"),
        "encouragement": (0, 1, "是否给予鼓励和希望"),
    }
    return tuple((part, *scale[part]) for part in CBT_PARTS)


RUBRICS: dict[str, Rubric] = {
    "cbt": Rubric(
        "cbt",
        "cbt-v1",
        (
            *_cbt_part_criteria(),
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
    # Cactus's session-level subset of the Cognitive Therapy Rating Scale (CTRS), each item 0-6; for transcripts of
    # `cbt-llm eval --sessions`, never for single answers (eval.judge.rubrics does not offer it)
    "ctrs": Rubric(
        "ctrs",
        "ctrs-v1",
        (
            ("understanding", 0, 6, "理解:准确把握来访者说出和没说出的想法与感受,并让来访者感到被理解"),
            ("interpersonal_effectiveness", 0, 6, "人际效能:温暖、真诚、专业,建立信任的咨询关系"),
            ("collaboration", 0, 6, "合作:与来访者共同设定议程和目标,一起决定下一步做什么"),
            ("guided_discovery", 0, 6, "引导式发现:用提问引导来访者自己发现新的看法,而不是说教或辩论"),
            ("focus", 0, 6, "聚焦关键认知或行为:找到与困扰最相关的具体想法或行为,并围绕它持续工作"),
            ("strategy", 0, 6, "改变策略:有连贯、适合这位来访者的CBT改变策略(如思维记录、行为实验)"),
        ),
        "total",
        "按认知治疗评定量表(CTRS)评价一次中文认知行为疗法多轮咨询会谈中咨询师的表现。请逐项独立打分,"
        "看整次会谈,不因会谈长短而加减分。",
        "【来访者的基本情况】",
        "【会谈记录】",
    ),
}

_VERSION_LINE = "评分标准版本: "


def judge_messages(rubric: Rubric, question: str, answer: str) -> list[dict]:
    lines = [f"- {key}({lo}-{hi}分):{what}" for key, lo, hi, what in rubric.criteria]
    keys = ", ".join(f'"{k}"' for k in rubric.keys)
    system = (
        f"你是一名心理咨询督导,负责{rubric.task}\n评分项:\n" + "\n".join(lines) + "\n只输出一个JSON对象,不要任何解释,"
        f"键依次为 {keys},每个值是该项分数范围内的整数。"
    )
    user = f"{_VERSION_LINE}{rubric.version}\n{rubric.question_label}\n{question}\n{rubric.answer_label}\n{answer}"
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
    """`synth api --agents`' critic: the judge's prompt and parser for one rubric, so a synthesised answer is
    scored exactly as `cbt-llm eval` would score it."""

    def __init__(self, rubric: Rubric):
        self.rubric, self.version, self.criteria = rubric, rubric.version, rubric.criteria

    def messages(self, question: str, answer: str) -> list[dict]:
        return judge_messages(self.rubric, question, answer)

    def parse(self, text: str) -> tuple[dict[str, int] | None, str]:
        return parse_scores(text, self.rubric)
