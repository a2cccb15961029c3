"""Shuffle buffer over a cache and over a live stream: determinism, coverage, epochs, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.activations.buffer import ShuffleBuffer
from orthosae.activations.cache import build_cache, open_cache
from orthosae.activations.source import from_cache, stream_activations
from orthosae.errors import UserError
from orthosae.models import load_model


class ArrayWindows:
    """A fake source: rows are their own index, so coverage and order are easy to check."""

    def __init__(self, n: int, per_window: int) -> None:
        self.d_model, self.n, self.per = 2, n, per_window

    def n_windows(self, epoch: int) -> int:
        return -(-self.n // self.per)

    def window(self, epoch: int, index: int) -> torch.Tensor | None:
        lo = index * self.per
        if lo >= self.n:
            return None
        rows = torch.arange(lo, min(lo + self.per, self.n), dtype=torch.float32)
        return torch.stack([rows, torch.full_like(rows, epoch)], 1)


def test_one_epoch_covers_every_row_once() -> None:
    buf = ShuffleBuffer(ArrayWindows(1000, 128), batch_size=50, seed=3, max_epochs=1)
    rows = torch.cat([b[:, 0] for b in buf])
    assert sorted(rows.tolist()) == list(range(1000))
    assert rows[:50].tolist() != list(range(50))  # shuffled
    assert buf.epochs_completed == 1


def test_epochs_and_partial_batch_dropped() -> None:
    batches = list(ShuffleBuffer(ArrayWindows(100, 30), batch_size=40, seed=0, max_epochs=3))
    assert len(batches) == 7  # 300 rows // 40
    assert all(b.shape == (40, 2) and b.dtype == torch.float32 for b in batches)
    epochs = torch.cat(batches)[:, 1]
    assert set(epochs.tolist()) == {0.0, 1.0, 2.0}


def test_same_seed_same_batches_other_seed_differs() -> None:
    def take(seed: int) -> torch.Tensor:
        buf = ShuffleBuffer(ArrayWindows(500, 64), batch_size=32, seed=seed)
        return torch.stack([next(buf) for _ in range(20)])

    assert torch.equal(take(1), take(1))
    assert not torch.equal(take(1), take(2))


@pytest.mark.parametrize("stop_after", [1, 4, 9, 17])
def test_resume_from_state_is_exact(stop_after: int) -> None:
    full = list(ShuffleBuffer(ArrayWindows(400, 50), batch_size=30, seed=5, max_epochs=2))
    buf = ShuffleBuffer(ArrayWindows(400, 50), batch_size=30, seed=5, max_epochs=2)
    head = [next(buf) for _ in range(stop_after)]
    state = buf.state()
    assert set(state) == {"seed", "epoch", "window", "offset", "batches"}
    tail = list(ShuffleBuffer(ArrayWindows(400, 50), batch_size=30, seed=5, max_epochs=2, state=dict(state)))
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("buf")
    model_dir = save_tiny_model(root / "m", "gpt2", n_layers=2)
    corpus = write_jsonl(root / "t.jsonl", SAMPLE_TEXTS)
    cache = build_cache(
        root / "c",
        model_name=str(model_dir),
        layer=1,
        n_tokens=1500,
        corpus=str(corpus),
        context_size=32,
        batch_size=4,
        shard_tokens=256,
        progress=False,
    )
    return model_dir, corpus, cache


def test_cache_source_mixes_shards_and_resumes(tiny: tuple[Path, Path, Path]) -> None:
    _, _, cache_dir = tiny
    src = from_cache(cache_dir, batch_size=64, seed=0, max_epochs=2, window_tokens=256, chunk_tokens=32)
    assert src.d_model == 32 and src.metadata["hook_name"] == "blocks.1.hook_resid_post"
    batches = list(src)
    assert len(batches) == 3000 // 64 and src.epochs_completed == 2
    cache = open_cache(cache_dir)
    every = np.concatenate(list(cache.iter_shards()))
    # The first epoch is a permutation of the cache.
    first = torch.cat(batches)[:1500].numpy()
    assert np.allclose(np.sort(first, axis=0), np.sort(every, axis=0))
    # Rows of the first batch come from several shards.
    shard_of = {tuple(np.round(r, 5)): i for i in range(cache.n_shards) for r in np.asarray(cache.shard(i))}
    assert len({shard_of[tuple(np.round(r, 5))] for r in batches[0].numpy()}) >= 3
    src2 = from_cache(cache_dir, batch_size=64, seed=0, max_epochs=2, window_tokens=256, chunk_tokens=32)
    for _ in range(10):
        next(src2)
    rest = list(
        from_cache(
            cache_dir,
            batch_size=64,
            seed=0,
            max_epochs=2,
            window_tokens=256,
            chunk_tokens=32,
            state=src2.state(),
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(rest, batches[10:], strict=True))


def test_cache_source_refuses_other_layer(tiny: tuple[Path, Path, Path]) -> None:
    with pytest.raises(UserError, match="layer"):
        from_cache(tiny[2], batch_size=8, layer=0)


def test_stream_equals_cache_contents_and_resumes(tiny: tuple[Path, Path, Path]) -> None:
    model_dir, corpus, cache_dir = tiny
    loaded = load_model(str(model_dir))
    kw = dict(
        corpus=str(corpus),
        context_size=32,
        batch_size=50,
        n_tokens=31 * 40,
        seed=1,
        window_tokens=256,
        forward_batch=4,
        model=loaded,
        progress=False,
    )
    batches = list(stream_activations(str(model_dir), 1, **kw))
    streamed = torch.cat(batches).numpy()
    assert streamed.shape[1] == 32 and len(batches) == (31 * 40) // 50
    cached = np.concatenate(list(open_cache(cache_dir).iter_shards()))
    keys = {r.tobytes() for r in cached}
    assert sum(r.tobytes() in keys for r in streamed) >= 0.99 * len(streamed)  # same tokens, other order
    src = stream_activations(str(model_dir), 1, **kw)
    for _ in range(7):
        next(src)
    rest = list(stream_activations(str(model_dir), 1, **kw, state=src.state()))
    assert all(torch.equal(a, b) for a, b in zip(rest, batches[7:], strict=True))
