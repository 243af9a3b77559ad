"""Intervals and paired tests for evaluation numbers.

* :func:`wilson_interval` — Wilson score interval for a proportion k/n (closed form).
* :func:`clopper_pearson_interval` — the exact (conservative) binomial interval, from the beta
  distribution's quantiles (``scipy.special.betaincinv``, the inverse regularized incomplete beta):
  ``[B(α/2; k, n−k+1), B(1−α/2; k+1, n−k)]``, with 0 / 1 at k = 0 / k = n.
* :func:`mcnemar_exact` — McNemar's test for two classifiers scored on the same items: under the null
  the b discordant pairs "A right, B wrong" among the b + c discordant ones are Binomial(b + c, ½);
  two-sided exact p-value ``min(1, 2·P(X ≤ min(b, c)))``, summed in exact integer arithmetic (equal to
  ``scipy.stats.binomtest``; tested).
* :func:`paired_bootstrap` — the difference of a statistic between two systems scored on the same
  items, with a percentile interval from resampling *items* (both systems resampled together), and a
  two-sided bootstrap p-value ``min(1, 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)))``.

The bootstrap interval (``metrics.mean_with_ci``) is kept beside the exact ones: for accuracies the
two agree closely except near 0 or 1 and for small n, where the percentile bootstrap is too narrow
(it is degenerate at k = 0) and Wilson / Clopper–Pearson are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from statistics import NormalDist

import numpy as np


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval for ``k`` successes in ``n`` trials (None when n = 0)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside 0..n={n}")
    z = _z(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Exact Clopper–Pearson interval for ``k`` successes in ``n`` trials (None when n = 0)."""
    from scipy.special import betaincinv

    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside 0..n={n}")
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return [lo, hi]


def proportion_intervals(correct: Sequence[float], confidence: float = 0.95) -> dict[str, list[float] | None]:
    """``{"wilson": […], "clopper_pearson": […]}`` for 0/1 values (fractional credits are rounded
    to the nearest whole count, which only matters for chance-level baselines)."""
    values = np.asarray(correct, dtype=np.float64)
    n = int(values.size)
    k = int(round(float(values.sum())))
    return {"wilson": wilson_interval(k, n, confidence), "clopper_pearson": clopper_pearson_interval(k, n, confidence)}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (A right, B wrong) and ``c``
    (A wrong, B right); 1.0 when there is no discordant pair."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = int(b + c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(int(b), int(c)) + 1))
    return min(1.0, float(Fraction(2 * tail, 2 ** n)))


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    bootstrap: int,
    confidence: float,
    rng: np.random.Generator,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, object]:
    """Difference ``stat(a) − stat(b)`` over the same items, with a paired-bootstrap interval.

    ``a``/``b`` are per-item values ``[n]`` (or per-item rows ``[n, d]`` with a ``statistic`` that
    maps summed rows ``[r, d]`` → ``[r]``, e.g. corpus BLEU from sufficient statistics). Without
    ``statistic`` the statistic is the mean. Returns ``{"diff", "ci", "p_value", "n"}`` (ci and
    p_value None when ``bootstrap`` is 0).
    """
    from .metrics import percentile_interval, resample_counts

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        return {"diff": None, "ci": None, "p_value": None, "n": 0}
    if statistic is None:
        point = float(a.mean() - b.mean())
    else:
        point = float(statistic(a.sum(axis=0)[None])[0] - statistic(b.sum(axis=0)[None])[0])
    if bootstrap <= 0:
        return {"diff": point, "ci": None, "p_value": None, "n": int(n)}
    diffs = []
    for w in resample_counts(n, bootstrap, rng):
        if statistic is None:
            diffs.append((w @ a - w @ b) / n)
        else:
            diffs.append(statistic(w @ a) - statistic(w @ b))
    d = np.concatenate(diffs)
    p = min(1.0, 2.0 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return {"diff": point, "ci": percentile_interval(d, confidence), "p_value": p, "n": int(n)}
