"""`orthosae run` end to end on a tiny model: seeds, the study report, and reuse of SAEs and evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.eval.results import SECTION_KEYS
from orthosae.experiment.config import load_experiment
from orthosae.experiment.run import EVAL_SECONDS, _step_seconds, estimate_seconds, run_experiment

CORE = SECTION_KEYS["core"]


def _write(root: Path, extra_saes: str = "", recon_batches: int = 1) -> Path:
    model = root / "model"
    if not model.exists():
        save_tiny_model(model, "llama", n_layers=3)
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, SAMPLE_TEXTS)
    toml = root / "exp.toml"
    toml.write_text(
        f'name = "tiny"\nout = "{root / "run"}"\nmodel = "{model}"\nlayer = 1\ntokens = 1500\n'
        f'corpus = "{corpus}"\ncontext_size = 32\ncache = "{root / "cache"}"\nevals = "core"\n'
        'baseline = "topk"\nspeed_steps = 0\nreport_feature_tokens = 300\nprogress = false\n'
        "[train]\nd_sae = 64\nk = 4\nsteps = 12\nbatch_size = 64\nlog_every = 4\n"
        "[saes.topk]\nseeds = 2\n"
        '[saes."orth-0.1"]\north = true\north_lambda = 0.1\n'
        '[saes.matryoshka]\narch = "matryoshka"\nmatryoshka_fractions = "1/4,3/4"\n'
        '[saes.ortsae]\north_kind = "ortsae"\n'
        f"{extra_saes}"
        f'[eval.core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        f"n_eval_reconstruction_batches = {recon_batches}\nn_eval_sparsity_variance_batches = 2\n"
        "[eval.synthetic]\nsteps = 30\nseeds = 2\nn_test = 500\n"
    )
    return toml


def _mtimes(run: Path, name: str) -> dict[str, int]:
    return {f: (run / "saes" / name / f).stat().st_mtime_ns for f in ("sae_weights.safetensors", "eval.json")}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    run_experiment(load_experiment(_write(root)))
    return root


def test_study_trains_seeds_evaluates_and_reports(tiny_study: Path):
    run = tiny_study / "run"
    names = ["matryoshka", "orth-0.1", "ortsae", "topk", "topk-seed2"]
    assert sorted(p.name for p in (run / "saes").iterdir()) == names
    cfgs = {n: json.loads((run / "saes" / n / "cfg.json").read_text()) for n in ("topk", "topk-seed2")}
    assert [c["training"]["init_seed"] for c in cfgs.values()] == [42, 43]
    assert (run / "saes" / "topk" / "sae_weights.safetensors").read_bytes() != (
        run / "saes" / "topk-seed2" / "sae_weights.safetensors"
    ).read_bytes()
    synthetic = json.loads((run / "synthetic.json").read_text())
    assert set(synthetic["summary"]) == {"topk", "topk+orth λ=0.1"}
    report = (run / "report.md").read_text()
    study_part = report[report.index("## Study") : report.index("## Metrics")]
    assert "Seeds per variant: topk 2, orth-0.1 1, matryoshka 1, ortsae 1" in study_part
    assert "| topk | topk | — | 2 |" in study_part  # the Pareto table's baseline row
    assert (run / "figures" / "training_curves.png").exists()
    assert 'id="study"' in (run / "report.html").read_text()


def test_rerun_reuses_and_adding_a_variant_trains_and_evaluates_only_it(tiny_study: Path, capsys):
    run = tiny_study / "run"
    before = {n: _mtimes(run, n) for n in ("topk", "topk-seed2", "orth-0.1", "matryoshka", "ortsae")}
    capsys.readouterr()
    run_experiment(load_experiment(_write(tiny_study, '[saes."orth-1"]\north = true\north_lambda = 1.0\n')))
    out = capsys.readouterr().out
    assert "-- evaluating orth-1: core" in out and out.count("-- evaluating") == 1
    assert {n: _mtimes(run, n) for n in before} == before
    assert (run / "saes" / "orth-1" / "eval.json").exists()
    # The estimate printed first counted only that work: core's LM side once plus one SAE's core.
    shared, per_sae = EVAL_SECONDS["core"]
    assert f"evals {(shared + per_sae) / 60:.1f}, " in out.splitlines()[0]


def test_the_estimate_counts_only_the_work_left(tiny_study: Path):
    exp = load_experiment(_write(tiny_study, '[saes."orth-1"]\north = true\north_lambda = 1.0\n'))
    shared, per_sae = EVAL_SECONDS["core"]
    full = estimate_seconds(exp, cache_ready=False)
    assert full["evals"] == pytest.approx(shared + per_sae * 6)
    assert full["train"] == pytest.approx(sum(_step_seconds(t) * t.steps for t in exp.saes.values()))
    assert full["cache"] > 0
    nothing = estimate_seconds(exp, True, [], {name: [] for name in exp.saes})
    assert (nothing["cache"], nothing["train"], nothing["evals"]) == (0.0, 0.0, 0.0)
    left = estimate_seconds(exp, True, ["orth-1"], {name: [] for name in exp.saes} | {"orth-1": ["core"]})
    assert left["train"] == pytest.approx(_step_seconds(exp.saes["orth-1"]) * exp.saes["orth-1"].steps)
    assert left["evals"] == pytest.approx(shared + per_sae)


def test_changed_eval_settings_redo_that_eval(tiny_study: Path, capsys):
    run = tiny_study / "run"
    old = json.loads((run / "saes" / "topk" / "eval.json").read_text())[CORE]
    capsys.readouterr()
    run_experiment(load_experiment(_write(tiny_study, recon_batches=2)), report=False)
    out = capsys.readouterr().out
    assert out.count("-- evaluating") == 5  # orth-1 was dropped from the file again: the other five
    new = json.loads((run / "saes" / "topk" / "eval.json").read_text())[CORE]
    assert (
        old["eval_cfg"]["n_eval_reconstruction_batches"],
        new["eval_cfg"]["n_eval_reconstruction_batches"],
    ) == (1, 2)


def test_giving_a_variant_more_seeds_trains_only_the_new_ones(tiny_study: Path, capsys):
    """orth-0.1 was trained alone (init_seed unset); with `seeds = 2` its first member is the same SAE."""
    run = tiny_study / "run"
    before = _mtimes(run, "orth-0.1")["sae_weights.safetensors"]
    toml = _write(tiny_study, recon_batches=2)  # the eval settings the test before left
    toml.write_text(toml.read_text().replace('[saes."orth-0.1"]\n', '[saes."orth-0.1"]\nseeds = 2\n'))
    exp = load_experiment(toml)
    assert (exp.saes["orth-0.1"].init_seed, exp.saes["orth-0.1-seed2"].init_seed) == (42, 43)
    capsys.readouterr()
    run_experiment(exp, report=False)
    out = capsys.readouterr().out
    assert "orth-0.1: already trained, kept" in out
    assert "-- evaluating orth-0.1-seed2: core" in out and out.count("-- evaluating") == 1
    assert _mtimes(run, "orth-0.1")["sae_weights.safetensors"] == before


def test_a_stored_lm_side_leaves_the_estimate(tiny_study: Path):
    from orthosae.eval import absorption
    from orthosae.eval.context import store_file
    from orthosae.experiment.run import _stored, lm_store

    exp = load_experiment(_write(tiny_study), overrides={"evals": "core,absorption"})
    configs = {"absorption": absorption.Config()}
    todo = {name: ["absorption"] for name in exp.saes}
    shared, per_sae = EVAL_SECONDS["absorption"]
    assert _stored(exp, configs) == set()
    c = exp.cfg
    path = store_file(lm_store(c), absorption.lm_key(configs["absorption"]), c.model, c.layer, c.seed, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    try:
        assert _stored(exp, configs) == {"absorption"}
        cold = estimate_seconds(exp, True, [], todo)["evals"]
        warm = estimate_seconds(exp, True, [], todo, _stored(exp, configs))["evals"]
        assert (cold - warm, warm) == (pytest.approx(shared), pytest.approx(per_sae * len(exp.saes)))
    finally:
        path.unlink()
