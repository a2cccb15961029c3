"""Data-parallel training with torch.distributed: set-up from torchrun's environment, and the collectives
the trainer and the loop need, each turning a lost or silent peer into a one-line error.

Every rank holds the whole SAE and takes its slice of every global batch. Gradients are averaged by hand,
in one flattened all-reduce after backward, instead of by wrapping the SAE in DistributedDataParallel: the
trainer never calls `sae.forward` (its TopK step runs custom sparse kernels on the parameters), so DDP's
hooks would have nothing to attach to, and for four parameter tensors one flat buffer is what DDP's
bucketing would produce anyway. Batch statistics that are not a plain mean over tokens (b_dec's geometric
median, the AuxK denominator, L_orth, the EMAs and the dead-feature counters) are reduced in the trainer.

A single-process run (WORLD_SIZE unset or 1) starts no process group and runs no collective: the trainer
and the loop skip every hook when their `ranks` is None, so its step stays free of host syncs.

`orthosae cache` under torchrun joins the same way and uses these collectives (orthosae.activations.cache),
with its own resume hint in the failure messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from orthosae.errors import UserError
from orthosae.sae.base import stored_transposed

EXIT_CODE = 1  # a failed peer is not bad input (2); torchrun reports the first failing rank
RESUME_HINT = "Continue from the last checkpoint with --resume under the same world size"


class RankFailure(UserError):
    """A collective failed: another rank died, hung past the timeout, or the connection broke."""

    exit_code = EXIT_CODE


class RankZeroFailed(UserError):
    """Rank 0 stopped with its own one-line error; the other ranks stop quietly with the same exit code."""

    quiet = True


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    timeout_s: float
    control: Any = None  # gloo group for host-side flags when the main backend is nccl; None: the default
    hint: str = RESUME_HINT  # what a failure message tells the user to do next

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when absent (a plain single-process run)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun") from None
    if value < 1:
        raise UserError(f"WORLD_SIZE={value} must be at least 1")
    return value


def env_rank() -> int:
    """This process's RANK, 0 outside a distributed launch."""
    try:
        return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0
    except (ValueError, UserError):
        return 0


def check_options(*, batch_size: int, world: int, compiled: bool = False) -> None:
    """What a multi-process run refuses up front, identically on every rank. (Streaming from --model is
    accepted: every rank harvests its share of each window, orthosae.activations.stream.)"""
    if compiled:
        raise UserError(
            "--compile is not supported under torchrun yet (the compiled step would contain the "
            "collectives); drop --compile"
        )
    if batch_size % world:
        raise UserError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the world size "
            f"{world}; use a multiple of {world}"
        )


def start(device: str, timeout_s: float, hint: str = RESUME_HINT) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    gloo on CPU, nccl on CUDA with this process pinned to cuda:LOCAL_RANK (so plain "cuda" means it).
    `hint` ends every failure message (how to continue after a lost rank).
    """
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE > 1 but {', '.join(missing)} unset; launch with torchrun")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size()
    kind = torch.device(device).type
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most "
                "one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"multi-process training supports --device cpu (gloo) or cuda (nccl), not {device}")
    timeout = timedelta(seconds=timeout_s)
    global _started
    _started = True
    with failures(rank, timeout_s, "joining the process group", hint):
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    global _current
    _current = Ranks(rank, world, local_rank, timeout_s, control, hint)
    return _current


def current() -> Ranks:
    """The Ranks `start` returned in this process: for code that the loop hands only (rank, world), such
    as a live stream, whose ranks exchange activations."""
    if _current is None:
        raise RuntimeError("no process group: call distributed.start first")
    return _current


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_started = False  # whether this process joined (or tried to join) a process group
_current: Ranks | None = None  # what start() returned


def exit_process(code: int) -> None:
    """End a process that joined a group without the interpreter's finalisation. After a clean
    destroy_process_group, torch's teardown at exit still aborted (SIGABRT, "terminate called without an
    active exception") about once in 25 two-rank gloo runs here, turning a finished run into a failure.
    Everything this process writes is already flushed and fsynced, so nothing is lost by skipping it."""
    if not _started:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- failures ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def failures(rank: int, timeout_s: float, what: str, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn the RuntimeError a collective raises (gloo: a reset connection, a timeout) into one line."""
    try:
        yield
    except RuntimeError as e:
        raise RankFailure(failure_message(rank, timeout_s, what, str(e), hint)) from None


