"""`orthosae cache` under torchrun (gloo on CPU, a tiny local model): 2 ranks build the same cache as one
process, rank 0 alone writes a manifest that lists every rank's shards with their checksums, a killed rank
stops the other with one line and leaves a cache that a rerun completes by redoing only the missing shards
(3 ranks, on a corpus whose contexts and shards do not divide by 3; or one process).

Every build uses 4 contexts per shard and 3 per forward batch, so each chunk's last batch is a single
context, and drops tokens above 1.1× the batch median norm (a quarter of them on this model): a cache
built from differently grouped batches would differ. Rows are compared sorted by (context, position):
token ids exactly, activations to 1e-5 of the largest entry (one process here runs in-process, with torch
threads set to 1 like the ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import orthosae
from conftest_models import SAMPLE_TEXTS, write_jsonl
from orthosae.activations.cache import MANIFEST, build_cache, open_cache, sha256_file
from orthosae.activations.cache_plan import COMPLETE, STOPPED, Harvested, Keep, Plan
from orthosae.errors import UserError

REL_TOL = 1e-5
KW: dict[str, Any] = dict(layer=1, context_size=32, batch_size=3, shard_tokens=128, remove_high_norm=1.1)
TOKENS = 700  # about 8 shards of the full corpus


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_process(out: Path, model_dir: Path, corpus: Path, tokens: int = TOKENS) -> Path:
    with _one_thread():
        return build_cache(
            out, model_name=str(model_dir), n_tokens=tokens, corpus=str(corpus), progress=False, **KW
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, corpus: Path) -> Path:
    return _one_process(tmp_path_factory.mktemp("ref") / "cache", model_dir, corpus)


def _cli_args(out: Path, model_dir: Path, corpus: Path, tokens: int = TOKENS) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]
    return ["cache", "--model", str(model_dir), "--corpus", str(corpus), "--tokens", str(tokens), *flags]


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(orthosae.__file__).resolve().parents[1])
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _torchrun(nproc: int, args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "orthosae", *args, "--no-progress", "--out", str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)


def _rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(meta, acts) of every shard, sorted by (context, position)."""
    cache = open_cache(path)
    meta = np.concatenate([np.asarray(cache.meta(i)) for i in range(cache.n_shards)])
    acts = np.concatenate([np.asarray(cache.shard(i)) for i in range(cache.n_shards)])
    order = np.lexsort((meta[:, 2], meta[:, 1]))
    return meta[order], acts[order]


def _assert_same_cache(path: Path, ref: Path) -> None:
    meta, acts = _rows(path)
    ref_meta, ref_acts = _rows(ref)
    assert np.array_equal(meta, ref_meta)  # token ids, contexts and positions, exactly
    scale = float(np.abs(ref_acts).max())
    assert float(np.abs(acts - ref_acts).max()) <= REL_TOL * scale
    drop = ("sha256",)
    shards = [{k: v for k, v in s.items() if k not in drop} for s in open_cache(path).manifest["shards"]]
    ref_shards = [{k: v for k, v in s.items() if k not in drop} for s in open_cache(ref).manifest["shards"]]
    assert shards == ref_shards  # same names, token and context counts, cut shard
    for key in ("n_tokens", "complete", "corpus_exhausted"):
        assert open_cache(path).manifest.get(key) == open_cache(ref).manifest.get(key), key


