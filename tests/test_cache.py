"""Activation cache: round trip, resume after interruption, refusals, checksums, disk full."""

from __future__ import annotations

import errno
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

from conftest_models import SAMPLE_TEXTS, write_jsonl
from orthosae.activations import cache as cache_mod
from orthosae.activations.cache import build_cache, open_cache
from orthosae.activations.harvest import resid_post
from orthosae.errors import UserError
from orthosae.models import load_model

KW = dict(layer=1, context_size=32, batch_size=3, shard_tokens=100, progress=False)


def _all(cache: cache_mod.ActivationCache) -> tuple[np.ndarray, np.ndarray]:
    acts = np.concatenate([np.asarray(cache.shard(i)) for i in range(cache.n_shards)])
    meta = np.concatenate([np.asarray(cache.meta(i)) for i in range(cache.n_shards)])
    return acts, meta


def test_round_trip_matches_model(tmp_path: Path, model_dir: Path, corpus: Path) -> None:
    out = build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=700, corpus=str(corpus), **KW)
    cache = open_cache(out)
    assert cache.n_tokens == 700 and cache.d_model == 32 and cache.n_shards > 3
    assert cache.manifest["hook_name"] == "blocks.1.hook_resid_post"
    acts, meta = _all(cache)
    assert acts.shape == (700, 32) and meta.dtype == np.int32
    # Recompute the first contexts directly and compare, token by token.
    loaded = load_model(str(model_dir))
    from orthosae.data import iter_contexts, iter_texts

    batch = next(iter_contexts(iter_texts(str(corpus)), loaded.tokenizer, context_size=32, batch_contexts=4))
    ref = resid_post(loaded.model, batch.tokens, 1)
    for row in range(0, 100, 7):
        tok, ctx, pos = meta[row]
        assert batch.tokens[ctx, pos] == tok and pos > 0  # BOS (position 0) excluded
        torch.testing.assert_close(torch.from_numpy(acts[row]), ref[ctx, pos], atol=1e-5, rtol=0)
    # Shards hold whole contexts except possibly the last.
    for s in cache.manifest["shards"][:-1]:
        assert not s["truncated"]
        assert s["n_contexts"] == 3


