"""One process vs two torchrun ranks on this machine: cache, streaming training and the core eval.

Every case runs the real command line as a subprocess, on the bundled SmolLM2-135M at layer 15, measured side
by side in one run (one process, then two ranks, case by case):

  (a) cache   `orthosae cache --tokens T`            harvest tokens/s, and end to end
  (b) train   `orthosae train --model ... --layer 15`  trained tokens/s (the loop's own rate: streaming
              harvest plus SAE steps, after the model is loaded), and end to end
  (c) eval    `orthosae eval RUN --evals core`       seconds (core's own eval_wall_time_s, and end to end),
              on the SAE that the one-process run of (b) trained

One process gets orthosae's default threads (every CPU it may use; `--threads` overrides), each of the two
ranks `torchrun --standalone --nproc-per-node 2` gives it (OMP_NUM_THREADS=1). The cache's harvest interval
runs from the appearance of its manifest (model loaded, ranks joined) to the final manifest's write, so it
leaves out start-up (imports, model load, rendezvous), which the end-to-end figures include. Everything
is written under one temporary directory, removed at the end; a failed command stops the run with its
output.

Usage: python benchmarks/scaling.py [--tokens 40k] [--eval-batches 6]   (default: about 6-7 min, 2 idle cores)
       python benchmarks/scaling.py --tokens 3k --eval-batches 1 --d-sae 1152   (smoke test, ~4 min)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine_info import cpu_name  # benchmarks/, the script's own folder

HERE = Path(__file__).resolve().parent
MODEL, LAYER, CONTEXT = "smollm2-135m", 15, 128


@dataclass
class Done:
    wall_s: float  # the whole command, start-up included
    harvest_s: float | None = None  # (a) only: the manifest's first appearance to its final write


def _launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "orthosae"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*torchrun, "-m", "orthosae"]


def run(
    args: list[str], ranks: int, log: Path, env: dict[str, str], timeout: float, watch: Path | None = None
) -> Done:
    """Run `orthosae ARGS` on `ranks` processes; with `watch`, note when that file first appears."""
    cmd = [*_launcher(ranks), *args]
    with log.open("w") as out:
        start = time.time()
        # Its own process group, so a timeout also ends torchrun's workers.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        seen = None
        while proc.poll() is None:
            if watch is not None and seen is None and watch.exists():
                seen = time.time()
            if time.time() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{_tail(log)}")
            time.sleep(0.02)
        wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{_tail(log)}")
    if watch is None:
        return Done(wall)
    if seen is None:
        raise SystemExit(f"{watch} never appeared while {' '.join(cmd)} ran")
    return Done(wall, watch.stat().st_mtime - seen)


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def machine() -> str:
    import torch

    cpu = cpu_name()
    return f"{cpu}; {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); torch {torch.__version__}"


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def one_process_threads(requested: int | None) -> int:
    from orthosae.threads import choose_threads

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    return choose_threads(requested, env) or 1


def row(name: str, one: float, two: float, unit: str, higher_is_better: bool) -> str:
    speedup = two / one if higher_is_better else one / two
    return f"{name:<34} {one:>11.1f} {two:>11.1f}  {unit:<6} {speedup:>6.2f}×"


@dataclass
class Bench:
    """One run's settings; each case method runs its command on `ranks` processes and returns figures."""

    tmp: Path
    env: dict[str, str]
    tokens: int
    steps: int
    batch: int
    d_sae: int
    eval_batches: int
    threads: int | None
    timeout: float

    def run(self, name: str, args: list[str], ranks: int, watch: Path | None = None) -> Done:
        given = ["--threads", str(self.threads)] if self.threads and ranks == 1 else []
        log = self.tmp / f"{name}{ranks}.log"
        return run([*args, "--no-progress", *given], ranks, log, self.env, self.timeout, watch)

    def cache(self, ranks: int) -> tuple[Done, int]:
        out = self.tmp / f"cache{ranks}"
        shard_tokens = max(CONTEXT, self.tokens // 8)  # ≥ 8 shards: both ranks get work every round
        args = ["cache", "--model", MODEL, "--layer", str(LAYER), "--tokens", str(self.tokens)]
        args += ["--shard-tokens", str(shard_tokens), "--out", str(out)]
        done = self.run("cache", args, ranks, watch=out / "manifest.json")
        return done, int(json.loads((out / "manifest.json").read_text())["n_tokens"])

    def train(self, ranks: int) -> tuple[Done, float]:
        out = self.tmp / f"train{ranks}"
        args = ["train", "--model", MODEL, "--layer", str(LAYER), "--steps", str(self.steps)]
        args += ["--batch-size", str(self.batch), "--d-sae", str(self.d_sae), "--k", "40", "--out", str(out)]
        args += ["--log-every", str(self.steps), "--checkpoint-every", "0", "--no-tensorboard"]
        done = self.run("train", args, ranks)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        return done, float(rows[-1]["tokens_per_s"])

    def eval(self, ranks: int) -> tuple[Done, float]:
        """The core eval of the SAE that train(1) left in tmp/train1."""
        toml, out = self.tmp / "eval.toml", self.tmp / f"eval{ranks}.json"
        n = self.eval_batches
        toml.write_text(
            f"[core]\nbatch_size_prompts = 8\nn_eval_reconstruction_batches = {n}\n"
            f"n_eval_sparsity_variance_batches = {n}\n"
        )
        args = ["eval", str(self.tmp / "train1"), "--evals", "core", "--config", str(toml), "--out", str(out)]
        done = self.run("eval", args, ranks)
        section = next(v for v in json.loads(out.read_text()).values() if "eval_wall_time_s" in v)
        return done, float(section["eval_wall_time_s"])


def main() -> None:
    from orthosae.config import parse_count

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=parse_count, default=40_000, help="tokens to cache and to train on")
    parser.add_argument("--eval-batches", type=int, default=6, help="core eval batches of 8×128 tokens")
    parser.add_argument("--batch-size", type=int, default=4096, help="training batch (global, even)")
    parser.add_argument("--d-sae", type=int, default=4608, help="SAE width (k = 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the one-process runs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per command")
    args = parser.parse_args()
    if args.tokens < 2 * CONTEXT or args.eval_batches < 1:
        parser.error(f"--tokens must be at least {2 * CONTEXT} and --eval-batches at least 1")
    batch = max(2, min(args.batch_size, args.tokens) // 2 * 2)
    steps = max(1, args.tokens // batch)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if p)
    print(machine())
    print(f"load average at the start: {load()}")
    print(
        f"{MODEL} layer {LAYER}, {CONTEXT}-token contexts; cache {args.tokens} tokens; train {steps} "
        f"steps of {batch} (d_sae {args.d_sae}, k 40); core eval {args.eval_batches} batches of 8 contexts"
    )
    print(f"one process: {one_process_threads(args.threads)} threads; two ranks: 1 thread each")

    with tempfile.TemporaryDirectory(prefix="orthosae-scaling-") as tmp:
        # The first load of the bundled model converts it (~20 s, once per machine): not a case's cost.
        warm = [sys.executable, "-c", f"from orthosae.models import load_model; load_model({MODEL!r})"]
        subprocess.run(warm, check=True, env=env, stdout=subprocess.DEVNULL)
        b = Bench(
            Path(tmp),
            env,
            args.tokens,
            steps,
            batch,
            args.d_sae,
            args.eval_batches,
            args.threads,
            args.timeout,
        )
        cache = {n: b.cache(n) for n in (1, 2)}
        train = {n: b.train(n) for n in (1, 2)}
        evals = {n: b.eval(n) for n in (1, 2)}

    (c1, kept1), (c2, kept2) = cache[1], cache[2]
    (t1, rate1), (t2, rate2) = train[1], train[2]
    (e1, core1), (e2, core2) = evals[1], evals[2]
    assert c1.harvest_s is not None and c2.harvest_s is not None
    trained = steps * batch
    print()
    print(f"{'case':<34} {'1 process':>11} {'2 ranks':>11}  {'unit':<6} {'speed-up':>7}")
    print(row("(a) cache: harvest", kept1 / c1.harvest_s, kept2 / c2.harvest_s, "tok/s", True))
    print(row("    cache: end to end", kept1 / c1.wall_s, kept2 / c2.wall_s, "tok/s", True))
    print(row("(b) train --model: training loop", rate1, rate2, "tok/s", True))
    print(row("    train: end to end", trained / t1.wall_s, trained / t2.wall_s, "tok/s", True))
    print(row("(c) eval core: eval_wall_time_s", core1, core2, "s", False))
    print(row("    eval: end to end", e1.wall_s, e2.wall_s, "s", False))
    print(f"\ntokens cached {kept1} / {kept2}; wall s: cache {c1.wall_s:.1f} / {c2.wall_s:.1f}, train "
          f"{t1.wall_s:.1f} / {t2.wall_s:.1f}")  # fmt: skip
    print(f"load average at the end: {load()} (other work on the machine skews every figure)")


if __name__ == "__main__":
    main()
