"""`orthosae report`: tables, verdicts, plots, the feature-browser pass, missing or broken input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from orthosae.activations.cache import build_cache, open_cache
from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS
from orthosae.report import FeatureOptions, build_report, compute_features
from orthosae.report.features import sample_plan
from orthosae.report.tables import metrics_table, preserved
from orthosae.sae import ReLUSAE, TopKSAE, save_sae

D_IN, D_SAE, K = 32, 64, 4
LETTERS = "abcdefghij"


# ------------------------------------------------------------------ fixtures mimicking runs/<name>/


def fake_evals(seed: int, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The four sections in the seed's key schema, with made-up numbers."""
    rng = np.random.default_rng(seed)
    core = {
        "metrics": {
            "model_behavior_preservation": {"kl_div_score": 0.96 - 0.02 * seed, "kl_div_with_sae": 0.4},
            "model_performance_preservation": {"ce_loss_score": 0.959, "ce_loss_with_sae": 3.33},
            "reconstruction_quality": {
                "explained_variance": 0.61 + 0.001 * seed,
                "mse": 2.48,
                "cossim": 0.875,
            },
            "shrinkage": {"l2_ratio": 0.875, "relative_reconstruction_bias": 0.996},
            "sparsity": {"l0": 40.0, "l1": 364.0},
        }
    }
    absorption = {
        "eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.14 - 0.05 * seed}},
        "eval_result_details": [
            {"first_letter": c, "mean_absorption_fraction": float(rng.uniform(0, 0.3))} for c in LETTERS
        ],
    }
    ks = (1, 2, 5, 10, 20, 50)
    probing = {
        "eval_result_metrics": {
            "llm": {f"llm_top_{k}_test_accuracy": 0.6 + 0.05 * i for i, k in enumerate(ks)}
            | {"llm_test_accuracy": 0.95, "llm_top_100_test_accuracy": None},
            "sae": {f"sae_top_{k}_test_accuracy": 0.7 + 0.04 * i + 0.01 * seed for i, k in enumerate(ks)}
            | {"sae_test_accuracy": 0.95},
        }
    }
    unlearning = {"eval_result_metrics": {"unlearning": {"unlearning_score": 0.026 + 0.01 * seed}}}
    blocks = {"core": core, "absorption": absorption, "sparse_probing": probing, "unlearning": unlearning}
    return {SECTION_KEYS[s]: b for s, b in blocks.items() if s not in skip}


def _metrics_rows(orth: bool, n: int = 12) -> list[dict[str, Any]]:
    return [
        {
            "step": 10 * i,
            "tokens": 10240 * i,
            "recon": 10.0 / (i + 1),
            "auxk": 0.5 / (i + 1),
            "l1": 0.0,
            "orth": 3.0 / (i + 1) if orth else 0.0,
            "orth_scaled": 0.01 / (i + 1) if orth else 0.0,
            "loss": 11.0 / (i + 1),
            "l0": float(K),
            "dead_frac": 0.5 / (i + 1),
            "lr": 1e-3,
            "tokens_per_s": 5000.0,
        }
        for i in range(n)
    ]


