"""The offline CBT-structure scorer: which of the five parts each paragraph or sentence of an answer is.

An answer is cut into segments: its paragraphs when it has two or more, else its sentences. Each segment gets one
label of LABELS (the five parts of cbt_llm.domain.cbt.CBT_PARTS, or "other"): a linear classifier over
character n-grams gives each segment a probability per label, and a Viterbi pass over the answer's segments picks
the most probable label sequence under a soft order prior (ORDER_PRIOR, one per unit: the canonical order, parts
repeated, skipped, reordered or mixed with "other" lines all allowed at a cost), so that a segment the classifier
is unsure of is read in the light of its neighbours (an unsure first paragraph before a key thought is more likely
empathy than encouragement). The prior looks at labels next to each other and the answer's two ends, not at a
segment's position by number. Per answer that gives

    parts        the parts present, in canonical order
    coverage     how many of the five are present (0-5)
    order        order agreement with the canonical order: over every pair of segments labelled with two different
                 parts, the fraction in canonical order (1.0 in order, 0.0 reversed; None with fewer than two parts)

Training (train_scorer, data_pipeline/synth/scorer.py): the five parts of generated corpus records (a frozen
sample of data_pipeline.synth.template's, data_pipeline/synth/banks/structure_corpus.jsonl.zst) and the
hand-written banks of data_pipeline/synth/banks/structure_seed.py; each part text and each of its sentences is one
example.
Features: NFKC + case-folded text, character 1..3-grams, sublinear TF-IDF (smooth idf) with n-grams seen in at
least `min_df` examples, L2-normalised; model: scikit-learn's multinomial logistic regression, weighted so that
every part weighs the same and "other" half as much (`other_weight`: a rare label of off-topic lines, at full weight
it drew in borderline part sentences), and, within a label, the corpus and the bank weigh half each (the corpus fills
a few phrasings with thousands of slot values; unweighted, those phrasings are all a label learns). The scorer is
saved as one small .npz (vocabulary, idf, weights, the priors in its header; no pickle) and scoring needs NumPy
only. Every score names how it was made (`signature`), and training is deterministic: the same arguments give the
same weights.

Use: `scorer = load_or_train("runs/structure_scorer.npz")` (data_pipeline.synth.scorer: trains and saves it
the first time, ~15-20 s on one core, then loads it), `scorer.score(answer)`. `bench/structure_bench.py` builds it
and measures it on hand-written answers it never trained on (tests/data/structure_handwritten.jsonl) and on
PsyQA's human answers.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.cbt import CBT_PARTS

VERSION = "structure:v4"
LABELS: tuple[str, ...] = (*CBT_PARTS, "other")
_RANK = {p: i for i, p in enumerate(CBT_PARTS)}

_PARAGRAPH = re.compile(r"\s*\n\s*")
# a sentence runs to its end mark, keeping closing quotes and brackets with it; ；and ，do not end one
_SENTENCE = re.compile(r"[^。！？!?…]+(?:[。！？!?…]+[”’\"」』）)]*)?")
_SPACE = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph, each with its end mark and any closing quote after it."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def segment(answer: str) -> tuple[list[str], str]:
    """The units an answer is labelled in and their kind: its paragraphs (lines) when there are two or more
    ("paragraphs"), else its sentences ("sentences")."""
    paragraphs = [p for p in _PARAGRAPH.split(answer.strip()) if p]
    return (paragraphs, "paragraphs") if len(paragraphs) >= 2 else (split_sentences(answer), "sentences")


def split_segments(answer: str) -> list[str]:
    """The units an answer is labelled in: its paragraphs (lines) when there are two or more, else its sentences."""
    return segment(answer)[0]


def normalise(text: str) -> str:
    """NFKC (full- and half-width alike), case-folded, runs of whitespace as one space."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def char_ngrams(text: str, n_max: int = 3) -> Counter:
    """Counts of the character 1..n_max-grams of the normalised text."""
    t = normalise(text)
    return Counter(t[i : i + n] for n in range(1, n_max + 1) for i in range(len(t) - n + 1))


