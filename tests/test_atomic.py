"""Atomic writes: a failure or a crash in the middle of a write leaves the previous file whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthosae import atomic
from orthosae.atomic import FAULT_ENV, FAULT_EXIT_CODE, FAULT_PATH_ENV, write_json, write_text, write_with


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_replaces_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "f.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two" and not _tmp_files(tmp_path)
    write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert (tmp_path / "j.json").read_text().startswith("{")


def test_an_exception_mid_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")

    def writer(f):  # type: ignore[no-untyped-def]
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_with(target, writer)
    assert target.read_bytes() == b"previous" and not _tmp_files(tmp_path)


def test_keyboard_interrupt_mid_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")

    def writer(f):  # type: ignore[no-untyped-def]
        f.write(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_with(target, writer)
    assert target.read_bytes() == b"previous"


def _crash_writing(target: Path, data: bytes, after: int, only: str = "") -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from orthosae.atomic import write_with; "
        "write_with(sys.argv[1], lambda f: f.write(sys.argv[2].encode()))"
    )
    env = {**os.environ, FAULT_ENV: str(after), FAULT_PATH_ENV: only}
    return subprocess.run(
        [sys.executable, "-c", code, str(target), data.decode()],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_crash_mid_write_keeps_the_old_file(tmp_path: Path):
    """The process dies (os._exit, as kill -9 would) after 10 bytes of the new file are on disk."""
    target = tmp_path / "f.txt"
    target.write_text("the previous contents")
    proc = _crash_writing(target, b"the new contents, longer than ten bytes", after=10)
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr
    assert target.read_text() == "the previous contents"
    (tmp,) = _tmp_files(tmp_path)  # the torn temp file is all that is left of the new write
    assert tmp.read_bytes() == b"the new co"


def test_fault_injection_only_hits_the_named_path(tmp_path: Path):
    target = tmp_path / "f.txt"
    proc = _crash_writing(target, b"complete", after=1, only="some-other-file")
    assert proc.returncode == 0 and target.read_text() == "complete"


def test_fault_hook_is_inert_without_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    write_text(tmp_path / "f", "x" * 10_000)
    assert (tmp_path / "f").stat().st_size == 10_000
    assert atomic._fault_injected.__name__  # the hook exists for tests


def test_checkpoint_save_failure_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from orthosae.train import checkpoint
    from orthosae.train.config import TrainConfig
    from orthosae.train.trainer import Trainer

    cfg = TrainConfig(activations="x.npy", d_sae=16, k=2, steps=10, out=str(tmp_path))
    trainer = Trainer(cfg, 4)
    trainer.step(torch.randn(32, 4))

    def save(step: int) -> None:
        checkpoint.save_checkpoint(
            tmp_path, step=step, tokens=step * 32, metrics_bytes=0, config=cfg, data={"kind": "array"},
            trainer_state=trainer.state_dict(), means=({}, 0),
        )  # fmt: skip

    save(1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    real = checkpoint.write_with

    def failing(path, writer):  # type: ignore[no-untyped-def]
        def half(f):  # type: ignore[no-untyped-def]
            f.write(b"partial")
            raise OSError(28, "No space left on device")

        real(path, half)

    monkeypatch.setattr(checkpoint, "write_with", failing)
    with pytest.raises(OSError):
        save(2)
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before
    assert checkpoint.load_checkpoint(tmp_path).step == 1
    # A non-finite parameter is never checkpointed.
    monkeypatch.undo()
    with torch.no_grad():
        trainer.sae.W_dec[0, 0] = float("nan")
    with pytest.raises(checkpoint.UserError, match="NaN or inf"):
        save(3)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [1]
