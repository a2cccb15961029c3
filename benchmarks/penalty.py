"""Time forward+backward of each orthogonality-penalty method side by side, against an encoder fwd+bwd.

    PYTHONPATH=src .venv/bin/python benchmarks/penalty.py                    # B=1024 d=512 n=8192 k=32
    PYTHONPATH=src .venv/bin/python benchmarks/penalty.py --methods pairwise,sparse --repeats 10
    PYTHONPATH=src .venv/bin/python benchmarks/penalty.py --methods pairwise --chunk-size 128

Each method is warmed up once, then timed ``--repeats`` times (``--slow-repeats`` for masked_dense, which
takes tens of seconds at the default shape); the median is reported. Peak memory is the rise in the
process's resident-set high-water mark during a method's runs, reset before each method through
/proc/self/clear_refs (Linux); elsewhere the column reads n/a.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from orthosae.orthogonality import METHODS, orthogonality_penalty

ENCODER = "encoder fwd+bwd"


@dataclass
class Inputs:
    top_acts: torch.Tensor
    top_indices: torch.Tensor
    decoder: torch.Tensor
    ema_mean: torch.Tensor
    x: torch.Tensor
    encoder: torch.Tensor
    encoder_grad: torch.Tensor


@dataclass
class Row:
    name: str
    seconds: float
    peak_mib: float | None
    value: float | None


def make_inputs(batch: int, d: int, n: int, k: int, seed: int) -> Inputs:
    """Realistic TopK latents: ids from a top-k of random scores, positive acts, ema from the batch mean."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=gen)
    top_vals, top_indices = scores.topk(k, dim=1)
    top_acts = top_vals.relu() + 1e-3  # the top 32 of 8192 normals are all > 2 anyway; keep them positive
    dense = torch.zeros(batch, n).scatter(1, top_indices, top_acts)
    ema_mean = dense.mean(dim=0)
    decoder = torch.randn(n, d, generator=gen)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    x = torch.randn(batch, d, generator=gen)
    encoder = torch.randn(d, n, generator=gen) / d**0.5
    encoder_grad = torch.randn(batch, n, generator=gen)
    return Inputs(top_acts, top_indices, decoder, ema_mean, x, encoder, encoder_grad)


def penalty_step(
    inputs: Inputs, method: str, coactivation: str, threshold_ratio: float, chunk_size: int | None = None
) -> Callable[[], float]:
    acts = inputs.top_acts.clone().requires_grad_(True)
    weight = inputs.decoder.clone().requires_grad_(True)

    def step() -> float:
        acts.grad = None
        weight.grad = None
        loss = orthogonality_penalty(
            acts,
            inputs.top_indices,
            weight,
            inputs.ema_mean,
            threshold_ratio=threshold_ratio,
            coactivation=coactivation,
            method=method,
            chunk_size=chunk_size,
        )
        loss.backward()
        return float(loss.detach())

    return step


def encoder_step(inputs: Inputs) -> Callable[[], float]:
    w_enc = inputs.encoder.clone().requires_grad_(True)

    def step() -> float:
        w_enc.grad = None
        pre = inputs.x @ w_enc
        pre.backward(inputs.encoder_grad)  # a dense upstream gradient, as a real loss would send
        return float("nan")

    return step


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this method's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure(name: str, step: Callable[[], float], repeats: int) -> Row:
    gc.collect()
    can_measure = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    value = step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    peak_mib = (peak - rss_before) / 1024 if can_measure and peak is not None and rss_before else None
    return Row(name, statistics.median(times), peak_mib, None if value != value else value)


def _ratio(seconds: float, reference: Row | None) -> str:
    return f"{seconds / reference.seconds:.2f}x" if reference is not None else "n/a"


def print_table(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}
    pairwise, encoder = by_name.get("pairwise"), by_name.get(ENCODER)
    header = f"{'method':<16} {'seconds':>9} {'vs pairwise':>12} {'vs encoder':>11} {'peak MiB':>9}  value"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        value = f"{r.value:.6g}" if r.value is not None else ""
        if r.value is not None and pairwise is not None and pairwise.value and r.name != "pairwise":
            value += f" (rel diff {abs(r.value - pairwise.value) / abs(pairwise.value):.1e})"
        print(
            f"{r.name:<16} {r.seconds:>9.4f} {_ratio(r.seconds, pairwise):>12} "
            f"{_ratio(r.seconds, encoder):>11} {peak:>9}  {value}"
        )


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}"
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", "-B", type=int, default=1024)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method after one warm-up")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed runs for masked_dense")
    parser.add_argument("--methods", type=parse_methods, default=list(METHODS), help="comma-separated")
    parser.add_argument("--coactivation", default="product")
    parser.add_argument("--threshold-ratio", type=float, default=0.1)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="also time pairwise with this many tokens per chunk"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpu_count={os.cpu_count()} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} load_avg_1min={_load()}"
    )
    print(
        f"shape: B={args.batch} d={args.d} n={args.n} k={args.k} coactivation={args.coactivation} "
        f"threshold_ratio={args.threshold_ratio} repeats={args.repeats} (masked_dense: {args.slow_repeats})"
    )
    inputs = make_inputs(args.batch, args.d, args.n, args.k, args.seed)
    # Methods first so that pairwise, the ratio reference, sits at the top of the table.
    order = [m for m in METHODS if m in args.methods]
    rows = []
    for method in order:
        repeats = args.slow_repeats if method == "masked_dense" else args.repeats
        step = penalty_step(inputs, method, args.coactivation, args.threshold_ratio)
        rows.append(measure(method, step, repeats))
        if method == "pairwise" and args.chunk_size is not None:
            step = penalty_step(inputs, method, args.coactivation, args.threshold_ratio, args.chunk_size)
            rows.append(measure(f"pairwise/{args.chunk_size}", step, repeats))
    rows.append(measure(ENCODER, encoder_step(inputs), args.repeats))
    print()
    print_table(rows)
    print(f"\nload_avg_1min at the end: {_load()} (other processes on the machine skew the timings)")


if __name__ == "__main__":
    main()
