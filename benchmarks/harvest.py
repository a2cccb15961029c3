"""Truncated harvest (blocks 0..L) vs the full forward (all blocks + LM head) on the bundled model.

Same batch (8 contexts × 128 tokens from the bundled corpus), measured side by side in one run.
Goal: ≥ 1.8× at layer 15 of 30. Usage: python benchmarks/harvest.py [--layer 15] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from orthosae.activations.harvest import resid_post
from orthosae.data import iter_contexts, iter_texts
from orthosae.models import load_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    batch = next(iter_contexts(iter_texts("bundled"), loaded.tokenizer, context_size=128, batch_contexts=8))
    ids = batch.tokens
    n_tok = ids.numel()

    def full() -> None:
        with torch.inference_mode():
            loaded.model(input_ids=ids, use_cache=False)

    def truncated() -> None:
        resid_post(loaded.model, ids, args.layer)

    # Interleave the two measurements so background load affects both alike.
    t_full, t_trunc = [], []
    for _ in range(2):
        t_full.append(_time(full, args.repeats))
        t_trunc.append(_time(truncated, args.repeats))
    tf, tt = min(t_full), min(t_trunc)
    print(
        f"model smollm2-135m ({loaded.n_layers} layers, d={loaded.d_model}), batch 8x128, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"full forward          : {tf:.3f} s/batch  {n_tok / tf:8.0f} tokens/s")
    print(f"harvest layer {args.layer:<2}      : {tt:.3f} s/batch  {n_tok / tt:8.0f} tokens/s")
    print(f"speed-up (full / harvest): {tf / tt:.2f}x  (goal >= 1.8x)")


if __name__ == "__main__":
    main()
