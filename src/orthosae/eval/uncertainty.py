"""Bootstrap 95 % intervals for the evals' headline numbers, and the test that two SAEs differ.

A resample draws n units with replacement (units: eval contexts for core, words for absorption, test
examples for probing, questions for unlearning). It is represented by its count vector w ∈ ℕⁿ (how often
each unit was drawn), so a statistic that is a function of per-unit sums (a mean, a ratio of sums, an
explained variance) is evaluated for all resamples at once as W @ sums. The interval is the percentile
interval of the resampled statistic (Efron & Tibshirani, ch. 13).

In a results JSON a metric `m` with an interval gets a sibling `m_ci95 = [lo, hi]`, and the eval's config
records how the intervals were made (`bootstrap_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

LEVEL = 0.95
N_RESAMPLES = 1000
CI_SUFFIX = "_ci95"


def ci_key(metric: str) -> str:
    return metric + CI_SUFFIX


def resample_counts(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(n_resamples, n) float64 counts: row r says how often each of the n units is in resample r
    (each row sums to n). Seeded, so a re-run gives the same interval."""
    if n <= 0:
        return torch.zeros(n_resamples, 0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_resamples, n), generator=gen)
    counts = torch.zeros(n_resamples, n, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def percentile_interval(samples: torch.Tensor, level: float = LEVEL) -> tuple[float, float] | None:
    """(lo, hi) percentiles of the finite resampled values; None when fewer than half are finite."""
    s = samples.double().flatten()
    s = s[torch.isfinite(s)]
    if s.numel() < max(2, samples.numel() // 2):
        return None
    alpha = (1 - level) / 2
    q = torch.quantile(s, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def stat_interval(
    stat: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Interval of any statistic given as stat(W) → (n_resamples,) for count matrices W (n_resamples, n).
    None with fewer than 2 units (no spread to resample)."""
    if n < 2:
        return None
    return percentile_interval(stat(resample_counts(n, n_resamples, seed)), level)


def mean_interval(values: torch.Tensor, **kw: Any) -> tuple[float, float] | None:
    """Interval of the mean of per-unit values (n,)."""
    v = values.double().flatten()
    return stat_interval(lambda w: (w @ v) / w.sum(dim=1), v.numel(), **kw)


def ratio_interval(num: torch.Tensor, den: torch.Tensor, **kw: Any) -> tuple[float, float] | None:
    """Interval of Σ num / Σ den over units, e.g. a per-token mean with units = contexts
    (num = the context's sum, den = its token count)."""
    a, b = num.double().flatten(), den.double().flatten()
    return stat_interval(lambda w: (w @ a) / (w @ b), a.numel(), **kw)


def as_list(interval: tuple[float, float] | None) -> list[float] | None:
    """JSON form: [lo, hi], or None (null) when no interval could be made."""
    if interval is None or not all(math.isfinite(x) for x in interval):
        return None
    return [interval[0], interval[1]]


def bootstrap_config(unit: str, n_units: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """What the eval's config records about its intervals."""
    return {
        "method": "percentile bootstrap",
        "level": LEVEL,
        "n_resamples": n_resamples,
        "unit": unit,
        "n_units": n_units,
        "seed": seed,
    }


def standard_error(interval: list[float] | tuple[float, float]) -> float:
    """The normal-theory standard error a 95 % interval implies: width / (2·1.96)."""
    lo, hi = interval
    return (hi - lo) / (2 * 1.959964)


def difference_interval(
    a: float, a_ci: list[float] | tuple[float, float], b: float, b_ci: list[float] | tuple[float, float]
) -> tuple[float, float]:
    """95 % interval of b − a from each value's own interval, treating them as independent. When both SAEs
    were scored on the same eval items the true interval is narrower (positively correlated errors), so
    "outside the noise" by this rule is conservative."""
    se = math.hypot(standard_error(a_ci), standard_error(b_ci))
    d = b - a
    return d - 1.959964 * se, d + 1.959964 * se


def differs(
    a: float, a_ci: list[float] | tuple[float, float], b: float, b_ci: list[float] | tuple[float, float]
) -> bool:
    """Is b − a outside the noise (its 95 % interval excludes 0)?"""
    lo, hi = difference_interval(a, a_ci, b, b_ci)
    return lo > 0 or hi < 0