def make_experiment(root: Path, cache: Path | None, model_name: str | None, *, evals: bool = True) -> Path:
    """runs/<name>/ as the experiment runner writes it: saes/{topk,orth,relu}, speed.json, results.json."""
    exp = root / "exp"
    gen = torch.Generator().manual_seed(0)
    meta = {"model_name": model_name, "hook_layer": 1}
    saes = {
        "topk": (TopKSAE(D_IN, D_SAE, K, generator=gen), {**meta, "orthogonality": None}),
        "orth": (
            TopKSAE(D_IN, D_SAE, K, generator=gen),
            {**meta, "orthogonality": {"lambda": 1e-3, "method": "pairwise", "L_orth_init": 2.5}},
        ),
        "relu": (ReLUSAE(D_IN, D_SAE, generator=gen), {**meta, "orthogonality": None}),
    }
    combined = {}
    for i, (name, (sae, extra)) in enumerate(saes.items()):
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) * 0.3)
        run = save_sae(sae, exp / "saes" / name, extra)
        rows = _metrics_rows(name == "orth")
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        combined[name] = fake_evals(i, skip=("unlearning",) if name == "relu" else ())
        if evals and name != "relu":  # relu's results only in the combined results.json
            (run / "eval.json").write_text(json.dumps(combined[name]))
    if evals:
        (exp / "results.json").write_text(json.dumps(combined))
        speed = {
            "machine": "test cpu",
            "shape": {"d_in": D_IN, "d_sae": D_SAE, "k": K, "batch_size": 64},
            "rows": [
                {"name": "topk", "seconds_per_step": 0.1, "ratio_to_baseline": 1.0},
                {"name": "orth/pairwise", "seconds_per_step": 0.12, "ratio_to_baseline": 1.2},
                {"name": "orth/masked_dense", "seconds_per_step": 2.0, "ratio_to_baseline": 20.0},
                {"name": "orth/sparse", "seconds_per_step": 0.9},
            ],
        }
        (exp / "speed.json").write_text(json.dumps(speed))
    (exp / "experiment.toml").write_text(f'name = "exp"\ncache = "{cache}"\n' if cache else 'name = "exp"\n')
    return exp


def build_tiny_world(root: Path) -> tuple[Path, Path]:
    """A tiny llama + byte tokenizer saved as a model dir, and a 3000-token cache of its layer 1."""
    from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl

    model_dir = save_tiny_model(root / "model")
    corpus = write_jsonl(root / "corpus.jsonl", SAMPLE_TEXTS)
    cache = build_cache(
        root / "cache",
        model_name=str(model_dir),
        layer=1,
        n_tokens=3000,
        corpus=str(corpus),
        context_size=32,
        batch_size=8,
        shard_tokens=1024,
        progress=False,
    )
    return model_dir, cache


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_world(tmp_path_factory.mktemp("report_world"))


@pytest.fixture
def experiment(tmp_path: Path, tiny_world: tuple[Path, Path]) -> Path:
    model_dir, cache = tiny_world
    return make_experiment(tmp_path, cache, str(model_dir))


SMALL = FeatureOptions(max_tokens=2000, batch_tokens=300, n_examples=4, window=3)


# ------------------------------------------------------------------ tests


def test_full_report(experiment: Path) -> None:
    md, page = build_report(experiment, "topk", feature_options=SMALL)
    text, html = md.read_text(), page.read_text()
    # The comparison table: every SAE a column, Δ to the baseline, verdicts, the rule, "not run" for relu.
    assert "| metric | topk (baseline) | orth | relu | Δ orth vs topk | Δ relu vs topk |" in text
    assert "reconstruction_quality.explained_variance" in text and "✓" in text and "✗" in text
    assert "unlearning.unlearning_score" in text and "not run" in text
    assert "preserved (✓)" in text
    assert "orth/masked_dense" in text and "20.00×" in text and "9.00×" in text  # ratio computed if absent
    for stem in ("pareto", "training_curves", "absorption_by_letter", "sparse_probing_vs_k", "coactive_cos2"):
        png = experiment / "figures" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert f"](figures/{stem}.png)" in text
    # Self-contained: data-URI images and inline SVG, nothing fetched.
    assert html.count('src="data:image/png;base64,') == 5 and "<svg" in html
    # The study opens the report: a verdict from the numbers and the Pareto table.
    assert text.index("## Study") < text.index("## Metrics") and "**Verdict:**" in text
    assert "| variant | arch | λ | seeds | absorption fraction |" in text
    for external in ('src="http', 'href="http', "<link", "@import", "url("):
        assert external not in html
    feats = json.loads((experiment / "features.json").read_text())
    assert set(feats["saes"]) == {"topk", "orth", "relu"} and feats["n_tokens"] == 2000
    topk = feats["saes"]["topk"]
    reasons = {r.split(" (")[0].split(" with")[0] for f in topk["features"] for r in f["reasons"]}
    assert reasons == {"most frequent", "random alive", "co-active pair"}
    f0 = topk["features"][0]
    assert len(f0["logits"]) == 10 and 0 < len(f0["examples"]) <= 4
    ex = f0["examples"][0]
    assert len(ex["tokens"]) == len(ex["acts"]) <= 7 and ex["acts"][ex["center"]] == pytest.approx(
        ex["act"], 1e-3
    )
    assert "".join(ex["tokens"]).strip() and ex["tokens"][ex["center"]] in html.replace("&#x27;", "'")
    # Rebuilding reuses features.json (no model load, no cache pass).
    build_report(experiment, "topk", feature_options=SMALL, model=_NoModel())  # type: ignore[arg-type]


