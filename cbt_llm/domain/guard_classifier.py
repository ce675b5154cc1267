"""The guard's learned layer: a classifier over character n-grams for user turns (which risk construct, if any) and
for model replies (which harm kind, if any), beside the patterns of cbt_llm/domain/crisis.py. It adds flags; on user
turns it also decides whether a non-acute pattern match stands (choose_corroboration: the patterns read words, this
layer the whole message).

Why this model: it must run on every turn of every conversation on one CPU core in well under 5 ms, give the same
answer on every machine, and train in seconds on a few thousand labelled lines, so that a platform can retrain it
on its own labelled data. A multinomial logistic regression (scikit-learn, deterministic lbfgs) over sublinear
TF-IDF of character 1..4-grams fits those bounds and reads Chinese without a word segmenter; spelling variants are
folded first (NFKC, case, traditional -> simplified for the crisis characters, pinyin and homophone spellings of
crisis words: spelling.normalise's reading, without its removal of spaces between Latin words, which keeps English
words apart).

Two models per task on the same features: a binary one (risk or none) that decides, and a multinomial one over the
task's kinds (crisis.CONSTRUCTS for user turns, crisis.HARM_KINDS for replies), trained on the risky lines only,
that names the kind of a flagged text. (One multinomial model over "none" and ten kinds would add ten classes'
probabilities up against one: a text with nothing in it, a greeting, would read as a risk.) A text is flagged when
P(risk) >= threshold. The threshold is chosen at training time on held-out authors of the training set (each
author's lines scored by a model trained without them), for a target recall, and recorded with the figures it
gives.

Saved as one .npz per task (arrays and a JSON header: version, labels, threshold, the training data's SHA-256, the
measured figures; no pickle). Scoring needs NumPy only; training needs scikit-learn and SciPy.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbt_llm.core.errors import ConfigError
from cbt_llm.domain.crisis import ACUTE, CrisisResult, detect
from cbt_llm.domain.spelling import fold_spellings

VERSION = "guard-classifier:v4"
NONE = "none"
TASKS = ("user", "reply")
MODEL_DIR = Path(__file__).with_name("guard_model")
_SPACE = re.compile(r"\s+")
_CJK = r"[\u3400-\u9fff\uf900-\ufaff]"
_SPACE_BY_CJK = re.compile(rf"(?<={_CJK}) | (?={_CJK})")


def model_path(task: str, folder: str | Path = MODEL_DIR) -> Path:
    return Path(folder) / f"{task}.npz"


def features_text(text: str) -> str:
    """The text the n-grams are read from: spelling variants folded, runs of white space one space, and no space
    next to a Chinese character. Spaces between Chinese phrases are a way of typing (voice input, phones), not a
    sign of risk; read as n-grams they made unpunctuated everyday messages look like crises. Spaces between Latin
    words stay: they keep English words apart."""
    folded = _SPACE.sub(" ", fold_spellings(unicodedata.normalize("NFKC", text).lower())).strip()
    return _SPACE_BY_CJK.sub("", folded)


def char_ngrams(text: str, n_min: int, n_max: int) -> Counter:
    t = features_text(text)
    return Counter(t[i : i + n] for n in range(n_min, n_max + 1) for i in range(len(t) - n + 1))


@dataclass
class Verdict:
    """A text's reading: `flagged` at the model's threshold, `score` = P(risk), `kind` the most probable
    construct or harm kind (None when not flagged)."""

    flagged: bool
    score: float
    kind: str | None


@dataclass
class TextClassifier:
    """A trained classifier: vocabulary (n-gram -> column), idf per column, the risk model's weights (`risk_coef`,
    `risk_intercept`) and the kind model's (one row per label of `labels`)."""

    task: str
    vocab: dict[str, int]
    idf: np.ndarray
    risk_coef: np.ndarray
    risk_intercept: float
    coef: np.ndarray
    intercept: np.ndarray
    labels: tuple[str, ...]
    threshold: float
    n_min: int = 1
    n_max: int = 4
    meta: dict = field(default_factory=dict)
    # user turns: the P(risk) from which a non-acute pattern match stands (choose_corroboration); None: every one
    corroborate: float | None = None

    def _row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) of one text's L2-normalised sublinear TF-IDF vector."""
        cols, vals = [], []
        for gram, n in char_ngrams(text, self.n_min, self.n_max).items():
            j = self.vocab.get(gram)
            if j is not None:
                cols.append(j)
                vals.append((1.0 + math.log(n)) * self.idf[j])
        cols_a, vals_a = np.asarray(cols, np.int64), np.asarray(vals, np.float64)
        norm = np.linalg.norm(vals_a)
        return cols_a, (vals_a / norm if norm else vals_a)

    def risk(self, text: str) -> float:
        """P(risk) of one text."""
        cols, vals = self._row(text)
        z = float(self.risk_coef[cols] @ vals + self.risk_intercept)
        return 1.0 / (1.0 + math.exp(-z)) if z > -30 else 0.0

    def kind(self, text: str) -> str:
        """The most probable kind of a risky text."""
        cols, vals = self._row(text)
        return self.labels[int(np.argmax(self.coef[:, cols] @ vals + self.intercept))]

    def __call__(self, text: str) -> Verdict:
        score = self.risk(text)
        if score < self.threshold:
            return Verdict(False, score, None)
        return Verdict(True, score, self.kind(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        terms = sorted(self.vocab, key=self.vocab.get)
        header = {
            "version": VERSION,
            "task": self.task,
            "labels": list(self.labels),
            "threshold": self.threshold,
            "corroborate": self.corroborate,
            "risk_intercept": self.risk_intercept,
            "n_min": self.n_min,
            "n_max": self.n_max,
            "meta": self.meta,
        }
        with open(path, "wb") as fh:  # a file object: savez would append .npz to another suffix
            np.savez_compressed(
                fh,
                header=np.array(json.dumps(header, ensure_ascii=False, sort_keys=True)),
                terms=np.array(terms),
                idf=self.idf.astype(np.float32),
                risk_coef=self.risk_coef.astype(np.float32),
                coef=self.coef.astype(np.float32),
                intercept=self.intercept.astype(np.float32),
            )
        return path


def load_classifier(path: str | Path) -> TextClassifier:
    """A saved classifier; ConfigError (one line) when the file is missing, unreadable or of another version."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"guard classifier '{path}' not found; train it with `cbt-llm guard train`")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            terms = [str(t) for t in z["terms"]]
            arrays = {k: z[k].astype(np.float64) for k in ("idf", "risk_coef", "coef", "intercept")}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"guard classifier '{path}' is not a classifier file ({exc}); retrain it") from None
    if header.get("version") != VERSION:
        raise ConfigError(f"guard classifier '{path}' is {header.get('version')}, this code reads {VERSION}; retrain")
    return TextClassifier(
        task=header["task"],
        vocab={t: i for i, t in enumerate(terms)},
        labels=tuple(header["labels"]),
        threshold=float(header["threshold"]),
        corroborate=None if header.get("corroborate") is None else float(header["corroborate"]),
        risk_intercept=float(header["risk_intercept"]),
        n_min=int(header["n_min"]),
        n_max=int(header["n_max"]),
        meta=header["meta"],
        **arrays,
    )


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Example:
    """One labelled line: its text, its label (NONE or a kind) and who wrote it (held-out authors pick the
    threshold)."""

    text: str
    label: str
    author: str


def data_hash(examples: Sequence[Example]) -> str:
    """SHA-256 of the training lines in a canonical order: the same data gives the same hash, however it was
    split into files."""
    lines = sorted(json.dumps([e.text, e.label, e.author], ensure_ascii=False) for e in examples)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def fit(
    examples: Sequence[Example], task: str, labels: Sequence[str], n_min: int = 1, n_max: int = 4, min_df: int = 2,
    C: float = 10.0, acute_weight: float = 1.0,
) -> TextClassifier:  # fmt: skip
    """A classifier trained on `examples` (threshold 0.5 until train_classifier sets it). Deterministic. Lines of an
    acute construct weigh `acute_weight` in the risk model's loss: a missed plan costs more than a missed wish."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    labels = tuple(k for k in labels if k != NONE)
    grams = [char_ngrams(e.text, n_min, n_max) for e in examples]
    df = Counter(g for counts in grams for g in counts)
    terms = sorted(g for g, n in df.items() if n >= min_df)
    n = len(examples)
    idf = np.array([math.log((1 + n) / (1 + df[g])) + 1.0 for g in terms])
    k = len(labels)
    vocab = {g: i for i, g in enumerate(terms)}
    clf = TextClassifier(task, vocab, idf, np.zeros(len(terms)), 0.0, np.zeros((k, len(terms))), np.zeros(k), labels,
                         0.5, n_min, n_max)  # fmt: skip
    rows, cols, vals = [], [], []
    for i, e in enumerate(examples):
        c, v = clf._row(e.text)
        rows += [i] * len(c)
        cols += c.tolist()
        vals += v.tolist()
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n, len(terms)))
    risky = np.array([e.label != NONE for e in examples])
    weight = np.array([acute_weight if e.label in ACUTE else 1.0 for e in examples])
    risk = LogisticRegression(C=C, max_iter=5000).fit(X, risky, sample_weight=weight)
    clf.risk_coef, clf.risk_intercept = risk.coef_[0], float(risk.intercept_[0])
    y = np.array([labels.index(e.label) for e in examples if e.label != NONE])
    if len(set(y)) > 1:
        kinds = LogisticRegression(C=C, max_iter=5000).fit(X[risky], y)
        clf.coef[kinds.classes_], clf.intercept[kinds.classes_] = kinds.coef_, kinds.intercept_
        missing = np.setdiff1d(np.arange(len(labels)), kinds.classes_)
        clf.intercept[missing] = -1e9  # a kind the data never shows is never named
    else:
        clf.intercept[:] = -1e9
        clf.intercept[y[0] if len(y) else 0] = 0.0
    return clf


