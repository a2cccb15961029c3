"""Checkpoints and resume: a run killed at any point (kill -9, SIGTERM, a crash mid-save) and resumed ends
with the same sae_weights.safetensors bytes as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from orthosae.atomic import FAULT_ENV, FAULT_EXIT_CODE, FAULT_PATH_ENV
from orthosae.train.checkpoint import list_checkpoints, load_checkpoint

STEPS = 40
ARGS = ["--d-sae", "64", "--k", "4", "--orth", "--batch-size", "64", "--log-every", "4"]
ARGS += ["--steps", str(STEPS), "--checkpoint-every", "5", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1000 rows with batch 64: batches straddle epochs, which the data position must get right.
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, np.random.default_rng(1).standard_normal((1000, 24)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def reference(acts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in-process."""
    from orthosae.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--activations", str(acts), *ARGS, "--out", str(out)]) == 0
    assert not (out / "checkpoints").exists()  # a finished run drops its checkpoints
    return out


def _env(**extra: str) -> dict[str, str]:
    # Same thread count as the in-process runs (conftest), so CPU kernels reduce in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **extra}


# `python -m orthosae`, with every step slowed by 20 ms (a sleep: the numbers are untouched) so that a
# kill reliably lands mid-run however fast the machine is.
_SLOW_MAIN = (
    "import sys, time\n"
    "from orthosae.train import trainer\n"
    "step = trainer.Trainer.step\n"
    "trainer.Trainer.step = lambda self, x: (time.sleep(0.02), step(self, x))[1]\n"
    "from orthosae.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _start(acts: Path, out: Path, **env: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", _SLOW_MAIN, "train", "--activations", str(acts), *ARGS, "--out", str(out)]
    return subprocess.Popen(
        cmd, env=_env(**env), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )


def _wait_for_checkpoint(proc: subprocess.Popen[str], out: Path, min_step: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list_checkpoints(out)
        if found and found[0][0] >= min_step:
            return found[0][0]
        assert proc.poll() is None, f"training ended before step {min_step}: {proc.stderr.read()}"  # type: ignore[union-attr]
        time.sleep(0.002)
    raise AssertionError("no checkpoint within 60 s")


def _assert_same_run(run: Path, ref: Path) -> None:
    cfg, ref_cfg = json.loads((run / "cfg.json").read_text()), json.loads((ref / "cfg.json").read_text())
    for c in (cfg, ref_cfg):
        c["training"].pop("out")
    assert cfg == ref_cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    for r in (*rows, *ref_rows):
        r.pop("tokens_per_s")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # no duplicate or missing lines
    assert rows == ref_rows, "metrics differ: the resumed run diverged"
    assert (run / "sae_weights.safetensors").read_bytes() == (ref / "sae_weights.safetensors").read_bytes()
    assert not (run / "checkpoints").exists()


def test_kill_9_at_a_random_step_then_resume_is_bit_exact(cli, acts: Path, reference: Path, tmp_path: Path):
    out = tmp_path / "run"
    target = random.Random().choice(range(5, 30, 5))
    proc = _start(acts, out)
    try:
        _wait_for_checkpoint(proc, out, target)
        time.sleep(random.Random().uniform(0, 0.05))  # the kill lands at some step after the checkpoint
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (target step {target})"
    assert not (out / "sae_weights.safetensors").exists()
    r = cli("train", "--resume", out)
    assert r.code == 0, (target, r.err)
    _assert_same_run(out, reference)


def test_sigterm_checkpoints_exits_with_a_message_and_resumes(
    cli, acts: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "run"
    proc = _start(acts, out)
    _wait_for_checkpoint(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped at step" in err and f"--resume {out}" in err and "Traceback" not in err
    assert cli("train", "--resume", out).code == 0
    _assert_same_run(out, reference)


@pytest.mark.parametrize("target", ["step-00000010.safetensors", "step-00000010.json"])
def test_crash_while_saving_keeps_the_previous_checkpoint(
    cli, acts: Path, reference: Path, tmp_path: Path, target: str
):
    out = tmp_path / "run"
    proc = _start(acts, out, **{FAULT_ENV: "100", FAULT_PATH_ENV: target})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == FAULT_EXIT_CODE, err
    assert [step for step, _ in list_checkpoints(out)] == [5]  # the torn step 10 never became a checkpoint
    assert any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())  # the torn write
    assert load_checkpoint(out).step == 5
    assert cli("train", "--resume", out).code == 0
    _assert_same_run(out, reference)


def _stop_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th trainer step look like it received SIGINT (in-process, no real signal)."""
    from orthosae.train import checkpoint, trainer

    calls = {"n": 0}
    real_step = trainer.Trainer.step

    def step(self, x):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            handler = signal.getsignal(signal.SIGINT)
            assert isinstance(handler, type(checkpoint.StopOnSignal()._handle))
            handler(signal.SIGINT, None)
        return real_step(self, x)

    monkeypatch.setattr(trainer.Trainer, "step", step)


def test_interrupt_in_process_and_resume_twice(cli, acts: Path, reference: Path, tmp_path: Path, monkeypatch):
    """Two interruptions (one between periodic checkpoints), then a resume: still bit-exact."""
    out = tmp_path / "run"
    _stop_after(monkeypatch, 13)
    r = cli("train", "--activations", acts, *ARGS, "--out", out)
    assert r.code == 130 and "stopped at step 13" in r.err
    assert [s for s, _ in list_checkpoints(out)] == [13, 10]  # the last two are kept
    _stop_after(monkeypatch, 4)
    assert cli("train", "--resume", out).code == 130
    assert [s for s, _ in list_checkpoints(out)] == [17, 15]
    monkeypatch.undo()
    assert cli("train", "--resume", out).code == 0
    _assert_same_run(out, reference)


def test_second_signal_aborts(monkeypatch):
    from orthosae.train.checkpoint import StopOnSignal

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with StopOnSignal() as stop:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)  # type: ignore[operator]
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # type: ignore[operator]
    assert signal.getsignal(signal.SIGINT) is before


def test_checkpoint_holds_everything(acts: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    _stop_after(monkeypatch, 7)
    from orthosae.cli import main

    assert main(["train", "--activations", str(acts), *ARGS, "--out", str(out)]) == 130
    step, path = list_checkpoints(out)[0]
    body = json.loads(path.read_text())
    assert step == 7 and body["step"] == 7 and body["tokens"] == 7 * 64
    assert body["metrics_bytes"] == (out / "metrics.jsonl").stat().st_size
    assert set(body["rng"]) >= {"torch", "numpy", "python"}
    assert body["data"]["kind"] == "array" and body["data"]["batches"] == 7
    assert body["config"]["d_sae"] == 64 and len(body["sha256"]) == 64
    ckpt = load_checkpoint(out)
    t = ckpt.trainer
    assert set(t) >= {
        "sae",
        "optimizer",
        "scheduler",
        "tokens_since_fired",
        "ema_mean",
        "l_orth_init",
        "step",
    }
    assert t["step"] == 7 and float(t["l_orth_init"]) > 0
    assert t["optimizer"]["state"][0]["exp_avg"].shape == (64, 24)  # W_enc's memory-order view
    assert ckpt.means[1] == 3  # steps 5..7 since the log line at step 4
    assert all(isinstance(v, torch.Tensor) for v in ckpt.means[0].values())


def test_steps_may_grow_on_resume(cli, acts: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    _stop_after(monkeypatch, 6)
    assert cli("train", "--activations", acts, *ARGS, "--out", out).code == 130
    monkeypatch.undo()
    r = cli("train", "--resume", out, "--steps", "20", "--log-every", "10")
    assert r.code == 0, r.err
    cfg = json.loads((out / "cfg.json").read_text())["training"]
    assert cfg["steps"] == 20 and cfg["steps_completed"] == 20
    assert cfg["warmup_steps"] == STEPS // 10  # pinned where the run started it


def test_fresh_run_refuses_a_dir_with_checkpoints(cli, acts: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    _stop_after(monkeypatch, 6)
    assert cli("train", "--activations", acts, *ARGS, "--out", out).code == 130
    monkeypatch.undo()
    assert_one_line_error(cli("train", "--activations", acts, *ARGS, "--out", out), "--resume", "--overwrite")
    assert list_checkpoints(out)
    assert cli("train", "--activations", acts, *ARGS, "--out", out, "--overwrite").code == 0
    assert not (out / "checkpoints").exists()


def test_resume_from_an_activation_cache_is_bit_exact(cli, tmp_path: Path, monkeypatch):
    """The cache's shuffle buffer position (epoch, window, offset) is restored too."""
    from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl

    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=2)
    corpus = write_jsonl(tmp_path / "t.jsonl", SAMPLE_TEXTS[:20])
    cache = tmp_path / "cache"
    args = ["--model", model, "--layer", "1", "--tokens", "600", "--corpus", corpus, "--context-size", "32"]
    assert cli("cache", *args, "--shard-tokens", "100", "--no-progress", "--out", cache).code == 0
    train = [
        "train",
        "--activations",
        cache,
        *ARGS[:9],
        "--steps",
        "24",
        "--checkpoint-every",
        "5",
        "--seed",
        "3",
    ]
    assert cli(*train, "--no-progress", "--out", tmp_path / "ref").code == 0
    _stop_after(monkeypatch, 13)
    assert cli(*train, "--no-progress", "--out", tmp_path / "run").code == 130
    monkeypatch.undo()
    assert json.loads(list_checkpoints(tmp_path / "run")[0][1].read_text())["data"]["kind"] == "cache"
    assert cli("train", "--resume", tmp_path / "run").code == 0
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
