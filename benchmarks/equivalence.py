"""Ours vs dictionary_learning's own trainers for BatchTopK, Matryoshka BatchTopK and JumpReLU: the same
initial weights, the same cached batches in the same order, then the per-token MSE on held-out batches.

    .venv/bin/orthosae cache --layer 15 --tokens 100k --out /tmp/arch-cache --no-progress
    PYTHONPATH=src .venv/bin/python benchmarks/equivalence.py --cache /tmp/arch-cache --steps 150

dictionary_learning 0.1.0 runs from benchmarks/.venv-dl (see step.py, which creates it); its trainer modules
are imported through stub parent packages (its package __init__ imports nnsight). Nothing of it is copied
here. Schedules are aligned to what both express exactly: a constant lr (ours warmup_steps=0,
decay_start=1.0; theirs warmup_steps=0, decay_start=None), the same threshold start step (both track the
threshold from the step after it) and, for JumpReLU, the same sparsity warm-up and target L0. Held-out MSE
is reported with each SAE's inference rule (BatchTopK/Matryoshka: the learned threshold; JumpReLU: its
thresholds) and, for the BatchTopK family, also with the training rule (batch top-k).

Normalisation (--normalize; default: orthosae's per-architecture default, i.e. JumpReLU only): ours trains
on raw batches with normalize_activations and folds the factor into the saved SAE; dictionary_learning's
trainer gets the batches divided by the same factor (what its trainSAE does with normalize_activations) and
its own `scale_biases` folds the factor back, so both are scored on the raw held-out batches.
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

ARCHS = ("batchtopk", "matryoshka", "jumprelu")
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32]  # orthosae's default --matryoshka-fractions
NORMALIZE: dict[str, bool | None] = {"default": None, "on": True, "off": False}
DL_MODULES = {
    "batchtopk": "dictionary_learning.trainers.batch_top_k",
    "matryoshka": "dictionary_learning.trainers.matryoshka_batch_top_k",
    "jumprelu": "dictionary_learning.trainers.jumprelu",
}


def _dl_module(name: str) -> Any:
    """A dictionary_learning trainer module without running the package __init__ files."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("dictionary_learning")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    for pkg, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        stub = types.ModuleType(pkg)
        stub.__path__ = [str(path)]
        sys.modules[pkg] = stub
    return importlib.import_module(name)


def _ours_cfg(
    arch: str, d_sae: int, k: int, b: int, steps: int, start: int, normalize: bool | None = None
) -> Any:
    from orthosae.train.config import TrainConfig

    return TrainConfig(
        activations="eq.npy", arch=arch, d_sae=d_sae, k=k, batch_size=b, steps=steps, warmup_steps=0,
        decay_start=1.0, threshold_start_step=start, sparsity_warmup_steps=start, seed=0,
        normalize_activations=normalize,
    )  # fmt: skip


def _dl_trainer(arch: str, d: int, n: int, k: int, steps: int, start: int) -> Any:
    mod = _dl_module(DL_MODULES[arch])
    common = {"steps": steps, "activation_dim": d, "dict_size": n, "layer": 0, "lm_name": "eq", "seed": 0}
    if arch == "jumprelu":
        return mod.JumpReluTrainer(
            **common, warmup_steps=0, sparsity_warmup_steps=start, target_l0=float(k), device="cpu"
        )
    kw = {**common, "k": k, "warmup_steps": 0, "threshold_start_step": start, "device": "cpu"}
    if arch == "matryoshka":
        return mod.MatryoshkaBatchTopKTrainer(**kw, group_fractions=FRACTIONS)
    return mod.BatchTopKTrainer(**kw)


def _load_into_dl(arch: str, ae: Any, params: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        if arch == "batchtopk":  # nn.Linear layers: weights stored (out, in)
            ae.encoder.weight.copy_(params["W_enc"].T)
            ae.encoder.bias.copy_(params["b_enc"])
            ae.decoder.weight.copy_(params["W_dec"].T)
            ae.b_dec.copy_(params["b_dec"])
        else:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(("threshold",) if arch == "jumprelu" else ())):
                getattr(ae, name).copy_(params[name])


