"""The trainer's CPU allocator setting: large tensors come from glibc's heap, not from their own mmap."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orthosae.allocator import keep_freed_memory

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _glibc() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version, libc.mallinfo2  # noqa: B018  (mallinfo2: glibc >= 2.33)
    except (OSError, AttributeError):
        return False
    return True


# mallinfo2 (glibc >= 2.33): hblkhd = bytes in mmapped blocks.
PROBE = """
import ctypes, sys, torch
from orthosae.train.config import TrainConfig
from orthosae.train.trainer import Trainer
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
Trainer(TrainConfig(activations="x.npy", d_sae=8, k=2, cpu_allocator=sys.argv[1]), 4)
t = torch.ones(16 * 2**20)  # 64 MiB
info = libc.mallinfo2()
print(info.hblkhd >= 64 * 2**20)
"""


@pytest.mark.skipif(not _glibc(), reason="the setting is glibc's (and the probe needs glibc >= 2.33)")
def test_trainer_serves_large_tensors_from_the_heap():
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("GLIBC_TUNABLES", None)
    runs = {}
    for mode in ("reuse", "system"):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
        )
        runs[mode] = done.stdout.split()
    assert runs["reuse"] == ["False"]  # from the heap, where a freed block stays for reuse
    assert runs["system"] == ["True"]  # its own mmap, unmapped again on free


def test_is_a_no_op_that_says_so_off_glibc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