def order_agreement(labels: Sequence[str]) -> float | None:
    """Over every pair of segments labelled with two different parts ("other" ignored), the fraction whose order
    matches the canonical one (Kendall-style concordance). None when fewer than two distinct parts are present."""
    ranks = [_RANK[label] for label in labels if label in _RANK]
    pairs = agree = 0
    for i, a in enumerate(ranks):
        for b in ranks[i + 1 :]:
            if a != b:
                pairs += 1
                agree += a < b
    return agree / pairs if pairs else None


def structure_of(labels: Sequence[str]) -> dict:
    """parts (present, canonical order), coverage and order agreement of a sequence of segment labels."""
    present = [p for p in CBT_PARTS if p in labels]
    return {"parts": present, "coverage": len(present), "order": order_agreement(labels)}


# The order priors the shipped scorer decodes with, per unit. Chosen on the design splits (dev, test, fresh, heldout2
# of tests/data/structure_handwritten.jsonl), as written and shuffled: paragraphs rarely repeat a part, so a repeat
# costs more there; sentences of one paragraph mostly continue the part before them. bench/RESULTS.md has the grid.
ORDER_PRIOR: dict[str, dict[str, float]] = {
    "paragraphs": {"stay": 0.5, "skip": 0.6, "back": 0.5, "other": 0.6, "ends": 0.6},
    "sentences": {"stay": 1.5, "skip": 0.3, "back": 0.5, "other": 0.6, "ends": 0.6},
}


def order_prior(labels: Sequence[str], stay: float, skip: float, back: float, other: float, ends: float) -> np.ndarray:
    """Log-scores of transitions between `labels` (parts of CBT_PARTS or "other"), (len(labels) + 1) square; the
    last row and column stand for the answer's start and end. Each number weighs a step against the canonical one
    (a part followed by the next part, an answer opening on empathy or closing on encouragement, all 1): `stay` a
    label repeated, `skip` a jump forward over parts, `back` a step back to an earlier part, `other` a step into or
    out of "other" (an answer may also open or close on it), `ends` an answer opening or closing on any other part.
    Nothing is forbidden: answers skip, repeat and reorder parts, and the prior only tips segments the classifier
    is unsure of. A prior that favours the canonical order costs accuracy on answers written out of it;
    evaluate_scorer measures that cost on shuffled answers."""
    n = len(labels)
    out = np.zeros((n + 1, n + 1))
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if a == b:
                out[i, j] = math.log(stay)
            elif a not in _RANK or b not in _RANK:
                out[i, j] = math.log(other)
            elif _RANK[b] - _RANK[a] != 1:
                out[i, j] = math.log(skip if _RANK[b] > _RANK[a] else back)
        out[n, i] = 0.0 if a in (CBT_PARTS[0], "other") else math.log(ends)
        out[i, n] = 0.0 if a in (CBT_PARTS[-1], "other") else math.log(ends)
    return out


def decode(log_probs: np.ndarray, transitions: np.ndarray) -> list[int]:
    """Viterbi: the label sequence maximising the sum of the segments' log-probabilities and the transition
    log-scores (order_prior; its last row/column are the start/end of the answer)."""
    start, end, step = transitions[-1, :-1], transitions[:-1, -1], transitions[:-1, :-1]
    best = start + log_probs[0]
    back = []
    for row in log_probs[1:]:
        cand = best[:, None] + step  # cand[i, j]: best path ending in i, then j
        back.append(cand.argmax(axis=0))
        best = cand.max(axis=0) + row
    path = [int((best + end).argmax())]
    for ptr in reversed(back):
        path.append(int(ptr[path[-1]]))
    return path[::-1]


