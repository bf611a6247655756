"""Error bars: a 95% interval for every accuracy, paired bootstrap intervals for ratios and differences.

With 200 samples the top methods of a table sit within a few points, so every accuracy carries its
interval:
- `wilson_interval`: the Wilson score interval of a proportion (per cell; scipy's ``binomtest``).
- `paired_bootstrap`: a percentile interval of a statistic of two score vectors over the *same*
  samples, resampled together (``scipy.stats.bootstrap(paired=True)``, seeded), for
  ``accuracy_rel`` (pruned / unpruned) and for differences between two methods.
Scores are per-sample values in [0, 1] (exact match gives 0/1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

#: Bootstrap resamples (percentile intervals stabilise to ~0.005 at this count for n = 200).
N_RESAMPLES = 2000
LEVEL = 0.95


def wilson_interval(scores: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the mean of ``scores`` (successes rounded to the nearest integer)."""
    from scipy.stats import binomtest

    n = len(scores)
    if n == 0:
        raise ValueError("wilson_interval: no scores")
    k = int(round(float(np.sum(scores))))
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(a) / mean(b) along ``axis`` (nan where mean(b) == 0)."""
    num, den = np.mean(a, axis=axis), np.mean(b, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def difference_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(a) - mean(b) along ``axis``."""
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], statistic: Callable[..., np.ndarray] = difference_of_means,
    seed: int = 0, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(a, b)`` with the pairs (a[i], b[i]) resampled together.

    ``a`` and ``b`` are scores of the same samples in the same order. Returns None when the interval
    is undefined (fewer than 2 samples, or the statistic is nan on some resample, e.g. a ratio to an
    all-wrong reference).
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_bootstrap: a and b must be 1-D and of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    if np.all(x == x[0]) and np.all(y == y[0]):  # no variation: the interval is the point
        v = float(statistic(x, y))
        return None if np.isnan(v) else (v, v)
    with warnings.catch_warnings():  # a nan statistic on some resample: reported as None below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap((x, y), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                        confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if np.isnan(lo) or np.isnan(hi) else (lo, hi)


def paired_scores(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    """The scores of the sample ids ``a`` and ``b`` share, in one order (sorted ids)."""
    ids = sorted(set(a) & set(b))
    return [a[i] for i in ids], [b[i] for i in ids]
