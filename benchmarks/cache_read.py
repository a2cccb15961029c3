"""Read throughput of an activation cache from the page cache (read it twice, time the second pass).

Without --cache, writes a synthetic cache (random activations, d=576, float32, ~1.2 GB) with the real writer
into a temp dir. Measures (a) sequential shard reads (mmap → float32 array) and (b) the shuffle buffer
(ShuffleBuffer over CacheWindows, batch 4096). Goal: ≥ 1 GB/s.
Usage: python benchmarks/cache_read.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from orthosae.activations import cache as cache_mod
from orthosae.activations.buffer import CacheWindows, ShuffleBuffer
from orthosae.activations.cache import open_cache


def synthetic_cache(out: Path, shards: int = 16, tokens: int = 1 << 15, d: int = 576) -> Path:
    out.mkdir(parents=True)
    manifest = {
        "format": cache_mod.FORMAT,
        "version": cache_mod.VERSION,
        "model_id": "synthetic",
        "model_revision": "none",
        "family": "none",
        "layer": 0,
        "hook_name": "blocks.0.hook_resid_post",
        "context_size": 128,
        "dtype": "float32",
        "d_model": d,
        "corpus": "random",
        "text_field": "text",
        "exclude_special": True,
        "prepend_bos": True,
        "contexts_per_shard": tokens // 128,
        "requested_tokens": shards * tokens,
        "n_tokens": 0,
        "complete": False,
        "shards": [],
    }
    gen = torch.Generator().manual_seed(0)
    for i in range(shards):
        ctx = torch.arange(i * tokens, (i + 1) * tokens) // 128
        shard = {
            "acts": torch.randn(tokens, d, generator=gen),
            "tok": torch.zeros(tokens, dtype=torch.int32),
            "ctx": ctx,
            "pos": (torch.arange(tokens) % 128).to(torch.int32),
            "n": tokens,
            "end_context": int(ctx[-1]) + 1,
            "truncated": False,
        }
        manifest = cache_mod._write_shard(out, manifest, shard, int(ctx[0]))
    manifest["complete"] = True
    cache_mod._save_manifest(out, manifest, manifest["n_tokens"])
    return out


def sequential(path: Path) -> tuple[float, int]:
    cache = open_cache(path)
    t = time.perf_counter()
    nbytes = 0
    for array in cache.iter_shards():
        x = np.array(array, dtype=np.float32)  # force the read out of the memory map
        nbytes += x.nbytes
    return time.perf_counter() - t, nbytes


def shuffled(path: Path, batch: int = 4096) -> tuple[float, int]:
    cache = open_cache(path)
    buf = ShuffleBuffer(CacheWindows(cache, seed=0), batch_size=batch, seed=0, max_epochs=1)
    t = time.perf_counter()
    nbytes = sum(b.numel() * 4 for b in buf)
    return time.perf_counter() - t, nbytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    tmp = None
    path = args.cache
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="orthosae-bench-"))
        path = synthetic_cache(tmp / "cache")
    try:
        for name, fn in (("sequential shard read", sequential), ("shuffle buffer, batch 4096", shuffled)):
            first, nbytes = fn(path)  # first pass: disk or page cache, plus sha256 verification in the first
            second, nbytes = fn(path)  # second pass: page cache, shards already verified
            print(
                f"{name:28s}: {nbytes / 1e9:.2f} GB  first pass {nbytes / first / 1e9:5.2f} GB/s"
                f"  second pass {nbytes / second / 1e9:5.2f} GB/s  (goal >= 1 GB/s)"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
