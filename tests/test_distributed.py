"""Data-parallel training under torchrun (gloo on CPU): 2 ranks reach the same SAE as 1 process given the
same global batch, rank 0 alone writes the run, resume works, and a dead or hung rank stops the others.

Tolerance: 2 ranks sum each statistic and gradient in two halves, so fp32 rounding differs from one
process; every tensor of the SAE must agree to 1e-5 of its largest entry (measured: at most 3e-7).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import orthosae
from conftest import assert_one_line_error
from orthosae.activations.cache import MANIFEST, sha256_file
from orthosae.activations.files import ArrayBatches
from orthosae.activations.source import from_cache
from orthosae.train.checkpoint import list_checkpoints

REL_TOL = 1e-5
TOPK = ["--arch", "topk", "--d-sae", "256", "--k", "4", "--orth", "--dead-tokens", "128"]
COMMON = ["--batch-size", "128", "--steps", "20", "--log-every", "5", "--warmup-steps", "2", "--seed", "1"]
COMMON += ["--no-progress"]
ENDLESS = ["--batch-size", "128", "--steps", "100000", "--log-every", "1", "--seed", "1", "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(orthosae.__file__).resolve().parents[1])
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **extra}


# `python -m orthosae`, with each step slowed by a sleep (numbers untouched) so that a kill lands mid-run,
# writing its pid to PID_DIR/rank-N, and, with STOP_AT=N, sending itself SIGTERM during step N of rank 1.
_SCRIPT = """
import os, signal, sys, time
from orthosae.train import trainer
step = trainer.Trainer.step
rank, stop_at = int(os.environ["RANK"]), int(os.environ.get("STOP_AT", "-1"))
delay = float(os.environ.get("STEP_DELAY", "0"))
if os.environ.get("PID_DIR"):
    open(os.path.join(os.environ["PID_DIR"], f"rank-{rank}"), "w").write(str(os.getpid()))
def slow(self, x):
    if rank == 1 and self.step_idx == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(delay)
    return step(self, x)
trainer.Trainer.step = slow
from orthosae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _script(tmp: Path) -> Path:
    path = tmp / "train_script.py"
    path.write_text(_SCRIPT)
    return path


