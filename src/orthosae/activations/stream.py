"""Harvest activations on the fly (no disk) as windows for the shuffle buffer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from orthosae.activations.harvest import harvest
from orthosae.data.pack import Contexts, iter_contexts
from orthosae.data.texts import iter_texts
from orthosae.models.loader import LoadedModel


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
    ) -> None:
        self.loaded, self.layer = loaded, layer
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
            batches = iter_contexts(
                iter_texts(self.corpus, field=self.text_field),
                self.loaded.tokenizer,
                context_size=self.context_size,
                batch_contexts=self.forward_batch,
                skip_contexts=start,
            )
            if self.max_contexts is not None:
                batches = _limit(batches, self.max_contexts)
            self._iter = harvest(self.loaded, self.layer, batches, self.remove_high_norm)
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
