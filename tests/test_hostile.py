"""Hostile input through the CLI: every case is a one-line error, exit code 2, no traceback, and nothing
already saved changes. Complements the cases in test_cli.py and test_config.py (not repeated here)."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error
from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.cli import main
from orthosae.train.checkpoint import list_checkpoints

FAST = [
    "--d-sae",
    "32",
    "--k",
    "4",
    "--batch-size",
    "32",
    "--steps",
    "12",
    "--log-every",
    "4",
    "--no-progress",
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shared, read-only artefacts: activations, a finished run, an interrupted run, a model, a cache."""
    root = tmp_path_factory.mktemp("world")
    acts = root / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    done, paused = root / "done", root / "paused"
    assert main(["train", "--activations", str(acts), *FAST, "--out", str(done)]) == 0
    _interrupt_at(acts, paused, 6)
    model = save_tiny_model(root / "tiny", "llama", n_layers=3)
    corpus = write_jsonl(root / "texts.jsonl", SAMPLE_TEXTS[:20])
    cache = root / "cache"
    args = ["cache", "--model", model, "--layer", 1, "--tokens", 400, "--corpus", corpus]
    args += ["--context-size", 32, "--shard-tokens", 100, "--no-progress", "--out", cache]
    assert main([str(a) for a in args]) == 0
    return {"root": root, "acts": acts, "done": done, "paused": paused, "model": model, "cache": cache}


def _interrupt_at(acts: Path, out: Path, n: int) -> None:
    """Run until the n-th step, then act as if Ctrl-C was pressed: a checkpoint and exit code 130."""
    from orthosae.train import trainer

    real, calls = trainer.Trainer.step, [0]

    def step(self, x):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == n:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # type: ignore[operator]
        return real(self, x)

    trainer.Trainer.step = step  # type: ignore[method-assign]
    try:
        assert (
            main(["train", "--activations", str(acts), *FAST, "--checkpoint-every", "4", "--out", str(out)])
            == 130
        )
    finally:
        trainer.Trainer.step = real  # type: ignore[method-assign]


def _copy(world: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world[name], tmp_path / name))


# --- train: options and config files ---------------------------------------------------------------