def test_resume_after_interrupt_is_identical(
    tmp_path: Path, model_dir: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = open_cache(
        build_cache(tmp_path / "ref", model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    )
    real = cache_mod._write_npy
    calls = {"n": 0}

    def flaky(path: Path, array: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 6:  # the acts file of shard 2 written, its meta file not yet
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(cache_mod, "_write_npy", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    monkeypatch.setattr(cache_mod, "_write_npy", real)
    with pytest.raises(UserError, match="incomplete"):
        open_cache(tmp_path / "c")
    partial = json.loads((tmp_path / "c/manifest.json").read_text())
    assert len(partial["shards"]) == 2 and (tmp_path / "c/shard_00002.acts.npy").exists()
    (tmp_path / "c/.shard_00002.meta.npy.junk.tmp").write_bytes(b"half")
    build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    assert not list((tmp_path / "c").glob(".*tmp"))
    a, m = _all(open_cache(tmp_path / "c"))
    b, n = _all(ref)
    assert np.array_equal(a, b) and np.array_equal(m, n)


_KILL_SCRIPT = """
import sys, time
from orthosae.activations import cache as c
real = c._write_shard
def slow(*a, **k):
    r = real(*a, **k); print("shard", flush=True); time.sleep(0.3); return r
c._write_shard = slow
c.build_cache(sys.argv[1], model_name=sys.argv[2], n_tokens=600, corpus=sys.argv[3], layer=1, context_size=32,
              batch_size=3, shard_tokens=100, progress=False)
"""


def test_sigkill_and_resume(tmp_path: Path, model_dir: Path, corpus: Path) -> None:
    out = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(out), str(model_dir), str(corpus)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(2):
        assert proc.stdout.readline().strip() == "shard"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert 2 <= n_before < 6
    build_cache(out, model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    ref = build_cache(tmp_path / "ref", model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    assert np.array_equal(_all(open_cache(out))[0], _all(open_cache(ref))[0])


def test_extend_existing_cache(tmp_path: Path, model_dir: Path, corpus: Path) -> None:
    build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=250, corpus=str(corpus), **KW)
    build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=500, corpus=str(corpus), **KW)
    ref = build_cache(tmp_path / "r", model_name=str(model_dir), n_tokens=500, corpus=str(corpus), **KW)
    assert np.array_equal(_all(open_cache(tmp_path / "c"))[1], _all(open_cache(ref))[1])


def test_mismatch_refused(tmp_path: Path, model_dir: Path, corpus: Path) -> None:
    out = build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=100, corpus=str(corpus), **KW)
    with pytest.raises(UserError, match="different cache: layer=1"):
        build_cache(out, model_name=str(model_dir), n_tokens=100, corpus=str(corpus), **{**KW, "layer": 2})
    cache = open_cache(out)
    cache.check_matches(model=str(model_dir), layer=1, context_size=32)
    with pytest.raises(UserError, match="layer=1.*2 was requested"):
        cache.check_matches(layer=2)
    with pytest.raises(UserError, match="model_id"):
        cache.check_matches(model="smollm2-135m")


def test_corrupt_and_missing_shards(tmp_path: Path, model_dir: Path, corpus: Path) -> None:
    out = build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=300, corpus=str(corpus), **KW)
    shard = out / "shard_00001.acts.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = open_cache(out)
    cache.shard(0)
    with pytest.raises(UserError, match=r"checksum mismatch in .*shard_00001\.acts\.npy"):
        cache.shard(1)
    (out / "shard_00002.meta.npy").unlink()
    with pytest.raises(UserError, match=r"shard_00002\.meta\.npy is missing"):
        cache.meta(2)
    with pytest.raises(UserError, match="not an activation cache"):
        open_cache(tmp_path)


def test_disk_full_keeps_shards(
    tmp_path: Path, model_dir: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_mod._write_npy
    calls = {"n": 0}

    def full(path: Path, array: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, array)

    monkeypatch.setattr(cache_mod, "_write_npy", full)
    with pytest.raises(UserError, match=r"disk full .* kept 2\d\d tokens in 3 complete shards.*rerun"):
        build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=600, corpus=str(corpus), **KW)
    assert len(json.loads((tmp_path / "c/manifest.json").read_text())["shards"]) == 3


def test_empty_corpus_and_bad_args(tmp_path: Path, model_dir: Path) -> None:
    empty = write_jsonl(tmp_path / "e.jsonl", ["hi"])
    with pytest.raises(UserError, match="empty"):
        build_cache(tmp_path / "c", model_name=str(model_dir), n_tokens=100, corpus=str(empty), **KW)
    with pytest.raises(UserError, match="out of range"):
        build_cache(
            tmp_path / "d", model_name=str(model_dir), n_tokens=100, corpus=str(empty), **{**KW, "layer": 9}
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        build_cache(tmp_path / "full", model_name=str(model_dir), n_tokens=100, corpus=str(empty), **KW)


def test_float16_and_corpus_exhausted(tmp_path: Path, model_dir: Path) -> None:
    small = write_jsonl(tmp_path / "small.jsonl", SAMPLE_TEXTS[:12])
    out = build_cache(
        tmp_path / "c",
        model_name=str(model_dir),
        n_tokens=10**7,
        corpus=str(small),
        **{**KW, "dtype": "float16", "shard_tokens": 10**4},
    )
    cache = open_cache(out)
    assert cache.manifest["corpus_exhausted"] and cache.shard(0).dtype == np.float16
    assert 0 < cache.n_tokens < 10**7
    t = time.perf_counter()
    list(cache.iter_shards())
    assert time.perf_counter() - t < 5


def test_remove_high_norm_drops_sink_tokens():
    """A planted token at 1000× the median norm is dropped; the others are kept."""
    from orthosae.activations import harvest as harvest_mod
    from orthosae.data.pack import Contexts

    acts = torch.ones(2, 5, 3)
    acts[1, 2] *= 1000.0

    class _Loaded:
        n_layers, d_model = 2, 3
        model = torch.nn.Linear(1, 1)

    batch = Contexts(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), 0)
    original = harvest_mod.resid_post
    harvest_mod.resid_post = lambda model, ids, layer, attention_mask=None: acts
    try:
        kept = next(harvest_mod.harvest(_Loaded(), 1, [batch], remove_high_norm=10.0))  # type: ignore[arg-type]
        everything = next(harvest_mod.harvest(_Loaded(), 1, [batch], remove_high_norm=0.0))  # type: ignore[arg-type]
    finally:
        harvest_mod.resid_post = original
    assert len(kept.acts) == 9 and len(everything.acts) == 10
    assert not ((kept.context_index == 1) & (kept.position == 2)).any()
