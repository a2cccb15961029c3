"""One training step, side by side: ours (TopK, TopK+orth with each penalty method), one encoder GEMM, and
dictionary_learning's TopKTrainer.update on the same activations.

    PYTHONPATH=src .venv/bin/python benchmarks/step.py                      # both shapes, all cases
    PYTHONPATH=src .venv/bin/python benchmarks/step.py --skip-slow          # seed shape: no masked_dense
    PYTHONPATH=src .venv/bin/python benchmarks/step.py --rounds 3           # interleaved rounds, pooled
    PYTHONPATH=src .venv/bin/python benchmarks/step.py --equivalence --cache /tmp/bench-cache --steps 200

Every case runs in its own subprocess (so its peak RSS, `ru_maxrss`, is its own): one warm-up step (step 0,
which also sets b_dec to the geometric median), then `--repeats` timed steps; the median is reported.
Every case runs with the allocator setting orthosae's trainer applies on CPU (freed memory kept, see
orthosae.allocator), the bare GEMM and dictionary_learning included; `--allocator system` runs them all
with glibc's default.
dictionary_learning runs from a separate venv, benchmarks/.venv-dl (created on first use: torch==2.13.0, then
`pip install --no-deps dictionary-learning==0.1.0` and einops). Its package __init__ imports nnsight, so the
worker imports only `dictionary_learning.trainers.top_k` (and what it imports) through stub parent packages.

--equivalence trains ours and dictionary_learning's from the same initial weights on the same batches from an
activation cache, with the schedules aligned to a constant lr (ours: warmup_steps=0, decay_start=1.0; theirs:
warmup_steps=0, decay_start=None), and compares the per-token MSE on held-out batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine_info import cpu_name  # benchmarks/, the script's own folder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from orthosae.allocator import ENV as REUSE_ENV  # noqa: E402  (no torch import: stdlib only)

DL_VENV = HERE / ".venv-dl"
DL_VERSION = "0.1.0"
TORCH_PIN = "torch==2.13.0"
SHAPES = {"seed": (2304, 16384, 40, 2048), "bundled": (576, 4608, 40, 4096), "tiny": (64, 512, 8, 256)}
OURS = (
    "ours",
    "ours_dense",
    "ours_bf16",
    "ours_compile",
    "orth_pairwise",
    "orth_pairwise_compile",
    "orth_pairwise_shared",
    "orth_sparse",
    "orth_masked_dense",
    # The other architectures' steps (each from its own module; the trainer does not branch on it).
    "arch_relu",
    "arch_batchtopk",
    "arch_matryoshka",
    "arch_jumprelu",
    "arch_batchtopk_orth",
)


# --- worker side (runs in a subprocess) -----------------------------------------------------------------


def _inputs(d: int, b: int, seed: int = 0) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    # A shared offset plus a heavy-tailed scale, roughly like residual-stream activations.
    return torch.randn(b, d, generator=gen) * (torch.rand(b, 1, generator=gen) + 0.5) + 0.3


def _time_steps(step: Any, repeats: int) -> list[float]:
    step(0)  # warm-up (and step 0's geometric median)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t)
    return times


def _ours_trainer(case: str, d: int, n: int, k: int, b: int, **kw: Any) -> Any:
    from orthosae.train.config import TrainConfig
    from orthosae.train.trainer import Trainer

    if case.startswith("arch_"):
        arch = case.removeprefix("arch_").removesuffix("_orth")
        steps = kw.pop("steps", 10**6)
        cfg = TrainConfig(
            activations="bench.npy", d_sae=n, k=k, batch_size=b, steps=steps, arch=arch,  # type: ignore[arg-type]
            orth=case.endswith("_orth"), **kw,
        )  # fmt: skip
        return Trainer(cfg, d)
    orth = case.startswith("orth_")
    shared = case.endswith("_shared")
    compiled = case.endswith("_compile")
    case = case.removesuffix("_shared").removesuffix("_compile")
    cfg = TrainConfig(
        activations="bench.npy",
        d_sae=n,
        k=k,
        batch_size=b,
        steps=kw.pop("steps", 10**6),
        orth=orth,
        orth_method=case.removeprefix("orth_") if orth else "pairwise",
        orth_share_gather=shared,
        kernel="dense" if case == "ours_dense" else "auto",
        bf16_encoder=case == "ours_bf16",
        compile=compiled,
        **kw,
    )
    return Trainer(cfg, d)


def _dl_module() -> Any:
    """dictionary_learning.trainers.top_k without running the package __init__ files (nnsight, wandb...)."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("dictionary_learning")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    return importlib.import_module("dictionary_learning.trainers.top_k")


