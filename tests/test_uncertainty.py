"""Bootstrap intervals against a literal resampling loop, and the difference test."""

from __future__ import annotations

import math
import random

import pytest
import torch

from orthosae.eval import uncertainty as U


def _literal_draws(n: int, n_resamples: int, seed: int) -> list[list[int]]:
    """The same draws resample_counts makes, as explicit index lists."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_resamples, n), generator=gen).tolist()


def _literal_percentiles(samples: list[float], level: float = 0.95) -> tuple[float, float]:
    """Linear-interpolation percentiles (numpy's default / torch.quantile) written out."""
    s = sorted(samples)
    out = []
    for q in ((1 - level) / 2, 1 - (1 - level) / 2):
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out[0], out[1]


def test_counts_match_the_draws():
    counts = U.resample_counts(7, 50, seed=3)
    for row, draw in zip(counts.tolist(), _literal_draws(7, 50, 3), strict=True):
        assert row == [draw.count(i) for i in range(7)]
    assert (counts.sum(dim=1) == 7).all()


def test_mean_interval_equals_literal_loop():
    rng = random.Random(0)
    values = [rng.gauss(1.0, 2.0) for _ in range(40)]
    got = U.mean_interval(torch.tensor(values, dtype=torch.float64), n_resamples=300, seed=5)
    means = [sum(values[i] for i in d) / len(d) for d in _literal_draws(40, 300, 5)]
    want = _literal_percentiles(means)
    assert got is not None
    assert got == pytest.approx(want, rel=1e-9)


def test_ratio_interval_equals_literal_loop():
    rng = random.Random(1)
    num = [rng.uniform(0, 10) for _ in range(25)]
    den = [rng.randint(1, 9) for _ in range(25)]
    got = U.ratio_interval(torch.tensor(num, dtype=torch.float64), torch.tensor(den), n_resamples=200, seed=2)
    ratios = [sum(num[i] for i in d) / sum(den[i] for i in d) for d in _literal_draws(25, 200, 2)]
    assert got == pytest.approx(_literal_percentiles(ratios), rel=1e-9)


def test_interval_covers_the_truth_at_about_95_percent():
    # Coverage check of the method itself: normal data with known mean 0.
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        x = torch.randn(60, generator=gen)
        lo, hi = U.mean_interval(x, n_resamples=400, seed=trial)  # type: ignore[misc]
        hits += lo <= 0.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_edge_cases():
    assert U.mean_interval(torch.tensor([1.0])) is None  # one unit: no spread
    assert U.mean_interval(torch.tensor([])) is None
    assert U.mean_interval(torch.full((10,), 2.5)) == pytest.approx((2.5, 2.5))  # constant
    assert U.as_list(None) is None
    assert U.as_list((float("nan"), 1.0)) is None
    # A ratio whose denominator is always 0 (0/0 = NaN) yields no interval, not a NaN one.
    num, den = torch.zeros(10), torch.zeros(10)
    assert U.ratio_interval(num, den, n_resamples=200) is None
    assert U.percentile_interval(torch.tensor([float("nan")] * 10)) is None


def test_difference_rule():
    # Two values whose intervals overlap a little can still differ; far apart ones always do.
    assert U.differs(0.30, [0.28, 0.32], 0.40, [0.38, 0.42])
    assert not U.differs(0.30, [0.20, 0.40], 0.33, [0.23, 0.43])
    lo, hi = U.difference_interval(1.0, [0.9, 1.1], 1.5, [1.4, 1.6])
    se = math.hypot(0.2 / 3.919928, 0.2 / 3.919928)
    assert (lo, hi) == pytest.approx((0.5 - 1.959964 * se, 0.5 + 1.959964 * se))
