"""Bootstrap intervals for the eval's means and rates, so no score is read without its uncertainty.

`bootstrap_ci` is the percentile bootstrap of the mean: draw `resamples` samples of size n with replacement, take
each one's mean, and report the (1 - confidence)/2 and (1 + confidence)/2 quantiles of those means (numpy's
default linear interpolation). Seeded, so a report is reproducible. `with_ci` puts the 95% interval on a metric
result (evaluation/reference.py's shape) from its per-answer scores, or from 0/1 flags for a rate.

Memory: resamples x n indices at once would be 8 GB at n = 1e6, so the draws go in blocks of about 4M indices;
the numbers do not depend on the block size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_BLOCK = 1 << 22  # indices drawn per block


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values`: None for no values, (x, x) for one value or
    constant values (every resample has the same mean)."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // x.size)
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(rows, resamples - start), x.size))].mean(axis=1)
            for start in range(0, resamples, rows)
        ]
    )
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def with_ci(result: dict, *, values: Sequence[float] | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """A copy of a metric result with "ci95": [lo, hi], the 95% percentile bootstrap of the mean of `values`
    (0/1 flags for a rate) or, when not given, of the result's per_sample scores; None when there are none
    (corpus-level metrics such as corpus BLEU and distinct-n have no per-answer scores). "ci_method" names how."""
    sample = result.get("per_sample") if values is None else values
    ci = bootstrap_ci(sample, resamples=resamples, seed=seed) if sample is not None else None
    out = dict(result)
    out["ci95"] = list(ci) if ci is not None else None
    out["ci_method"] = f"bootstrap-percentile|mean|resamples:{resamples}|seed:{seed}" if ci is not None else None
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n: honest at 0 and at n, unlike the normal approximation."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 or k = n an end is exactly 0 or 1; in floats centre -/+ half can land a hair inside the rate
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)
