"""Which chunks of contexts a cache build harvests, in which round, and where it stops: pure bookkeeping,
shared by a one-process build and every rank of a torchrun build.

The packed corpus is cut into chunks of `per_shard` consecutive contexts: chunk c holds contexts
[c·per_shard, (c+1)·per_shard) and becomes the shard file `shard_{c:05d}`. A build runs in rounds; each
round hands the lowest-numbered chunks that are neither on disk nor certainly beyond the token budget to
ranks 0, 1, … in order, one each. In a fresh build that is chunk c → rank c mod world. The finished cache
is the shortest run of chunks 0..J holding `n_tokens` kept tokens (chunk J cut at the budget), or every
chunk when the corpus ends first: exactly what one process keeps, whatever the world size.

Kept-token counts are only known after a chunk is harvested (special and high-norm tokens are dropped), so
the rules below use bounds: a chunk is skipped once the chunks before it certainly hold the budget, and a
harvest stops early once its own tokens certainly complete it. Both only ever leave out tokens that the
finished cache does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RUNNING, COMPLETE, STOPPED = 0, 1, 2  # a chunk's harvest: under way, every context done, stopped early


@dataclass(frozen=True)
class Harvested:
    """What one rank reports about its chunk at the end of a round."""

    tokens: int  # kept tokens harvested
    contexts: int  # contexts harvested
    state: int  # COMPLETE or STOPPED


@dataclass(frozen=True)
class Keep:
    """The part of a harvested chunk that goes into the cache: its first `tokens` kept tokens."""

    chunk: int
    tokens: int
    truncated: bool  # the shard ends before its chunk does (cut at the budget)


@dataclass
class Plan:
    n_tokens: int
    per_shard: int
    done: dict[int, int] = field(default_factory=dict)  # chunk → kept tokens, for shards on disk
    cut: set[int] = field(default_factory=set)  # chunks on disk whose shard was cut at the budget
    corpus_chunks: int | None = None  # chunks the corpus holds, once its end has been seen

    @classmethod
    def from_shards(cls, shards: Sequence[Mapping[str, Any]], n_tokens: int, per_shard: int) -> Plan:
        """The plan after the shards an earlier (interrupted) build left, as manifest entries."""
        plan = cls(n_tokens, per_shard)
        for s in shards:
            chunk = int(s["first_context"]) // per_shard
            plan.done[chunk] = int(s["n_tokens"])
            if s.get("truncated"):
                plan.cut.add(chunk)
            if not s.get("truncated") and int(s["n_contexts"]) < per_shard:
                plan.corpus_chunks = chunk + 1  # only the corpus's last chunk is short and whole
        return plan

    def before(self, chunk: int, partial: Mapping[int, int] | None = None) -> int:
        """A lower bound on the kept tokens of chunks < `chunk`: those on disk plus `partial` (tokens
        harvested so far by chunks of the current round)."""
        counts = {**self.done, **(partial or {})}
        return sum(n for c, n in counts.items() if c < chunk)

    def next_round(self, world: int) -> list[int]:
        """Up to `world` chunks to harvest next, lowest first; empty when the cache is finished."""
        chunks: list[int] = []
        kept, chunk = 0, 0  # `kept`: tokens on disk in chunks < chunk (exact while `chunks` is empty)
        while len(chunks) < world and kept < self.n_tokens:
            if self.corpus_chunks is not None and chunk >= self.corpus_chunks:
                break
            if chunk in self.done and (chunks or self._fits(chunk, kept)):
                kept += self.done[chunk]
            else:
                chunks.append(chunk)
            chunk += 1
        return chunks

    def _fits(self, chunk: int, before: int) -> bool:
        """Whether the shard on disk ends where the cache needs it to, given the exact tokens before it. One
        left by a build that asked for more tokens may run past the budget: it is harvested again and cut."""
        after = before + self.done[chunk]
        return after == self.n_tokens if chunk in self.cut else after <= self.n_tokens

    def settle(self, chunks: Sequence[int], harvested: Sequence[Harvested]) -> list[Keep | None]:
        """Record a round (its chunks ascending, as next_round gave them): what to keep of each chunk,
        None for a chunk the cache does not need or that lies past the corpus's end."""
        keeps: list[Keep | None] = []
        for chunk, got in zip(chunks, harvested, strict=True):
            before = self.before(chunk)  # exact: every earlier chunk is on disk or settled above
            if got.state == COMPLETE and got.contexts < self.per_shard:  # the corpus ends in this chunk
                end = chunk + (got.contexts > 0)
                self.corpus_chunks = end if self.corpus_chunks is None else min(self.corpus_chunks, end)
            if before >= self.n_tokens or got.contexts == 0:
                keeps.append(None)
                continue
            tokens = min(got.tokens, self.n_tokens - before)
            keep = Keep(chunk, tokens, tokens < got.tokens or got.state != COMPLETE)
            self.done[chunk] = tokens
            (self.cut.add if keep.truncated else self.cut.discard)(chunk)
            keeps.append(keep)
        return keeps

    def chunks(self) -> list[int]:
        """The finished cache's chunks, in order: 0..J, where chunk J reaches the budget or is the last."""
        out, kept = [], 0
        for chunk in range(len(self.done)):
            if chunk not in self.done or kept >= self.n_tokens:
                break
            out.append(chunk)
            kept += self.done[chunk]
        return out

    def kept(self) -> int:
        return sum(self.done[c] for c in self.chunks())