@dataclass
class StructureScorer:
    """A trained scorer: vocabulary (n-gram -> column), idf per column, weights per label (rows of `coef`)."""

    vocab: dict[str, int]
    idf: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    labels: tuple[str, ...]
    n_max: int
    meta: dict
    priors: dict[str, dict[str, float]] | None = None  # ORDER_PRIOR's shape; None: label segment by segment

    @property
    def signature(self) -> str:
        return self.meta["signature"]

    def _row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of one text's L2-normalised sublinear TF-IDF vector."""
        cols, vals = [], []
        for gram, n in char_ngrams(text, self.n_max).items():
            j = self.vocab.get(gram)
            if j is not None:
                cols.append(j)
                vals.append((1.0 + math.log(n)) * self.idf[j])
        cols_a, vals_a = np.asarray(cols, np.int64), np.asarray(vals, np.float64)
        norm = np.linalg.norm(vals_a)
        return cols_a, (vals_a / norm if norm else vals_a)

    def probabilities(self, segments: Sequence[str]) -> np.ndarray:
        """(len(segments), len(labels)) label probabilities."""
        out = np.zeros((len(segments), len(self.labels)))
        for i, text in enumerate(segments):
            cols, vals = self._row(text)
            z = self.coef[:, cols] @ vals + self.intercept
            z = np.exp(z - z.max())
            out[i] = z / z.sum()
        return out

    def label(self, segments: Sequence[str], unit: str = "paragraphs") -> list[str]:
        """The labels of one answer's segments (`unit`: "paragraphs" or "sentences"), in the answer's order: the
        most probable sequence under the classifier and the order prior of that unit; segment by segment when the
        scorer has no prior. Segments of different answers are labelled in separate calls."""
        if not segments:
            return []
        log_probs = np.log(np.maximum(self.probabilities(segments), 1e-300))
        if self.priors is None:
            return [self.labels[k] for k in log_probs.argmax(axis=1)]
        return [self.labels[k] for k in decode(log_probs, order_prior(self.labels, **self.priors[unit]))]

    def score(self, answer: str) -> dict:
        """An answer's segments with their labels, the parts present, coverage (0-5) and order agreement."""
        segments, unit = segment(answer)
        labels = self.label(segments, unit)
        return {"segments": [{"text": s, "label": lab} for s, lab in zip(segments, labels)], **structure_of(labels)}

    def save(self, path: str | Path) -> Path:
        """One .npz: arrays and a JSON header (no pickle), loadable by load_scorer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        terms = sorted(self.vocab, key=self.vocab.get)
        header = {
            "version": VERSION,
            "labels": list(self.labels),
            "n_max": self.n_max,
            "priors": self.priors,
            "meta": self.meta,
        }
        with open(path, "wb") as fh:  # a file object: savez would otherwise append .npz to any other suffix
            np.savez_compressed(
                fh,
                header=np.array(json.dumps(header, ensure_ascii=False)),
                terms=np.array(terms),
                idf=self.idf.astype(np.float32),
                coef=self.coef.astype(np.float32),
                intercept=self.intercept.astype(np.float32),
            )
        return path


class StaleScorerError(ConfigError):
    """A scorer file written by another version of this code (load_or_train rebuilds it)."""


def load_scorer(path: str | Path) -> StructureScorer:
    """Load a saved scorer. Raises ConfigError (one line) when the file is missing, unreadable or of another
    version (StaleScorerError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"structure scorer '{path}' not found; build it with bench/structure_bench.py or load_or_train"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            terms = [str(t) for t in z["terms"]]
            arrays = {k: z[k].astype(np.float64) for k in ("idf", "coef", "intercept")}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"structure scorer '{path}' is not a scorer file ({exc}); rebuild it") from None
    if header.get("version") != VERSION:
        raise StaleScorerError(
            f"structure scorer '{path}' is {header.get('version')}, this code reads {VERSION}; rebuild it"
        )
    return StructureScorer(
        vocab={t: i for i, t in enumerate(terms)},
        labels=tuple(header["labels"]),
        n_max=int(header["n_max"]),
        meta=header["meta"],
        priors=header["priors"],
        **arrays,
    )
