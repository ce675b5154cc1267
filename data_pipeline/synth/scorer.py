"""Training the structure scorer (cbt_llm/domain/structure.py, which scores with NumPy alone): character n-gram
TF-IDF and scikit-learn's logistic regression over the five parts of a frozen template corpus and the hand-written
seed banks, saved as one .npz. `load_or_train(path)` trains it the first time and loads it after.

Training is deterministic: the same arguments give the same weights, and the signature names how it was made.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cbt_llm.domain.cbt import CBT_PARTS
from cbt_llm.domain.structure import (
    LABELS,
    ORDER_PRIOR,
    VERSION,
    StaleScorerError,
    StructureScorer,
    char_ngrams,
    load_scorer,
    split_sentences,
)


def seed_bank() -> dict[str, tuple[str, ...]]:
    """The hand-written exemplars of data_pipeline/synth/banks/structure_seed.py, per label."""
    from data_pipeline.synth.banks import structure_seed as bank

    return {
        "empathy": bank.EMPATHY,
        "key_thought": bank.KEY_THOUGHT,
        "challenge": bank.CHALLENGE,
        "strategy": bank.STRATEGY,
        "encouragement": bank.ENCOURAGEMENT,
        "other": bank.OTHER,
    }


def training_examples(records: Iterable[dict], bank: bool = True) -> list[tuple[str, str, str]]:
    """Distinct (text, label, source) examples, source "corpus" or "bank": each corpus part and each of its
    sentences, plus the seed banks."""
    seen: set[tuple[str, str, str]] = set()
    for rec in records:
        for part in CBT_PARTS:
            text = rec["cbt"][part]
            seen.add((text, part, "corpus"))
            seen.update((s, part, "corpus") for s in split_sentences(text))
    if bank:
        seen.update((text, label, "bank") for label, texts in seed_bank().items() for text in texts)
    return sorted(seen)  # sorted: the same examples in the same order give the same weights


def example_weights(examples: Sequence[tuple[str, str, str]], other_weight: float = 1.0) -> np.ndarray:
    """Every label the same total weight ("other" `other_weight` times that); within a label, each source present
    an equal share of it."""
    groups = Counter((label, source) for _, label, source in examples)
    sources = Counter(label for label, _ in groups)
    labels = len(sources)
    n = len(examples)
    return np.array(
        [
            n / (labels * sources[lab] * groups[(lab, src)]) * (other_weight if lab == "other" else 1.0)
            for _, lab, src in examples
        ]
    )


def _decode_signature(priors: dict[str, dict[str, float]] | None) -> str:
    if priors is None:
        return "per-segment argmax"
    return "viterbi order-prior " + " ".join(
        f"{unit}(" + ",".join(f"{k}{v:g}" for k, v in params.items()) + ")" for unit, params in priors.items()
    )


# The corpus half of the default training set, frozen: the first 2000 records of seed 0 from the template
# generator at template-v2, the corpus cbt_llm.domain.structure.VERSION ("structure:v4") was built and measured
# on; only their five parts are kept. The generator keeps changing (template-v3 writes more varied phrases); a
# scorer that retrained on whatever it writes now would silently become another scorer than the one whose held-out
# accuracy is on record.
FROZEN_CORPUS = Path(__file__).parent / "banks" / "structure_corpus.jsonl.zst"
FROZEN_CORPUS_SOURCE = "synth-template seed0 n2000"  # the source string structure:v4 was signed with


def frozen_corpus() -> list[dict]:
    """The frozen training records ({id, cbt}), in their generated order."""
    import zstandard

    text = zstandard.ZstdDecompressor().decompress(FROZEN_CORPUS.read_bytes()).decode("utf-8")
    return [json.loads(line) for line in text.splitlines()]


def train_scorer(
    records: int | None = None,
    seed: int = 0,
    corpus: Iterable[dict] | None = None,
    bank: bool = True,
    n_max: int = 3,
    min_df: int = 2,
    C: float = 10.0,
    other_weight: float = 0.5,
    priors: dict[str, dict[str, float]] | None = ORDER_PRIOR,
) -> StructureScorer:
    """Train a scorer on `corpus` (schema-v1 records; default: FROZEN_CORPUS, or with `records` that many records
    the template generator writes today for `seed`) and, with `bank`, the hand-written seed banks; it decodes each
    answer with `priors` (ORDER_PRIOR's shape; None: every segment on its own). Needs scikit-learn (and SciPy);
    scoring does not."""
    import scipy.sparse as sp
    import sklearn
    from sklearn.linear_model import LogisticRegression

    from data_pipeline.synth.template import SOURCE, iter_records

    if corpus is not None:
        source = "corpus"
    elif records is None:
        corpus, source = frozen_corpus(), FROZEN_CORPUS_SOURCE
    else:
        corpus, source = iter_records(seed, 0, records), f"{SOURCE} seed{seed} n{records}"
    examples = training_examples(corpus, bank)
    grams = [char_ngrams(t, n_max) for t, _, _ in examples]
    df = Counter(g for counts in grams for g in counts)
    terms = sorted(g for g, n in df.items() if n >= min_df)
    vocab = {g: i for i, g in enumerate(terms)}
    n = len(examples)
    idf = np.array([math.log((1 + n) / (1 + df[g])) + 1.0 for g in terms])
    labels = LABELS if bank else CBT_PARTS  # without the banks nothing teaches "other"
    scorer = StructureScorer(
        vocab, idf, np.zeros((len(labels), len(terms))), np.zeros(len(labels)), labels, n_max, {}, priors
    )
    rows, cols, vals = [], [], []
    for i, (text, _, _) in enumerate(examples):
        c, v = scorer._row(text)
        rows += [i] * len(c)
        cols += c.tolist()
        vals += v.tolist()
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n, len(terms)))
    y = np.array([labels.index(lab) for _, lab, _ in examples])
    clf = LogisticRegression(C=C, max_iter=5000).fit(X, y, sample_weight=example_weights(examples, other_weight))
    scorer.coef, scorer.intercept = clf.coef_, clf.intercept_
    counts = Counter(lab for _, lab, _ in examples)
    scorer.meta = {
        "signature": (
            f"{VERSION}|seg:paragraphs,else sentences|feat:char1-{n_max} tfidf-sublinear min_df{min_df} nfkc|"
            f"model:logreg C{C:g} label+source-balanced other x{other_weight:g}|"
            f"decode:{_decode_signature(priors)}|"
            f"train:{source}{' + seed-bank' if bank else ''}|"
            f"sklearn {sklearn.__version__}"
        ),
        "examples": {lab: counts[lab] for lab in labels},
        "features": len(terms),
    }
    return scorer


def load_or_train(path: str | Path, **train_kw) -> StructureScorer:
    """The scorer saved at `path`, trained (train_scorer(**train_kw)) and saved there first if it is missing or
    was written by another version of this code (a file that is not a scorer at all is refused, not replaced)."""
    path = Path(path)
    if path.is_file():
        try:
            return load_scorer(path)
        except StaleScorerError:
            pass
    scorer = train_scorer(**train_kw)
    scorer.save(path)
    return scorer
