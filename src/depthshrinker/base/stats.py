"""95 % intervals for the aggregate table: Wilson's score interval for a top-1 measured on one held-out split,
Student's t-interval for a mean over seeds (Wilson 1927; any statistics text for the t-interval), and a rank
correlation for test-retest."""
from __future__ import annotations

import math

from scipy import stats

LEVEL = 0.95


def wilson(correct: int, total: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / total`` (as fractions), without continuity correction
    (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``); stays inside [0, 1], sensible at p = 0 or 1."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"wilson: need 0 <= correct <= total and total > 0 (got {correct}/{total})")
    ci = stats.binomtest(correct, total).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    """Student's t-interval of the mean of ``values`` (n >= 2): ``mean ± t(n-1) · s / sqrt(n)``, s the sample
    standard deviation (ddof 1); equal values give the mean itself (``scipy.stats.t.interval`` gives NaN)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"t_interval: needs at least 2 values (got {n})")
    mean = sum(values) / n
    half = stats.t.ppf(0.5 + level / 2, n - 1) * stats.tstd(values) / math.sqrt(n)
    return float(mean - half), float(mean + half)


def prediction_interval(mean: float, std: float, n: int, m: int, level: float = LEVEL) -> tuple[float, float]:
    """Where the mean of ``m`` new replicates lands with probability ``level``, from ``n`` replicates of mean
    ``mean`` and sample standard deviation ``std``: ``mean ± t(n-1) · std · sqrt(1/n + 1/m)`` (same variance)."""
    if n < 2:
        raise ValueError(f"prediction_interval: needs at least 2 replicates (got {n})")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std * math.sqrt(1 / n + 1 / m)
    return float(mean - half), float(mean + half)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of paired values (ties get their mean rank): how well a test and its retest
    order the same items."""
    return float(stats.spearmanr(a, b).statistic)