class _NoModel:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("the model must not be loaded when features.json is up to date")


def test_feature_stats_match_brute_force(experiment: Path, tiny_world: tuple[Path, Path]) -> None:
    """Top examples, firing counts and the co-active cos² histogram equal a dense recomputation."""
    from orthosae.sae import load_sae

    data = compute_features(experiment, options=SMALL)
    cache = open_cache(tiny_world[1])
    sae, _ = load_sae(experiment / "saes" / "orth")
    # The sample: the first ceil(n · 2000/3000) rows of every shard.
    xs, keys = [], []
    plan = sample_plan(cache, SMALL.max_tokens)
    assert sum(t for _, t in plan) == 2000 and len(plan) == cache.n_shards
    for i, take in plan:
        xs.append(np.asarray(cache.shard(i)[:take], dtype=np.float32))
        keys += [(int(c), int(p)) for c, p in cache.meta(i)[:take, 1:]]
    x = torch.from_numpy(np.concatenate(xs))
    with torch.no_grad():
        lat = sae.encode(x)
    orth = data["saes"]["orth"]
    for f in orth["features"]:
        col = lat[:, f["id"]]
        assert f["freq"] == pytest.approx(float((col > 0).float().mean()), rel=1e-3)
        best = torch.topk(col, len(f["examples"])).values
        assert [e["act"] for e in f["examples"]] == pytest.approx(best.tolist(), rel=1e-3)
        assert (f["examples"][0]["context"], f["examples"][0]["position"]) == keys[int(col.argmax())]
    active = (lat > 0).sum(1)
    assert orth["coactive_cos2"]["n_pairs"] == int((active * (active - 1) // 2).sum())
    assert sum(orth["coactive_cos2"]["counts"]) == orth["coactive_cos2"]["n_pairs"]
    w = (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).detach()
    cos2 = (w @ w.T) ** 2
    pair_values = []
    for row in lat > 0:
        ids = row.nonzero().flatten()
        iu = torch.triu_indices(len(ids), len(ids), 1)
        pair_values.append(cos2[ids[iu[0]], ids[iu[1]]])
    v = torch.cat(pair_values)
    assert orth["coactive_cos2"]["mean"] == pytest.approx(float(v.mean()), rel=1e-3)
    assert orth["coactive_cos2"]["frac_above_0.1"] == pytest.approx(float((v > 0.1).float().mean()), rel=1e-3)
    top = orth["top_pairs"][0]
    assert top["cos2"] == pytest.approx(float(cos2[top["a"], top["b"]]), rel=1e-3)


def test_missing_pieces_say_not_run(tmp_path: Path) -> None:
    """No evals, no speed, no cache, one SAE without metrics: a report with "not run", not a crash."""
    exp = make_experiment(tmp_path, None, None, evals=False)
    (exp / "saes" / "relu" / "metrics.jsonl").unlink()
    md, page = build_report(exp, "topk")
    text = md.read_text()
    assert text.count("not run") >= 8
    assert "No speed.json" in text and "feature browser not computed" in text
    assert "](figures/training_curves.png)" in text  # the SAEs with metrics still get curves
    assert "![Absorption" not in text
    assert "not run" in page.read_text()


def test_eval_section_missing_for_one_sae(experiment: Path) -> None:
    from orthosae.report.load import load_experiment

    exp = load_experiment(experiment)
    table = metrics_table(exp, "topk")
    row = next(r for r in table.rows if r[0].text == "unlearning.unlearning_score")
    assert [c.text for c in row[1:]] == ["0.026", "0.036", "not run", "+0.01 (+38.5%)", "not run"]


@pytest.mark.parametrize(
    ("metric", "value", "base", "ok"),
    [
        ("explained_variance", 0.60, 0.609, True),  # within the 0.01 absolute tolerance
        ("explained_variance", 0.59, 0.609, False),
        ("explained_variance", 0.90, 0.609, True),  # better is always preserved
        ("mse", 2.50, 2.48, True),  # +0.8 % relative
        ("mse", 2.60, 2.48, False),
        ("l2_ratio", 1.10, 0.875, True),  # closer to 1
        ("l2_ratio", 0.80, 0.875, False),
        ("l0", 40.3, 40.0, True),
        ("l0", 60.0, 40.0, False),
        ("kl_div_with_ablation", 99.0, 10.0, None),  # a reference, not a quality: no verdict
    ],
)
def test_preserved_rule(metric: str, value: float, base: float, ok: bool | None) -> None:
    assert preserved(metric, value, base) is ok


def test_malformed_json_is_one_line_error(cli, experiment: Path) -> None:
    (experiment / "saes" / "orth" / "eval.json").write_text("{not json")
    result = cli("report", experiment, "--no-features")
    assert_one_line_error(result, "eval.json", "not valid JSON")
    (experiment / "saes" / "orth" / "eval.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        build_report(experiment, features=False)


def test_torn_metrics_line_is_tolerated(tmp_path: Path) -> None:
    from orthosae.report.load import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": "nan"}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != rows[0]["loss"]  # NaN restored
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 1"):
        read_metrics(path)


def test_unknown_baseline(cli, experiment: Path) -> None:
    assert_one_line_error(
        cli("report", experiment, "--baseline", "topkk", "--no-features"), "did you mean 'topk'"
    )


def test_cli_writes_both_files_and_open_never_fails(cli, experiment: Path, monkeypatch) -> None:
    import webbrowser

    def broken(url: str, *a: Any, **k: Any) -> bool:
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "open", broken)
    result = cli("report", experiment, "--open", "--no-features", "--feature-tokens", "1000")
    assert result.code == 0, result.err
    assert "report.html" in result.out and "open" in result.err
    assert (experiment / "report.md").is_file() and (experiment / "report.html").is_file()
    assert not list(experiment.glob(".*tmp"))
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: False)
    assert cli("report", experiment, "--open", "--no-features").code == 0


def test_features_need_a_cache(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path, None, None)
    with pytest.raises(UserError, match="no activation cache"):
        compute_features(exp)


def test_intervals_and_noise_marks_in_the_metrics_table(experiment: Path) -> None:
    from orthosae.report.load import load_experiment

    exp = load_experiment(experiment)
    for name, ci in (("topk", [0.01, 0.04]), ("orth", [0.03, 0.05])):
        block = exp.saes[name].sections["unlearning"]
        block["eval_result_metrics"]["unlearning"]["unlearning_score_ci95"] = ci
    table = metrics_table(exp, "topk")
    row = next(r for r in table.rows if r[0].text == "unlearning.unlearning_score")
    assert row[1].text == "0.026 [0.01, 0.04]" and row[2].text == "0.036 [0.03, 0.05]"
    assert row[4].text == "+0.01 (+38.5%) ~"  # the difference is inside the noise
    assert not any(r[0].text.endswith("_ci95") for r in table.rows)  # intervals are not rows
    assert "bootstrap 95 % intervals" in table.note
