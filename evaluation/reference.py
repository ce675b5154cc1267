"""Reference metrics: how close each generated answer is to the reference answer.

Every metric takes lists of predictions and references (strings, paired by position) and returns

    {"score": float | None, "n": int, "per_sample": list[float] | None, "signature": str, ["note": str]}

`per_sample` is given where a per-answer score is defined (None for the corpus-level ones: corpus BLEU and
distinct-n), so a bootstrap interval can be drawn from it later. `signature` names how the number was made in
sacrebleu's style: implementation and its installed version, tokenization, smoothing, scale. `note` says why a
number may surprise (empty predictions or references scored 0, no samples). `reference_metrics(preds, refs)` runs
them all and returns {metric name: result}.

    bleu-4       nltk `sentence_bleu` on characters, smoothing method3, x100, mean over answers: LLaMA-Factory's
                 recipe (the CBT-LLM paper was trained and scored with it), so numbers compare with both.
                 LLaMA-Factory rounds each answer's score to 4 decimals before the mean; we do not (< 1e-4 apart).
    bleu-corpus  sacrebleu's corpus BLEU, tokenize="zh" (CJK characters split, other text by 13a), x100.
    rouge-1/2/l  rouge-chinese's F-score over jieba words (as LLaMA-Factory), x100, mean over answers; ROUGE-L is
                 rouge-chinese's summary-level LCS over sentences cut at 。！？. (`rouge-score` and `evaluate`'s
                 rouge tokenize on [a-z0-9] and silently score Chinese as 0.)
    meteor       nltk's `meteor_score` over jieba words, x100, mean over answers. Offline: WordNet is never
                 downloaded; a stub with no synsets is passed as `wordnet=`, so METEOR's synonym stage is dropped.
                 Exact matching (case-folded) stays, and the Porter stem stage, which only changes Latin-script words:
                 on Chinese text only exact word matches remain.
    distinct-1/2 unique / total character n-grams over all answers (whitespace removed), x100: corpus diversity.
    length       characters per answer, whitespace removed; mean (and the references' mean beside it).

BERTScore F1 (the paper's third metric) is in evaluation/bertscore.py: it needs a local encoder (bert-base-chinese,
layer 8 is the paper-comparable setting), so it is configured and checked apart from these.

jieba is loaded once per process, quietly (its logger set to WARNING), as a private `jieba.Tokenizer` over its
bundled dictionary with HMM on (as `jieba.cut`), so user dictionaries added elsewhere cannot change our scores.
On first use jieba writes a cache of its dictionary to the temp folder (`jieba.cache`, ~1 s to build); that is
its only side effect. Nothing downloads at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib.metadata import version

METRICS = (
    "bleu-4",
    "bleu-corpus",
    "rouge-1",
    "rouge-2",
    "rouge-l",
    "meteor",
    "distinct-1",
    "distinct-2",
    "length",
)

_jieba_tokenizer = None


def _jieba():
    global _jieba_tokenizer
    if _jieba_tokenizer is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        tokenizer = jieba.Tokenizer()  # the bundled dictionary, not the global one others may extend
        tokenizer.initialize()
        _jieba_tokenizer = tokenizer
    return _jieba_tokenizer


def words(text: str) -> list[str]:
    """jieba words of `text` (HMM on, as `jieba.cut`), whitespace tokens dropped."""
    return [w for w in _jieba().cut(text, HMM=True) if w.strip()]


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def _jieba_tag() -> str:
    return f"tok:jieba-{version('jieba')}-hmm"


def _check(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they pair by position")


def _result(score: float | None, n: int, per_sample: list[float] | None, signature: str, notes: list[str]) -> dict:
    out = {"score": score, "n": n, "per_sample": per_sample, "signature": signature}
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _per_sample(preds: Sequence[str], refs: Sequence[str], fn: Callable[[str, str], float], signature: str) -> dict:
    """Mean over answers of fn(pred, ref); an empty (whitespace-only) prediction or reference scores 0."""
    _check(preds, refs)
    if not preds:
        return _result(None, 0, [], signature, ["no samples"])
    scores, empty_pred, empty_ref = [], 0, 0
    for p, r in zip(preds, refs):
        if not p.strip():
            empty_pred += 1
            scores.append(0.0)
        elif not r.strip():
            empty_ref += 1
            scores.append(0.0)
        else:
            scores.append(float(fn(p, r)))
    notes = []
    if empty_pred:
        notes.append(f"{empty_pred} of {len(preds)} predictions empty: scored 0")
    if empty_ref:
        notes.append(f"{empty_ref} of {len(preds)} references empty: scored 0")
    return _result(sum(scores) / len(scores), len(scores), scores, signature, notes)


def bleu4_char(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """BLEU-4 on characters, LLaMA-Factory's recipe: sentence_bleu([list(ref)], list(pred), method3) x100, mean."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method3

    def one(p: str, r: str) -> float:
        return sentence_bleu([list(r)], list(p), smoothing_function=smooth) * 100

    sig = f"bleu4-char|nltk-{version('nltk')}|tok:char|smooth:method3|weights:uniform-4|mean-of-sentences|x100"
    return _per_sample(preds, refs, one, sig)


