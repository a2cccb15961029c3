"""Bootstrap 95 % intervals for the evals' headline numbers, and the test that two SAEs differ.

A resample draws n units with replacement (units: eval contexts for core, words for absorption, test
examples for probing, questions for unlearning). It is represented by its count vector w ∈ ℕⁿ (how often
each unit was drawn), so a statistic that is a function of per-unit sums (a mean, a ratio of sums, an
explained variance) is evaluated for all resamples at once as W @ sums. The interval is the percentile
interval of the resampled statistic (Efron & Tibshirani, ch. 13).

In a results JSON a metric `m` with an interval gets a sibling `m_ci95 = [lo, hi]`, and the eval's config
records how the intervals were made (`bootstrap_config`). Core and absorption also store the resampled
values of their headline metrics (section["bootstrap_replicates"], which SAEBench's files leave out), with
bootstrap_config["items"] naming the resampled units: two SAEs with equal `pairing` keys were resampled
identically, so their difference is judged resample by resample (`paired_differs`).
"""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------- paired differences

# Every SAE of an experiment is scored on the same items with the same seeded resamples, so resample r of one
# SAE and resample r of another draw the same units: the difference of their resampled values is the
# resampled difference, whose spread holds only the noise that does not cancel.

REPLICATES_KEY = "bootstrap_replicates"  # in a section: {"<group>.<metric>": [R resampled values]}
REPLICATE_DIGITS = 7  # significant digits kept: far below any interval's width, a third of a float64's size
# bootstrap_config fields that must agree for two evals' resamples to be the same draws of the same units.
PAIRING_KEYS = ("method", "n_resamples", "seed", "n_units", "n_units_reconstruction", "items")


def replicates_json(samples: torch.Tensor, digits: int = REPLICATE_DIGITS) -> list[float | None]:
    """Resampled values as JSON: each rounded to `digits` significant digits, non-finite ones null."""
    return [float(f"{v:.{digits - 1}e}") if math.isfinite(v) else None for v in samples.double().tolist()]


def replicates_tensor(values: Any) -> torch.Tensor | None:
    """Stored replicates as float64 (R,), null as NaN; None unless a non-empty list of numbers and nulls."""
    if not isinstance(values, list) or not values:
        return None
    if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values):
        return None
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


def pairing(config: Any) -> str | None:
    """A key that two evals share exactly when their replicates pair (same units, same resamples); None
    when the bootstrap_config does not say which items were resampled, or there was no resampling."""
    if not isinstance(config, dict) or config.get("items") is None:
        return None
    n, r = config.get("n_units"), config.get("n_resamples")
    if not isinstance(n, int) or not isinstance(r, int) or n < 2 or r <= 0:
        return None
    return json.dumps({k: config.get(k) for k in PAIRING_KEYS}, sort_keys=True)


def replicate_sd(samples: torch.Tensor) -> float | None:
    """Standard deviation of the finite resampled values (the bootstrap standard error); None when fewer
    than half are finite, as percentile_interval."""
    s = samples.double().flatten()
    finite = s[torch.isfinite(s)]
    if finite.numel() < max(2, s.numel() // 2):
        return None
    return float(finite.std())


def paired_interval(
    rep_a: torch.Tensor, rep_b: torch.Tensor, level: float = LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of b − a from paired replicates (a resample non-finite in either is dropped)."""
    if rep_a.shape != rep_b.shape:
        raise ValueError(f"paired replicates differ in shape: {tuple(rep_a.shape)} and {tuple(rep_b.shape)}")
    return percentile_interval(rep_b.double() - rep_a.double(), level)


def paired_differs(rep_a: torch.Tensor, rep_b: torch.Tensor) -> bool | None:
    """Is b − a outside the noise by the paired rule (its percentile interval excludes 0)? None: too few
    finite resamples."""
    iv = paired_interval(rep_a, rep_b)
    return None if iv is None else iv[0] > 0 or iv[1] < 0


Replicates = tuple[str | None, dict[str, torch.Tensor]]  # (pairing key, metric → replicates), per SAE


def paired(a: Replicates, b: Replicates, metric: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two SAEs' replicates of `metric` when they pair (same pairing key, same length); else None."""
    key_a, reps_a = a
    key_b, reps_b = b
    ra, rb = reps_a.get(metric), reps_b.get(metric)
    if key_a is None or key_a != key_b or ra is None or rb is None or ra.shape != rb.shape:
        return None
    return ra, rb


def noise_verdict(
    a: float,
    a_ci: list[float] | tuple[float, float] | None,
    b: float,
    b_ci: list[float] | tuple[float, float] | None,
    reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[bool, str] | None:
    """(is b − a outside the noise?, the rule used): "paired" from paired replicates when they give a
    verdict, else "independent" from the two intervals (`differs`); None when neither is there."""
    if reps is not None and (outside := paired_differs(*reps)) is not None:
        return outside, "paired"
    if a_ci is None or b_ci is None:
        return None
    return differs(a, a_ci, b, b_ci), "independent"
