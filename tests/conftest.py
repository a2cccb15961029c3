"""Shared test helpers: run the CLI in-process and capture its exit code and streams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.cli import main

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """No test may wait on a model or dataset hub: this machine has none, and CI must not depend on one."""
    import os

    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def acts_file(tmp_path: Path) -> Path:
    """A small (2048, 16) float32 activation file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "acts.npy"
    np.save(path, rng.standard_normal((2048, 16)).astype(np.float32))
    return path


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    assert result.code == 2, result
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {result.err!r}"
    assert "Traceback" not in result.err
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), f"{frag!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (3 layers) with a byte tokenizer, saved once per module."""
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", n_layers=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small .jsonl corpus of SAMPLE_TEXTS, once per test module."""
    return write_jsonl(tmp_path_factory.mktemp("c") / "texts.jsonl", SAMPLE_TEXTS)
