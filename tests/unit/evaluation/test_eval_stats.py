"""Bootstrap intervals (evaluation/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import stats as S


def test_degenerate_inputs():
    assert S.bootstrap_ci([]) is None
    assert S.bootstrap_ci([3.5]) == (3.5, 3.5)
    assert S.bootstrap_ci([2.0] * 50) == (2.0, 2.0)


def test_deterministic_by_seed_and_contains_the_mean():
    x = np.random.default_rng(1).normal(50, 10, size=200)
    a, b = S.bootstrap_ci(x, seed=7), S.bootstrap_ci(x, seed=7)
    assert a == b
    assert S.bootstrap_ci(x, seed=8) != a
    lo, hi = a
    assert lo < x.mean() < hi
    # the normal-theory 95% interval of the mean is mean +- 1.96 sd / sqrt(n); the bootstrap's is close to it
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_width_shrinks_with_n():
    rng = np.random.default_rng(2)
    small, large = rng.normal(0, 1, size=20), rng.normal(0, 1, size=2000)
    w_small = np.subtract(*S.bootstrap_ci(small)[::-1])
    w_large = np.subtract(*S.bootstrap_ci(large)[::-1])
    # width goes as 1 / sqrt(n): 10x for 100x the samples; allow for sampling noise
    assert 5 < w_small / w_large < 20


def test_confidence_widens_the_interval():
    x = np.random.default_rng(3).normal(size=100)
    lo90, hi90 = S.bootstrap_ci(x, confidence=0.90)
    lo99, hi99 = S.bootstrap_ci(x, confidence=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_block_size_does_not_change_the_numbers(monkeypatch):
    x = np.random.default_rng(4).integers(0, 2, size=101)
    whole = S.bootstrap_ci(x)
    monkeypatch.setattr(S, "_BLOCK", 101 * 7 + 3)  # 7 resamples per block, the last block short
    assert S.bootstrap_ci(x) == whole


def test_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        S.bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        S.bootstrap_ci([1.0, 2.0], resamples=0)


def test_with_ci_on_metric_results():
    result = {"score": 50.0, "n": 4, "per_sample": [0.0, 100.0, 0.0, 100.0], "signature": "s"}
    out = S.with_ci(result)
    lo, hi = out["ci95"]
    assert 0.0 <= lo < 50.0 < hi <= 100.0
    assert out["ci_method"] == "bootstrap-percentile|mean|resamples:1000|seed:0"
    assert "ci95" not in result  # a copy, the input is left alone
    # a corpus-level metric has no per-answer scores: no interval
    corpus = S.with_ci({"score": 30.0, "n": 4, "per_sample": None, "signature": "c"})
    assert corpus["ci95"] is None and corpus["ci_method"] is None
    # a rate from its 0/1 flags
    rate = S.with_ci({"score": 0.25, "n": 4, "signature": "r"}, values=[1, 0, 0, 0])
    assert rate["ci95"][0] == 0.0 and 0.25 < rate["ci95"][1] <= 1.0
    assert S.with_ci({"score": None, "n": 0, "signature": "r"}, values=[])["ci95"] is None