def held_out_scores(examples: Sequence[Example], task: str, labels: Sequence[str], **fit_kw) -> np.ndarray:
    """P(risk) of every example from a model trained without its author's lines (every author in turn)."""
    authors = sorted({e.author for e in examples})
    scores = np.zeros(len(examples))
    for a in authors:
        train = [e for e in examples if e.author != a]
        model = fit(train, task, labels, **fit_kw)
        for i, e in enumerate(examples):
            if e.author == a:
                scores[i] = model.risk(e.text)
    return scores


def choose_threshold(scores: np.ndarray, positive: np.ndarray, target_recall: float) -> float:
    """The highest threshold at which at least `target_recall` of the positives score at or above it."""
    pos = np.sort(scores[positive])
    k = int(math.floor((1.0 - target_recall) * len(pos)))
    return float(pos[min(k, len(pos) - 1)]) if len(pos) else 0.5


# A pattern match with fewer characters than this around it (about a sentence) stands without corroboration: the
# learned layer has nothing to read it against, and its score is then how often those words alone were hyperbole in
# training ("我想死" alone: 0.12). The labelled crisis set's longest such crises have 13 and 17 around the match.
CONTEXT_TO_READ = 20


def needs_corroboration(found: CrisisResult) -> bool:
    """A pattern match that stands only when the learned layer corroborates it: not acute, and with a sentence or
    more around it for that layer to read."""
    return bool(found) and not found.acute and found.context >= CONTEXT_TO_READ


