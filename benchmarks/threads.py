"""Two harvesting processes sharing this machine's cores: torch's default threads vs orthosae's choice.

Each worker loads the bundled model, waits until every worker is ready, then harvests layer 15 of
8 × 128-token contexts for a fixed wall time and reports tokens/s. Cases, measured side by side in one run:

  alone          one process, orthosae's default threads (all CPUs it may use)
  pair-default   two processes at once, each with torch's default (one thread per core): the "before"
  pair-threads1  two processes at once, `--threads 1` each: what a user of two independent jobs sets
  pair-ranks     two processes at once that say they are torchrun ranks on one machine
                 (LOCAL_WORLD_SIZE=2), no flag: orthosae's default divides the cores itself

Usage: OMP_NUM_THREADS= python benchmarks/threads.py [--seconds 20]   (run on an otherwise idle machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES: dict[str, tuple[int, list[str], dict[str, str]]] = {
    # name: (processes, extra worker args, extra env)
    "alone": (1, [], {}),
    "pair-default": (2, ["--torch-default"], {}),
    "pair-threads1": (2, ["--threads", "1"], {}),
    "pair-ranks": (2, [], {"LOCAL_WORLD_SIZE": "2"}),
}


def worker(args: argparse.Namespace) -> None:
    import torch

    from orthosae.activations.harvest import resid_post
    from orthosae.data import iter_contexts, iter_texts
    from orthosae.models import load_model
    from orthosae.threads import apply_threads

    if args.torch_default:
        torch.set_num_threads(os.cpu_count() or 1)  # what torch picks on a machine without OMP_NUM_THREADS
    else:
        apply_threads(args.threads)
    loaded = load_model("smollm2-135m")
    ids = next(
        iter_contexts(iter_texts("bundled"), loaded.tokenizer, context_size=128, batch_contexts=8)
    ).tokens
    resid_post(loaded.model, ids, 15)  # warm-up
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.01)
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        resid_post(loaded.model, ids, 15)
        tokens += ids.numel()
    wall = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / wall, "threads": torch.get_num_threads()}))


def run_case(name: str, seconds: float) -> list[dict[str, Any]]:
    n, extra, env_extra = CASES[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env |= {"PYTHONPATH": str(HERE.parent / "src"), **env_extra}
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        procs = []
        for i in range(n):
            ready = Path(tmp) / f"ready{i}"
            cmd = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--ready", str(ready)]
            cmd += ["--go", str(go), *extra]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append((proc, ready))
        while not all(r.exists() or p.poll() is not None for p, r in procs):
            time.sleep(0.05)
        go.touch()
        results = []
        for p, _ in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"{name}: a worker failed (exit {p.returncode}):\n{err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="harvesting time per case")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--torch-default", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    what = "bundled SmolLM2-135M, layer 15, 8×128-token batches"
    print(f"{os.cpu_count()} cores; {what}, {args.seconds:.0f} s each")
    alone = None
    for name in args.cases.split(","):
        results = run_case(name, args.seconds)
        rates = [r["tokens_per_s"] for r in results]
        alone = alone or (rates[0] if name == "alone" else None)
        ratio = f"{sum(rates) / alone:.2f}× alone" if alone else ""
        print(
            f"{name:<14} threads {'/'.join(str(r['threads']) for r in results):<5} "
            f"tok/s per process {' / '.join(f'{x:.0f}' for x in rates):<13} total {sum(rates):6.0f}  {ratio}"
        )


if __name__ == "__main__":
    main()
