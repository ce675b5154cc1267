"""Flawed CBT answers, built from a record's five parts: the rejected side of template pairs (pairs.py) and the
flawed share of a template corpus (synth.flawed_fraction, template.py). The flaws:

    missing_part       one of the five parts left out (never empathy on a crisis question, which holds its crisis
                       support)
    order              the five parts in a drawn order other than the canonical one
    no_empathy         advice without empathy: the empathy part dropped and the strategy moved first (strategy,
                       key thought, challenge, encouragement); non-crisis questions only
    no_crisis_support  (pairs only) a crisis question answered without its crisis-support sentence
    unsafe             (pairs only) one short harmful line added after the strategy, of the kinds the crisis guard's
                       output check stops; deliberately vague: no method, means or dose is ever written

A corpus record carries only the first three: it must stay schema-valid and safe to train on.
"""

from __future__ import annotations

import itertools

from cbt_llm.domain.cbt import CBT_PARTS
from cbt_llm.domain.crisis import CRISIS_SUPPORT_SENTENCE
from data_pipeline.synth.draws import PPM, digest

FLAWS = ("missing_part", "order", "no_empathy", "no_crisis_support", "unsafe")

# Short harmful lines of the kinds the guard's output check stops (secrecy_discourages_help): each turns the person
# away from help or asks them to keep it secret. None names a method, a means or a dose.
UNSAFE_LINES: tuple[str, ...] = (
    "其实心理咨询都是骗钱的，没必要去。",
    "这些事别告诉任何人，自己扛着就好。",
    "热线都没用，打了也没人真的在乎。",
    "不用去看医生，过段时间自己就好了。",
    "觉得药没效果的话，直接停药就行。",
    "别告诉家人，他们只会更担心。",
)
# every order of the five parts but the canonical one, in a fixed order
_ORDERS = tuple(p for p in itertools.permutations(range(len(CBT_PARTS))) if list(p) != sorted(p))
_NO_EMPATHY = ("strategy", "key_thought", "challenge", "encouragement")


def flaw_thresholds(mix: dict[str, float]) -> list[tuple[int, str]]:
    """(cumulative ppm bound, flaw) in FLAWS order over the flaws with weight > 0; the last bound is PPM."""
    total = sum(w for w in mix.values() if w > 0)
    out, acc = [], 0.0
    for f in FLAWS:
        w = mix.get(f, 0.0)
        if w > 0:
            acc += w
            out.append((round(acc / total * PPM), f))
    out[-1] = (PPM, out[-1][1])
    return out


def flawed_parts(h: int, cbt: dict[str, str], crisis: bool, flaw: str) -> tuple[int, list[str], dict]:
    """The paragraphs of a `flaw`ed answer built from the five parts `cbt` (crisis: the record is a crisis question),
    with its flaw_detail; draws from h what the flaw needs and returns the rest (see the module docstring)."""
    parts = list(CBT_PARTS)
    if flaw == "missing_part":
        choices = parts[1:] if crisis else parts
        h, r = divmod(h, len(choices))
        detail = {"part": choices[r]}
        out = [cbt[p] for p in parts if p != choices[r]]
    elif flaw == "order":
        h, r = divmod(h, len(_ORDERS))
        order = [parts[i] for i in _ORDERS[r]]
        detail = {"order": order}
        out = [cbt[p] for p in order]
    elif flaw == "no_empathy":
        detail = {"order": list(_NO_EMPATHY)}
        out = [cbt[p] for p in _NO_EMPATHY]
    elif flaw == "no_crisis_support":
        detail = {"removed": CRISIS_SUPPORT_SENTENCE}
        out = [cbt[p].replace(CRISIS_SUPPORT_SENTENCE, "") for p in parts]
    else:  # unsafe
        h, r = divmod(h, len(UNSAFE_LINES))
        detail = {"line": UNSAFE_LINES[r]}
        out = [cbt[p] + UNSAFE_LINES[r] if p == "strategy" else cbt[p] for p in parts]
    return h, out, detail


# synth.flawed_fraction
# The flaws a corpus record may carry: its record must stay schema-valid (a crisis record keeps its crisis support)
# and safe to train on, so no_crisis_support and unsafe are pair-only.
CORPUS_FLAWS = ("missing_part", "order", "no_empathy")


def _flawed_prefix(seed: int) -> bytes:
    return f"cbt-llm/synth-template-flawed/v1/{seed}/".encode()


def corpus_flaw_thresholds(mix: dict[str, float]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """flaw_thresholds for non-crisis and for crisis records (no no_empathy: the empathy part holds the crisis
    support); a side with no flaw of positive weight is []."""
    plain = {f: w for f, w in mix.items() if f in CORPUS_FLAWS and w > 0}
    crisis = {f: w for f, w in plain.items() if f != "no_empathy"}
    return (flaw_thresholds(plain) if plain else [], flaw_thresholds(crisis) if crisis else [])


class CorpusFlaws:
    """synth.flawed_fraction: whether record i of a template corpus gets a flawed answer, and which. A pure function
    of (seed, i, fraction, mix) from its own BLAKE2b digest, so the record's own draws (question, parts) are those of
    the unflawed corpus and only its answer changes; fraction 0 changes nothing."""

    def __init__(self, seed: int, fraction: float, mix: dict[str, float]):
        self.prefix, self.ppm = _flawed_prefix(seed), round(fraction * PPM)
        self.thresholds = corpus_flaw_thresholds(mix)

    def apply(self, record: dict, index: int) -> None:
        """Flaw `record` in place when it is drawn (answer rebuilt from the flawed paragraphs, meta.flaw and
        meta.flaw_detail added; cbt keeps the five parts as drawn)."""
        if not self.ppm:
            return
        h, r = divmod(digest(self.prefix, index), PPM)
        crisis = record["meta"]["crisis"]
        thresholds = self.thresholds[1 if crisis else 0]
        if r >= self.ppm or not thresholds:
            return
        h, r = divmod(h, PPM)
        flaw = next(f for bound, f in thresholds if r < bound)
        _, paragraphs, detail = flawed_parts(h, record["cbt"], crisis, flaw)
        record["answer"] = "\n\n".join(paragraphs)
        record["meta"]["flaw"] = flaw
        record["meta"]["flaw_detail"] = detail
