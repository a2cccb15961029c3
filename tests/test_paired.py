"""Paired differences between SAEs scored on the same evaluation items: stored bootstrap replicates, the
study's paired standard errors, the paired noise marks of --compare and the report, against slow literal
references that redraw every resample with resample_counts' generator."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from orthosae.eval import absorption as A
from orthosae.eval import absorption_calc as calc
from orthosae.eval import core_stats as CS
from orthosae.eval import uncertainty as U
from orthosae.eval.compare import compare_rows, format_rows
from orthosae.eval.results import section_replicates
from orthosae.eval.saebench_files import saebench_file
from orthosae.report import study as S
from orthosae.report.load import Experiment, SAERun, split_sections
from orthosae.report.tables import metrics_table

R = 400  # resamples in these tests
SEED = 3


# ------------------------------------------------------------------ literal references


def _draws(n: int, n_resamples: int, seed: int) -> list[list[int]]:
    """The unit indices of every resample, drawn as resample_counts draws them (one generator, row by row)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_resamples, n), generator=gen).tolist()


def _literal_means(values: list[float], n_resamples: int, seed: int) -> list[float]:
    """The mean of each resample, by looping over its drawn units."""
    return [sum(values[i] for i in idx) / len(idx) for idx in _draws(len(values), n_resamples, seed)]


def _literal_percentiles(samples: list[float], level: float = 0.95) -> tuple[float, float]:
    """Linear-interpolation percentiles of the finite samples (numpy's and torch's default method)."""
    s = sorted(x for x in samples if math.isfinite(x))

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        return s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])

    return q((1 - level) / 2), q((1 + level) / 2)


def _units(n: int, seed: int, rho: float, shift: float = 0.0) -> tuple[list[float], list[float]]:
    """Per-unit values of two SAEs on the same n units; their unit-to-unit noise has correlation rho."""
    g = torch.Generator().manual_seed(seed)
    common, own_a, own_b = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    a = 0.5 + 0.1 * (math.sqrt(rho) * common + math.sqrt(1 - rho) * own_a)
    b = 0.5 + shift + 0.1 * (math.sqrt(rho) * common + math.sqrt(1 - rho) * own_b)
    return a.tolist(), b.tolist()


def _point(values: list[float], key: str | None = "items", n_resamples: int = R, seed: int = SEED) -> S.Point:
    """One SAE's Point of a mean over units, with its replicates as the evals compute them."""
    v = torch.tensor(values, dtype=torch.float64)
    reps = (U.resample_counts(len(values), n_resamples, seed) @ v) / len(values)
    ci = U.percentile_interval(reps)
    assert ci is not None
    return S.Point(statistics.fmean(values), U.standard_error(ci), reps, key)


# ------------------------------------------------------------------ (a) stored replicates and paired se


