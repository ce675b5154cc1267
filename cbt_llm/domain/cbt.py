"""The CBT knowledge every stage shares: the five parts of an answer, in order, and the cognitive distortions.

An answer in CBT-LLM's structure has five parts, always in this order: validation and empathy, identifying the key
thought or belief, a challenge or reflection, a strategy or insight, and encouragement and foresight (which also
says more professional support may be needed). The corpus schema, the prompts, the judge's rubric, the structure
scorer and the generators all take the parts from here.
"""

from __future__ import annotations

# The five CBT parts, in the order an answer must follow.
CBT_PARTS: tuple[str, ...] = ("empathy", "key_thought", "challenge", "strategy", "encouragement")
CBT_PART_TITLES_ZH: dict[str, str] = {
    "empathy": "验证和共情",
    "key_thought": "识别关键思维或信念",
    "challenge": "提出挑战或反思",
    "strategy": "提供策略或见解",
    "encouragement": "鼓励与前瞻",
}

# Cognitive distortion labels (Beck / Burns).
DISTORTIONS: tuple[str, ...] = (
    "all_or_nothing",
    "overgeneralization",
    "catastrophizing",
    "mind_reading",
    "should_statements",
    "labeling",
    "emotional_reasoning",
    "personalization",
)


def join_answer(cbt: dict[str, str]) -> str:
    """Join the five parts into one answer, in CBT order, as paragraphs of prose (no headings)."""
    return "\n\n".join(cbt[p].strip() for p in CBT_PARTS)