def choose_corroboration(
    texts: Sequence[str], scores: np.ndarray, positive: np.ndarray, threshold: float, keep: float
) -> tuple[float, dict]:
    """(floor, figures): the highest P(risk) a non-acute pattern match needs from the learned layer to stand, such
    that at least `keep` of the crisis lines that the patterns and the learned layer catch together (on held-out
    authors' scores) are still caught. Acute matches (a method, a plan, an attempt) and matches with too little
    around them to read (needs_corroboration) always stand.

    Why: the patterns read words, not context; on fresh sets their non-acute matches (想死, 不想活, 自杀 in a
    question about warning signs, a novel, locking away a relative's pills) were most of the hard-negative false
    positives, while the learned layer, which reads the whole message, scored the crises among them well above
    the floor that removes most of the false ones. figures: recall and false-positive rate of the union and of the
    corroborated union on the same scores."""
    found = [detect(t) for t in texts]
    gated = np.array([needs_corroboration(f) for f in found])
    standing = np.array([bool(f) for f in found]) & ~gated
    learned = scores >= threshold
    union = standing | gated | learned
    at_stake = np.sort(scores[positive & gated & ~learned])  # crises only a non-acute pattern catches
    lose = int(math.floor((1.0 - keep) * (union & positive).sum() + 1e-9))
    floor = float(at_stake[lose]) if lose < len(at_stake) else threshold
    kept = standing | learned | (gated & (scores >= floor))

    def rates(flagged: np.ndarray) -> dict:
        return {"recall": round(float(flagged[positive].mean()), 4),
                "false_positive_rate": round(float(flagged[~positive].mean()), 4)}  # fmt: skip

    return floor, {"keep": keep, "floor": round(floor, 4), "union": rates(union), "corroborated": rates(kept)}


