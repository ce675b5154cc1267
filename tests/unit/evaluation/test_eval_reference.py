"""Reference metrics (evaluation/reference.py) against values computed by hand on fixed strings."""

from __future__ import annotations

import math

import pytest

from evaluation import reference as R

# The known pair. Characters: ref 我今天很开心 (6), pred 我今天开心 (5).
# jieba words: ref 我/今天/很/开心 (4), pred 我/今天/开心 (3) (checked in test_jieba_words).
REF = "我今天很开心"
PRED = "我今天开心"

# BLEU-4 on characters, by hand:
#   1-grams: 我 今 天 开 心 all in ref          -> 5/5
#   2-grams: 我今 今天 天开 开心; ref has 我今 今天 开心 -> 3/4
#   3-grams: 我今天 今天开 天开心; ref has 我今天      -> 1/3
#   4-grams: 我今天开 今天开心; none in ref            -> 0/2, smoothed (nltk method3 = sacrebleu "exp"):
#            the k-th zero precision becomes 1 / (2^k * total) = 1 / (2 * 2) = 1/4
#   geometric mean = (1 * 3/4 * 1/3 * 1/4) ** (1/4) = (1/16) ** (1/4) = 1/2
#   brevity penalty = exp(1 - 6/5) = exp(-0.2)
#   BLEU = 100 * exp(-0.2) / 2 = 40.9365...
BLEU_PAIR = 100 * math.exp(-0.2) / 2

# ROUGE F over jieba words (rouge-chinese: F = 2PR / (P + R + 1e-8)):
#   ROUGE-1: overlap 我 今天 开心 = 3; P = 3/3, R = 3/4 -> F = 2 * 0.75 / 1.75 = 6/7
#   ROUGE-2: pred bigrams 我今天, 今天开心 (2); ref 我今天, 今天很, 很开心 (3); overlap 1 -> P 1/2, R 1/3
#            -> F = 2 * (1/6) / (5/6) = 2/5
#   ROUGE-L: one sentence each; LCS 我 今天 开心 = 3 -> P 1, R 3/4 -> F = 6/7
ROUGE1_PAIR = 100 * 6 / 7
ROUGE2_PAIR = 100 * 2 / 5
ROUGEL_PAIR = 100 * 6 / 7

# METEOR (nltk: alpha 0.9, beta 3, gamma 0.5) over the jieba words:
#   matches 3; P = 1, R = 3/4; Fmean = P R / (alpha P + (1 - alpha) R) = 0.75 / (0.9 + 0.075) = 0.75 / 0.975
#   chunks: (我,今天) adjacent in both, 开心 is not (pred 2 -> ref 3): 2 chunks; frag = 2/3
#   penalty = gamma * frag^beta = 0.5 * 8/27; METEOR = Fmean * (1 - penalty)
METEOR_PAIR = 100 * (0.75 / 0.975) * (1 - 0.5 * (2 / 3) ** 3)

IDENTICAL = "我最近总是担心考试考不好，晚上睡不着。"
DISJOINT_PRED = "天气晴朗"
DISJOINT_REF = "他们去学校"


def test_jieba_words():
    assert R.words(REF) == ["我", "今天", "很", "开心"]
    assert R.words(PRED) == ["我", "今天", "开心"]
    assert R.words(" a  b ") == ["a", "b"]  # whitespace tokens dropped


def test_identical_scores_100():
    p, r = [IDENTICAL], [IDENTICAL]
    assert R.bleu4_char(p, r)["score"] == pytest.approx(100.0)
    assert R.bleu_corpus(p, r)["score"] == pytest.approx(100.0)
    for fn in (R.rouge1, R.rouge2, R.rougel):  # rouge-chinese's F = 2PR / (P + R + 1e-8): 99.9999995
        assert fn(p, r)["score"] == pytest.approx(100.0, abs=1e-5)
    # METEOR on identical text of n words: P = R = 1, one chunk, frag = 1/n -> 100 * (1 - 0.5 / n^3)
    n = len(R.words(IDENTICAL))
    assert n > 1
    assert R.meteor(p, r)["score"] == pytest.approx(100 * (1 - 0.5 / n**3))


def test_disjoint_scores_0():
    p, r = [DISJOINT_PRED], [DISJOINT_REF]
    assert not set(DISJOINT_PRED) & set(DISJOINT_REF)
    for fn in (R.bleu4_char, R.bleu_corpus, R.rouge1, R.rouge2, R.rougel, R.meteor):
        assert fn(p, r)["score"] == 0.0, fn.__name__


def test_known_pair_by_hand():
    p, r = [PRED], [REF]
    assert R.bleu4_char(p, r)["score"] == pytest.approx(BLEU_PAIR)
    # sacrebleu tok:zh splits CJK characters, and its "exp" smoothing is method3: same arithmetic, same number
    assert R.bleu_corpus(p, r)["score"] == pytest.approx(BLEU_PAIR)
    assert R.rouge1(p, r)["score"] == pytest.approx(ROUGE1_PAIR, abs=1e-5)
    assert R.rouge2(p, r)["score"] == pytest.approx(ROUGE2_PAIR, abs=1e-5)
    assert R.rougel(p, r)["score"] == pytest.approx(ROUGEL_PAIR, abs=1e-5)
    assert R.meteor(p, r)["score"] == pytest.approx(METEOR_PAIR)


