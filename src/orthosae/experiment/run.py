"""The whole experiment: cache → train every SAE from one stream → speed table → evals → results → report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orthosae.atomic import write_json, write_text
from orthosae.config import to_dict
from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS
from orthosae.experiment.config import Experiment, ExperimentConfig
from orthosae.experiment.multi import train_many
from orthosae.experiment.speed import format_speed, measure_speed
from orthosae.sae.io import weights_file
from orthosae.train.config import TrainConfig

# Rough costs on a 2-core CPU (measured with the bundled SmolLM2-135M), used only for the up-front estimate.
HARVEST_TOKENS_PER_S = 1500.0
STEP_SECONDS_PER_GFLOP = 0.045  # one training step ≈ this × (B·d·n / 1e9)
# Per eval at seed.toml's sizes on 2 cores: (once per experiment: the LM side, per SAE). Measured on one
# thread: core 91 s for the first SAE, then 30 s each; absorption (3000 words) 435 s, then 2.5 s each.
EVAL_SECONDS = {
    "core": (40.0, 20.0),
    "absorption": (340.0, 3.0),
    "sparse_probing": (350.0, 40.0),
    "unlearning": (150.0, 150.0),
}
# Multipliers of the GEMM-based step estimate: ReLU's 2.4 (its dense backward) was calibrated on make run;
# the others are each SAE's training time against TopK's in one `orthosae run` on the 2-core CPU (tokens/s
# in metrics.jsonl, 2026-12-03: BatchTopK 1.8× in archs.toml, Matryoshka 2.05× and JumpReLU 2.6× in make run).
ARCH_STEP_FACTOR = {"relu": 2.4, "batchtopk": 1.8, "matryoshka": 2.1, "jumprelu": 2.6}
SYNTHETIC_SECONDS = 45.0
REPORT_SECONDS = 60.0


def estimate_seconds(
    exp: Experiment,
    cache_ready: bool,
    to_train: list[str] | None = None,
    to_evaluate: dict[str, list[str]] | None = None,
    stored: frozenset[str] | set[str] = frozenset(),
) -> dict[str, float]:
    """Seconds per phase. `to_train`: the SAEs still to train, `to_evaluate`: the evals each SAE still needs
    (default: everything), `stored`: the evals whose LM side is already on disk, so that a re-run's
    estimate counts only the work it will do."""
    c = exp.cfg
    to_train = list(exp.saes) if to_train is None else to_train
    if to_evaluate is None:
        to_evaluate = {name: c.eval_names() for name in exp.saes}
    est = {"cache": 0.0 if cache_ready else c.tokens / HARVEST_TOKENS_PER_S}
    est["train"] = sum(_step_seconds(exp.saes[n]) * exp.saes[n].steps for n in to_train)
    first = next(iter(exp.saes.values()))
    est["speed"] = (c.speed_steps + 2) * _step_seconds(first) * 8 if c.speed_steps else 0.0
    est["synthetic"] = SYNTHETIC_SECONDS if c.synthetic else 0.0
    est["evals"] = 0.0
    for name in c.eval_names():
        shared, per_sae = EVAL_SECONDS.get(name, (0.0, 0.0))
        shared = 0.0 if name in stored else shared
        n = sum(name in todo for todo in to_evaluate.values())
        est["evals"] += shared + per_sae * n if n else 0.0  # the LM side runs once if any SAE needs it
    est["report"] = REPORT_SECONDS
    return est


def _step_seconds(t: TrainConfig) -> float:
    d_in = 576  # refined once the cache is open; the estimate only needs the order of magnitude
    # The co-activation penalty costs O(B·k²·d) on top (measured ≈ 1.7× the GEMM's cost per unit); the
    # dense or batch-wide steps cost more than TopK's (ARCH_STEP_FACTOR).
    gemm = t.batch_size * d_in * t.d_sae / 1e9 * ARCH_STEP_FACTOR.get(t.arch, 1.0)
    penalty = 1.7 * t.batch_size * t.k**2 * d_in / 1e9 if t.penalty_kind() == "coactive" else 0.0
    return STEP_SECONDS_PER_GFLOP * (gemm + penalty)


def run_experiment(
    exp: Experiment, *, overwrite: bool = False, evals: bool = True, report: bool = True
) -> Path:
    c = exp.cfg
    out = c.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = c.cache_dir()
    to_train = [name for name, cfg in exp.saes.items() if overwrite or not _trained(cfg)]
    configs = _eval_configs(exp) if evals else {}
    to_evaluate = {
        name: list(configs) if name in to_train else _eval_plan(exp, configs, cfg)[2]
        for name, cfg in exp.saes.items()
    }
    est = estimate_seconds(
        exp, (cache_dir / "manifest.json").exists(), to_train, to_evaluate, _stored(exp, configs)
    )
    print(
        f"experiment '{c.name}': {len(exp.saes)} SAEs ({', '.join(exp.saes)}) on {c.model} layer {c.layer}; "
        f"estimated {sum(est.values()) / 60:.0f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items())
        + ")",
        flush=True,
    )
    timings: dict[str, float] = {}
    write_text(out / "experiment.toml", _resolved_toml(exp))

    with _phase("cache", timings):
        _build_cache(exp)
    with _phase("train", timings):
        _train(exp, overwrite)
    if c.speed_steps:
        with _phase("speed", timings):
            speed = _speed(exp)
            write_json(out / "speed.json", speed)
            print(format_speed(speed), flush=True)
    if c.synthetic:
        with _phase("synthetic", timings):
            _synthetic(exp, out)
    if evals and c.eval_names():
        with _phase("evals", timings):
            _evaluate(exp)
    write_json(out / "results.json", _combined_results(exp))
    write_json(out / "timings.json", timings)
    if report:
        with _phase("report", timings):
            from orthosae.report import build_report
            from orthosae.report.features import FeatureOptions

            opts = FeatureOptions(max_tokens=c.report_feature_tokens)
            _, html = build_report(out, baseline=c.baseline, feature_options=opts, progress=c.progress)
            print(f"report: {html}", flush=True)
    print(
        f"done in {sum(timings.values()) / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    )
    return out


class _phase:
    """Context manager that prints a phase banner and records its wall time."""

    def __init__(self, name: str, timings: dict[str, float]):
        self.name, self.timings = name, timings

    def __enter__(self) -> None:
        print(f"== {self.name}", flush=True)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.t0


def _build_cache(exp: Experiment) -> None:
    from orthosae.activations.cache_config import CacheConfig

    c = exp.cfg
    CacheConfig(
        out=str(c.cache_dir()),
        model=c.model,
        layer=c.layer,
        tokens=c.tokens,
        corpus=c.corpus,
        context_size=c.context_size,
        remove_high_norm=c.remove_high_norm,
        progress=c.progress,
    ).build()


def _train(exp: Experiment, overwrite: bool) -> None:
    """Train the SAEs that are not already trained with the same config (a re-run resumes cheaply)."""

    todo: dict[str, TrainConfig] = {}
    for name, cfg in exp.saes.items():
        run = Path(cfg.out)
        if weights_file(run).exists() and not overwrite:
            if not _trained(cfg):
                raise UserError(
                    f"{run} holds an SAE trained with other settings; pass --overwrite to retrain it"
                )
            print(f"{name}: already trained, kept", flush=True)
            continue
        todo[name] = TrainConfig(**{**to_dict(cfg), "overwrite": overwrite})
    if todo:
        train_many(todo, progress=exp.cfg.progress)


def _trained(cfg: TrainConfig) -> bool:
    """Is this SAE already trained, with exactly this config?"""
    from orthosae.config import load_toml

    run = Path(cfg.out)
    return weights_file(run).exists() and load_toml(TrainConfig, run / "config.toml").trains_like(cfg)


def _speed(exp: Experiment) -> dict[str, Any]:
    from orthosae.activations.source import from_cache

    c = exp.cfg
    base = exp.saes.get(c.baseline) or next(t for t in exp.saes.values() if t.arch == "topk")
    src = from_cache(c.cache_dir(), batch_size=base.batch_size, seed=c.seed)
    batches = [next(src) for _ in range(min(c.speed_steps + 2, 4))]
    return measure_speed(base, batches, c.speed_steps)


def _evaluate(exp: Experiment) -> None:
    """Evaluate every SAE, reusing each eval whose inputs (weights, settings, code) did not change."""
    from orthosae.eval.context import EvalContext
    from orthosae.eval.runner import run_evals, write_results
    from orthosae.eval.saebench_files import write_saebench_files
    from orthosae.experiment import reuse
    from orthosae.models import load_model

    c = exp.cfg
    source = f"{exp.path or 'experiment'} [eval]"
    configs = _eval_configs(exp)
    model = None  # loaded once, shared by every SAE's evaluations
    shared: dict[Any, Any] = {}  # and so are the SAE-independent parts of the evals (LM probes, acts)
    for sae_name, cfg in exp.saes.items():
        run_dir = Path(cfg.out)
        fps, kept, todo = _eval_plan(exp, configs, cfg)
        if not todo:
            print(f"{sae_name}: evaluations up to date, kept", flush=True)
            continue
        print(f"-- evaluating {sae_name}: {', '.join(todo)}" + (f" (kept {len(kept)})" if kept else ""))
        model = model or load_model(c.model, device=cfg.device)
        ctx = EvalContext.from_run(
            cfg.out,
            device=cfg.device,
            seed=c.seed,
            progress=c.progress,
            model=model,
            shared=shared,
            store=lm_store(c),
        )
        fresh = run_evals(ctx, todo, exp.eval_tables, source=source)
        results = {SECTION_KEYS[n]: (kept | fresh)[SECTION_KEYS[n]] for n in configs}
        write_results(run_dir / "eval.json", results)
        write_saebench_files(results, run_dir / "eval_results", run_dir.resolve().name)
        reuse.record(run_dir, fps)


def lm_store(c: ExperimentConfig) -> Path:
    """Where evaluations keep their costly SAE-independent work (absorption's LM side) for later runs: beside
    the activation caches, shared by every experiment on the same model, layer and seed."""
    return c.cache_dir().parent / "eval-lm"


def _stored(exp: Experiment, configs: dict[str, Any]) -> set[str]:
    """The evals whose SAE-independent LM side a previous run left in `lm_store`."""
    from orthosae.eval import absorption
    from orthosae.eval.context import store_file

    c, device = exp.cfg, next(iter(exp.saes.values())).device
    keys = {"absorption": absorption.lm_key} if "absorption" in configs else {}
    return {
        name
        for name, key in keys.items()
        if store_file(lm_store(c), key(configs[name]), c.model, c.layer, c.seed, device).exists()
    }


def _eval_configs(exp: Experiment) -> dict[str, Any]:
    from orthosae.eval.runner import eval_config

    source = f"{exp.path or 'experiment'} [eval]"
    return {name: eval_config(name, exp.eval_tables, source) for name in exp.cfg.eval_names()}


def _eval_plan(
    exp: Experiment, configs: dict[str, Any], cfg: TrainConfig
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(fingerprints of this SAE's eval inputs, the eval sections still valid, the evals to run)."""
    from orthosae.experiment import reuse

    c = exp.cfg
    run_dir = Path(cfg.out)
    fps = reuse.fingerprints(
        configs, weights_file(run_dir), {"model": c.model, "layer": c.layer, "seed": c.seed}
    )
    kept = reuse.reusable(run_dir, fps)
    return fps, kept, [n for n in configs if SECTION_KEYS[n] not in kept]


def _synthetic(exp: Experiment, out: Path) -> None:
    """The toy-model benchmark at the experiment's λ values: exact absorption vs λ beside the real model's."""
    from dataclasses import asdict

    from orthosae.eval import synthetic
    from orthosae.eval.runner import build_config

    lambdas = sorted({t.orth_lambda for t in exp.saes.values() if t.penalty_kind() == "coactive"})
    table = {"orth_lambdas": ",".join(f"{v:g}" for v in lambdas) or "0.001"} | exp.eval_tables.get(
        "synthetic", {}
    )
    cfg = build_config(synthetic.Config, table, f"{exp.path or 'experiment'} [eval.synthetic]")
    path = out / "synthetic.json"
    if path.exists():
        try:
            if json.loads(path.read_text()).get("eval_config") == asdict(cfg):
                print("synthetic.json is up to date, kept", flush=True)
                return
        except ValueError:
            pass  # a torn or edited file: recompute it
    result = synthetic.run(cfg)
    write_json(path, result)
    print(synthetic.format_table(result), flush=True)


def _combined_results(exp: Experiment) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, cfg in exp.saes.items():
        path = Path(cfg.out) / "eval.json"
        results[name] = json.loads(path.read_text()) if path.exists() else {}
    return results


def _resolved_toml(exp: Experiment) -> str:
    import tomli_w

    top = {k: v for k, v in to_dict(exp.cfg).items() if v is not None}
    top["cache"] = str(exp.cfg.cache_dir())
    saes = {n: {k: v for k, v in to_dict(t).items() if v is not None} for n, t in exp.saes.items()}
    return tomli_w.dumps({**top, "groups": exp.groups, "saes": saes})