def _dl_trainer(d: int, n: int, k: int, steps: int = 10**6, warmup: int = 1000) -> Any:
    top_k = _dl_module()
    return top_k.TopKTrainer(
        steps=steps, activation_dim=d, dict_size=n, k=k, layer=0, lm_name="bench", warmup_steps=warmup,
        seed=0, device="cpu",
    )  # fmt: skip


def worker(case: str, d: int, n: int, k: int, b: int, repeats: int, allocator: str) -> dict[str, Any]:
    import torch

    x = _inputs(d, b)
    if case == "gemm":
        W = torch.randn(d, n) / d**0.5
        bias = torch.zeros(n)

        def step(_: int) -> None:
            torch.addmm(bias, x, W)

    elif case == "dl":
        tr = _dl_trainer(d, n, k)

        def step(i: int) -> None:
            tr.update(i, x)

    else:
        trainer = _ours_trainer(case, d, n, k, b, cpu_allocator=allocator)
        if case.endswith("_compile"):
            for _ in range(2):  # compile, then the one recompile once the step counters turn dynamic
                trainer.step(x)

        def step(_: int) -> None:
            trainer.step(x)

    times = _time_steps(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median": statistics.median(times), "times": times, "peak_mib": peak}


# --- equivalence (worker side) --------------------------------------------------------------------------


def equivalence_worker(side: str, data: str, init: str, steps: int, k: int) -> dict[str, Any]:
    import torch

    batches = torch.load(data)
    train, held = batches[:steps], batches[steps:]
    params = torch.load(init)
    d, n = params["W_enc"].shape
    if side == "ours":
        tr = _ours_trainer("ours", d, n, k, batches.shape[1], steps=steps, warmup_steps=0, decay_start=1.0)
        with torch.no_grad():
            for name, p in tr.sae.named_parameters():
                p.copy_(params[name])
        for x in train:
            tr.step(x)
        reconstruct = tr.sae.reconstruct
    else:
        tr = _dl_trainer(d, n, k, steps=steps, warmup=0)
        with torch.no_grad():
            tr.ae.encoder.weight.copy_(params["W_enc"].T)
            tr.ae.encoder.bias.copy_(params["b_enc"])
            tr.ae.decoder.weight.copy_(params["W_dec"].T)
            tr.ae.b_dec.copy_(params["b_dec"])
        for i, x in enumerate(train):
            tr.update(i, x)
        reconstruct = tr.ae
    with torch.no_grad():
        mse = [float((x - reconstruct(x)).pow(2).sum(dim=-1).mean()) for x in held]
    return {"mse": sum(mse) / len(mse)}


# --- driver ---------------------------------------------------------------------------------------------


def ensure_dl_venv() -> Path:
    python = DL_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {DL_VENV} (torch pinned, dictionary-learning --no-deps)...", file=sys.stderr)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(DL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN, "einops"], check=True)
    subprocess.run([*pip, "--no-deps", f"dictionary-learning=={DL_VERSION}"], check=True)
    return python


def run_case(
    case: str, shape: tuple[int, int, int, int], repeats: int, timeout: float, reuse: bool = True
) -> dict[str, Any]:
    python = str(ensure_dl_venv()) if case == "dl" else sys.executable
    args = [
        python,
        __file__,
        "--worker",
        case,
        "--shape",
        ",".join(map(str, shape)),
        "--repeats",
        str(repeats),
        "--allocator",
        "reuse" if reuse else "system",
    ]
    # Every case, dictionary_learning's and the bare GEMM included, under the same allocator setting.
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), **(REUSE_ENV if reuse else {})}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = cpu_name()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    return (
        f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"load average {', '.join(f'{v:.1f}' for v in load)}"  # type: ignore[union-attr]
    )


