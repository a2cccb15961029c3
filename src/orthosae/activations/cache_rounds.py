"""One round of a cache build: each rank harvests its chunk of contexts batch by batch, and after every batch
the ranks exchange their progress (one small all-reduce), so that all of them know when the round is over,
when a harvest may stop early, and at once when a rank failed. One process runs the same code without the
exchange.

Every batch is a slice of one chunk (`batch_size` contexts from the chunk's start; the last may be smaller),
never of two: the batch median that `--remove-high-norm` uses is then the same whichever rank harvests
the chunk, and so is the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from orthosae.activations.cache_plan import COMPLETE, RUNNING, STOPPED, Harvested, Plan
from orthosae.activations.harvest import Harvest
from orthosae.data.pack import Contexts
from orthosae.errors import UserError
from orthosae.train.distributed import EXIT_CODE, Ranks, all_reduce_sum_


class PeerFailed(UserError):
    """Another rank stopped with its own error; this one stops quietly (that rank's line says why)."""

    quiet = True
    exit_code = EXIT_CODE


def exchange(row: Sequence[int], error: BaseException | None, ranks: Ranks | None, what: str) -> torch.Tensor:
    """Every rank's `row`, stacked in rank order, (world, len(row)) int64. A rank that failed (`error`)
    raises it here, once every rank has heard of it; the others stop quietly, so none waits forever."""
    if ranks is None:
        if error is not None:
            raise error
        return torch.tensor([list(row)], dtype=torch.int64)
    table = torch.zeros(ranks.world, len(row) + 1, dtype=torch.int64)
    table[ranks.rank] = torch.tensor([*row, int(error is not None)], dtype=torch.int64)
    all_reduce_sum_(table, ranks, what)
    if error is not None:
        if isinstance(error, UserError) and ranks.rank and not str(error).startswith("rank "):
            raise UserError(f"rank {ranks.rank}: {error}") from None  # rank 0 alone speaks unnamed lines
        raise error
    failed = table[:, -1].nonzero().flatten().tolist()
    if failed:
        raise PeerFailed(f"rank {ranks.rank}: rank {failed[0]} failed while {what} (see its error)")
    return table[:, :-1]


class ChunkReader:
    """Chunks of packed contexts (`per_shard` each, the last possibly fewer), read forward: a rank asks for
    ever higher chunk numbers, so one pass over the corpus serves the whole build."""

    def __init__(self, contexts: Callable[[int], Iterator[Contexts]], per_shard: int):
        self._contexts = contexts  # skip → batches of per_shard contexts from context `skip` on
        self._per_shard = per_shard
        self._it: Iterator[Contexts] | None = None
        self._next = 0  # first context the iterator yields next

    def get(self, chunk: int) -> Contexts | None:
        """Chunk `chunk`'s contexts, None past the corpus's end."""
        start = chunk * self._per_shard
        if self._it is None or start < self._next:
            self._it, self._next = self._contexts(start), start
        for contexts in self._it:
            self._next = contexts.first_index + contexts.tokens.shape[0]
            if contexts.first_index == start:
                return contexts
        return None


def batches(chunk: Contexts | None, batch_size: int) -> list[Contexts]:
    """A chunk's forward batches: `batch_size` contexts at a time from its start."""
    if chunk is None:
        return []
    return [
        Contexts(chunk.tokens[i : i + batch_size], chunk.mask[i : i + batch_size], chunk.first_index + i)
        for i in range(0, chunk.tokens.shape[0], batch_size)
    ]


@dataclass
class ChunkWork:
    """One rank's harvest of one chunk."""

    chunk: int
    batches: list[Contexts]
    pieces: list[Harvest] = field(default_factory=list)
    tokens: int = 0
    contexts: int = 0
    state: int = RUNNING

    def step(self, harvest_batch: Callable[[Contexts], Harvest], before: int, n_tokens: int) -> None:
        """Harvest the next batch, unless the chunk is done or its tokens so far certainly complete the
        cache (`before`: a lower bound on the kept tokens of earlier chunks)."""
        if self.state != RUNNING:
            return
        done = len(self.pieces)
        if done == len(self.batches):
            self.state = COMPLETE
        elif before + self.tokens >= n_tokens:
            self.state = STOPPED
        else:
            piece = harvest_batch(self.batches[done])
            self.pieces.append(piece)
            self.tokens += len(piece.token_ids)
            self.contexts += self.batches[done].tokens.shape[0]
            if done + 1 == len(self.batches):
                self.state = COMPLETE

    def row(self) -> list[int]:
        return [self.tokens, self.contexts, self.state]


def harvest_round(
    plan: Plan,
    chunks: Sequence[int],
    reader: ChunkReader,
    harvest_batch: Callable[[Contexts], Harvest],
    batch_size: int,
    ranks: Ranks | None,
    on_progress: Callable[[int], None],
) -> tuple[list[Harvested], ChunkWork | None]:
    """Harvest `chunks[r]` on rank r until every rank is done; what each rank got, and this rank's work.
    `on_progress` gets a lower bound on the cache's kept tokens after every batch."""
    rank = ranks.rank if ranks is not None else 0
    work: ChunkWork | None = None
    partial: dict[int, int] = {}  # chunk → tokens harvested so far this round, every rank's
    while True:
        error = None
        try:
            if work is None and rank < len(chunks):
                work = ChunkWork(chunks[rank], batches(reader.get(chunks[rank]), batch_size))
            if work is not None:
                work.step(harvest_batch, plan.before(work.chunk, partial), plan.n_tokens)
        except Exception as e:  # re-raised by exchange, after every rank has heard of it
            error = e
        row = work.row() if work is not None else [0, 0, COMPLETE]
        table = exchange(row, error, ranks, "harvesting")[: len(chunks)]
        partial = dict(zip(chunks, table[:, 0].tolist(), strict=True))
        on_progress(sum(plan.done.values()) + sum(partial.values()))
        if bool((table[:, 2] != RUNNING).all()):
            return [Harvested(*map(int, r)) for r in table.tolist()], work