def failure_message(rank: int, timeout_s: float, what: str, raw: str, hint: str = RESUME_HINT) -> str:
    reason = _short(raw)
    if "timed out" in raw.lower() or "timeout" in raw.lower():
        cause = f"no answer from another rank within --dist-timeout {timeout_s:g} s (hung or stopped?)"
    else:
        cause = "lost contact with another rank (it exited or was killed: see its output)"
    return f"rank {rank}: {cause} while {what} ({reason}); stopping. {hint}"


def _short(raw: str) -> str:
    """The gist of a gloo/nccl message: no source-file prefix, first sentence, first line."""
    line = raw.strip().splitlines()[0] if raw.strip() else "no detail"
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")[:160]


# --- collectives ------------------------------------------------------------------------------------


def all_reduce_sum_(t: torch.Tensor, ranks: Ranks, what: str = "summing statistics") -> torch.Tensor:
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: torch.Tensor, ranks: Ranks, what: str = "averaging statistics") -> torch.Tensor:
    return all_reduce_sum_(t, ranks, what).div_(ranks.world)


def all_reduce_max_(t: torch.Tensor, ranks: Ranks, what: str = "combining statistics") -> torch.Tensor:
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_rows(x: torch.Tensor, ranks: Ranks, what: str = "gathering the first batch") -> torch.Tensor:
    """Every rank's (b, d) rows stacked in rank order: the global batch, as one process would see it."""
    parts = [torch.empty_like(x) for _ in range(ranks.world)]
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_ragged(x: torch.Tensor, counts: Sequence[int], ranks: Ranks, what: str) -> torch.Tensor:
    """Every rank's host rows stacked in rank order, on every rank; rank r holds `counts[r]` (n, d) rows
    and every rank passes the same counts. Over the control group: gloo, even beside nccl."""
    most = max(counts)
    if most == 0:
        return x[:0]
    padded = torch.zeros(most, *x.shape[1:], dtype=x.dtype)  # all_gather needs equal shapes
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_gather(parts, padded, group=ranks.control)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def average_gradients_(params: Sequence[torch.nn.Parameter], ranks: Ranks) -> None:
    """Mean of every rank's gradients, through one flattened all-reduce. Each rank's loss is a mean over
    its equal share of the global batch, so this mean is the gradient of the global batch's loss."""
    # Each gradient travels in its parameter's memory order and comes back with its parameter's layout
    # (W_enc is stored transposed): fused Adam walks parameter, gradient and moments as flat memory.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat(
        [(g.T if stored_transposed(p) else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )
    all_reduce_mean_(flat, ranks, "averaging gradients")
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()]
        p.grad = part.view(p.T.shape).T if stored_transposed(p) else part.view_as(p)
        offset += p.numel()


def any_rank(flag: bool, ranks: Ranks, what: str) -> bool:
    """True on every rank when `flag` is true on any: a host-side agreement (a stop signal, a failure)."""
    t = torch.tensor([int(flag)], dtype=torch.int32)
    with failures(ranks.rank, ranks.timeout_s, what, ranks.hint):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ranks.control)
    return bool(t.item())


def on_main(ranks: Ranks | None, fn: Any, what: str) -> Any:
    """Run `fn` on rank 0 only (file writes); every rank learns whether it failed, so none waits forever
    at the next collective. Rank 0 re-raises its own error; the others stop with a one-line pointer to it."""
    if ranks is None:
        return fn()
    result, error = None, None
    if ranks.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    if any_rank(error is not None, ranks, what) or error is not None:
        if error is not None:
            raise error
        raise RankZeroFailed(f"rank {ranks.rank}: rank 0 failed while {what} (see its error)")
    return result


def pop_means(means: Any, ranks: Ranks | None) -> dict[str, float]:
    """A `RunningMeans`' means over every rank's tokens (each rank's means weigh equally: equal shares)."""
    average_means_(means, ranks)
    return means.pop()


def average_means_(means: Any, ranks: Ranks | None) -> None:
    """Replace every rank's partial sums by their mean over ranks, the same on all (one all-reduce). Done
    before a checkpoint too, so rank 0's saved sums stand for all ranks and a resumed run logs the same."""
    if ranks is None or not means.sums:
        return
    names = sorted(means.sums)
    stacked = torch.stack([means.sums[n].float() for n in names])
    all_reduce_mean_(stacked, ranks, "averaging metrics")
    means.sums = {n: stacked[i].to(means.sums[n].dtype) for i, n in enumerate(names)}


class NoLog:
    """What ranks other than 0 write metrics to (the log file, trackers): nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def sync(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
