"""Intervals over seeds: the statistics the sweep report and the THTL finding share.

Runs of one configuration differ only in their seed, so a configuration is summarised by its mean and the 95 %
t-interval over its seeds (mean_ci); two configurations are compared by the 95 % Welch t-interval of the
difference of their means (welch_interval): their seeds are independent runs with possibly different spreads, so
neither pairing by seed nor a pooled variance is justified.
"""
from __future__ import annotations

import math

#: The confidence level of every interval over seeds.
CONFIDENCE = 0.95


def _t_quantile(dof: float) -> float:
    """The two-sided CONFIDENCE quantile of Student's t with `dof` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf((1 + CONFIDENCE) / 2, dof))


def mean_ci(values) -> tuple[int, float | None, float | None]:
    """(n, mean, half-width of the 95 % t-interval over seeds); the half-width is None for n < 2."""
    import numpy as np

    values = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                        dtype=np.float64)
    if len(values) == 0:
        return 0, None, None
    if len(values) == 1:
        return 1, float(values[0]), None
    half = _t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return len(values), float(values.mean()), float(half)


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """(mean(a) - mean(b), low, high) of the 95 % Welch t-interval; no interval when a side has < 2 values."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, None, None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t_quantile(dof) * se
    return diff, diff - half, diff + half