def test_core_replicates_equal_a_literal_loop_over_resamples():
    g = torch.Generator().manual_seed(0)
    n, d = 12, 3
    x = torch.randn(n * 5, d, generator=g, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(n * 5, d, generator=g, dtype=torch.float64)
    acts = torch.relu(torch.randn(n * 5, 6, generator=g, dtype=torch.float64))
    context = torch.arange(n * 5) % n
    sums = CS.by_context(CS.recon_token_values(x, x_hat, acts), context, n)
    reps = CS.resampled(CS.recon_metrics, sums, 50, SEED)
    assert reps is not None
    for r, idx in enumerate(_draws(n, 50, SEED)):
        rows = torch.cat([torch.nonzero(context == i).flatten() for i in idx])  # each drawn context's tokens
        xs, xh = x[rows], x_hat[rows]
        ev = 1 - (xs - xh).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
        assert float(reps["explained_variance"][r]) == pytest.approx(float(ev), rel=1e-12)
        assert float(reps["l0"][r]) == pytest.approx(
            float((acts[rows] > 0).sum(-1).double().mean()), rel=1e-12
        )
    # The interval is the one the replicates give, and the stored form keeps 7 significant digits.
    assert CS.intervals(CS.recon_metrics, sums, 50, SEED)["mse"] == U.as_list(
        U.percentile_interval(reps["mse"])
    )
    stored = U.replicates_tensor(json.loads(json.dumps(U.replicates_json(reps["mse"]))))
    assert stored is not None
    torch.testing.assert_close(stored, reps["mse"], rtol=1e-6, atol=0)


def test_absorption_replicates_equal_a_literal_loop_over_letters():
    g = torch.Generator().manual_seed(1)
    letters = [(torch.rand(n, generator=g, dtype=torch.float64), (torch.rand(n, generator=g) < 0.3).double())
               for n in (7, 11, 5)]  # fmt: skip
    reps = calc.letter_mean_replicates(letters, n_resamples=60, seed=SEED)
    assert reps is not None and reps.shape == (2, 60)
    draws = [
        _draws(len(v[0]), 60, SEED + li) for li, v in enumerate(letters)
    ]  # letter li draws with seed + li
    for r in range(60):
        for vi in range(2):
            per_letter = [
                sum(float(v[vi][i]) for i in d[r]) / len(d[r]) for v, d in zip(letters, draws, strict=True)
            ]
            assert float(reps[vi, r]) == pytest.approx(statistics.fmean(per_letter), rel=1e-12)
    iv = calc.letter_mean_intervals(letters, n_resamples=60, seed=SEED)
    assert iv[0] == U.as_list(U.percentile_interval(reps[0]))


def test_paired_se_and_interval_equal_the_literal_resampled_difference():
    base_seeds = [_units(40, s, 0.8)[0] for s in (0, 1)]
    other_seeds = [_units(40, s, 0.8, shift=0.02)[1] for s in (0, 1, 2)]
    spread, df = 0.004, 3
    base = S.estimate([_point(v) for v in base_seeds], spread, df)
    other = S.estimate([_point(v) for v in other_seeds], spread, df)
    d = S.difference(base, other)
    # Literal: per resample, the mean over seeds of each variant's resampled mean, then their difference.
    lit_base = [
        statistics.fmean(col) for col in zip(*(_literal_means(v, R, SEED) for v in base_seeds), strict=True)
    ]
    lit_other = [
        statistics.fmean(c) for c in zip(*(_literal_means(v, R, SEED) for v in other_seeds), strict=True)
    ]
    e_diff = statistics.stdev([o - b for o, b in zip(lit_other, lit_base, strict=True)])
    se = math.sqrt(spread**2 / 3 + spread**2 / 2 + e_diff**2)
    assert d.rule == "paired" and d.se == pytest.approx(se, rel=1e-10)
    value = statistics.fmean(map(statistics.fmean, other_seeds)) - statistics.fmean(
        map(statistics.fmean, base_seeds)
    )
    assert d.value == pytest.approx(value, rel=1e-12)
    assert (d.lo, d.hi) == pytest.approx((value - S.t975(df) * se, value + S.t975(df) * se), rel=1e-10)
    # A variant's own eval error is the spread of its seed-mean replicates.
    assert base.rule == "paired"
    assert base.se == pytest.approx(math.sqrt(spread**2 / 2 + statistics.stdev(lit_base) ** 2), rel=1e-10)
    # --compare's paired interval is the percentile interval of the resampled differences.
    a, b = _point(base_seeds[0]), _point(other_seeds[0])
    assert a.reps is not None and b.reps is not None
    means_a, means_b = _literal_means(base_seeds[0], R, SEED), _literal_means(other_seeds[0], R, SEED)
    lit = [y - x for x, y in zip(means_a, means_b, strict=True)]
    assert U.paired_interval(a.reps, b.reps) == pytest.approx(_literal_percentiles(lit), rel=1e-10)


# ------------------------------------------------------------------ (b) correlation


def test_paired_se_is_smaller_for_correlated_units_and_equal_for_independent_ones():
    a, b = _units(300, 5, rho=0.9)
    pa, pb = _point(a), _point(b)
    assert pa.se is not None and pb.se is not None
    paired = S.difference(S.estimate([pa], 0.0, 0), S.estimate([pb], 0.0, 0))
    independent = math.hypot(pa.se, pb.se)
    assert paired.rule == "paired" and paired.se < 0.5 * independent  # 1 − ρ of the variance is left
    a, b = _units(300, 5, rho=0.0)
    pa, pb = _point(a), _point(b)
    assert pa.se is not None and pb.se is not None
    paired = S.difference(S.estimate([pa], 0.0, 0), S.estimate([pb], 0.0, 0))
    assert paired.se == pytest.approx(math.hypot(pa.se, pb.se), rel=0.1)


# ------------------------------------------------------------------ (c) fallback


def test_difference_falls_back_to_the_independent_rule():
    a, b = _units(40, 0, 0.8)
    bare = [S.Point(p.value, p.se) for p in (_point(a), _point(b))]  # no replicates
    for pa, pb in [
        (bare[0], _point(b)),
        (_point(a, key="n_units=40"), _point(b, key="n_units=41")),  # not the same items
        (_point(a, n_resamples=R), _point(b, n_resamples=R - 1, key="items")),  # lengths differ
    ]:
        ea, eb = S.estimate([pa], 0.01, 2), S.estimate([pb], 0.01, 2)
        d = S.difference(ea, eb)
        assert d.rule == "independent" and d.se == pytest.approx(math.hypot(ea.se, eb.se))
    # A variant whose seeds do not all pair falls back too (and so does its difference).
    mixed = S.estimate([_point(a), bare[1]], 0.01, 2)
    assert mixed.rule == "independent" and mixed.reps is None
    assert mixed.se == pytest.approx(
        math.sqrt(0.01**2 / 2 + statistics.fmean(p.se**2 for p in (_point(a), bare[1])))
    )


def test_pairing_needs_the_same_items_units_seed_and_resamples():
    cfg = U.bootstrap_config("context", 40, R, SEED) | {"items": {"dataset": "d", "heldout_first_context": 0}}
    assert U.pairing(cfg) == U.pairing(dict(cfg))
    for change in ({"n_units": 41}, {"seed": 4}, {"n_resamples": R + 1}, {"items": {"dataset": "e"}}):
        assert U.pairing(cfg | change) != U.pairing(cfg)
    assert U.pairing({k: v for k, v in cfg.items() if k != "items"}) is None  # which items: unknown
    assert U.pairing(cfg | {"n_units": 1}) is None and U.pairing(None) is None


# ------------------------------------------------------------------ planted experiments


def _section(
    kind: str, metric: str, values: list[float], n_units: int | None = None, with_reps: bool = True
) -> dict[str, Any]:
    """A core or absorption section holding one mean-over-units metric, its interval and replicates."""
    n = len(values)
    v = torch.tensor(values, dtype=torch.float64)
    reps = (U.resample_counts(n, R, SEED) @ v) / n
    group, name = metric.split(".")
    metrics = {
        group: {name: statistics.fmean(values), U.ci_key(name): U.as_list(U.percentile_interval(reps))}
    }
    cfg = {"bootstrap_config": U.bootstrap_config("unit", n_units or n, R, SEED) | {"items": {"set": "x"}}}
    block: dict[str, Any] = (
        {"metrics": metrics, "eval_cfg": cfg}
        if kind == "core"
        else {"eval_result_metrics": metrics, "eval_config": cfg, "eval_id": "i", "datetime_epoch_millis": 1}
    )
    if with_reps:
        block[U.REPLICATES_KEY] = {metric: U.replicates_json(reps)}
    return block


ABS, CE = "mean.mean_absorption_fraction_score", "model_performance_preservation.ce_loss_score"


def _study_experiment(with_reps: bool = True, other_units: int | None = None) -> Experiment:
    """Baseline 'topk' and 'orth' (λ = 0.1), one seed each, on the same 60 words and 60 contexts: orth's
    absorption is 0.012 lower and its CE-loss score 0.008 lower per unit, with small unit-level noise on
    top of large shared item-to-item variation (wide per-SAE intervals)."""
    g = torch.Generator().manual_seed(7)
    words = 0.4 + 0.15 * torch.randn(60, generator=g, dtype=torch.float64)
    ctxs = 0.92 + 0.05 * torch.randn(60, generator=g, dtype=torch.float64)
    noise = [0.004 * torch.randn(60, generator=g, dtype=torch.float64) for _ in range(2)]
    saes = {}
    for name, shift, eps, lam in (("topk", 0.0, noise[0], None), ("orth", 1.0, noise[1], 0.1)):
        units = other_units if name == "orth" else None
        sections = {
            "absorption evaluation results": _section(
                "absorption", ABS, (words - 0.012 * shift + eps).tolist(), units, with_reps
            ),
            "core evaluation results": _section(
                "core", CE, (ctxs - 0.008 * shift + eps).tolist(), units, with_reps
            ),
        }
        cfg = {"arch": "topk", "orthogonality": None if lam is None else {"lambda": lam}}
        saes[name] = SAERun(name, Path(name), cfg, [], split_sections(sections, Path(name)))
    return Experiment(Path("x"), {}, saes, None)


def test_small_effect_inside_the_independent_noise_is_found_paired():
    paired = S.build_study(_study_experiment(), "topk")
    d_abs, d_ce = paired.diff("orth", "absorption"), paired.diff("orth", "ce_loss_score")
    assert d_abs is not None and d_ce is not None and d_abs.rule == d_ce.rule == "paired"
    assert d_abs.hi < 0 and d_ce.hi < 0  # both effects outside the paired noise
    text = "\n".join(S.verdict(paired))
    assert "**Verdict:** λ = 0.1 lowers the absorption fraction" in text
    assert "λ = 0.1 (1 seed) lowers absorption" in text and "(paired)" in text
    assert f"CE-loss score Δ {d_ce.value:+.3f}" in text and "inside the noise" not in text
    assert "Differences are paired" in text  # the rule is stated

    for exp in (_study_experiment(with_reps=False), _study_experiment(other_units=61)):
        independent = S.build_study(exp, "topk")
        d_abs = independent.diff("orth", "absorption")
        assert d_abs is not None and d_abs.rule == "independent" and d_abs.lo < 0 < d_abs.hi
        text = "\n".join(S.verdict(independent))
        assert "no measurable effect on absorption" in text
        assert "does not measurably change absorption" in text and "(independent, inside the noise)" in text


def test_compare_and_report_mark_the_paired_difference():
    exp = _study_experiment()
    results = [{k: v for k, v in _blocks(exp, n).items() if v is not None} for n in ("topk", "orth")]
    rows = {r.metric: r for r in compare_rows(results)}
    row = rows["absorption/mean/mean_absorption_fraction_score"]
    assert row.outside_noise == [False, True] and row.rules == ["paired", "paired"]
    assert "Rules used here: 2 paired." in format_rows(list(rows.values()), ["topk", "orth"])
    assert not any("bootstrap_replicates" in m for m in rows)  # replicates are not metrics
    table = metrics_table(exp, "topk")
    cells = {r[0].text: r[-1].text for r in table.rows}
    assert cells["mean.mean_absorption_fraction_score"].endswith(" *")
    # Without replicates the same difference is inside the independent noise.
    bare = _study_experiment(with_reps=False)
    results = [{k: v for k, v in _blocks(bare, n).items() if v is not None} for n in ("topk", "orth")]
    row = {r.metric: r for r in compare_rows(results)}["absorption/mean/mean_absorption_fraction_score"]
    assert row.outside_noise == [False, False] and row.rules == ["independent", "independent"]
    cells = {r[0].text: r[-1].text for r in metrics_table(bare, "topk").rows}
    assert cells["mean.mean_absorption_fraction_score"].endswith(" ~")


def _blocks(exp: Experiment, name: str) -> dict[str, Any]:
    s = exp.saes[name].sections
    return {"absorption evaluation results": s["absorption"], "core evaluation results": s["core"]}


def test_saebench_file_leaves_the_replicates_out():
    block = _section("absorption", ABS, [0.1, 0.2, 0.4, 0.3])
    block["eval_result_metrics"]["mean"] |= {k: 0.5 for k in A.MEAN_KEYS[1:]}  # SAEBench requires them all
    block |= {"sae_cfg_dict": {"model_name": "m", "hook_layer": 1}}
    out = saebench_file("absorption", block, "m_layer_1_sae", "x")
    assert out is not None and U.REPLICATES_KEY not in json.dumps(out)
    assert section_replicates(block)[1].keys() == {ABS}


# ------------------------------------------------------------------ (e) edge cases


def test_nan_resamples_are_dropped_from_both_sides():
    a, b = _units(40, 1, 0.7)
    pa, pb = _point(a), _point(b)
    assert pa.reps is not None and pb.reps is not None
    ra, rb = pa.reps.clone(), pb.reps.clone()
    ra[[3, 10]] = math.nan
    rb[[10, 25, 77]] = math.inf
    # Through JSON: non-finite values are stored as null and read back as NaN.
    ra = U.replicates_tensor(json.loads(json.dumps(U.replicates_json(ra))))
    assert ra is not None and ra[3].isnan() and U.replicates_json(rb)[25] is None
    keep = [r for r in range(R) if r not in (3, 10, 25, 77)]
    lit = [float(rb[r] - ra[r]) for r in keep]
    d = S.difference(S.estimate([S.Point(pa.value, pa.se, ra, "k")], 0.0, 0),
                     S.estimate([S.Point(pb.value, pb.se, rb, "k")], 0.0, 0))  # fmt: skip
    assert d.rule == "paired" and d.se == pytest.approx(statistics.stdev(lit), rel=1e-10)
    assert U.paired_interval(ra, rb) == pytest.approx(_literal_percentiles(lit), rel=1e-10)
    # A resample non-finite for one seed is dropped from the variant's seed mean.
    e = S.estimate([S.Point(0.5, None, ra, "k"), S.Point(0.5, None, pb.reps, "k")], 0.0, 0)
    finite = [float(ra[r] + pb.reps[r]) / 2 for r in range(R) if r not in (3, 10)]
    assert e.rule == "paired" and e.se == pytest.approx(statistics.stdev(finite), rel=1e-10)
    # Mostly non-finite: no paired verdict, so the intervals decide.
    junk = torch.full((R,), math.nan, dtype=torch.float64)
    assert U.paired_differs(junk, rb) is None
    assert U.noise_verdict(0.5, [0.4, 0.6], 0.52, [0.42, 0.62], (junk, rb)) == (False, "independent")


def test_one_seed_per_variant_uses_the_normal_quantile_and_replicate_se():
    a, b = _units(50, 2, 0.5)
    pa, pb = _point(a), _point(b)
    assert pa.reps is not None and pb.reps is not None
    ea, eb = S.estimate([pa], 0.0, 0), S.estimate([pb], 0.0, 0)
    assert ea.q == pytest.approx(1.959964) and ea.se == pytest.approx(float(pa.reps.std()), rel=1e-12)
    d = S.difference(ea, eb)
    assert d.se == pytest.approx(float((pb.reps - pa.reps).std()), rel=1e-12)


def test_fewer_than_two_units_store_no_replicates():
    one = {"n": torch.ones(1, dtype=torch.float64), "resid_sq": torch.ones(1, dtype=torch.float64)}
    assert CS.resampled(lambda s, w: {"mse": (w @ s["resid_sq"]) / (w @ s["n"])}, one, R, SEED) is None
    assert calc.letter_mean_replicates([(torch.ones(1), torch.zeros(1))], n_resamples=R) is None
    assert calc.letter_mean_replicates([(torch.ones(0), torch.zeros(0))], n_resamples=R) is None
    assert calc.letter_mean_replicates([(torch.ones(3), torch.zeros(3))], n_resamples=0) is None
    block = _section("core", CE, [0.9, 0.8], n_units=1)  # a record claiming one unit does not pair
    assert section_replicates(block) == (None, {})


def test_results_text_puts_number_arrays_on_one_line():
    from orthosae.eval.runner import results_text

    obj = {"s": {"bootstrap_replicates": {"m": [0.5, None, -1e-07]}, "t": "[\n 1\n]", "l": ["a", 1], "e": []}}
    text = results_text(obj)
    assert json.loads(text) == obj and '"m": [0.5, null, -1e-07]' in text
    assert '"a",\n' in text  # arrays holding strings keep json.dumps' layout