def train_classifier(
    examples: Iterable[Example], task: str, labels: Sequence[str], target_recall: float = 0.95,
    pattern_keep: float | None = None, **fit_kw,
) -> TextClassifier:  # fmt: skip
    """Train on every example; the threshold is the one that reaches `target_recall` on held-out authors, and the
    header records it with the recall and false-positive rate it gave there, the data's hash and its counts. For
    user turns with `pattern_keep`, also the floor a non-acute pattern match needs (choose_corroboration)."""
    import sklearn

    examples = list(examples)
    if task not in TASKS:
        raise ValueError(f"task '{task}' is not one of {TASKS}")
    if len({e.author for e in examples}) < 2:
        raise ConfigError("guard train: the threshold is chosen on held-out authors; the data needs two or more")
    positive = np.array([e.label != NONE for e in examples])
    scores = held_out_scores(examples, task, labels, **fit_kw)
    threshold = choose_threshold(scores, positive, target_recall)
    model = fit(examples, task, labels, **fit_kw)
    flagged = scores >= threshold
    model.threshold = threshold
    corroboration = None
    if task == "user" and pattern_keep is not None:
        model.corroborate, corroboration = choose_corroboration(
            [e.text for e in examples], scores, positive, threshold, pattern_keep
        )
    model.meta = {
        "data_sha256": data_hash(examples),
        "examples": dict(sorted(Counter(e.label for e in examples).items())),
        "authors": sorted({e.author for e in examples}),
        "features": len(model.vocab),
        "held_out_authors": {
            "target_recall": target_recall,
            "recall": round(float(flagged[positive].mean()), 4),
            "false_positive_rate": round(float(flagged[~positive].mean()), 4),
        },
        **({"patterns_corroborated": corroboration} if corroboration else {}),
        "sklearn": sklearn.__version__,
        "fit": {"n_min": model.n_min, "n_max": model.n_max, **{k: v for k, v in fit_kw.items()}},
    }
    return model


# ---------------------------------------------------------------------------------------------- labelled data

DATA_DIR = Path(__file__).with_name("guard_data")
USER_LABELS = {"crisis": "construct", "not_crisis": "negative_kind"}
REPLY_LABELS = {"unsafe": "harm_kind", "safe": "safe_kind"}


def _example(obj, where: str, kinds_user: Sequence[str], kinds_reply: Sequence[str]) -> tuple[str, Example]:
    """(task, example) of one labelled line; ValueError with the reason for a bad one."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    text, label = obj.get("text"), obj.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is missing or empty")
    author = obj.get("author") or where
    if label in USER_LABELS:
        kind = obj.get("construct")
        if label == "crisis" and kind not in kinds_user:
            raise ValueError(f"construct '{kind}' is not one of {', '.join(kinds_user)}")
        return "user", Example(text, kind if label == "crisis" else NONE, str(author))
    if label in REPLY_LABELS:
        kind = obj.get("harm_kind")
        if label == "unsafe" and kind not in kinds_reply:
            raise ValueError(f"harm_kind '{kind}' is not one of {', '.join(kinds_reply)}")
        return "reply", Example(text, kind if label == "unsafe" else NONE, str(author))
    raise ValueError(f"label '{label}' is not one of {', '.join([*USER_LABELS, *REPLY_LABELS])}")


def read_labelled(
    paths: Iterable[str | Path], kinds_user: Sequence[str], kinds_reply: Sequence[str]
) -> tuple[dict[str, list[Example]], list[dict]]:
    """({"user": [...], "reply": [...]}, bad lines as {file, line, reason}) from labelled JSONL files (the format
    of cbt_llm/domain/guard_data/README.md); a line without an author is its file's. Bad lines are counted and
    returned with their reason, never trained on and never fatal."""
    out: dict[str, list[Example]] = {"user": [], "reply": []}
    bad: list[dict] = []
    for path in paths:
        path = Path(path)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                task, ex = _example(json.loads(line), path.stem, kinds_user, kinds_reply)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                bad.append({"file": str(path), "line": i, "reason": str(exc).splitlines()[0]})
                continue
            out[task].append(ex)
    return out, bad


def shipped_data_files() -> list[Path]:
    return sorted(DATA_DIR.glob("*.jsonl"))
