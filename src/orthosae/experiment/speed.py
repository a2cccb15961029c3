"""Per-step time of the TopK baseline and of TopK+orth with each penalty implementation, measured side by
side in one process on the same real batches (round-robin, so drift in machine load hits all alike)."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any

import torch

from orthosae.orthogonality import METHODS
from orthosae.train.config import TrainConfig
from orthosae.train.trainer import Trainer

WARMUP_STEPS = 2


def variants(base: TrainConfig) -> dict[str, TrainConfig]:
    plain = dataclasses.replace(base, arch="topk", orth=False)
    out = {"topk": plain}
    for method in METHODS:
        out[f"orth/{method}"] = dataclasses.replace(plain, orth=True, orth_method=method)
    return out


def measure_speed(base: TrainConfig, batches: list[torch.Tensor], steps: int) -> dict[str, Any]:
    """Median seconds per optimizer step of each variant, and the ratio to the TopK baseline."""
    cfgs = variants(base)
    d_in = batches[0].shape[1]
    trainers = {name: Trainer(c, d_in) for name, c in cfgs.items()}
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for i in range(WARMUP_STEPS + steps):
        x = batches[i % len(batches)]
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step(x)
            elapsed = time.perf_counter() - t0
            if i >= WARMUP_STEPS:
                times[name].append(elapsed)
    base_t = statistics.median(times["topk"])
    rows = [
        {
            "name": name,
            "seconds_per_step": statistics.median(t),
            "ratio_to_baseline": statistics.median(t) / base_t,
        }
        for name, t in times.items()
    ]
    return {
        "machine": machine(),
        "shape": {"d_in": d_in, "d_sae": base.d_sae, "k": base.k, "batch_size": batches[0].shape[0]},
        "steps_timed": steps,
        "rows": rows,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def format_speed(speed: dict[str, Any]) -> str:
    shape = speed["shape"]
    lines = [
        f"per-step time, d={shape['d_in']} n={shape['d_sae']} k={shape['k']} B={shape['batch_size']} "
        f"({speed['machine']})",
        f"{'variant':<20}{'s/step':>10}{'× topk':>10}",
    ]
    lines += [
        f"{r['name']:<20}{r['seconds_per_step']:>10.3f}{r['ratio_to_baseline']:>10.2f}" for r in speed["rows"]
    ]
    return "\n".join(lines)
