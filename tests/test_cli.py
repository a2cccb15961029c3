"""`orthosae train` as a user runs it: run directory contents, config replay, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error
from orthosae.sae import load_sae

FAST = ["--steps", "12", "--batch-size", "64", "--log-every", "5", "--no-progress"]


def test_train_topk_orth_writes_a_complete_run(cli, acts_file: Path, tmp_path: Path):
    out = tmp_path / "a"
    r = cli(
        "train",
        "--activations",
        acts_file,
        "--arch",
        "topk",
        "--k",
        "4",
        "--d-sae",
        "64",
        "--orth",
        *FAST,
        "--out",
        out,
    )
    assert r.code == 0, r.err
    assert {p.name for p in out.iterdir()} >= {
        "sae_weights.safetensors",
        "cfg.json",
        "config.toml",
        "metrics.jsonl",
    }
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["arch"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 16 and cfg["dtype"] == "float32"
    assert cfg["orthogonality"]["L_orth_init"] > 0 and cfg["orthogonality"]["method"] == "pairwise"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12]
    for key in ("recon", "auxk", "orth", "orth_scaled", "l0", "dead_frac", "lr", "tokens_per_s", "loss"):
        assert key in rows[-1]
    assert rows[-1]["l0"] == pytest.approx(4.0)
    sae, _ = load_sae(out)
    assert sae.d_sae == 64


def test_train_relu(cli, acts_file: Path, tmp_path: Path):
    r = cli(
        "train",
        "--activations",
        acts_file,
        "--arch",
        "relu",
        "--l1",
        "0.04",
        "--d-sae",
        "32",
        *FAST,
        "--out",
        tmp_path / "b",
    )
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["architecture"] == "standard"


def test_config_replay_is_deterministic(cli, acts_file: Path, tmp_path: Path):
    a, c = tmp_path / "a", tmp_path / "c"
    assert (
        cli(
            "train",
            "--activations",
            acts_file,
            "--d-sae",
            "32",
            "--k",
            "3",
            "--orth",
            "--seed",
            "7",
            *FAST,
            "--out",
            a,
        ).code
        == 0
    )
    r = cli("train", "--config", a / "config.toml", "--out", c)
    assert r.code == 0, r.err
    assert (a / "sae_weights.safetensors").read_bytes() == (c / "sae_weights.safetensors").read_bytes()
    # another seed gives other weights (the comparison above can fail)
    d = tmp_path / "d"
    assert cli("train", "--config", a / "config.toml", "--seed", "8", "--out", d).code == 0
    assert (a / "sae_weights.safetensors").read_bytes() != (d / "sae_weights.safetensors").read_bytes()


def test_safetensors_activations(cli, tmp_path: Path):
    path = tmp_path / "acts.safetensors"
    save_file({"activations": torch.randn(256, 8)}, path)
    assert (
        cli("train", "--activations", path, "--d-sae", "16", "--k", "2", *FAST, "--out", tmp_path / "s").code
        == 0
    )


def test_existing_run_is_not_overwritten(cli, acts_file: Path, tmp_path: Path):
    out = tmp_path / "a"
    args = ["train", "--activations", acts_file, "--d-sae", "32", "--k", "3", *FAST, "--out", out]
    assert cli(*args).code == 0
    before = (out / "sae_weights.safetensors").read_bytes()
    assert_one_line_error(cli(*args, "--seed", "3"), "already holds a trained SAE", "--overwrite")
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert cli(*args, "--seed", "3", "--overwrite").code == 0
    assert (out / "sae_weights.safetensors").read_bytes() != before


def _npy(tmp_path: Path, arr: np.ndarray, name: str = "x.npy") -> Path:
    np.save(tmp_path / name, arr)
    return tmp_path / name


@pytest.mark.parametrize(
    ("make", "extra", "fragments"),
    [
        (lambda p: _npy(p, np.zeros(10, np.float32)), [], ["shape (N, d)"]),
        (lambda p: _npy(p, np.zeros((4, 3, 2), np.float32)), [], ["shape (N, d)"]),
        (lambda p: _npy(p, np.zeros((10, 4), np.int64)), [], ["floating point"]),
        (lambda p: _npy(p, np.zeros((0, 4), np.float32)), [], ["empty"]),
        (
            lambda p: _npy(p, np.where(np.arange(40).reshape(10, 4) == 13, np.nan, 1).astype(np.float32)),
            [],
            ["non-finite", "row 3, column 1"],
        ),
        (
            lambda p: _npy(p, np.ones((10, 4), np.float32)),
            ["--k", "100", "--d-sae", "50"],
            ["larger than --d-sae"],
        ),
        (lambda p: p / "missing.npy", [], ["not found"]),
        (lambda p: (p / "x.npy").write_bytes(b"garbage") and p / "x.npy", [], ["not a readable .npy"]),
        (lambda p: (p / "x.csv").write_text("1,2") and p / "x.csv", [], ["unsupported activations format"]),
        (lambda p: _npy(p, np.ones((10, 4), np.float32)), ["--orth-method", "dense"], ["invalid choice"]),
        (lambda p: _npy(p, np.ones((10, 4), np.float32)), ["--steps", "-3"], ["--steps must be positive"]),
        (lambda p: _npy(p, np.ones((10, 4), np.float32)), ["--d-sae", "lots"], ["must be an integer"]),
        (lambda p: _npy(p, np.ones((10, 4), np.float32)), ["--config", "/nonexistent.toml"], ["not found"]),
        (
            lambda p: _npy(p, np.ones((10, 4), np.float32)),
            ["--arch", "matryoshka", "--matryoshka-fractions", "1/2,1/4"],
            ["must sum to 1"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, tmp_path: Path, make, extra, fragments):
    path = make(tmp_path)
    r = cli(
        "train", "--activations", path, "--d-sae", "8", "--k", "2", *FAST, "--out", tmp_path / "run", *extra
    )
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


def test_out_is_a_file(cli, acts_file: Path, tmp_path: Path):
    (tmp_path / "f").write_text("keep me")
    r = cli("train", "--activations", acts_file, *FAST, "--d-sae", "8", "--k", "2", "--out", tmp_path / "f")
    assert_one_line_error(r, "is a file")
    assert (tmp_path / "f").read_text() == "keep me"


def test_out_under_a_file(cli, acts_file: Path, tmp_path: Path):
    (tmp_path / "f").write_text("keep me")
    r = cli(
        "train",
        "--activations",
        acts_file,
        *FAST,
        "--d-sae",
        "8",
        "--k",
        "2",
        "--out",
        tmp_path / "f" / "run",
    )
    assert_one_line_error(r, "cannot write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out(cli, acts_file: Path, tmp_path: Path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = cli("train", "--activations", acts_file, *FAST, "--d-sae", "8", "--k", "2", "--out", ro / "run")
    assert_one_line_error(r, "cannot write")


def test_console_script_exit_code_and_no_traceback(tmp_path: Path):
    """The real process: exit status 2 and a single stderr line."""
    exe = Path(sys.executable).with_name("orthosae")
    proc = subprocess.run(
        [str(exe), "train", "--activations", str(tmp_path / "none.npy"), "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    )