def _assert_manifest_lists_every_shard(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    listed = {s[k] for s in manifest["shards"] for k in ("acts", "meta")}
    assert {f.name for f in path.iterdir()} == listed | {MANIFEST}  # no records, temp files or strays left
    for s in manifest["shards"]:
        for kind in ("acts", "meta"):
            assert sha256_file(path / s[kind]) == s["sha256"][kind], s[kind]
    assert manifest["n_tokens"] == sum(s["n_tokens"] for s in manifest["shards"])
    open_cache(path).verify_all()


# --- N ranks == one process ---------------------------------------------------------------------------


def test_two_ranks_build_the_one_process_cache(
    model_dir: Path, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two"
    done = _torchrun(2, _cli_args(out, model_dir, corpus), out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("cache ready") == 1  # rank 0 alone reports
    manifest = json.loads((out / MANIFEST).read_text())
    assert (
        manifest["n_tokens"] == TOKENS
        and len(manifest["shards"]) >= 6
        and manifest["shards"][-1]["truncated"]
    )
    _assert_manifest_lists_every_shard(out)
    _assert_same_cache(out, reference)


# --- a killed rank, then resume -----------------------------------------------------------------------

# `python -m orthosae`, except that rank KILL_RANK kills itself (SIGKILL) when it is about to write its
# KILL_AT-th shard, so the kill lands at the same point on every run.
_KILL_SCRIPT = """
import os, signal, sys
from orthosae.activations import cache
real, calls = cache._write_record, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == os.environ["KILL_RANK"] and calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
cache._write_record = dying
from orthosae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn_ranks(args: list[str], out: Path, tmp_path: Path, **env: str) -> list[subprocess.Popen[str]]:
    """Two ranks started by hand: no torchrun agent tears the survivor down before it reports."""
    script = tmp_path / "kill_script.py"
    script.write_text(_KILL_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        rank_env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        rank_env.update(MASTER_PORT=port, **env)
        cmd = [sys.executable, str(script), *args, "--no-progress", "--dist-timeout", "30", "--out", str(out)]
        procs.append(
            subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def test_killed_rank_stops_the_other_and_three_ranks_redo_only_the_missing_shards(
    model_dir: Path, tmp_path: Path
) -> None:
    # 55 contexts: 13 shards of 4 and a last one of 3, so neither the contexts nor the shards divide by 3;
    # more tokens are asked than the corpus holds.
    small = write_jsonl(tmp_path / "small.jsonl", SAMPLE_TEXTS[:10])
    out, ref = tmp_path / "cache", tmp_path / "ref"
    args = _cli_args(out, model_dir, small, tokens=10**6)
    # Round 1: rank 0 writes shard 0, rank 1 shard 1. Round 2: rank 0 dies as it starts shard 2; rank 1
    # writes shard 3, then finds rank 0 gone.
    procs = _spawn_ranks(args, out, tmp_path, KILL_RANK="0", KILL_AT="2")
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == -signal.SIGKILL
    err = results[1][1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[1].returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("orthosae: error: rank 1: ") and "Rerun the same command" in lines[0]

    with pytest.raises(UserError, match="incomplete"):
        open_cache(out)
    kept = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("shard_*.npy")}
    assert {name.split(".")[0] for name in kept} == {"shard_00000", "shard_00001", "shard_00003"}
    shutil.copytree(out, tmp_path / "copy")
    _one_process(ref, model_dir, small, tokens=10**6)

    done = _torchrun(3, args, out)  # any number of processes resumes it: here 3
    assert done.returncode == 0, done.stderr
    assert {
        f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("*.npy") if f.name in kept
    } == kept
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["corpus_exhausted"] and [s["n_contexts"] for s in manifest["shards"]] == [4] * 13 + [3]
    _assert_manifest_lists_every_shard(out)
    _assert_same_cache(out, ref)

    _one_process(tmp_path / "copy", model_dir, small, tokens=10**6)  # or one process, same arguments
    _assert_manifest_lists_every_shard(tmp_path / "copy")
    _assert_same_cache(tmp_path / "copy", ref)


# --- the plan, without processes ----------------------------------------------------------------------


def test_plan_hands_out_missing_chunks_and_stops_at_the_budget() -> None:
    plan = Plan(n_tokens=250, per_shard=4)
    assert plan.next_round(3) == [0, 1, 2]  # a fresh build: chunk c on rank c mod 3
    assert plan.settle([0, 1, 2], [Harvested(100, 4, COMPLETE)] * 3) == [
        Keep(0, 100, False),
        Keep(1, 100, False),
        Keep(2, 50, True),
    ]
    assert plan.next_round(3) == [] and plan.chunks() == [0, 1, 2] and plan.kept() == 250


def test_plan_fills_holes_and_recuts_a_shard_past_the_budget() -> None:
    # Left by a build that asked for more tokens and was killed: chunk 1 missing, chunks 2 and 4 whole.
    shards = [
        {"first_context": c * 4, "n_tokens": 100, "n_contexts": 4, "truncated": False} for c in (0, 2, 4)
    ]
    plan = Plan.from_shards(shards, n_tokens=250, per_shard=4)
    assert plan.next_round(2) == [1, 3]  # chunk 4 lies certainly past the budget
    assert plan.before(3) == 200 and plan.before(3, {1: 60}) == 260  # chunk 3 may stop at once
    keeps = plan.settle([1, 3], [Harvested(100, 4, COMPLETE), Harvested(0, 0, STOPPED)])
    assert keeps == [Keep(1, 100, False), None]
    assert plan.next_round(2) == [2, 3]  # chunk 2 runs past the budget: harvested again, to be cut
    assert plan.settle([2, 3], [Harvested(50, 2, STOPPED), Harvested(0, 0, STOPPED)]) == [
        Keep(2, 50, True),
        None,
    ]
    assert plan.next_round(2) == [] and plan.chunks() == [0, 1, 2] and plan.kept() == 250


def test_plan_finds_the_corpus_end() -> None:
    plan = Plan(n_tokens=10**6, per_shard=4)
    assert plan.next_round(3) == [0, 1, 2]
    keeps = plan.settle(
        [0, 1, 2], [Harvested(90, 4, COMPLETE), Harvested(40, 2, COMPLETE), Harvested(0, 0, COMPLETE)]
    )
    assert keeps == [Keep(0, 90, False), Keep(1, 40, False), None]
    assert plan.corpus_chunks == 2 and plan.next_round(3) == [] and plan.kept() == 130
    resumed = Plan.from_shards(
        [{"first_context": 4, "n_tokens": 40, "n_contexts": 2, "truncated": False}], 10**6, per_shard=4
    )
    assert resumed.corpus_chunks == 2 and resumed.next_round(3) == [0]


# --- refused up front ---------------------------------------------------------------------------------


def test_cache_is_allowed_under_torchrun_and_the_others_are_refused(tmp_path: Path, cli, monkeypatch) -> None:
    from conftest import assert_one_line_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli("cache", "--out", tmp_path / "c"), "--layer is required")  # its own checks
    x = str(tmp_path / "x")
    for command in (["report", x], ["export", x, x], ["run", x], ["sweep", x]):
        assert_one_line_error(cli(*command), "runs under torchrun", "as one process")
    monkeypatch.setenv("RANK", "1")
    r = cli("cache", "--out", tmp_path / "c")
    assert r.code == 2 and r.err == ""