def test_bleu4_char_is_llamafactory_recipe():
    """LLaMA-Factory's ComputeSimilarity: sentence_bleu([list(label)], list(pred), method3) * 100, mean.
    (The reference list is wrapped once more: sentence_bleu takes a list of references.)"""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    preds = [PRED, IDENTICAL, "我有点担心考试", "abxd", DISJOINT_PRED]
    refs = [REF, IDENTICAL, "我很担心明天的考试", "abcd", DISJOINT_REF]
    recipe = [
        sentence_bleu([list(r)], list(p), smoothing_function=SmoothingFunction().method3) * 100
        for p, r in zip(preds, refs)
    ]
    out = R.bleu4_char(preds, refs)
    assert out["per_sample"] == pytest.approx(recipe)
    assert out["score"] == pytest.approx(sum(recipe) / len(recipe))
    # abxd vs abcd by hand: 3/4, 1/3, 0/2 -> 1/4, 0/1 -> 1/4; (3/4 * 1/3 * 1/4 * 1/4) ** (1/4) = (1/64) ** (1/4)
    assert out["per_sample"][3] == pytest.approx(100 * (1 / 64) ** 0.25)


def test_chinese_rouge_nonzero_and_rouge_score_gives_zero():
    p, r = ["我最近很焦虑，睡不着"], ["最近我总是焦虑，晚上睡不着"]
    assert R.rouge1(p, r)["score"] > 30
    assert R.rougel(p, r)["score"] > 0
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed")
    scorer = rouge_score.RougeScorer(["rouge1"])
    assert scorer.score(r[0], p[0])["rouge1"].fmeasure == 0.0  # its default tokenizer keeps [a-z0-9] only


def test_meteor_offline_no_synonyms_but_stems():
    # WordNet would match "glad" with "happy"; our stub has no synonyms, so only "I" and "am" match.
    # 2 matches of 3 each: P = R = 2/3, Fmean = 2/3; one chunk of 2: frag 1/2, penalty 0.5 * 1/8
    out = R.meteor(["I am glad"], ["I am happy"])
    assert out["score"] == pytest.approx(100 * (2 / 3) * (1 - 0.5 / 8))
    assert "synonyms:none" in out["signature"]
    # the Porter stemmer needs no download: cats/cat and runs/run match (3 matches, 1 chunk)
    assert R.meteor(["the cats run"], ["The cat runs"])["score"] == pytest.approx(100 * (1 - 0.5 / 27))


def test_distinct_and_length_exact():
    preds = ["好 好好", "好的"]  # chars without spaces: 好好好 | 好的
    refs = ["x", "yz"]
    # 1-grams: 好 好 好 好 的 -> 2 unique of 5; 2-grams: 好好 好好 | 好的 -> 2 unique of 3
    assert R.distinct1(preds, refs)["score"] == pytest.approx(100 * 2 / 5)
    assert R.distinct2(preds, refs)["score"] == pytest.approx(100 * 2 / 3)
    out = R.length(preds, refs)
    assert out["per_sample"] == [3.0, 2.0]
    assert out["score"] == 2.5
    assert out["reference_mean"] == 1.5


def test_empty_predictions_do_not_crash():
    out = R.reference_metrics(["", PRED], [REF, REF])
    for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "meteor"):
        assert out[name]["per_sample"][0] == 0.0
        assert "1 of 2 predictions empty" in out[name]["note"]
    assert out["bleu-4"]["score"] == pytest.approx(BLEU_PAIR / 2)
    assert "predictions empty" in out["bleu-corpus"]["note"]
    only_empty = R.reference_metrics(["  "], [REF])
    assert all(v["score"] == 0.0 for v in only_empty.values())
    none = R.reference_metrics([], [])
    assert all(v["score"] is None and v["n"] == 0 and v["note"] == "no samples" for v in none.values())


def test_reference_metrics_shape_and_signatures():
    out = R.reference_metrics([PRED, IDENTICAL], [REF, IDENTICAL])
    assert list(out) == list(R.METRICS)
    for name, v in out.items():
        assert v["n"] == 2, name
        assert set(v) >= {"score", "n", "per_sample", "signature"}
    assert out["bleu-4"]["signature"] == (
        "bleu4-char|nltk-3.10.4|tok:char|smooth:method3|weights:uniform-4|mean-of-sentences|x100"
    )
    assert out["bleu-corpus"]["signature"] == (
        "bleu-corpus|sacrebleu|nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0"
    )
    assert out["rouge-l"]["signature"].startswith("rouge-l-f|rouge-chinese-1.0.3|summary-level-lcs|tok:jieba-0.42.1")
    assert "nltk-3.10.4" in out["meteor"]["signature"]
    assert out["bleu-corpus"]["per_sample"] is None and out["distinct-1"]["per_sample"] is None
    with pytest.raises(ValueError, match="pair by position"):
        R.reference_metrics(["a"], [])
    with pytest.raises(ValueError, match="unknown metric"):
        R.reference_metrics(["a"], ["a"], metrics=["bertscore"])