BAD_OPTIONS = [
    (["--k", "0"], "--k must be positive"),
    (["--d-sae", "0"], "--d_sae must be positive"),
    (["--batch-size", "-5"], "--batch-size must be positive"),
    (["--log-every", "0"], "--log-every must be positive"),
    (["--lr", "nan"], "--lr must be a positive"),
    (["--lr", "0"], "--lr must be a positive"),
    (["--decay-start", "1.5"], "--decay-start"),
    (["--threshold-beta", "1"], "--threshold-beta"),
    (["--max-skipped-batches", "-1"], "--max-skipped-batches"),
    (["--k-aux", "0"], "--k-aux must be positive"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--steps", "2.5"], "must be an integer"),
    (["--seed", "x"], "must be an integer"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite"),
    (["--model", "smollm2-135m"], "exactly one data source"),
]


@pytest.mark.parametrize(("extra", "fragment"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option(cli, world, tmp_path: Path, extra: list[str], fragment: str):
    fragment = fragment.replace("--d_sae", "--d-sae")
    r = cli("train", "--activations", world["acts"], *FAST, *extra, "--out", tmp_path / "run")
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run").exists()


BAD_TOML = [
    ('d_sae = 32\nk = "4', "not valid TOML"),
    ("d_sea = 32\n", "did you mean 'd_sae'"),
    ("d_sae = [1, 2]\n", "must be an integer"),
    ("[activations]\npath = 'a.npy'\n", "must be a string"),
    ("steps = 10\nsteps = 11\n", "not valid TOML"),
    ("orth_method = 'pairwize'\n", "did you mean 'pairwise'"),
    ("checkpoint_every = true\n", "must be an integer"),
    ("\x00\x01 = 3\n", "not valid TOML"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_TOML)
def test_bad_toml_on_the_command_line(cli, world, tmp_path: Path, body: str, fragment: str):
    cfg = tmp_path / "c.toml"
    prefix = "" if "activations" in body else f"activations = '{world['acts']}'\n"
    cfg.write_text(prefix + body)
    r = cli("train", "--config", cfg, "--out", tmp_path / "run")
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run").exists()


def test_config_is_a_directory(cli, world, tmp_path: Path):
    assert_one_line_error(
        cli("train", "--config", tmp_path, "--activations", world["acts"]), "is a directory"
    )


# --- train: data ------------------------------------------------------------------------------------


def _st(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


def _truncated(path: Path) -> Path:
    save_file({"activations": torch.randn(64, 8)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _object_npy(path: Path) -> Path:
    np.save(path, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)
    return path


BAD_DATA: list[tuple[str, Callable[[Path], Path], str]] = [
    ("dir without manifest", lambda p: p, "not an activation cache"),
    ("truncated safetensors", lambda p: _truncated(p / "a.safetensors"), "corrupt"),
    (
        "integer safetensors",
        lambda p: _st(p / "a.safetensors", {"x": torch.ones(8, 4, dtype=torch.int32)}),
        "floating",
    ),
    (
        "two tensors",
        lambda p: _st(p / "a.safetensors", {"a": torch.ones(4, 2), "b": torch.ones(4, 2)}),
        "one tensor",
    ),
    (
        "zero-width safetensors",
        lambda p: _st(p / "a.safetensors", {"activations": torch.ones(10, 0)}),
        "empty",
    ),
    ("1-d safetensors", lambda p: _st(p / "a.safetensors", {"activations": torch.ones(10)}), "shape (N, d)"),
    (
        "garbage safetensors",
        lambda p: (p / "a.safetensors").write_bytes(b"\xff" * 64) and p / "a.safetensors",
        "corrupt",
    ),
    ("inf in .npy", lambda p: _npy(p, 5, 2, np.inf), "row 5, column 2"),
    ("complex .npy", lambda p: _save(p / "a.npy", np.ones((4, 4), np.complex64)), "floating point"),
    ("pickled object .npy", lambda p: _object_npy(p / "a.npy"), "not a readable .npy"),
    ("empty file", lambda p: (p / "a.npy").write_bytes(b"") or p / "a.npy", "not a readable .npy"),
]


def _save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def _npy(p: Path, row: int, col: int, value: float) -> Path:
    arr = np.ones((40, 8), np.float32)
    arr[row, col] = value
    return _save(p / "a.npy", arr)


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_activations(cli, tmp_path: Path, make, fragment: str):
    data = tmp_path / "data"
    data.mkdir()
    r = cli("train", "--activations", make(data), *FAST, "--out", tmp_path / "run")
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run").exists()


def test_out_in_proc_is_refused(cli, world):
    assert_one_line_error(
        cli("train", "--activations", world["acts"], *FAST, "--out", "/proc/orthosae-run"), "cannot write"
    )


def test_layer_out_of_range(cli, world, tmp_path: Path):
    r = cli("train", "--model", world["model"], "--layer", "99", *FAST, "--out", tmp_path / "run")
    assert_one_line_error(r, "layer")
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


def test_model_dir_missing(cli, tmp_path: Path):
    r = cli("train", "--model", tmp_path / "no-such-model", "--layer", "1", *FAST, "--out", tmp_path / "run")
    assert_one_line_error(r)


def test_exploding_loss_stops_without_a_non_finite_checkpoint(cli, tmp_path: Path):
    rows = np.random.default_rng(0).standard_normal((64, 8)) * 1e30
    huge = _save(tmp_path / "huge.npy", rows.astype(np.float32))  # finite, but x² overflows
    r = cli("train", "--activations", huge, *FAST, "--checkpoint-every", "1", "--out", tmp_path / "run")
    assert_one_line_error(r, "nan or inf")
    assert (
        not list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "sae_weights.safetensors").exists()
    )
    r = cli("train", "--activations", huge, *FAST, "--max-skipped-batches", "2", "--out", tmp_path / "run2")
    assert_one_line_error(r, "--max-skipped-batches")


# --- caches -----------------------------------------------------------------------------------------


def _corrupt_shard(cache: Path) -> None:
    shard = cache / "shard_00001.acts.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))


def _nan_shard(cache: Path) -> None:
    from orthosae.activations.cache import sha256_file

    shard = cache / "shard_00000.acts.npy"
    arr = np.load(shard)
    arr[3, 7] = np.nan
    np.save(shard, arr)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["sha256"]["acts"] = sha256_file(shard)  # a valid checksum: a NaN at harvest time
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_corrupt_shard, "checksum mismatch"),
        (_nan_shard, "non-finite activation"),
        (lambda c: (c / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda c: (c / "shard_00002.acts.npy").unlink(), "missing"),
    ],
    ids=["flipped byte", "nan with valid checksum", "garbage manifest", "missing shard"],
)
def test_damaged_cache(cli, world, tmp_path: Path, damage, fragment: str):
    cache = _copy(world, "cache", tmp_path)
    damage(cache)
    r = cli("train", "--activations", cache, *FAST, "--batch-size", "400", "--out", tmp_path / "run")
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


CACHE_CASES = [
    (["--layer", "99"], "out of range"),
    (["--tokens", "0"], "--tokens must be positive"),
    (["--context-size", "1"], "--context-size must be at least 2"),
    (["--shard-tokens", "-1"], "--shard-tokens must be positive"),
    (["--dtype", "float64"], "invalid choice"),
    (["--corpus", "/nonexistent/corpus.jsonl"], "corpus"),
    (["--batch-size", "lots"], "must be an integer"),
]


@pytest.mark.parametrize(("extra", "fragment"), CACHE_CASES, ids=[" ".join(e) for e, _ in CACHE_CASES])
def test_bad_cache_command(cli, world, tmp_path: Path, extra: list[str], fragment: str):
    args = ["--model", world["model"], "--layer", "1", "--tokens", "100", "--no-progress"]
    r = cli("cache", *args, "--out", tmp_path / "c", *extra)
    assert_one_line_error(r, fragment)
    manifest = tmp_path / "c" / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


def test_cache_needs_layer_and_out(cli, world, tmp_path: Path):
    assert_one_line_error(
        cli("cache", "--model", world["model"], "--out", tmp_path / "c"), "--layer is required"
    )
    assert_one_line_error(cli("cache", "--model", world["model"], "--layer", "1"), "--out is required")


def test_cache_empty_corpus(cli, world, tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["cache", "--model", world["model"], "--layer", "1", "--tokens", "100", "--no-progress"]
    assert_one_line_error(cli(*args, "--corpus", empty, "--out", tmp_path / "c"))


def test_cache_out_under_a_file(cli, world, tmp_path: Path):
    (tmp_path / "f").write_text("keep")
    args = ["cache", "--model", world["model"], "--layer", "1", "--tokens", "100", "--no-progress"]
    try:
        assert_one_line_error(cli(*args, "--out", tmp_path / "f" / "c"))
    finally:
        assert (tmp_path / "f").read_text() == "keep"


def test_existing_cache_is_not_touched(cli, world, tmp_path: Path):
    cache = _copy(world, "cache", tmp_path)
    before = snapshot(cache)
    r = cli(
        "cache", "--model", world["model"], "--layer", "2", "--tokens", "400", "--no-progress", "--out", cache
    )
    assert_one_line_error(r)
    assert snapshot(cache) == before


# --- resume -----------------------------------------------------------------------------------------


def _flip_tensors(run: Path) -> None:
    _, path = list_checkpoints(run)[0]
    st = path.with_suffix(".safetensors")
    raw = bytearray(st.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    st.write_bytes(bytes(raw))


def _truncate_tensors(run: Path) -> None:
    st = list_checkpoints(run)[0][1].with_suffix(".safetensors")
    st.write_bytes(st.read_bytes()[:1000])


def _edit_json(run: Path, key: str, value: object) -> None:
    path = list_checkpoints(run)[0][1]
    body = json.loads(path.read_text())
    body[key] = value
    path.write_text(json.dumps(body))


RESUME_DAMAGE = [
    ("flipped bit in tensors", _flip_tensors, ["checksum mismatch", ".safetensors", "delete step-00000006"]),
    ("truncated tensors", _truncate_tensors, ["checksum mismatch"]),
    ("garbage json", lambda r: list_checkpoints(r)[0][1].write_text("{"), ["not JSON", "step-00000006.json"]),
    ("edited step", lambda r: _edit_json(r, "step", 2), ["checksum mismatch", "step-00000006.json"]),
    ("future version", lambda r: _edit_json(r, "version", 99), ["format version 99"]),
    ("not a checkpoint", lambda r: _edit_json(r, "format", "pickle"), ["not an orthosae checkpoint"]),
    (
        "tensors deleted",
        lambda r: list_checkpoints(r)[0][1].with_suffix(".safetensors").unlink(),
        ["missing"],
    ),
    ("metrics truncated", lambda r: (r / "metrics.jsonl").write_text(""), ["metrics.jsonl", "truncated"]),
    ("activations replaced", None, ["activations differ", "n_rows"]),
]


@pytest.mark.parametrize(
    ("damage", "fragments"), [c[1:] for c in RESUME_DAMAGE], ids=[c[0] for c in RESUME_DAMAGE]
)
def test_resume_damaged_run(cli, world, tmp_path: Path, damage, fragments: list[str]):
    run = _copy(world, "paused", tmp_path)
    if damage is None:  # the same path now holds other activations
        acts = tmp_path / "acts.npy"
        _save(acts, np.ones((100, 16), np.float32))
        cfg = json.loads(list_checkpoints(run)[0][1].read_text())["config"]
        assert cfg["activations"] == str(world["acts"])
        world_acts_backup = world["acts"].read_bytes()
        world["acts"].write_bytes(acts.read_bytes())
        try:
            before = snapshot(run)
            assert_one_line_error(cli("train", "--resume", run), *fragments)
        finally:
            world["acts"].write_bytes(world_acts_backup)
    else:
        damage(run)
        before = snapshot(run)
        assert_one_line_error(cli("train", "--resume", run), *fragments)
    assert snapshot(run) == before


RESUME_CHANGES = [
    (["--d-sae", "64"], "d_sae"),
    (["--arch", "relu", "--l1", "0.1"], "arch"),
    (["--seed", "5"], "seed"),
    (["--orth"], "orth"),
    (["--batch-size", "16"], "batch_size"),
    (["--steps", "3"], "below the checkpoint"),
    (["--activations", "/elsewhere.npy"], "activations"),
    (["--d-sae", "0"], "--d-sae must be positive"),
]


@pytest.mark.parametrize(("extra", "fragment"), RESUME_CHANGES, ids=[" ".join(e) for e, _ in RESUME_CHANGES])
def test_resume_with_a_changed_config(cli, world, extra: list[str], fragment: str):
    before = snapshot(world["paused"])
    assert_one_line_error(cli("train", "--resume", world["paused"], *extra), fragment)
    assert snapshot(world["paused"]) == before


def test_resume_with_a_bad_config_file(cli, world, tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("k_auks = 3\n")
    before = snapshot(world["paused"])
    assert_one_line_error(cli("train", "--resume", world["paused"], "--config", cfg), "did you mean 'k_aux'")
    assert snapshot(world["paused"]) == before


def test_resume_nothing_to_resume(cli, world, tmp_path: Path):
    assert_one_line_error(cli("train", "--resume", tmp_path / "nope"), "does not exist")
    assert_one_line_error(cli("train", "--resume", world["acts"]), "is a file")
    assert_one_line_error(cli("train", "--resume", tmp_path), "holds no checkpoint")
    before = snapshot(world["done"])
    assert_one_line_error(cli("train", "--resume", world["done"]), "complete")
    assert snapshot(world["done"]) == before


def test_finished_run_is_not_touched_by_a_failing_train(cli, world):
    before = snapshot(world["done"])
    assert_one_line_error(
        cli("train", "--activations", world["acts"], *FAST, "--out", world["done"]), "already holds"
    )
    assert_one_line_error(
        cli("train", "--activations", world["acts"], *FAST, "--out", world["paused"]), "--resume"
    )
    assert snapshot(world["done"]) == before
