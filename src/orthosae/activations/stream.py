"""Harvest activations on the fly (no disk) as windows for the shuffle buffer.

Under torchrun (`ranks`), window w is cut into `world` runs of whole forward batches, rank r harvests run r,
and the ranks all-gather the kept rows in rank order, so every rank holds window w exactly as one process
harvests it (a forward batch, and with it `--remove-high-norm`'s batch median, is the same whichever rank
runs it). The shuffle buffer then forms one process's global batches on every rank and each rank takes its
slice (`window_rows`/`read_rows`); its position stays global, so a rank-0 checkpoint resumes every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from orthosae.activations.cache_rounds import exchange
from orthosae.activations.harvest import harvest
from orthosae.data.pack import Contexts, iter_contexts
from orthosae.data.texts import iter_texts
from orthosae.models.loader import LoadedModel
from orthosae.train.distributed import Ranks, all_gather_ragged


def rank_span(start: int, stop: int, forward_batch: int, part: tuple[int, int]) -> tuple[int, int]:
    """Contexts [a, b) of window [start, stop) that rank `part[0]` of `part[1]` harvests: a contiguous run of
    whole forward batches (counted from `start`), the runs in rank order covering the window once."""
    rank, world = part
    n = -(-(stop - start) // forward_batch)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return min(start + lo * forward_batch, stop), min(start + hi * forward_batch, stop)


class StreamWindows:
    """Window w = the kept tokens of packed contexts [w·k, (w+1)·k), harvested when asked for.

    The stream ends after enough contexts for about `n_tokens` tokens (context_size − 1 per context; a few
    fewer when special tokens are excluded) or when the corpus runs out. Sequential reads reuse one pass over
    the corpus; a jump (resume, new epoch) re-tokenises up to the window, which is cheap next to the forward.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        layer: int,
        *,
        corpus: str = "bundled",
        context_size: int = 128,
        n_tokens: int | None = None,
        window_tokens: int = 1 << 15,
        forward_batch: int = 8,
        text_field: str = "text",
        remove_high_norm: float = 10.0,
        progress: bool = True,
        ranks: Ranks | None = None,
    ) -> None:
        self.loaded, self.layer = loaded, layer
        self.ranks = ranks
        self.d_model = loaded.d_model
        self.corpus, self.context_size, self.text_field = corpus, context_size, text_field
        self.forward_batch = forward_batch
        self.remove_high_norm = remove_high_norm
        # A whole number of forward batches per window, so a window never splits a batch.
        per = max(1, window_tokens // context_size)
        self.contexts_per_window = max(forward_batch, per // forward_batch * forward_batch)
        self.max_contexts = None if n_tokens is None else -(-n_tokens // (context_size - 1))
        self._iter: Iterator[Any] | None = None
        self._next_context = -1
        self._bar: Any = None
        self._progress = progress
        self._n_tokens = n_tokens
        # Under torchrun: this rank's forward batches, read forward across windows, and the shared window.
        self._batches: Iterator[Contexts] | None = None
        self._batches_next = 0  # first context `_batches` yields next
        self._corpus_end: int | None = None  # contexts the corpus holds, once its end has been read
        self._held = torch.empty(0, self.d_model)

    def _bounds(self, index: int) -> tuple[int, int]:
        start = index * self.contexts_per_window
        stop = start + self.contexts_per_window
        return start, stop if self.max_contexts is None else min(stop, self.max_contexts)

    def _contexts(self, skip: int) -> Iterator[Contexts]:
        batches = iter_contexts(
            iter_texts(self.corpus, field=self.text_field),
            self.loaded.tokenizer,
            context_size=self.context_size,
            batch_contexts=self.forward_batch,
            skip_contexts=skip,
        )
        return batches if self.max_contexts is None else _limit(batches, self.max_contexts)

    def n_windows(self, epoch: int) -> int | None:
        return None if self.max_contexts is None else -(-self.max_contexts // self.contexts_per_window)

    def window(self, epoch: int, index: int) -> torch.Tensor | None:
        start = index * self.contexts_per_window
        stop = start + self.contexts_per_window
        if self.max_contexts is not None:
            stop = min(stop, self.max_contexts)
            if start >= stop:
                return None
        if self._iter is None or start != self._next_context:
            self._iter = harvest(self.loaded, self.layer, self._contexts(start), self.remove_high_norm)
        parts: list[torch.Tensor] = []
        end = start
        while end < stop:  # windows are whole forward batches, so pieces never straddle two windows
            piece = next(self._iter, None)
            if piece is None:
                self._iter = None  # corpus exhausted
                break
            parts.append(piece.acts)
            self._tick(len(piece.acts))
            end = piece.end_context
        self._next_context = end
        return torch.cat(parts) if parts else None

    # --- torchrun: the ShuffleBuffer reads rows of the shared window by address ----------------------

    def window_rows(self, epoch: int, index: int) -> np.ndarray | None:
        """Harvest window `index` together with the other ranks; (n, 2) addresses (0, row) of its rows."""
        held = self._shared_window(index)
        if held is None:
            return None
        self._held = held
        return np.stack([np.zeros(len(held), dtype=np.int64), np.arange(len(held), dtype=np.int64)], axis=1)

    def read_rows(self, where: np.ndarray) -> torch.Tensor:
        return self._held[torch.from_numpy(where[:, 1])]

    def _shared_window(self, index: int) -> torch.Tensor | None:
        """Window `index` as one process harvests it: this rank's run of it, all-gathered in rank order;
        None past the stream's end (the same on every rank: it follows from the gathered counts)."""
        assert self.ranks is not None
        start, stop = self._bounds(index)
        if start >= stop:
            return None
        a, b = rank_span(start, stop, self.forward_batch, (self.ranks.rank, self.ranks.world))
        acts, contexts, error = torch.empty(0, self.d_model), 0, None
        try:
            batches = self._read(a, b)
            pieces = [p.acts for p in harvest(self.loaded, self.layer, batches, self.remove_high_norm)]
            acts = torch.cat([acts, *pieces])
            contexts = sum(batch.tokens.shape[0] for batch in batches)
            self._tick(len(acts))
        except Exception as e:  # raised by exchange once every rank has heard of it, so none waits
            error = e
        table = exchange([len(acts), contexts], error, self.ranks, "harvesting activations")
        if int(table[:, 1].sum()) == 0:
            return None  # the corpus ended before this window
        return all_gather_ragged(acts, table[:, 0].tolist(), self.ranks, "exchanging activations")

    def _read(self, a: int, b: int) -> list[Contexts]:
        """The forward batches of contexts [a, b), reading on from the last call when [a, b) lies ahead:
        a rank's runs skip the other ranks' contexts, which are tokenised (cheap) but never run."""
        if self._corpus_end is not None and a >= self._corpus_end:
            return []
        if self._batches is None or a < self._batches_next:
            self._batches, self._batches_next = self._contexts(a), a
        out: list[Contexts] = []
        while self._batches_next < b:
            batch = next(self._batches, None)
            if batch is None:
                self._corpus_end, self._batches = self._batches_next, None
                break
            self._batches_next = batch.first_index + batch.tokens.shape[0]
            if batch.first_index >= a:  # runs start on forward-batch boundaries, so batches never straddle a
                out.append(batch)
        return out

    def _tick(self, n: int) -> None:
        if not self._progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self._n_tokens, unit="tok", unit_scale=True, desc=f"harvest layer {self.layer}"
            )
        self._bar.update(n)


def _limit(batches: Iterator[Contexts], max_contexts: int) -> Iterator[Contexts]:
    # Stop pulling contexts at the end of the stream so no forward pass is wasted beyond it.
    for batch in batches:
        n = max_contexts - batch.first_index
        if n <= 0:
            return
        if n < len(batch.tokens):
            yield Contexts(batch.tokens[:n], batch.mask[:n], batch.first_index)
            return
        yield batch
