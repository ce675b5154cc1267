"""Versioned CBT prompts for `cbt-llm synth api` (the paper's method).

A prompt version is frozen once records have been generated with it: every record stores
`meta.prompt_version`, so a corpus can always be traced back to the exact wording that produced it.
To change the wording, add a new version ("v2") instead of editing "v1".

`synth api --agents` adds the revision prompts (REVISE_PROMPTS, versioned the same way, stored in
`meta.agents.revise_prompt`): the draft goes back to the model as its own turn, followed by the supervisor's
feedback, which names each rubric criterion scored below its maximum.

The model is asked for one JSON object with exactly the five CBT parts of cbt_llm.domain.cbt.CBT_PARTS
(plus an optional list of cognitive-distortion labels), so replies can be validated field by field instead of
being split out of free prose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.cbt import CBT_PART_TITLES_ZH, CBT_PARTS, DISTORTIONS
from cbt_llm.domain.crisis import NATIONAL_CRISIS_HOTLINE


@dataclass(frozen=True)
class CBTPrompt:
    """One frozen prompt version: the system prompt and the templates of the user message."""

    version: str
    system: str
    user_template: str
    crisis_instruction: str


_PARTS_SPEC = "\n".join(f'- "{p}":{CBT_PART_TITLES_ZH[p]}' for p in CBT_PARTS)

_V1_SYSTEM = f"""你是一名经验丰富的心理咨询师,专长于认知行为疗法(CBT)。请以心理咨询师的身份,用温暖、专业、通俗的中文回答来访者的问题。

回答必须严格遵循认知行为疗法的五个步骤,依次为:
1. 验证和共情:理解并接纳来访者的感受,让对方感到被倾听。
2. 识别关键思维或信念:指出问题背后可能存在的自动化思维、核心信念或认知扭曲。
3. 提出挑战或反思:用温和的苏格拉底式提问,引导来访者检验这些想法是否符合事实。
4. 提供策略或见解:给出具体、可操作的方法(如思维记录、行为实验、放松练习等)。
5. 鼓励与前瞻:给予鼓励和希望,并说明如果困扰持续或加重,可能需要寻求更专业的支持(如心理咨询师或精神科医生)。

只输出一个 JSON 对象,不要输出任何其他文字,不要使用 Markdown。JSON 对象恰好包含以下五个字段,每个字段的值都是一段非空的中文文本(不要写小标题或序号):
{_PARTS_SPEC}

另外可以包含一个可选字段 "distortions":一个字符串列表,列出你在问题中识别到的认知扭曲,只能使用以下标签:{", ".join(DISTORTIONS)}。没有识别到时给出空列表。"""

_V1_USER = """来访者的问题:{question}
问题描述:{description}
关键词:{keywords}

请按照要求输出 JSON 对象。"""

# v1 is frozen as sent: it named the older line 400-161-9995 (cbt_llm/domain/crisis_hotlines.json, id hope24).
_V1_CRISIS = (
    "注意:来访者提到了自杀、自伤或类似的危机念头。请在回答中认真对待这一风险,"
    '并在 "encouragement" 字段中明确提供危机支持信息:建议立刻联系身边信任的人、'
    "拨打心理援助热线(如全国心理援助热线 400-161-9995)或前往最近的医院急诊。"
)
# v2 = v1 with the national line of the crisis policy (cbt_llm/domain/crisis.py, the 2025 number). A new number in
# the policy changes this text, so it also needs a new prompt version (tests/unit/data_pipeline/test_synth_api.py pins the text).
_V2_CRISIS = _V1_CRISIS.replace("全国心理援助热线 400-161-9995", NATIONAL_CRISIS_HOTLINE)

PROMPTS: dict[str, CBTPrompt] = {
    "v1": CBTPrompt(version="v1", system=_V1_SYSTEM, user_template=_V1_USER, crisis_instruction=_V1_CRISIS),
    "v2": CBTPrompt(version="v2", system=_V1_SYSTEM, user_template=_V1_USER, crisis_instruction=_V2_CRISIS),
}


def get_prompt(version: str) -> CBTPrompt:
    """Return the frozen prompt `version`; raises ConfigError naming the valid versions."""
    try:
        return PROMPTS[version]
    except KeyError:
        raise ConfigError(
            f"api.prompt_version: unknown prompt version '{version}'; valid: {', '.join(sorted(PROMPTS))}"
        ) from None


def build_messages(
    question: str, description: str, keywords: list[str], *, crisis: bool, version: str = "v2"
) -> list[dict[str, str]]:
    """Chat messages (system + user) for one question. `crisis` adds the crisis-support instruction."""
    prompt = get_prompt(version)
    user = prompt.user_template.format(
        question=question.strip(),
        description=description.strip() or "(无)",
        keywords=",".join(keywords) if keywords else "(无)",
    )
    if crisis:
        user = f"{user}\n\n{prompt.crisis_instruction}"
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class RevisePrompt:
    """One frozen revision prompt: the feedback turn that follows the draft, and its line per weak criterion."""

    version: str
    feedback_template: str
    weak_line: str


_REVISE_V1_FEEDBACK = """督导按认知行为疗法的评分标准给你的回答打了 {total:g} 分(满分 {maximum:g} 分)。以下几项还没有达到满分,请重点改进:
{weak}

