"""TensorBoard and W&B logging: the scalars they receive are the rows of metrics.jsonl, once per step, also
across a crash and --resume."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import assert_one_line_error
from orthosae.train import trainer as trainer_mod
from orthosae.train.tracking import TB_DIR, WANDB_ID, tag

ARGS = ["--d-sae", "32", "--k", "4", "--batch-size", "64", "--steps", "9", "--log-every", "1"]
ARGS += ["--checkpoint-every", "3", "--no-progress", "--orth"]


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _events(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / TB_DIR))
    acc.Reload()
    return acc


def _assert_events_match_metrics(out: Path) -> None:
    rows, acc = _rows(out), _events(out)
    scalars = acc.Tags()["scalars"]
    for name in ("loss", "recon", "orth", "auxk", "l0", "dead_frac", "lr", "tokens_per_s"):
        assert tag(name) in scalars, (name, scalars)
        events = acc.Scalars(tag(name))
        assert [e.step for e in events] == [r["step"] for r in rows], name  # each step exactly once
        for e, r in zip(events, rows, strict=True):
            assert e.value == pytest.approx(r[name], rel=1e-6, abs=1e-30), (name, r["step"])


def test_tensorboard_gets_every_metrics_row(cli, acts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli("train", "--activations", acts_file, *ARGS, "--out", out).code == 0
    _assert_events_match_metrics(out)
    assert [r["step"] for r in _rows(out)] == list(range(1, 10))


def test_no_tensorboard_writes_no_events(cli, acts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli("train", "--activations", acts_file, *ARGS, "--no-tensorboard", "--out", out).code == 0
    assert not (out / TB_DIR).exists()


def test_resume_after_crash_drops_events_past_the_checkpoint(
    cli, acts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after step 7 leaves events for steps 1–7 but a checkpoint at 6; the resumed run rewrites 7."""
    out = tmp_path / "run"
    real_step = trainer_mod.Trainer.step

    def crashing(self: trainer_mod.Trainer, x: Any) -> Any:
        if self.step_idx == 7:
            raise RuntimeError("simulated crash")
        return real_step(self, x)

    monkeypatch.setattr(trainer_mod.Trainer, "step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli("train", "--activations", acts_file, *ARGS, "--out", out)
    assert [e.step for e in _events(out).Scalars(tag("loss"))] == list(range(1, 8))
    monkeypatch.setattr(trainer_mod.Trainer, "step", real_step)

    assert cli("train", "--resume", out).code == 0
    _assert_events_match_metrics(out)
    assert [r["step"] for r in _rows(out)] == list(range(1, 10))


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init arguments and logged rows."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> _FakeWandb:
        self.inits.append(kwargs)
        return self

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_logs_rows_and_resume_continues_the_same_run(
    cli, acts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    real_step = trainer_mod.Trainer.step
    monkeypatch.setattr(
        trainer_mod.Trainer,
        "step",
        lambda self, x: (
            (_ for _ in ()).throw(RuntimeError("crash")) if self.step_idx == 4 else real_step(self, x)
        ),
    )
    with pytest.raises(RuntimeError):
        cli("train", "--activations", acts_file, *ARGS, "--wandb-project", "p", "--out", out)
    monkeypatch.setattr(trainer_mod.Trainer, "step", real_step)
    assert cli("train", "--resume", out).code == 0

    first, second = fake.inits
    assert first["project"] == second["project"] == "p"
    assert first["id"] == second["id"] == (out / WANDB_ID).read_text().strip()
    assert first["config"]["d_sae"] == 32
    assert fake.finished == 2
    rows = _rows(out)
    # The resumed run logs from the checkpoint (step 3) on; the last value W&B holds for a step is the row.
    last = dict(fake.logged)
    assert sorted(last) == [r["step"] for r in rows]
    for r in rows:
        assert last[r["step"]][tag("loss")] == pytest.approx(r["loss"], rel=1e-6)


def test_wandb_missing_is_a_one_line_error(cli, acts_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    out = tmp_path / "run"
    result = cli("train", "--activations", acts_file, *ARGS, "--wandb-project", "p", "--out", out)
    assert_one_line_error(result, "wandb", "pip install wandb")
