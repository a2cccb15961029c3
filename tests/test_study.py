"""The study summary: t quantiles, pooled seed spread, variant intervals, the generated verdict, seeds and
eval reuse in experiment files."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from orthosae.errors import UserError
from orthosae.experiment import reuse
from orthosae.experiment.config import build_experiment
from orthosae.report import study as S
from orthosae.report.load import Experiment, SAERun, split_sections

# ------------------------------------------------------------------ literal references


def _t_cdf(t: float, df: int, steps: int = 20000) -> float:
    """Student t CDF by Simpson integration of its density from 0 to t (the slow, literal reference)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = t / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 6, 10, 17, 30, 31, 45, 120])
def test_t_quantile_matches_the_integrated_density(df: int):
    assert _t_cdf(S.t975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_t_quantile_without_degrees_of_freedom_is_the_normal():
    assert S.t975(0) == pytest.approx(1.959964)


def test_pooled_spread_is_the_pooled_sample_sd():
    groups = [[0.40, 0.45, 0.47], [0.30], [0.2, 0.26]]
    ss = sum((v - statistics.fmean(g)) ** 2 for g in groups if len(g) > 1 for v in g)
    sd, df = S.pooled_spread(groups)
    assert df == 3 and sd == pytest.approx(math.sqrt(ss / 3))
    assert S.pooled_spread([[1.0], [2.0]]) == (0.0, 0)  # no variant with two seeds: nothing to pool
    assert S.pooled_spread([]) == (0.0, 0)


def test_estimate_combines_seed_spread_and_shared_eval_noise():
    pts = [S.Point(0.4, 0.02), S.Point(0.5, 0.04), S.Point(0.45, None)]
    e = S.estimate(pts, spread=0.05, df=4)
    assert e.value == pytest.approx(0.45) and e.n == 3
    assert e.se == pytest.approx(math.sqrt(0.05**2 / 3 + (0.02**2 + 0.04**2) / 2))
    assert e.hi - e.value == pytest.approx(2.7764 * e.se)
    one = S.estimate([S.Point(0.3, 0.01)], spread=0.0, df=0)  # one seed, no spread known: eval noise only
    assert one.se == pytest.approx(0.01) and one.q == pytest.approx(1.959964)
    with pytest.raises(ValueError):
        S.estimate([], 0.1, 2)


def test_difference_adds_standard_errors():
    a, b = S.Estimate(0.5, 0.03, 3, 2.78), S.Estimate(0.3, 0.04, 1, 2.78)
    d = S.difference(a, b)
    assert d.value == pytest.approx(-0.2) and d.se == pytest.approx(0.05)
    assert S.excludes_zero(d) and not S.excludes_zero(S.difference(a, S.Estimate(0.45, 0.04, 1, 2.78)))


# ------------------------------------------------------------------ a planted experiment


def _sections(absorption: float, ev: float, ce: float, half: float = 0.02, l0: float = 40.0) -> dict:
    return {
        "core evaluation results": {
            "metrics": {
                "reconstruction_quality": {
                    "explained_variance": ev,
                    "explained_variance_ci95": [ev - 0.004, ev + 0.004],
                },
                "model_performance_preservation": {
                    "ce_loss_score": ce,
                    "ce_loss_score_ci95": [ce - 0.006, ce + 0.006],
                },
                "sparsity": {"l0": l0},
            }
        },
        "absorption evaluation results": {
            "eval_result_metrics": {
                "mean": {
                    "mean_absorption_fraction_score": absorption,
                    "mean_absorption_fraction_score_ci95": [absorption - half, absorption + half],
                }
            }
        },
    }


def _experiment(
    values: dict[str, tuple[float, float, float]], groups: dict[str, list[str]], lam: dict
) -> Experiment:
    saes = {}
    for name, (a, ev, ce) in values.items():
        variant = next(g for g, ms in groups.items() if name in ms)
        orth = {"lambda": lam[variant]} if lam.get(variant) is not None else None
        arch = "relu" if variant == "relu" else "topk"
        cfg = {"arch": arch, "orthogonality": orth, "training": {"tokens_seen": 512_000}}
        l0 = 180.0 if arch == "relu" else 40.0
        saes[name] = SAERun(
            name, Path(name), cfg, [], split_sections(_sections(a, ev, ce, l0=l0), Path(name))
        )
    return Experiment(Path("x"), {"groups": groups}, saes, None)


GROUPS = {
    "topk": ["topk", "topk-seed2", "topk-seed3"],
    "orth-0.001": ["orth-0.001"],
    "orth-0.1": ["orth-0.1", "orth-0.1-seed2", "orth-0.1-seed3"],
    "relu": ["relu"],
}
LAMBDAS = {"topk": None, "orth-0.001": 0.001, "orth-0.1": 0.1, "relu": None}


def _values(orth_abs: float, orth_ce: float) -> dict[str, tuple[float, float, float]]:
    return {
        "topk": (0.46, 0.71, 0.925),
        "topk-seed2": (0.47, 0.709, 0.926),
        "topk-seed3": (0.45, 0.711, 0.924),
        "orth-0.001": (0.462, 0.71, 0.925),
        "orth-0.1": (orth_abs, 0.70, orth_ce),
        "orth-0.1-seed2": (orth_abs + 0.01, 0.70, orth_ce),
        "orth-0.1-seed3": (orth_abs - 0.01, 0.70, orth_ce),
        "relu": (0.29, 0.79, 0.967),
    }


def test_verdict_names_the_lambda_that_lowers_absorption_with_its_numbers():
    st = S.build_study(_experiment(_values(0.30, 0.92), GROUPS, LAMBDAS), "topk")
    assert st.variants["topk"].saes == GROUPS["topk"] and st.estimates["topk"]["absorption"].n == 3
    assert st.spread["absorption"][1] == 4  # two variants of three seeds
    text = "\n".join(S.verdict(st))
    assert "**Verdict:** λ = 0.1 lowers the absorption fraction from 0.460" in text
    assert "λ = 0.001 (1 seed) does not measurably change absorption" in text
    assert "512,000 tokens (5.1% of the seed experiment's 10M)" in text
    d = st.diff("orth-0.1", "absorption")
    assert d is not None and f"{d.value:+.3f}" in text
    assert "'relu' (relu, L0 180) reads absorption 0.290" in text and "not like for like" in text


def test_verdict_says_no_effect_when_the_reduction_costs_too_much_ce_or_is_noise():
    costly = "\n".join(S.verdict(S.build_study(_experiment(_values(0.30, 0.90), GROUPS, LAMBDAS), "topk")))
    assert "no measurable effect on absorption at any λ that keeps the CE-loss score within 0.01" in costly
    assert "λ = 0.1 (3 seeds) lowers absorption" in costly  # still reported, with its cost
    noise = "\n".join(S.verdict(S.build_study(_experiment(_values(0.455, 0.925), GROUPS, LAMBDAS), "topk")))
    assert "no measurable effect" in noise and "λ = 0.1 (3 seeds) does not measurably change" in noise


def test_verdict_without_results_says_so():
    exp = _experiment({"topk": (0.4, 0.7, 0.9)}, {"topk": ["topk"]}, {"topk": None})
    exp.saes["topk"].sections["absorption"] = None
    paragraphs = S.verdict(S.build_study(exp, "topk"))
    assert paragraphs[0].startswith("Each SAE trained on") and paragraphs[-1].startswith("No verdict")
    assert S.verdict(S.build_study(exp, "nope"))[0].startswith("No verdict")


def test_ungrouped_saes_are_their_own_variants_and_pareto_rows_cover_all():
    exp = _experiment(_values(0.3, 0.92), GROUPS, LAMBDAS)
    exp.config = {}
    st = S.build_study(exp, "topk")
    assert len(st.variants) == 8 and st.spread["absorption"] == (0.0, 0)
    table = S.pareto_table(exp, st)
    assert [r[0].text for r in table.rows] == list(exp.saes)


# ------------------------------------------------------------------ seeds and reuse in experiment files


def test_seeds_expand_into_init_seeds_on_one_stream():
    exp = build_experiment(
        {"seed": 7, "train": {"steps": 5}, "saes": {"topk": {"seeds": 3}, "orth": {"orth": True}}}, source="t"
    )
    assert list(exp.saes) == ["topk", "topk-seed2", "topk-seed3", "orth"]
    assert [exp.saes[n].init_seed for n in exp.groups["topk"]] == [7, 8, 9]
    assert {c.seed for c in exp.saes.values()} == {7} and exp.saes["orth"].init_seed is None
    assert exp.groups == {"topk": ["topk", "topk-seed2", "topk-seed3"], "orth": ["orth"]}


@pytest.mark.parametrize(
    ("saes", "fragment"),
    [
        ({"a": {"seeds": 0}}, "'seeds' must be a whole number"),
        ({"a": {"seeds": 2.5}}, "'seeds' must be a whole number"),
        ({"a": {"seeds": 2, "init_seed": 3}}, "not both"),
        ({"a": {"seeds": 2}, "a-seed2": {}}, "used twice"),
    ],
)
def test_bad_seeds(saes: dict[str, Any], fragment: str):
    with pytest.raises(UserError) as e:
        build_experiment({"saes": saes}, source="t")
    assert fragment in str(e.value)


def test_init_seed_changes_the_init_only(tmp_path: Path):
    from orthosae.train.config import TrainConfig
    from orthosae.train.trainer import build_sae

    base = dict(activations="x", d_sae=16, k=2)
    a = build_sae(TrainConfig(**base, seed=1), 8)
    b = build_sae(TrainConfig(**base, seed=1, init_seed=1), 8)
    c = build_sae(TrainConfig(**base, seed=1, init_seed=2), 8)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert any((p != q).any() for p, q in zip(a.parameters(), c.parameters(), strict=True))
    # So an unset init_seed trains like init_seed = seed, and nothing else is read loosely.
    assert TrainConfig(**base, seed=1).trains_like(TrainConfig(**base, seed=1, init_seed=1))
    assert not TrainConfig(**base, seed=1).trains_like(TrainConfig(**base, seed=1, init_seed=2))
    assert not TrainConfig(**base, seed=1).trains_like(TrainConfig(**base, seed=2, init_seed=1))


def test_eval_reuse_keeps_only_sections_whose_inputs_match(tmp_path: Path):
    from orthosae.eval import absorption, core

    weights = tmp_path / "sae.safetensors"
    weights.write_bytes(b"w1")
    cfgs = {"core": core.Config(), "absorption": absorption.Config()}
    fps = reuse.fingerprints(cfgs, weights, {"model": "m", "layer": 3, "seed": 1})
    (tmp_path / "eval.json").write_text(
        json.dumps({"core evaluation results": {"x": 1}, "absorption evaluation results": {"y": 2}})
    )
    assert reuse.reusable(tmp_path, fps) == {}  # nothing recorded yet
    reuse.record(tmp_path, fps)
    assert set(reuse.reusable(tmp_path, fps)) == {"core evaluation results", "absorption evaluation results"}
    changed = reuse.fingerprints(
        {"core": core.Config(n_eval_reconstruction_batches=3), "absorption": absorption.Config()},
        weights,
        {"model": "m", "layer": 3, "seed": 1},
    )
    assert set(reuse.reusable(tmp_path, changed)) == {"absorption evaluation results"}
    weights.write_bytes(b"w2")  # retrained: every eval is stale
    assert (
        reuse.reusable(tmp_path, reuse.fingerprints(cfgs, weights, {"model": "m", "layer": 3, "seed": 1}))
        == {}
    )
    (tmp_path / "eval.json").write_text("{torn")
    assert reuse.reusable(tmp_path, fps) == {}