def _torchrun(*args: object, nproc: int = 2, script: Path | None = None, **env: str) -> subprocess.Popen[str]:
    target = [str(script)] if script else ["-m", "orthosae"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [*target, "train", *map(str, args)]
    return subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _single(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "orthosae", "train", *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _assert_close(run: Path, ref: Path) -> None:
    a, b = load_file(run / "sae_weights.safetensors"), load_file(ref / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        scale = float(b[name].abs().max())
        err = float((a[name] - b[name]).abs().max())
        assert err <= REL_TOL * max(scale, 1e-12), f"{name}: max |diff| {err:.3g} vs scale {scale:.3g}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for row, ref_row in zip(rows, ref_rows, strict=True):
        assert row["tokens"] == ref_row["tokens"]
        for key in ("loss", "recon", "auxk", "orth", "l0", "dead_frac"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), (row["step"], key)


def _write_cache(path: Path, acts: np.ndarray, shard_rows: int) -> Path:
    """A small activation cache in the on-disk format, without a model (fp16 shards, uneven last one)."""
    path.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(acts), shard_rows)):
        part = acts[start : start + shard_rows].astype(np.float16)
        names = {"acts": f"shard_{i:05d}.acts.npy", "meta": f"shard_{i:05d}.meta.npy"}
        np.save(path / names["acts"], part)
        np.save(path / names["meta"], np.zeros((len(part), 3), dtype=np.int32))
        sha = {k: sha256_file(path / v) for k, v in names.items()}
        shards.append({**names, "n_tokens": len(part), "sha256": sha, "first_context": 0, "n_contexts": 1})
    manifest = {
        "format": "orthosae-activations",
        "version": 1,
        "model_id": "test",
        "model_revision": None,
        "layer": 0,
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 32,
        "dtype": "float16",
        "d_model": acts.shape[1],
        "corpus": "test",
        "remove_high_norm": 0.0,
        "n_tokens": len(acts),
        "complete": True,
        "shards": shards,
    }
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-data")
    acts = np.random.default_rng(0).standard_normal((1500, 32)).astype(np.float32)
    np.save(root / "acts.npy", acts)
    return {"npy": root / "acts.npy", "cache": _write_cache(root / "cache", acts, shard_rows=400)}


@pytest.fixture(scope="module")
def two_rank_orth(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run (TopK + orth + AuxK on the .npy file), checkpointing every 5 steps."""
    out = tmp_path_factory.mktemp("ddp-ref") / "run"
    code, stdout, err = _finish(
        _torchrun("--activations", data["npy"], *TOPK, *COMMON, "--checkpoint-every", "5", "--out", out)
    )
    assert code == 0, err
    assert stdout.count("saved SAE") == 1, stdout  # rank 0 alone reports
    return out


# --- data: each rank reads its slice of the same global batches ------------------------------------


def test_cache_ranks_read_disjoint_slices_of_the_same_batches(data: dict[str, Path]) -> None:
    def batches(part: tuple[int, int], n: int) -> list[torch.Tensor]:
        src = from_cache(data["cache"], batch_size=96, seed=3, window_tokens=256, chunk_tokens=64, part=part)
        return [next(src) for _ in range(n)]

    whole = batches((0, 1), 40)  # several windows and two epochs
    halves = [batches((r, 2), 40) for r in range(2)]
    thirds = [batches((r, 3), 40) for r in range(3)]
    for i, full in enumerate(whole):
        assert torch.equal(torch.cat([h[i] for h in halves]), full)
        assert torch.equal(torch.cat([t[i] for t in thirds]), full)


def test_cache_rank_resumes_at_the_global_position(data: dict[str, Path]) -> None:
    src = from_cache(data["cache"], batch_size=96, seed=3, window_tokens=256, chunk_tokens=64, part=(1, 2))
    for _ in range(7):
        next(src)
    state = src.state()
    expected = [next(src) for _ in range(5)]
    again = from_cache(
        data["cache"], batch_size=96, seed=3, window_tokens=256, chunk_tokens=64, part=(1, 2), state=state
    )
    assert all(torch.equal(next(again), e) for e in expected)


def test_array_ranks_read_disjoint_slices_of_the_same_batches(data: dict[str, Path]) -> None:
    arr = np.load(data["npy"], mmap_mode="r")
    whole = ArrayBatches(arr, 128, seed=5)
    halves = [ArrayBatches(arr, 128, seed=5, part=(r, 2)) for r in range(2)]
    for _ in range(30):  # past two epochs
        assert torch.equal(torch.cat([next(h) for h in halves]), next(whole))
    assert halves[0].state() == halves[1].state() == whole.state()


# --- training: 2 ranks == 1 process ---------------------------------------------------------------


def test_two_ranks_match_one_process_topk_orth_auxk(
    data: dict[str, Path], two_rank_orth: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "one"
    done = _single("--activations", data["npy"], *TOPK, *COMMON, "--checkpoint-every", "5", "--out", ref)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (two_rank_orth / "metrics.jsonl").read_text().splitlines()]
    assert max(r["auxk"] for r in rows) > 0 and max(r["dead_frac"] for r in rows) > 0  # AuxK ran
    assert max(r["orth"] for r in rows) > 0
    _assert_close(two_rank_orth, ref)
    assert sorted(p.name for p in two_rank_orth.iterdir()) == sorted(p.name for p in ref.iterdir())
    cfg = json.loads((two_rank_orth / "cfg.json").read_text())
    assert cfg["training"]["tokens_seen"] == 20 * 128


@pytest.mark.parametrize(
    "source,arch",
    [
        ("cache", "topk"),
        ("npy", "relu"),
        ("npy", "batchtopk"),  # the batch's B·k largest over the global batch, threshold min over ranks
        ("cache", "matryoshka"),
        ("npy", "jumprelu"),
        ("npy", "batchtopk+orth"),  # the penalty on a variable number of co-active latents per token
    ],
)
def test_two_ranks_match_one_process(data: dict[str, Path], tmp_path: Path, source: str, arch: str) -> None:
    name, orth = arch.removesuffix("+orth"), arch.endswith("+orth")
    model = ["--arch", name, "--d-sae", "128", *(["--k", "6"] if name != "relu" else [])]
    args = ["--activations", data[source], *model, *(["--orth"] if orth else []), *COMMON]
    proc = _torchrun(*args, "--out", tmp_path / "two")
    done = _single(*args, "--out", tmp_path / "one")
    code, _, err = _finish(proc)
    assert code == 0 and done.returncode == 0, (err, done.stderr)
    _assert_close(tmp_path / "two", tmp_path / "one")


# --- resume -------------------------------------------------------------------------------------------


def test_signal_on_one_rank_stops_all_at_one_step_and_resume_is_exact(
    data: dict[str, Path], two_rank_orth: Path, tmp_path: Path, cli
) -> None:
    out = tmp_path / "run"
    args = ["--activations", data["npy"], *TOPK, *COMMON, "--checkpoint-every", "5", "--out", out]
    # Only rank 1 is signalled (during loop step 9); both ranks checkpoint after step 10 and stop.
    code, _, err = _finish(_torchrun(*args, script=_script(tmp_path), STOP_AT="9"))
    assert code != 0
    assert err.count("stopped at step 10 of 20") == 1, err
    (step, newest), *_ = list_checkpoints(out)
    assert step == 10 and json.loads(newest.read_text())["world_size"] == 2

    r = cli("train", "--resume", out)  # one process cannot take over a 2-rank run
    assert_one_line_error(r, "trained with 2", "same world size")

    code, _, err = _finish(_torchrun("--resume", out))
    assert code == 0, err
    assert (out / "sae_weights.safetensors").read_bytes() == (
        two_rank_orth / "sae_weights.safetensors"
    ).read_bytes()
    strip = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (two_rank_orth / "metrics.jsonl").read_text().splitlines()]
    for row in (*strip, *ref):
        row.pop("tokens_per_s")
    assert strip == ref


# --- failures -----------------------------------------------------------------------------------------


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_killed_rank_ends_the_torchrun_job(data: dict[str, Path], tmp_path: Path) -> None:
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    args = ["--activations", data["npy"], *TOPK, *ENDLESS]
    proc = _torchrun(*args, "--out", out, script=_script(tmp_path), PID_DIR=str(pids), STEP_DELAY="0.01")
    try:
        _wait_for(out / "metrics.jsonl", proc)
        _wait_for(pids / "rank-1", proc)
        while not (out / "metrics.jsonl").read_text():  # training is under way
            time.sleep(0.05)
        killed = time.monotonic()
        os.kill(int((pids / "rank-1").read_text()), signal.SIGKILL)
        code, _, _ = _finish(proc, timeout=60)
    finally:
        proc.kill()
    assert code != 0
    assert time.monotonic() - killed < 60


def _spawn_ranks(args: list[object], tmp_path: Path) -> list[subprocess.Popen[str]]:
    """Two ranks started by hand (no torchrun agent to tear the job down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = _script(tmp_path)
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=port, STEP_DELAY="0.01", PID_DIR=str(tmp_path))
        cmd = [sys.executable, str(script), "train", *map(str, args)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_survivor_exits_with_one_line_without_torchrun(
    data: dict[str, Path], tmp_path: Path, how: str
) -> None:
    out = tmp_path / "run"
    args = ["--activations", data["npy"], *TOPK, *ENDLESS]
    procs = _spawn_ranks([*args, "--dist-timeout", "3", "--out", out], tmp_path)
    try:
        _wait_for(out / "metrics.jsonl", procs[0])
        while not (out / "metrics.jsonl").read_text():
            time.sleep(0.05)
        victim = int((tmp_path / "rank-1").read_text())
        os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        started = time.monotonic()
        code, _, err = _finish(procs[0], timeout=60)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("orthosae: error: rank 0: ")
    if how == "kill":
        assert "lost contact with another rank" in lines[0] and elapsed < 30
    else:
        assert "within --dist-timeout 3 s" in lines[0] and 2 < elapsed < 30


# --- refused up front, one line from rank 0 only ------------------------------------------------------


def test_refusals_are_one_line_on_rank_0_and_silent_elsewhere(
    data: dict[str, Path], tmp_path: Path, cli, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    base = ["train", "--activations", data["npy"], "--d-sae", "64", "--k", "4", "--out", tmp_path / "x"]
    assert_one_line_error(cli(*base, "--batch-size", "127"), "divisible by the world size 2")
    assert_one_line_error(cli(*base, "--batch-size", "128", "--compile"), "--compile is not supported")
    assert_one_line_error(cli("report", tmp_path), "only `orthosae train` runs under torchrun")
    monkeypatch.setenv("RANK", "1")
    r = cli(*base, "--batch-size", "127")
    assert r.code == 2 and r.err == ""
