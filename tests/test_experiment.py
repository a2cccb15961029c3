"""Experiment files, sweeps, and training several SAEs from one stream."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orthosae.errors import UserError
from orthosae.experiment.config import build_experiment, load_experiment
from orthosae.experiment.multi import train_many
from orthosae.experiment.speed import measure_speed
from orthosae.train.config import TrainConfig
from orthosae.train.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["seed.toml", "study.toml", "gemma2b.toml", "orth_lambda.toml"])
def test_shipped_experiment_files_resolve(name: str):
    exp = load_experiment(REPO / "experiments" / name)
    assert exp.saes and exp.cfg.baseline in exp.saes


def test_seed_experiment_is_the_lambda_study():
    exp = load_experiment(REPO / "experiments" / "seed.toml")
    assert exp.groups["topk"] == ["topk", "topk-seed2", "topk-seed3"] and len(exp.groups["orth-0.1"]) == 3
    lambdas = sorted(c.orth_lambda for c in exp.saes.values() if c.orth)
    assert sorted(set(lambdas)) == [1e-3, 1e-2, 1e-1, 1.0]
    assert {c.k for c in exp.saes.values()} == {40} and exp.saes["relu"].arch == "relu"
    assert set(exp.eval_tables) <= {"core", "absorption", "sparse_probing", "unlearning"}


def test_sweep_grid_expands_and_shares_the_stream():
    exp = build_experiment(
        {"name": "s", "train": {"steps": 5}, "sweep": {"orth_lambda": [0.0, 0.1], "k": [2, 4]}}, source="t"
    )
    assert sorted(exp.saes) == sorted(
        ["orth_lambda=0.0+k=2", "orth_lambda=0.0+k=4", "orth_lambda=0.1+k=2", "orth_lambda=0.1+k=4"]
    )
    assert {c.activations for c in exp.saes.values()} == {str(exp.cfg.cache_dir())}
    assert exp.saes["orth_lambda=0.1+k=4"].k == 4


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"saes": {"a": {"activations": "x.npy"}}}, "set by the experiment"),
        ({"saes": {"a": {"k": 2}, "b": {"k": 2, "steps": 7}}}, "'steps' must agree"),
        ({"saes": {"a": {"kk": 2}}}, "did you mean 'k'"),
        ({}, "no SAEs to train"),
        ({"sweep": {"k": 3}}, "non-empty list"),
        ({"saes": {"a": {}}, "layerr": 3}, "did you mean 'layer'"),
        ({"saes": 3}, "must be a table"),
    ],
)
def test_bad_experiment_files(data: dict, fragment: str):
    with pytest.raises(UserError, match=None) as e:
        build_experiment(data, source="exp.toml")
    assert fragment in str(e.value)


def _cfg(tmp: Path, acts: Path, name: str, **kw) -> TrainConfig:
    base = dict(activations=str(acts), d_sae=32, k=3, steps=8, batch_size=64, log_every=4, progress=False)
    return TrainConfig(**{**base, **kw, "out": str(tmp / name)})


def test_one_stream_feeds_all_and_matches_training_alone(tmp_path: Path, acts_file: Path):
    cfgs = {
        "topk": _cfg(tmp_path / "many", acts_file, "topk"),
        "orth": _cfg(tmp_path / "many", acts_file, "orth", orth=True),
        "relu": _cfg(tmp_path / "many", acts_file, "relu", arch="relu"),
    }
    outs = train_many(cfgs, progress=False)
    alone = train(_cfg(tmp_path / "alone", acts_file, "orth", orth=True))
    assert (outs["orth"] / "sae_weights.safetensors").read_bytes() == (
        alone / "sae_weights.safetensors"
    ).read_bytes()
    assert (outs["topk"] / "sae_weights.safetensors").read_bytes() != (
        outs["orth"] / "sae_weights.safetensors"
    ).read_bytes()
    for out in outs.values():
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("loss/recon")] == [4, 8]  # every SAE of a sweep logs too


def test_speed_table_has_every_variant(tmp_path: Path):
    import torch

    base = TrainConfig(activations="x", d_sae=64, k=4, steps=10, batch_size=32)
    speed = measure_speed(base, [torch.randn(32, 16) for _ in range(2)], steps=2)
    names = [r["name"] for r in speed["rows"]]
    assert names == ["topk", "orth/pairwise", "orth/masked_dense", "orth/sparse"]
    assert speed["rows"][0]["ratio_to_baseline"] == 1.0
    assert all(r["seconds_per_step"] > 0 for r in speed["rows"])