def worker(
    side: str, arch: str, data: str, init: str, steps: int, k: int, start: int, factor: float
) -> dict[str, Any]:
    """factor: the normalisation factor, 0 for none."""
    import torch

    batches = torch.load(data)
    train, held = batches[:steps], batches[steps:]
    params = torch.load(init)
    d, n = params["W_enc"].shape
    if side == "ours":
        from orthosae.train.trainer import Trainer

        tr = Trainer(_ours_cfg(arch, n, k, batches.shape[1], steps, start, factor > 0), d)
        with torch.no_grad():
            for name, p in tr.sae.named_parameters():
                p.copy_(params[name])
        for x in train:
            tr.step(x)
        if factor:
            assert abs(tr.norm_factor - factor) <= 1e-6 * factor, (tr.norm_factor, factor)
        sae: Any = tr.trained_sae()
        infer = sae.reconstruct
        training_rule = (
            (lambda x: sae.decode(sae.encode(x, use_threshold=False))) if arch != "jumprelu" else None
        )
        threshold = sae.threshold
    else:
        tr = _dl_trainer(arch, d, n, k, steps, start)
        _load_into_dl(arch, tr.ae, params)
        for i, x in enumerate(train):
            tr.update(i, x / factor if factor else x)
        ae = tr.ae
        if factor:
            ae.scale_biases(factor)
        infer = ae
        training_rule = (
            (lambda x: ae.decode(ae.encode(x, use_threshold=False))) if arch != "jumprelu" else None
        )
        threshold = ae.threshold

    def mse(fn: Any) -> float:
        with torch.no_grad():
            return sum(float((x - fn(x)).pow(2).sum(dim=-1).mean()) for x in held) / len(held)

    out = {"mse": mse(infer), "threshold_mean": float(threshold.detach().float().mean())}
    if training_rule is not None:
        out["mse_batch_topk"] = mse(training_rule)
    return out


def driver(args: argparse.Namespace) -> None:
    import torch

    from orthosae.activations.source import from_cache
    from orthosae.train.trainer import build_sae
    from step import ensure_dl_venv, machine

    held = 8
    source = from_cache(args.cache, batch_size=args.batch, seed=0)
    it = iter(source.batches) if hasattr(source, "batches") else iter(source)
    batches = [next(it).float() for _ in range(args.steps + held)]
    d = batches[0].shape[1]
    tmp = Path(tempfile.mkdtemp(prefix="orthosae-arch-eq-"))
    torch.save(torch.stack(batches), tmp / "batches.pt")  # torch, not numpy: the dl venv has no numpy
    start = args.steps // 4
    print(machine())
    print(
        f"equivalence: {args.steps} steps, B={args.batch}, d={d}, n={args.d_sae}, k={args.k}, constant lr, "
        f"threshold/sparsity warm-up start {start}; per-token MSE on {held} held-out batches"
    )
    python = {"ours": sys.executable, "dl": str(ensure_dl_venv())}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    for arch in args.archs.split(","):
        cfg = _ours_cfg(arch, args.d_sae, args.k, args.batch, args.steps, start, NORMALIZE[args.normalize])
        sae = build_sae(cfg, d)
        rms = float(batches[0].double().pow(2).sum(dim=-1).mean().sqrt())
        factor = rms if cfg.resolved_normalize() else 0.0
        if factor:
            print(f"  {arch:10s} normalised: the first batch's root mean squared norm is {factor:.3f}")
        torch.save({name: p.detach().clone() for name, p in sae.named_parameters()}, tmp / f"{arch}.pt")
        res: dict[str, dict[str, Any]] = {}
        for side in ("ours", "dl"):
            cmd = [
                python[side],
                __file__,
                "--worker",
                side,
                "--arch",
                arch,
                "--data",
                str(tmp / "batches.pt"),
            ]
            cmd += ["--init", str(tmp / f"{arch}.pt"), "--steps", str(args.steps), "--k", str(args.k)]
            cmd += ["--start", str(start), "--norm-factor", repr(factor)]
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{arch}/{side} failed:\n{done.stderr[-3000:]}")
            res[side] = json.loads(done.stdout.strip().splitlines()[-1])
            extra = (
                f"  (batch top-k rule {res[side]['mse_batch_topk']:.4f})"
                if "mse_batch_topk" in res[side]
                else ""
            )
            r, took = res[side], time.perf_counter() - t
            thr = r["threshold_mean"]
            print(
                f"  {arch:10s} {side:4s} MSE {r['mse']:.4f}{extra}  mean threshold {thr:.4f}  ({took:.0f} s)"
            )
        rel = abs(res["ours"]["mse"] - res["dl"]["mse"]) / res["dl"]["mse"]
        verdict = "met" if rel <= 0.02 else "NOT met"
        print(f"  {arch:10s} relative MSE difference {rel:.2%}  goal ≤ 2%  {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="activation cache directory (orthosae cache ...)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    for hidden in ("--worker", "--arch", "--data", "--init"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--normalize", choices=list(NORMALIZE), default="default")
    p.add_argument("--start", type=int, help=argparse.SUPPRESS)
    p.add_argument("--norm-factor", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = worker(
            args.worker, args.arch, args.data, args.init, args.steps, args.k, args.start, args.norm_factor
        )
        print(json.dumps(out))
    elif not args.cache:
        p.error("--cache DIR is required")
    else:
        driver(args)


if __name__ == "__main__":
    main()
