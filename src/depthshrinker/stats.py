"""95 % intervals for the aggregate table: Wilson's score interval for a top-1 measured on one held-out split,
Student's t-interval for a mean over seeds (Wilson 1927; any statistics text for the t-interval)."""
from __future__ import annotations

import math

from scipy import stats

LEVEL = 0.95


def wilson(correct: int, total: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / total`` (as fractions):
    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; stays inside [0, 1], sensible at p = 0 or 1."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"wilson: need 0 <= correct <= total and total > 0 (got {correct}/{total})")
    z = stats.norm.ppf(0.5 + level / 2)
    p, n = correct / total, total
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    """Student's t-interval of the mean of ``values`` (n >= 2): ``mean ± t(n-1) · s / sqrt(n)``, s the sample
    standard deviation (ddof 1)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"t_interval: needs at least 2 values (got {n})")
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n)
    return float(mean - half), float(mean + half)
