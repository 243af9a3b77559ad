"""Intervals, the bootstrap and paired tests for evaluation numbers.

* :func:`resample_counts` — the one item bootstrap: resamples of n items as multiplicity counts, so a
  statistic of a resample is a weighted sum (``w @ values``); :func:`percentile_interval` turns the
  resampled values into an interval, :func:`mean_with_ci` does both for a mean, and
  :func:`stable_seed` seeds each resampled quantity from its name (reproducible, never ``hash()``).

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

The bootstrap interval (:func:`mean_with_ci`) is kept beside the exact ones: for accuracies the
two agree closely except near 0 or 1 and for small n, where the percentile bootstrap is too narrow
(it is degenerate at k = 0) and Wilson / Clopper–Pearson are not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
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


def stable_seed(*parts: object) -> int:
    """A 32-bit integer from strings/ints (md5; never Python's salted ``hash()``)."""
    digest = hashlib.md5("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def resample_counts(n: int, bootstrap: int, rng: np.random.Generator, block: int = 256) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` items as multiplicity counts, in blocks ``[b, n]`` (rows sum to n)."""
    for start in range(0, bootstrap, block):
        b = min(block, bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """The percentile interval ``[lo, hi]`` of bootstrap values."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def mean_with_ci(
    values: np.ndarray, *, bootstrap: int, confidence: float, rng: np.random.Generator
) -> tuple[float, list[float] | None]:
    """Mean of per-item values ``[n]`` and its percentile-bootstrap interval (None when ``bootstrap`` is 0)."""
    n = len(values)
    point = float(values.mean())
    if bootstrap <= 0:
        return point, None
    boots = np.concatenate([w @ values / n for w in resample_counts(n, bootstrap, rng)])
    return point, percentile_interval(boots, confidence)


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
