"""torch's CPU allocator setting that orthosae applies when it is imported (it must not import torch).

A training step allocates several fresh tensors of 100+ MiB (the B×n pre-activations, the (n, d) weight
gradients). glibc serves each with its own mmap and unmaps it on free, so every step page-faults them back
in 4 KiB at a time: 55 ms per 144 MiB tensor on a 2-core CPU, a fifth of a seed-shape step. torch's
THP_MEM_ALLOC_ENABLE aligns allocations of 2 MiB or more to 2 MiB and asks for transparent huge pages
(madvise), 512x fewer faults. torch reads the variable once, at its first allocation, so it only takes
effect when orthosae is imported before any tensor exists (the CLI always is). A value the user set,
0 included, is kept.
"""

from __future__ import annotations

import os

THP_VAR = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> None:
    os.environ.setdefault(THP_VAR, "1")
