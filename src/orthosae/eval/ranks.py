"""`orthosae eval` under torchrun: which rank runs which LM forward batch, and the collectives that put the
ranks' parts back together as one process would have computed them.

The rule: the evaluations cut their inputs into forward batches exactly as one process does (the core eval's
batches of `batch_size_prompts` contexts in corpus order; prompts and probing texts sorted by length, then
cut into batches of `llm_batch_size`), and batch j (0-based, in that order) is run by rank j mod W. A rank
thus runs the same batches, with the same contents and padding, as one process, so its numbers are the
same ones; W need not divide the number of batches (the first ranks then run one batch more).

Putting the parts back:
- a per-item tensor (one row per prompt or text) is filled by each rank at its own rows, zeros elsewhere, and
  summed over ranks: x + 0 is exact, so every rank ends with one process's tensor, in the original order;
- the core eval's per-context sums travel as Python objects, tagged with their batch, and are put back in
  batch order (see core.py), so bootstrap intervals resample the same contexts in the same order.
Everything after the LM part (probe fitting, scoring, bootstrap) then runs on every rank on identical
inputs; rank 0 alone writes files.

Collectives always run over gloo on CPU tensors, whatever device the model is on: they carry statistics
and activations the evaluations already keep on the host.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from orthosae.errors import UserError
from orthosae.train.distributed import Ranks, all_reduce_sum_, failures

HINT = "Rerun the evaluation: a run's eval.json is written only once all its evals have finished"


def owns(index: int, ranks: Ranks | None) -> bool:
    """Whether this process runs forward batch `index` (every batch, in one process)."""
    return ranks is None or index % ranks.world == ranks.rank


def n_owned(n_batches: int, ranks: Ranks | None) -> int:
    """How many of `n_batches` batches this process runs."""
    if ranks is None:
        return n_batches
    return len(range(ranks.rank, n_batches, ranks.world))


@dataclass
class Deal:
    """Batch j on rank j mod W, where j counts the batches of several calls in turn (one eval's many small
    forward loops, each a batch or two long, would otherwise all start on rank 0). Every rank must deal
    the same batches in the same order, which holds where the decisions that shape them are global."""

    ranks: Ranks | None = None
    dealt: int = 0

    @property
    def width(self) -> int:
        """Batches per round: one each for every rank."""
        return 1 if self.ranks is None else self.ranks.world

    def take(self) -> bool:
        """Deal the next batch: whether this rank runs it."""
        mine = owns(self.dealt, self.ranks)
        self.dealt += 1
        return mine


def rank_device(device: str, world: int, local_rank: int, n_gpus: int) -> str:
    """The device this rank evaluates on: `device` in one process; under torchrun cpu stays cpu and cuda
    becomes cuda:LOCAL_RANK (one GPU per rank on each node, as in training)."""
    if world <= 1:
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise UserError(f"under torchrun, --device must be cpu or cuda (a GPU per rank), not {device}")
    if parsed.index is not None:
        raise UserError(
            f"under torchrun each rank uses the GPU numbered its LOCAL_RANK: give --device cuda, not {device}"
        )
    if local_rank >= n_gpus:
        raise UserError(
            f"--device cuda: LOCAL_RANK {local_rank} has no GPU ({n_gpus} visible); start at most one "
            "process per GPU (--nproc-per-node)"
        )
    return f"cuda:{local_rank}"


def sum_rows_(t: torch.Tensor, ranks: Ranks | None, what: str) -> torch.Tensor:
    """Each rank's rows (zeros where another rank owns the row) summed in place: every rank gets the whole
    tensor. A no-op in one process."""
    if ranks is None:
        return t
    return all_reduce_sum_(t, ranks, what)


def gather_objects(obj: Any, ranks: Ranks, what: str) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[Any] = [None] * ranks.world
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_gather_object(out, obj, group=ranks.control)
    return out


def fingerprint(seqs: Sequence[Sequence[int]]) -> int:
    """crc32 of token id sequences (with their lengths), to check that every rank cut the same inputs."""
    crc = zlib.crc32(len(seqs).to_bytes(8, "little"))
    for s in seqs:
        crc = zlib.crc32(array("q", [len(s), *s]).tobytes(), crc)
    return crc


def check_same_inputs(seqs: Sequence[Sequence[int]], ranks: Ranks | None, what: str) -> None:
    """Refuse to combine rows when the ranks hold different inputs (their probes or prompt draws
    diverged, e.g. on machines whose arithmetic differs): the rows would not line up."""
    if ranks is None:
        return
    prints = gather_objects(fingerprint(seqs), ranks, f"comparing {what}")
    if len(set(prints)) > 1:
        raise UserError(
            f"rank {ranks.rank}: the ranks built different {what} (fingerprints {prints}), so their "
            "activations cannot be combined; evaluate as one process"
        )
