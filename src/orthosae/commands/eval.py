"""`orthosae eval`: run evals on trained SAEs, compare results side by side, or run the synthetic benchmark.

orthosae eval runs/x --evals core,absorption --out runs/x/eval.json
orthosae eval runs/x runs/y --compare       # reads each run's eval.json (never runs evals itself)
orthosae eval --synthetic                   # ground-truth TopK vs TopK+orth benchmark
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from orthosae.config import add_arguments, cli_overrides, from_dict
from orthosae.errors import UserError


@dataclass
class EvalOptions:
    evals: str = "core"
    """Comma-separated evals to run: core, absorption, sparse_probing, unlearning."""
    out: str | None = None
    """Results JSON to write; default RUN/eval.json (synthetic: printed only unless given)."""
    saebench_dir: str | None = None
    """Directory for SAEBench 0.6.0's own per-eval files (<eval>/<release>_<sae>_eval_results.json);
    default: eval_results/ next to the results JSON."""
    config: str | None = None
    """TOML file with one table of settings per eval ([core], [absorption], …, [synthetic])."""
    model: str | None = None
    """Language model, when the SAE's cfg.json records none (SAE trained on a plain array)."""
    layer: int | None = None
    """Decoder block the SAE reads, when the SAE's cfg.json records none."""
    device: str = "cpu"
    """Torch device for the model and SAE."""
    seed: int = 42
    """Seed for the evals' random choices."""
    progress: bool = True
    """Show progress bars."""
    compare: bool = False
    """Print a side-by-side table of the given runs' existing results (their eval.json or JSON files)."""
    synthetic: bool = False
    """Run the synthetic ground-truth benchmark (TopK vs TopK+orth on a toy model with known features)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate SAEs (core, absorption, sparse probing, unlearning), compare, synthetic benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories (or results JSONs with --compare)")
    add_arguments(p, EvalOptions)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    opts = from_dict(EvalOptions, cli_overrides(EvalOptions, ns), source="command line")
    runs: list[str] = list(ns.runs)
    if opts.synthetic:
        if runs or opts.compare:
            raise UserError("--synthetic takes no run directories and no --compare")
        return _synthetic(opts)
    if opts.compare:
        return _compare(runs)
    return _evaluate(runs, opts)


def _synthetic(opts: EvalOptions) -> int:
    from orthosae.eval import synthetic
    from orthosae.eval.results import SYNTHETIC_KEY
    from orthosae.eval.runner import build_config, read_eval_toml, write_results

    tables = read_eval_toml(opts.config)
    cfg = build_config(synthetic.Config, tables.get("synthetic", {}), f"{opts.config} [synthetic]")
    result = synthetic.run(cfg)
    print(synthetic.format_table(result))
    if opts.out:
        print(f"wrote {write_results(opts.out, {SYNTHETIC_KEY: result})}")
    return 0


def _compare(runs: list[str]) -> int:
    from orthosae.eval.compare import compare, format_rows

    rows, labels = compare(list[str | Path](runs))
    print(format_rows(rows, labels))
    return 0


def _evaluate(runs: list[str], opts: EvalOptions) -> int:
    from orthosae.eval.context import EvalContext
    from orthosae.eval.runner import eval_config, parse_evals, read_eval_toml, run_evals, write_results
    from orthosae.eval.saebench_files import write_saebench_files

    if not runs:
        raise UserError("give a run directory to evaluate (or --synthetic, or two runs with --compare)")
    if opts.out and len(runs) > 1:
        raise UserError(
            "--out names one file: evaluate one run at a time, or drop --out (each run gets RUN/eval.json)"
        )
    if opts.saebench_dir and Path(opts.saebench_dir).is_file():
        raise UserError(f"--saebench-dir {opts.saebench_dir} is a file: give a directory")
    names = parse_evals(opts.evals)
    tables = read_eval_toml(opts.config)
    source = opts.config or "eval config"
    for name in names:  # check every config before loading anything
        eval_config(name, tables, source)
    model = None
    shared: dict[object, object] = {}  # SAE-independent eval work (LM probes, activations), done once
    for run_dir in runs:
        if not Path(run_dir).exists():
            raise UserError(f"no run directory at {run_dir}")
        ctx = EvalContext.from_run(
            run_dir,
            model_name=opts.model,
            layer=opts.layer,
            device=opts.device,
            seed=opts.seed,
            progress=opts.progress,
            model=model if model is not None and model.model_id == _model_id(opts, run_dir) else None,
            shared=shared,
        )
        results = run_evals(ctx, names, tables, source=source)
        out = write_results(opts.out or Path(run_dir) / "eval.json", results)
        print(f"wrote {out}")
        sb_dir = Path(opts.saebench_dir or out.parent / "eval_results")
        written = write_saebench_files(results, sb_dir, Path(run_dir).resolve().name)
        print(f"wrote SAEBench files under {sb_dir} ({', '.join(p.parent.name for p in written) or 'none'})")
        model = ctx._model
    return 0


def _model_id(opts: EvalOptions, run_dir: str) -> str | None:
    """The model a run will be evaluated with, to reuse an already loaded one across runs."""
    from orthosae.interop.load import read_info
    from orthosae.models.bundled import ALIASES, BUNDLED_NAME

    name = opts.model or read_info(run_dir).get("model_name")
    if name is None:
        return None
    return BUNDLED_NAME if str(name).lower() in ALIASES else str(name)