def bleu_corpus(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """sacrebleu corpus BLEU with tokenize="zh", one reference per answer, x100 (sacrebleu's own scale)."""
    from sacrebleu.metrics import BLEU

    _check(preds, refs)
    bleu = BLEU(tokenize="zh")
    if not preds:
        bleu.corpus_score([""], [[""]])  # sacrebleu names its signature only once it has scored something
        return _result(None, 0, None, f"bleu-corpus|sacrebleu|{bleu.get_signature()}", ["no samples"])
    notes = []
    empty = sum(1 for p in preds if not p.strip())
    if empty:
        notes.append(f"{empty} of {len(preds)} predictions empty: they add no n-grams and lower the brevity penalty")
    score = bleu.corpus_score(list(preds), [list(refs)]).score
    return _result(float(score), len(preds), None, f"bleu-corpus|sacrebleu|{bleu.get_signature()}", notes)


def _rouge(key: str) -> Callable[[Sequence[str], Sequence[str]], dict]:
    def metric(preds: Sequence[str], refs: Sequence[str]) -> dict:
        from rouge_chinese import Rouge

        rouge = Rouge(metrics=[key])

        def one(p: str, r: str) -> float:
            hyp, ref = words(p), words(r)
            if not hyp or not ref:  # defensive: rouge-chinese raises on an empty side
                return 0.0
            return rouge.get_scores(" ".join(hyp), " ".join(ref))[0][key]["f"] * 100

        level = "|summary-level-lcs" if key == "rouge-l" else ""
        sig = f"{key}-f|rouge-chinese-{version('rouge-chinese')}{level}|{_jieba_tag()}|mean-of-sentences|x100"
        return _per_sample(preds, refs, one, sig)

    metric.__name__ = key.replace("-", "")
    metric.__doc__ = f"{key.upper()} F-score (rouge-chinese over jieba words, as LLaMA-Factory), x100, mean."
    return metric


rouge1 = _rouge("rouge-1")
rouge2 = _rouge("rouge-2")
rougel = _rouge("rouge-l")


class _NoWordNet:
    """Stands in for nltk's WordNet reader: no synonyms for any word, so nothing is ever downloaded or loaded."""

    def synsets(self, word: str, *args, **kwargs) -> list:
        return []


def meteor(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """METEOR (nltk, alpha 0.9, beta 3, gamma 0.5) over jieba words, x100, mean. No WordNet: synonym matching is
    dropped; exact (case-folded) and Porter-stem matches remain, and the stemmer only touches Latin-script words, so
    on Chinese text only exact word matches count."""
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    stemmer, wordnet = PorterStemmer(), _NoWordNet()

    def one(p: str, r: str) -> float:
        return meteor_score([words(r)], words(p), stemmer=stemmer, wordnet=wordnet) * 100

    sig = (
        f"meteor|nltk-{version('nltk')}|{_jieba_tag()}|lower|match:exact+porter-stem|synonyms:none-no-wordnet"
        "|alpha:0.9|beta:3|gamma:0.5|mean-of-sentences|x100"
    )
    return _per_sample(preds, refs, one, sig)


def _distinct(n: int) -> Callable[[Sequence[str], Sequence[str]], dict]:
    def metric(preds: Sequence[str], refs: Sequence[str]) -> dict:
        _check(preds, refs)
        sig = f"distinct-{n}|tok:char-no-space|corpus:unique/total|x100"
        if not preds:
            return _result(None, 0, None, sig, ["no samples"])
        grams = []
        for p in preds:
            c = _chars(p)
            grams.extend(tuple(c[i : i + n]) for i in range(len(c) - n + 1))
        if not grams:
            return _result(0.0, len(preds), None, sig, [f"no character {n}-grams in any prediction: scored 0"])
        return _result(len(set(grams)) / len(grams) * 100, len(preds), None, sig, [])

    metric.__name__ = f"distinct{n}"
    metric.__doc__ = f"Distinct-{n}: unique / total character {n}-grams over all predictions, x100."
    return metric


distinct1 = _distinct(1)
distinct2 = _distinct(2)


def length(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """Characters per prediction (whitespace removed), mean; the references' mean length under "reference_mean"."""
    _check(preds, refs)
    sig = "length|chars-no-space|mean"
    if not preds:
        return _result(None, 0, [], sig, ["no samples"])
    per = [float(len(_chars(p))) for p in preds]
    out = _result(sum(per) / len(per), len(per), per, sig, [])
    out["reference_mean"] = sum(len(_chars(r)) for r in refs) / len(refs)
    return out


_FUNCTIONS: dict[str, Callable[[Sequence[str], Sequence[str]], dict]] = {
    "bleu-4": bleu4_char,
    "bleu-corpus": bleu_corpus,
    "rouge-1": rouge1,
    "rouge-2": rouge2,
    "rouge-l": rougel,
    "meteor": meteor,
    "distinct-1": distinct1,
    "distinct-2": distinct2,
    "length": length,
}


def reference_metrics(preds: Sequence[str], refs: Sequence[str], metrics: Sequence[str] = METRICS) -> dict:
    """Every reference metric (or those named) on the paired predictions and references: {name: result}."""
    _check(preds, refs)
    unknown = [m for m in metrics if m not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    return {m: _FUNCTIONS[m](preds, refs) for m in metrics}