def bench(args: argparse.Namespace) -> None:
    print(machine())
    print(f"allocator: {args.allocator} (the same in every case)")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        d, n, k, b = shape
        print(f"\n== {name}: d={d} n={n} k={k} B={b} (median of {args.repeats} steps after one warm-up)")
        if args.rounds > 1:
            print(f"   {args.rounds} interleaved rounds: each case's steps pooled over the rounds")
        results: dict[str, dict[str, Any]] = {}
        for r in range(args.rounds):
            for case in ("gemm", *OURS, "dl"):
                if args.cases and case not in args.cases.split(","):
                    continue
                slow = case == "orth_masked_dense" or (case == "orth_sparse" and name == "seed")
                if slow and args.skip_slow and name == "seed":
                    results[case] = {"error": "skipped (--skip-slow)"}
                    continue
                reps = args.slow_repeats if slow else args.repeats
                run = run_case(case, shape, reps, args.timeout, reuse=args.allocator == "reuse")
                results[case] = _pool(results.get(case), run)
                if r == args.rounds - 1:
                    _print_row(case, results[case], results)
        _print_goals(results)


def _pool(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Merge one more round of a case: the median over every timed step so far, the largest peak."""
    if old is None or "error" in old or "error" in new:
        return new if old is None or "error" in new else old
    times = old["times"] + new["times"]
    return {
        "median": statistics.median(times),
        "times": times,
        "peak_mib": max(old["peak_mib"], new["peak_mib"]),
    }


LABELS = {
    "gemm": "(e) encoder GEMM alone",
    "ours": "(a) ours TopK step (kernel=auto)",
    "ours_dense": "    ours TopK step (kernel=dense)",
    "ours_bf16": "    ours TopK step (bf16 encoder GEMM)",
    "orth_pairwise": "(b) ours TopK+orth pairwise",
    "orth_pairwise_shared": "    … pairwise, decode from shared gather",
    "ours_compile": "    ours TopK step (torch.compile)",
    "orth_pairwise_compile": "    … pairwise (torch.compile)",
    "orth_sparse": "(c) ours TopK+orth sparse",
    "orth_masked_dense": "(c) ours TopK+orth masked_dense",
    "dl": "(d) dictionary_learning TopKTrainer.update",
    "arch_relu": "    ReLU + L1 step",
    "arch_batchtopk": "    BatchTopK step",
    "arch_matryoshka": "    Matryoshka BatchTopK step",
    "arch_jumprelu": "    JumpReLU step",
    "arch_batchtopk_orth": "    BatchTopK+orth pairwise",
}


def _print_row(case: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    if "error" in r:
        print(f"  {LABELS[case]:44s} {r['error']}")
        return
    ours = results.get("ours", {}).get("median")
    ratio = f"{r['median'] / ours:6.2f}× (a)" if ours else ""
    print(
        f"  {LABELS[case]:44s} {r['median']:8.3f} s  {ratio:12s} peak RSS {r['peak_mib']:7.0f} MiB",
        flush=True,
    )


def _print_goals(res: dict[str, dict[str, Any]]) -> None:
    def m(case: str) -> float | None:
        return res.get(case, {}).get("median")

    a, e = m("ours"), m("gemm")
    checks = [
        ("(b)/(a) pairwise overhead", m("orth_pairwise"), a, "≤ 1.10", lambda v: v <= 1.10),
        (
            "  same, both compiled",
            m("orth_pairwise_compile"),
            m("ours_compile"),
            "≤ 1.10",
            lambda v: v <= 1.10,
        ),
        ("masked_dense/pairwise", m("orth_masked_dense"), m("orth_pairwise"), "≥ 20", lambda v: v >= 20),
        ("sparse/pairwise", m("orth_sparse"), m("orth_pairwise"), "(info)", lambda v: True),
        ("(d)/(a) dictionary_learning/ours", m("dl"), a, "≥ 3", lambda v: v >= 3),
        ("(a)/(e) ours/GEMM", a, e, "≤ 1.5", lambda v: v <= 1.5),
    ]
    for label, num, den, goal, ok in checks:
        if num is None or den is None:
            print(f"  {label:34s} n/a")
        else:
            v = num / den
            print(f"  {label:34s} {v:6.2f}  goal {goal:6s} {'met' if ok(v) else 'NOT met'}")


def equivalence(args: argparse.Namespace) -> None:
    import torch

    from orthosae.activations.source import from_cache
    from orthosae.train.trainer import build_sae

    held = 8
    source = from_cache(args.cache, batch_size=args.batch, seed=0)
    it = iter(source.batches) if hasattr(source, "batches") else iter(source)
    batches = [next(it).float() for _ in range(args.steps + held)]
    d = batches[0].shape[1]
    tmp = Path(tempfile.mkdtemp(prefix="orthosae-eq-"))
    torch.save(torch.stack(batches), tmp / "batches.pt")  # torch, not numpy: the dl venv has no numpy
    trainer_cfg = _ours_trainer("ours", d, args.d_sae, args.k, args.batch).cfg
    sae = build_sae(trainer_cfg, d)
    torch.save({name: p.detach().clone() for name, p in sae.named_parameters()}, tmp / "init.pt")
    print(machine())
    print(f"equivalence: {args.steps} steps, B={args.batch}, d={d}, n={args.d_sae}, k={args.k}, constant lr; "
          f"MSE per token on {held} held-out batches")  # fmt: skip
    out = {}
    for side in ("ours", "dl"):
        python = str(ensure_dl_venv()) if side == "dl" else sys.executable
        cmd = [python, __file__, "--eq-worker", side, "--data", str(tmp / "batches.pt"),
               "--init", str(tmp / "init.pt"), "--steps", str(args.steps), "--k", str(args.k)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{side} failed:\n{done.stderr[-2000:]}")
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {side:5s} MSE {out[side]['mse']:.5f}  ({time.perf_counter() - t:.0f} s incl. startup)")
    rel = abs(out["ours"]["mse"] - out["dl"]["mse"]) / out["dl"]["mse"]
    print(f"  relative difference {rel:.2%}  goal ≤ 2%  {'met' if rel <= 0.02 else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="bundled,seed", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the case list this many times, interleaved, and pool the steps",
    )
    p.add_argument("--cases", help="comma list of cases to run: gemm, dl, " + ", ".join(OURS))
    p.add_argument(
        "--slow-repeats", type=int, default=1, help="repeats for masked_dense (and sparse at seed)"
    )
    p.add_argument(
        "--allocator",
        choices=("reuse", "system"),
        default="reuse",
        help="reuse: glibc keeps freed memory (TrainConfig.cpu_allocator's default, see orthosae.allocator); "
        "system: glibc's default, an mmap per large tensor (page faults on every step)",
    )
    p.add_argument("--skip-slow", action="store_true", help="skip masked_dense and sparse at the seed shape")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--equivalence", action="store_true")
    p.add_argument("--cache", help="activation cache directory for --equivalence")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--eq-worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        d, n, k, b = map(int, args.shape.split(","))
        print(json.dumps(worker(args.worker, d, n, k, b, args.repeats, args.allocator)))
    elif args.eq_worker:
        print(json.dumps(equivalence_worker(args.eq_worker, args.data, args.init, args.steps, args.k)))
    elif args.equivalence:
        if not args.cache:
            p.error("--equivalence needs --cache DIR")
        equivalence(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
