"""Config machinery: field docs become help, TOML round trip, strict keys and types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orthosae.config import field_docs, load_toml, parse_count, save_toml
from orthosae.errors import UserError
from orthosae.train.config import TrainConfig


def test_every_field_has_a_doc():
    docs = field_docs(TrainConfig)
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert not missing


def test_help_comes_from_field_docs(cli):
    out = cli("train", "--help").out
    assert field_docs(TrainConfig)["orth_threshold_ratio"][:40] in " ".join(out.split())


@pytest.mark.parametrize(
    ("text", "value"), [("2M", 2_000_000), ("500k", 500_000), ("4096", 4096), ("1.5k", 1500)]
)
def test_parse_count(text: str, value: int):
    assert parse_count(text) == value


def test_parse_count_rejects():
    for bad in ("two", "1.5", ""):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_toml_round_trip(tmp_path: Path):
    cfg = TrainConfig(activations="a.npy", d_sae=512, k=8, orth=True, lr=1e-3, tokens=2_000_000)
    save_toml(cfg, tmp_path / "c.toml")
    assert load_toml(TrainConfig, tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('activations = "a.npy"\nd_sea = 5\n', "did you mean 'd_sae'"),
        ('activations = "a.npy"\nd_sae = "big"\n', "must be an integer"),
        ('activations = "a.npy"\north = "yes"\n', "true or false"),
        ('activations = "a.npy"\narch = "topkk"\n', "did you mean 'topk'"),
        ('activations = "a.npy"\nlr = true\n', "must be a number"),
        ("activations = [", "not valid TOML"),
        ('activations = "a.npy"\nk = 50\nd_sae = 10\n', "larger than --d-sae"),
        ('activations = "a.npy"\nsteps = 0\n', "--steps must be positive"),
        ('activations = "a.npy"\narch = "matryoshka"\nmatryoshka_fractions = "1/2,1/4"\n', "must sum to 1"),
        ('activations = "a.npy"\nlr = -1.0\n', "--lr must be a positive"),
        ('activations = "a.npy"\nl1 = nan\n', "finite"),
        ('activations = "a.npy"\nwarmup_steps = 5000\n', "--warmup-steps"),
        ('model = "smollm2-135m"\n', "--layer"),
        ("steps = 10\n", "exactly one data source"),
    ],
)
def test_bad_config_values(tmp_path: Path, body: str, fragment: str):
    p = tmp_path / "c.toml"
    p.write_text(body)
    with pytest.raises(UserError) as e:
        load_toml(TrainConfig, p)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_config_path_problems(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_toml(TrainConfig, tmp_path / "missing.toml")
    with pytest.raises(UserError, match="is a directory"):
        load_toml(TrainConfig, tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="UTF-8"):
        load_toml(TrainConfig, tmp_path / "bin.toml")
