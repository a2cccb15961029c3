"""`orthosae eval` as a user runs it: a full core run on a tiny model, --compare, --synthetic, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.eval.compare import compare_rows, flatten_metrics
from orthosae.eval.results import SECTION_KEYS
from orthosae.sae import TopKSAE, save_sae


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A TopK SAE for block 1 of a tiny llama (a local model dir) and an eval TOML on a small corpus."""
    root = tmp_path_factory.mktemp("evalcli")
    model_dir = save_tiny_model(root / "model", "llama", n_layers=3)
    corpus = write_jsonl(root / "corpus.jsonl", SAMPLE_TEXTS)
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    run = root / "run"
    src = {"corpus": str(corpus.resolve()), "n_tokens": 200, "context_size": 32}
    save_sae(sae, run, {"model_name": str(model_dir), "hook_layer": 1, "activations_source": src})
    toml = root / "eval.toml"
    toml.write_text(
        f'[core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        "n_eval_reconstruction_batches = 1\nn_eval_sparsity_variance_batches = 2\n"
    )
    return run, toml


def test_eval_core_writes_results_and_compare_reads_them(cli, tiny_run, tmp_path: Path):
    run, toml = tiny_run
    out = tmp_path / "a" / "eval.json"
    r = cli("eval", run, "--evals", "core", "--config", toml, "--out", out, "--no-progress")
    assert r.code == 0, r.err
    data = json.loads(out.read_text())
    core = data[SECTION_KEYS["core"]]
    assert core["eval_wall_time_s"] > 0
    m = core["metrics"]
    assert set(m) >= {
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
        "token_stats",
        "misc",
        "orthogonality",
    }
    assert m["sparsity"]["l0"] <= 4
    # Held out: 200 training tokens at ≤ 31 kept per context → at least 7 contexts skipped.
    assert core["eval_cfg"]["heldout_first_context"] >= 7
    assert "kept tokens" in core["eval_cfg"]["heldout_rule"]

    other = tmp_path / "b.json"
    shutil.copy(out, other)
    r = cli("eval", out, other, "--compare")
    assert r.code == 0, r.err
    assert "core/reconstruction_quality/explained_variance" in r.out
    assert "Δ" in r.out and "+0" in r.out


def test_compare_rows_give_differences():
    a = {SECTION_KEYS["core"]: {"metrics": {"sparsity": {"l0": 40.0, "l1": 3.0}}}}
    b = {
        SECTION_KEYS["core"]: {"metrics": {"sparsity": {"l0": 38.0}}},
        SECTION_KEYS["absorption"]: {"eval_result_metrics": {"mean": {"mean_absorption_score": 0.1}}},
    }
    rows = {row.metric: row for row in compare_rows([a, b])}
    assert rows["core/sparsity/l0"].diffs == [0.0, -2.0]
    assert rows["core/sparsity/l1"].values == [3.0, None] and rows["core/sparsity/l1"].diffs[1] is None
    assert rows["absorption/mean/mean_absorption_score"].values == [None, 0.1]
    assert flatten_metrics(a) == {"core/sparsity/l0": 40.0, "core/sparsity/l1": 3.0}


def test_synthetic_benchmark_from_the_cli(cli, tmp_path: Path):
    toml = tmp_path / "s.toml"
    toml.write_text('[synthetic]\nseeds = 1\nsteps = 60\north_lambdas = "1"\nn_test = 2000\n')
    out = tmp_path / "syn.json"
    r = cli("eval", "--synthetic", "--config", toml, "--out", out)
    assert r.code == 0, r.err
    assert "absorption_rate" in r.out and "topk+orth" in r.out
    assert "synthetic evaluation results" in json.loads(out.read_text())


def test_missing_run_dir(cli, tmp_path: Path):
    assert_one_line_error(cli("eval", tmp_path / "nope"), "no run directory")


def test_sae_without_model_needs_model_and_layer(cli, tmp_path: Path):
    save_sae(TopKSAE(16, 32, 4), tmp_path / "run")
    assert_one_line_error(cli("eval", tmp_path / "run"), "--model", "--layer")


def test_unknown_eval_suggests_the_closest(cli, tmp_path: Path):
    assert_one_line_error(cli("eval", tmp_path, "--evals", "core,absorbtion"), "absorbtion", "absorption")


def test_malformed_and_unknown_toml(cli, tiny_run, tmp_path: Path):
    run, _ = tiny_run
    bad = tmp_path / "bad.toml"
    bad.write_text("[core\nx = 1\n")
    assert_one_line_error(cli("eval", run, "--config", bad), "not valid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[core]\nn_eval_reconstruction_batchs = 3\n")
    assert_one_line_error(cli("eval", run, "--config", unknown), "n_eval_reconstruction_batches")
    table = tmp_path / "table.toml"
    table.write_text("[cor]\nx = 1\n")
    assert_one_line_error(cli("eval", run, "--config", table), "[core]")


def test_compare_needs_results(cli, tiny_run, tmp_path: Path):
    run, _ = tiny_run
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    (fresh / "eval.json").unlink(missing_ok=True)
    assert_one_line_error(cli("eval", fresh, fresh, "--compare"), "orthosae eval")
    assert_one_line_error(cli("eval", fresh, "--compare"), "two or more")
