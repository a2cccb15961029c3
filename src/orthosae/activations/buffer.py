"""Seeded shuffle buffer: float32 (B, d) batches mixed across shards and sequences, resumable.

The token stream is cut into windows. A window is a set of chunks (contiguous runs of tokens) drawn in a
seeded random order from the whole source, so every window mixes many shards and contexts; inside a window,
tokens are emitted in a seeded random permutation. Batches are the next B tokens of that stream and may span
windows and epochs. Because windows and permutations are pure functions of (seed, epoch, window), the
position {epoch, window, offset} is the whole state: resuming reloads one window and skips `offset` tokens.

Data-parallel ranks (`part=(rank, world)`) walk the same global stream of batches, and each reads only its
slice [rank·B/world, (rank+1)·B/world) of every batch. A source that can say where a window's rows live
(`window_rows`/`read_rows`, as a cache can) is then never read in full: each rank shuffles the window's
row addresses with the same seeded permutation and reads its own rows only, so the ranks' reads are
disjoint and together cover exactly what one process would read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from orthosae.activations.cache import ActivationCache


class WindowSource(Protocol):
    d_model: int

    def n_windows(self, epoch: int) -> int | None:
        """Windows per epoch, or None when not known in advance (a stream)."""
        ...

    def window(self, epoch: int, index: int) -> torch.Tensor | None:
        """Window `index` of `epoch` as (n, d_model) float32, or None past the end of the epoch."""
        ...


def _rng_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class RowSource(WindowSource, Protocol):
    def window_rows(self, epoch: int, index: int) -> np.ndarray | None:
        """(n, 2) int64 (shard, row) of window `index`'s rows in `window`'s order; None past the end."""
        ...

    def read_rows(self, where: np.ndarray) -> torch.Tensor:
        """The rows at (shard, row) addresses `where`, in that order, as float32 (len(where), d_model)."""
        ...


class CacheWindows:
    """Windows of `window_tokens` built from randomly ordered `chunk_tokens` chunks of an activation cache."""

    def __init__(
        self, cache: ActivationCache, *, seed: int, window_tokens: int = 1 << 16, chunk_tokens: int = 1024
    ) -> None:
        self.cache = cache
        self.d_model = cache.d_model
        self.seed = seed
        self.chunks = [
            (i, start, min(start + chunk_tokens, size))
            for i, size in enumerate(cache.shard_sizes())
            for start in range(0, size, chunk_tokens)
        ]
        self.chunks_per_window = max(1, window_tokens // chunk_tokens)
        self._maps: dict[int, np.ndarray] = {}

    def n_windows(self, epoch: int) -> int:
        return math.ceil(len(self.chunks) / self.chunks_per_window)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_rng_seed(self.seed, 1, epoch)).permutation(len(self.chunks))

    def _picked(self, epoch: int, index: int) -> np.ndarray:
        return self._order(epoch)[index * self.chunks_per_window : (index + 1) * self.chunks_per_window]

    def window_rows(self, epoch: int, index: int) -> np.ndarray | None:
        picked = self._picked(epoch, index)
        if len(picked) == 0:
            return None
        spans = [self.chunks[i] for i in picked]
        shards = np.concatenate([np.full(b - a, s, dtype=np.int64) for s, a, b in spans])
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b in spans])
        return np.stack([shards, rows], axis=1)

    def read_rows(self, where: np.ndarray) -> torch.Tensor:
        out = np.empty((len(where), self.d_model), dtype=np.float32)
        for shard in np.unique(where[:, 0]):
            at = np.nonzero(where[:, 0] == shard)[0]
            order = np.argsort(where[at, 1], kind="stable")  # ascending reads are kinder to a memory map
            if int(shard) not in self._maps:
                self._maps[int(shard)] = self.cache.shard(int(shard))
            out[at[order]] = self._maps[int(shard)][where[at[order], 1]]
        return torch.from_numpy(out)

    def window(self, epoch: int, index: int) -> torch.Tensor | None:
        picked = self._picked(epoch, index)
        if len(picked) == 0:
            return None
        parts = [self.cache.shard(s)[a:b] for s, a, b in (self.chunks[i] for i in picked)]
        out = np.empty((sum(len(p) for p in parts), self.d_model), dtype=np.float32)
        row = 0
        for part in parts:
            out[row : row + len(part)] = part  # copies (and upcasts) straight out of the memory map
            row += len(part)
        return torch.from_numpy(out)


class ShuffleBuffer(Iterator[torch.Tensor]):
    """Iterator of (batch_size, d_model) float32 tensors; deterministic for a given seed and source.

    `max_epochs=None` cycles forever; otherwise iteration stops when that many passes are done (a final
    partial batch is dropped). `state()` returns a small dict; pass it back as `state=` to resume exactly.
    """

    def __init__(
        self,
        source: WindowSource,
        *,
        batch_size: int,
        seed: int = 0,
        max_epochs: int | None = None,
        state: dict[str, Any] | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rank, world = part
        self.mine = (rank * batch_size // world, (rank + 1) * batch_size // world)
        # One process materialises whole windows (fast sequential copies); a rank reads its rows only.
        self.by_row = world > 1
        if self.by_row and not hasattr(source, "window_rows"):
            raise ValueError("splitting batches across ranks needs a source that can read single rows")
        self.source = source
        self.d_model = source.d_model
        self.batch_size = batch_size
        self.seed = seed
        self.max_epochs = max_epochs
        self.epoch, self.window_index, self.offset, self.batches = 0, 0, 0, 0
        if state is not None:
            if state.get("seed", seed) != seed:
                raise ValueError(f"state was saved with seed {state['seed']}, buffer has seed {seed}")
            self.epoch, self.window_index = int(state["epoch"]), int(state["window"])
            self.offset, self.batches = int(state["offset"]), int(state.get("batches", 0))
        self._data: torch.Tensor | None = None  # the current window, already shuffled
        self._where: np.ndarray | None = None  # by_row: the shuffled window's (shard, row) addresses
        self._len = 0  # rows in the current window; 0 when none is loaded

    @property
    def epochs_completed(self) -> int:
        return self.epoch

    def state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "window": self.window_index,
            "offset": self.offset,
            "batches": self.batches,
        }

    def _load(self) -> bool:
        """Load the current window (moving on to the next epoch at the end of one); False when done."""
        while not self._len:
            if self.max_epochs is not None and self.epoch >= self.max_epochs:
                return False
            n = self._open_window()
            if not n:
                if n is None and self.window_index == 0:
                    return False  # an empty source: nothing ever to yield
                self._advance_window(end_of_epoch=n is None)
                continue
        return True

    def _open_window(self) -> int | None:
        """Shuffle the current window into place; its row count (None past the end of the epoch)."""
        if self.by_row:
            data: Any = self.source.window_rows(self.epoch, self.window_index)  # type: ignore[attr-defined]
        else:
            data = self.source.window(self.epoch, self.window_index)
        if data is None or len(data) == 0:
            return None if data is None else 0
        gen = torch.Generator().manual_seed(_rng_seed(self.seed, 2, self.epoch, self.window_index))
        dest = torch.randperm(len(data), generator=gen).numpy()
        if self.by_row:  # the same permutation, applied to addresses instead of activations
            where = np.empty_like(data)
            where[dest] = data
            self._where = where
        else:
            # Permute the whole window once with a scatter (several GB/s); batches are then contiguous slices.
            shuffled = np.empty((len(data), data.shape[1]), dtype=np.float32)
            shuffled[dest] = data.numpy()
            self._data = torch.from_numpy(shuffled)
        self._len = len(data)
        return self._len

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        if self._where is not None:
            return self.source.read_rows(self._where[start:stop])  # type: ignore[attr-defined]
        assert self._data is not None
        return self._data[start:stop]  # a view: windows are never written again

    def _advance_window(self, end_of_epoch: bool = False) -> None:
        self._data, self._where, self._len = None, None, 0
        self.offset = 0
        n = self.source.n_windows(self.epoch)
        if end_of_epoch or (n is not None and self.window_index + 1 >= n):
            self.epoch += 1
            self.window_index = 0
        else:
            self.window_index += 1

    def __next__(self) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        need, filled = self.batch_size, 0
        lo, hi = self.mine
        while need:
            if not self._load():
                raise StopIteration  # the tail shorter than a batch is dropped
            take = min(need, self._len - self.offset)
            a, b = max(lo - filled, 0), min(hi - filled, take)  # the part of this piece that is ours
            if a < b:
                parts.append(self._rows(self.offset + a, self.offset + b))
            self.offset += take
            filled += take
            need -= take
            if self.offset >= self._len:
                self._advance_window()
        self.batches += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)
