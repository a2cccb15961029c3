"""Keep freed CPU memory in the process, so that a training step's large tensors reuse warm pages.

A step allocates several fresh tensors of 100+ MiB (the B×n pre-activations, the (n, d) weight gradients).
glibc serves each with its own mmap and unmaps it on free, so every step the kernel zero-fills and
page-faults them back in, 4 KiB at a time: 30-60 ms per 144 MiB tensor on a 2-core CPU, up to a fifth of a
seed-shape step. With mmap off and trimming raised, glibc serves them from its heap and keeps what is freed,
and the next step's tensors land on pages already mapped. The cost is a higher peak RSS: freed blocks are
kept, and a heap fragments. (torch's THP_MEM_ALLOC_ENABLE huge pages were also tried: faster on some runs,
slower on others on the same machine, so they are not used.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1  # the largest value the C int parameter takes

ENV = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_TRIM_BYTES}"}
"""The same setting as environment variables, for processes started from outside (benchmarks)."""


def keep_freed_memory() -> bool:
    """Apply the setting to this process from now on; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
