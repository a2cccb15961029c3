"""The core eval's spliced forward: from block L's output (`Splicer`) vs from the tokens, side by side.

Runs the bundled SmolLM2-135M on one batch of real text, checks once that starting from the clean block-L
output reproduces the clean logits (the Splicer's calibration), then times the spliced pass both ways,
interleaved, and prints the medians, their ratio and the largest logit difference.

Usage: PYTHONPATH=src .venv/bin/python benchmarks/splice.py [--layer 15] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from machine_info import cpu_name  # benchmarks/, the script's own folder
from orthosae.data import iter_contexts, iter_texts
from orthosae.eval.splice import Splicer, clean_run, spliced_logits
from orthosae.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    loaded = load_model("smollm2-135m")
    batches = iter_contexts(
        iter_texts(), loaded.tokenizer, context_size=args.context, batch_contexts=args.batch
    )
    tokens = next(batches).tokens
    hidden, clean = clean_run(loaded.model, args.layer, tokens)
    splicer = Splicer(loaded.model, args.layer)
    assert splicer.calibrate(tokens, hidden, clean), "block-L shortcut does not reproduce the clean logits"
    replacement = hidden + 0.1 * torch.randn_like(hidden)  # any edit: the splice's cost does not depend on it
    mask = torch.ones(tokens.shape, dtype=torch.bool)

    times: dict[str, list[float]] = {"tokens": [], "block_output": []}
    outs = {}
    for _ in range(args.repeats):
        for name in times:
            start = time.perf_counter()
            if name == "tokens":
                outs[name] = spliced_logits(loaded.model, args.layer, tokens, replacement, mask)
            else:
                outs[name] = splicer.spliced(tokens, hidden, replacement, mask)
            times[name].append(time.perf_counter() - start)
    slow, fast = statistics.median(times["tokens"]), statistics.median(times["block_output"])
    diff = float((outs["tokens"] - outs["block_output"]).abs().max())
    scale = float(outs["tokens"].abs().max())
    print(
        f"{cpu_name()}; {os.cpu_count()} cores; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print(f"smollm2-135m layer {args.layer}, {args.batch}×{args.context} tokens, median of {args.repeats}")
    print(f"spliced pass from the tokens        {slow:.3f} s")
    print(f"spliced pass from block L's output  {fast:.3f} s   {slow / fast:.2f}× faster")
    print(f"largest |Δ logit| between the two   {diff:.2e} (largest |logit| {scale:.1f})")


if __name__ == "__main__":
    main()
