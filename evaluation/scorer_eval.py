"""How well the structure scorer (cbt_llm/domain/structure.py) labels answers it never trained on: per-segment
recall and precision, part presence and order agreement on hand-written labelled answers and their variants (a part
removed, parts shuffled). bench/structure_bench.py reports these on tests/data/structure_handwritten.jsonl."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from cbt_llm.domain.cbt import CBT_PARTS
from cbt_llm.domain.structure import LABELS, StructureScorer, split_sentences, structure_of


def variants(answer: dict, rng: random.Random) -> list[dict]:
    """Labelled answers derived from one ({id, layout, segments: [{label, text}]}): as written, each part removed
    in turn, shuffled, and two parts removed then shuffled. The shuffles never keep the original order."""

    def make(kind: str, segs: list[dict]) -> dict:
        return {"id": f"{answer['id']}/{kind}", "layout": answer["layout"], "segments": segs}

    segs = answer["segments"]
    out = [make("full", segs)]
    for part in CBT_PARTS:
        kept = [s for s in segs if s["label"] != part]
        if len(kept) < len(segs):
            out.append(make(f"no-{part}", kept))

    def shuffled(items: list[dict]) -> list[dict]:
        order = list(range(len(items)))
        while len(items) > 1 and order == sorted(order):
            rng.shuffle(order)
        return [items[i] for i in order]

    out.append(make("shuffled", shuffled(segs)))
    drop = set(rng.sample(CBT_PARTS, 2))
    out.append(make("two-removed-shuffled", shuffled([s for s in segs if s["label"] not in drop])))
    return out


def answer_text(answer: dict) -> str:
    """The answer as a model would write it: paragraphs apart by a blank line, or one paragraph."""
    texts = [s["text"] for s in answer["segments"]]
    return "".join(texts) if answer["layout"] == "one_paragraph" else "\n\n".join(texts)


def longest_shared(texts: Iterable[str], refs: Iterable[str], cap: int = 40) -> tuple[int, str, str]:
    """The longest substring (up to `cap` characters) that any of `texts` shares with any of `refs`: (length,
    substring, the text it is in). How near the hand-written banks come to the answers they are measured on."""
    refs = list(refs)
    grams = [set()] + [{r[i : i + k] for r in refs for i in range(len(r) - k + 1)} for k in range(1, cap + 1)]
    best = (0, "", "")
    for t in texts:
        k = best[0] + 1  # only a longer one matters; a text sharing k characters shares every length below k
        while k <= cap and (
            hit := next((t[i : i + k] for i in range(len(t) - k + 1) if t[i : i + k] in grams[k]), None)
        ):
            best, k = (k, hit, t), k + 1
    return best


def _ratio(hits: int, n: int) -> dict:
    return {"n": n, "accuracy": hits / n if n else None}


def _unit(answer: dict) -> str:
    """The unit the scorer would cut a labelled answer into: sentences when it is one paragraph."""
    return "sentences" if answer["layout"] == "one_paragraph" else "paragraphs"


def _segment_accuracy(gold: Sequence[str], pred: Sequence[str]) -> dict:
    """Overall accuracy and, per label, recall (`accuracy`) with its n and precision."""
    per = {}
    for lab in LABELS:
        called = sum(p == lab for p in pred)
        hit = sum(g == p == lab for g, p in zip(gold, pred))
        per[lab] = {**_ratio(hit, sum(g == lab for g in gold)), "precision": hit / called if called else None}
    return {"n": len(gold), "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold), "per_label": per}


def _labelled(scorer: StructureScorer, answers: Iterable[dict]) -> tuple[list[str], list[str]]:
    """(gold, predicted) labels of every segment, each answer decoded on its own in its unit."""
    gold, pred = [], []
    for a in answers:
        gold += [s["label"] for s in a["segments"]]
        pred += scorer.label([s["text"] for s in a["segments"]], _unit(a))
    return gold, pred


def as_sentences(answer: dict) -> dict:
    """The answer written as one paragraph and cut into sentences, each labelled as the segment it is in."""
    segs = [{"label": s["label"], "text": t} for s in answer["segments"] for t in split_sentences(s["text"])]
    return {**answer, "layout": "one_paragraph", "segments": segs}


def evaluate_scorer(scorer: StructureScorer, answers: Sequence[dict], seed: int = 0) -> dict:
    """Accuracy of the scorer on labelled answers ({id, layout, segments: [{label, text}]}):

    segments   per label: recall (the accuracy on segments of that label) with its n, and precision; each answer
               decoded on its own, in the unit its layout gives (sentences for one paragraph)
    shuffled   the same over the shuffled variants (variants()): what the order prior costs when the order breaks
    sentences  the same with every answer written as one paragraph and labelled sentence by sentence
    presence   per part, over every variant: how often "the part is present" is called right
    coverage   over every variant: exact-match rate and mean absolute error of coverage
    order      mean absolute error of order agreement, over variants where both are defined
    """
    gold, pred = _labelled(scorer, answers)
    confusion = {g: dict(Counter(p for gg, p in zip(gold, pred) if gg == g)) for g in LABELS if g in gold}

    rng = random.Random(seed)
    presence = {p: [0, 0] for p in CBT_PARTS}
    cov_hit = cov_err = 0
    order_err: list[float] = []
    shuffled: list[dict] = []
    n_var = 0
    for a in answers:
        for v in variants(a, rng):
            shuffled += [v] if v["id"].endswith("/shuffled") else []
            truth = structure_of([s["label"] for s in v["segments"]])
            got = scorer.score(answer_text(v))
            n_var += 1
            for p in CBT_PARTS:
                presence[p][0] += (p in truth["parts"]) == (p in got["parts"])
                presence[p][1] += 1
            cov_hit += truth["coverage"] == got["coverage"]
            cov_err += abs(truth["coverage"] - got["coverage"])
            if truth["order"] is not None and got["order"] is not None:
                order_err.append(abs(truth["order"] - got["order"]))
    return {
        "signature": scorer.signature,
        "answers": len(answers),
        "segments": _segment_accuracy(gold, pred),
        "shuffled": _segment_accuracy(*_labelled(scorer, shuffled)),
        "sentences": _segment_accuracy(*_labelled(scorer, [as_sentences(a) for a in answers])),
        "confusion": confusion,
        "presence": {p: _ratio(h, n) for p, (h, n) in presence.items()},
        "coverage": {"n": n_var, "exact": cov_hit / n_var, "mae": cov_err / n_var},
        "order": {"n": len(order_err), "mae": float(np.mean(order_err)) if order_err else None},
    }
