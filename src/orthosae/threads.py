"""How many CPU threads torch should use in this process.

torch's default is one thread per core of the machine, whatever share of it this process may use. Two
processes at two threads each on two cores run 4-9× slower than alone, not 2× (measured: see
benchmarks/threads.py). So the default here is the CPUs this process may actually use, from its affinity
mask and its cgroup's CPU quota, divided among the torchrun ranks on this machine. `--threads N` or an
explicit OMP_NUM_THREADS wins over both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from orthosae.errors import UserError

CGROUP = Path("/sys/fs/cgroup")


@dataclass
class ThreadOptions:
    threads: int | None = None
    """torch CPU threads for this process; default: the CPUs it may use (affinity mask and cgroup quota)
    divided by the torchrun ranks on this machine, or OMP_NUM_THREADS when that is set."""


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (taskset, container cpusets); all cores where unsupported."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def quota_cpus(root: Path = CGROUP) -> float | None:
    """The cgroup CPU quota in CPUs (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`/`cfs_period_us`); None when
    unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def default_threads(cpus: int, quota: float | None, local_ranks: int) -> int:
    """floor(min(affinity, ceil(quota)) / ranks on this machine), at least 1."""
    usable = cpus if quota is None else min(cpus, max(1, math.ceil(quota)))
    return max(1, usable // max(1, local_ranks))


def choose_threads(requested: int | None, environ: dict[str, str] | None = None) -> int | None:
    """The thread count to set, or None to leave torch as OMP_NUM_THREADS already set it."""
    env = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be at least 1, got {requested}")
        return requested
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    try:
        local_ranks = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    except ValueError:
        local_ranks = 1
    return default_threads(affinity_cpus(), quota_cpus(), local_ranks)


def apply_threads(requested: int | None) -> None:
    import torch

    n = choose_threads(requested)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