请修改你的回答:保留已经做得好的部分,针对上面每一项具体加强,并紧扣来访者的具体处境。仍然只输出一个 JSON 对象,包含同样的五个字段(可以附上 "distortions"),不要输出任何其他文字。"""
_REVISE_V1_LINE = "- {name}:{score}/{highest} 分。评分标准:{what}"

REVISE_PROMPTS: dict[str, RevisePrompt] = {
    "revise-v1": RevisePrompt("revise-v1", _REVISE_V1_FEEDBACK, _REVISE_V1_LINE),
}


def get_revise_prompt(version: str) -> RevisePrompt:
    """Return the frozen revision prompt `version`; raises ConfigError naming the valid versions."""
    try:
        return REVISE_PROMPTS[version]
    except KeyError:
        raise ConfigError(
            f"api.agents.revise_prompt_version: unknown version '{version}'; valid: {', '.join(sorted(REVISE_PROMPTS))}"
        ) from None


def criterion_name(key: str) -> str:
    """A criterion as the reviser reads it: a CBT part by its JSON field and title, anything else by its key."""
    return f'"{key}"({CBT_PART_TITLES_ZH[key]})' if key in CBT_PART_TITLES_ZH else f"整体({key})"


def build_revise_messages(
    question: str,
    description: str,
    keywords: list[str],
    *,
    crisis: bool,
    draft: dict,
    weak: list[tuple[str, int, int, str]],
    total: float,
    maximum: float,
    version: str = "v2",
    revise_version: str = "revise-v1",
) -> list[dict[str, str]]:
    """The draft's own conversation (build_messages), the draft as the assistant's turn, then the feedback.

    `weak` lists (criterion key, score, highest, what it rewards) for every criterion below its maximum; a crisis
    question gets the crisis instruction again after the feedback, so a revision never drops the support.
    """
    prompt = get_revise_prompt(revise_version)
    lines = [prompt.weak_line.format(name=criterion_name(k), score=s, highest=hi, what=what) for k, s, hi, what in weak]
    feedback = prompt.feedback_template.format(total=total, maximum=maximum, weak="\n".join(lines))
    if crisis:
        feedback = f"{feedback}\n\n{get_prompt(version).crisis_instruction}"
    return [
        *build_messages(question, description, keywords, crisis=crisis, version=version),
        {"role": "assistant", "content": json.dumps(draft, ensure_ascii=False)},
        {"role": "user", "content": feedback},
    ]


# ---------------------------------------------------------------------------------------------- sessions

# The counsellor's system prompt in multi-turn sessions (synth template --sessions writes it into every session;
# synth api --sessions and eval --sessions build on it).
SESSION_SYSTEM_PROMPT = (
    "你是一名经验丰富的心理咨询师，专长于认知行为疗法（CBT）。你正在和来访者进行一次多轮的咨询会谈："
    "先问候并共同设定议程，了解具体情境，识别情绪背后的自动化思维，用温和的苏格拉底式提问检验它，"
    "和来访者一起练习一项CBT技术，商定家庭作业，最后总结并请来访者反馈。每次只说一段话，多倾听、多提问，"
    "用温暖、通俗的中文交流。如果来访者提到自杀、自伤或伤害他人的念头，先直接询问其安全状况并提供心理援助热线，"
    "安全永远优先于任何技术练习。"
)

END_MARKER = "[END_SESSION]"

COUNSELLOR_PROMPT = (
    SESSION_SYSTEM_PROMPT
    + "每次只以咨询师的身份说一段话，然后等待来访者回应；不要替来访者说话，也不要写“咨询师：”“来访者：”之类的角色标签。"
    + f"当你完成总结、听取了来访者的反馈，会谈自然结束时，在最后一段话的末尾写上 {END_MARKER}。"
)
# The counsellor's first request needs a user message: many chat templates refuse a conversation without one.
KICKOFF = "（来访者已经到了，请你开始这次会谈。）"
CLIENT_RULES = (
    "请始终以来访者的身份、用第一人称和口语化的中文回应咨询师，每次只说一段话（一到四句）。"
    "不要替咨询师说话，不要写任何角色标签，不要给自己提建议或做总结。"
    "你可以犹豫、怀疑，甚至一时说“这没用”，但愿意慢慢说出自己的经历、感受和想法。"
)
CLIENT_CRISIS = "在会谈的前半段，你会说出自己最难受的时候有过轻生或伤害自己的念头；咨询师问到安全时，请如实回答。"


def client_prompt(intake: dict, client: dict) -> str:
    """The client simulator's system prompt, from an intake and the client behind it (intake_at's pair, or a
    PsyQA question's)."""
    lines = ["你在扮演一位来访者，正在和一位心理咨询师进行认知行为疗法（CBT）咨询。你的情况如下："]
    if client.get("persona"):
        lines.append(f"- 身份：{client['persona']}，{client['age']}岁")
    if intake.get("setting"):
        lines.append(f"- 咨询地点：{intake['setting']}")
    lines.append(f"- 困扰：{client.get('duration', '')}{intake['presenting_problem']}")
    if intake.get("situation"):
        lines.append(f"- 最近的具体情境：{intake['situation']}")
    if client.get("feelings"):
        lines.append(f"- 当时的感受：{'，'.join(client['feelings'])}")
    if intake.get("automatic_thought"):
        lines.append(f"- 脑子里常冒出的想法：“{intake['automatic_thought']}”（等咨询师问到时再慢慢说出来）")
    if intake.get("keywords"):
        lines.append(f"- 关键词：{'、'.join(intake['keywords'])}")
    lines.append(CLIENT_RULES)
    if client.get("crisis"):
        lines.append(CLIENT_CRISIS)
    return "\n".join(lines)
