"""`orthosae eval`: run evals on trained SAEs, compare results side by side, or run the synthetic benchmark.

orthosae eval runs/x --evals core,absorption --out runs/x/eval.json
orthosae eval runs/x runs/y --compare       # reads each run's eval.json (never runs evals itself)
orthosae eval --synthetic                   # ground-truth TopK vs TopK+orth benchmark
torchrun --nproc-per-node 2 -m orthosae eval runs/x --evals core,absorption   # LM forwards split by rank
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthosae.config import add_arguments, cli_overrides, from_dict
from orthosae.errors import UserError

if TYPE_CHECKING:
    from orthosae.train.distributed import Ranks


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
    """Torch device for the model and SAE; with cuda under torchrun, each rank uses the GPU numbered its
    LOCAL_RANK."""
    model_device_map: str = "none"
    """One process only: spread the language model over the visible GPUs (and CPU) with transformers'
    device_map, for a model too large for one GPU: auto, balanced, balanced_low_0, sequential, one device
    (cuda:1) or a JSON object of module → device ('{"model.layers": 0, "lm_head": 1}'); --device then
    places only the SAE. none loads the model whole on --device."""
    seed: int = 42
    """Seed for the evals' random choices."""
    progress: bool = True
    """Show progress bars."""
    compare: bool = False
    """Print a side-by-side table of the given runs' existing results (their eval.json or JSON files)."""
    synthetic: bool = False
    """Run the synthetic ground-truth benchmark (TopK vs TopK+orth on a toy model with known features)."""
    dist_timeout: float = 300.0
    """Under torchrun: seconds a rank waits for the others in a collective before it stops with an error,
    so a rank that hangs or dies never leaves the rest waiting forever."""


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
    from orthosae.train.distributed import world_size

    opts = from_dict(EvalOptions, cli_overrides(EvalOptions, ns), source="command line")
    runs: list[str] = list(ns.runs)
    if world_size() > 1 and (opts.synthetic or opts.compare):
        flag = "--synthetic" if opts.synthetic else "--compare"
        raise UserError(f"{flag} runs as one process: drop torchrun (only evaluating runs is split by rank)")
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
    from orthosae.eval.ranks import HINT, rank_device
    from orthosae.eval.runner import eval_config, parse_evals, read_eval_toml
    from orthosae.models.placement import check_single_process, parse_device_map
    from orthosae.train import distributed

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
    for run_dir in runs:
        if not Path(run_dir).exists():
            raise UserError(f"no run directory at {run_dir}")
    if not (math.isfinite(opts.dist_timeout) and opts.dist_timeout > 0):
        raise UserError(f"--dist-timeout must be a positive number of seconds, got {opts.dist_timeout}")
    world = distributed.world_size()
    check_single_process(parse_device_map(opts.model_device_map), world)
    device = rank_device(opts.device, world, _local_rank(), _gpus(opts.device))
    if world == 1:
        return _evaluate_runs(runs, opts, names, tables, source, device, None)
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # so that a plain "cuda" anywhere means this rank's GPU
    # The ranks exchange host-side statistics and activations only: gloo, wherever the model runs.
    ranks = distributed.start("cpu", opts.dist_timeout, HINT)
    try:
        return _evaluate_runs(runs, opts, names, tables, source, device, ranks)
    except UserError as e:
        if ranks.is_main or str(e).startswith("rank "):
            raise
        raise UserError(f"rank {ranks.rank}: {e}") from None
    finally:
        distributed.stop()


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError(
            f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} is not an integer; launch with torchrun"
        ) from None


def _gpus(device: str) -> int:
    """Visible GPUs, counted only when asked for one (no CUDA start-up otherwise)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def _evaluate_runs(
    runs: list[str],
    opts: EvalOptions,
    names: list[str],
    tables: dict[str, dict[str, object]],
    source: str,
    device: str,
    ranks: Ranks | None,
) -> int:
    """Evaluate each run; under torchrun every rank takes part and rank 0 alone writes and prints."""
    from orthosae.eval.context import EvalContext
    from orthosae.eval.runner import run_evals
    from orthosae.train.distributed import on_main

    main = ranks is None or ranks.is_main
    model = None
    shared: dict[object, object] = {}  # SAE-independent eval work (LM probes, activations), done once
    for run_dir in runs:
        ctx = EvalContext.from_run(
            run_dir,
            model_name=opts.model,
            layer=opts.layer,
            device=device,
            model_device_map=opts.model_device_map,
            seed=opts.seed,
            progress=opts.progress and main,
            model=model if model is not None and model.model_id == _model_id(opts, run_dir) else None,
            shared=shared,
            ranks=ranks,
        )
        results = run_evals(ctx, names, tables, source=source, log=None if main else _silent)
        on_main(ranks, functools.partial(_write, results, run_dir, opts), f"writing the results of {run_dir}")
        model = ctx._model
    return 0


def _write(results: dict[str, Any], run_dir: str, opts: EvalOptions) -> None:
    """eval.json and SAEBench's files of one run (rank 0 only under torchrun)."""
    from orthosae.eval.runner import write_results
    from orthosae.eval.saebench_files import write_saebench_files

    out = write_results(opts.out or Path(run_dir) / "eval.json", results)
    print(f"wrote {out}")
    sb_dir = Path(opts.saebench_dir or out.parent / "eval_results")
    written = write_saebench_files(results, sb_dir, Path(run_dir).resolve().name)
    print(f"wrote SAEBench files under {sb_dir} ({', '.join(p.parent.name for p in written) or 'none'})")


def _silent(_line: str) -> None:
    """Progress lines of ranks other than 0: not printed (rank 0 prints the same)."""


def _model_id(opts: EvalOptions, run_dir: str) -> str | None:
    """The model a run will be evaluated with, to reuse an already loaded one across runs."""
    from orthosae.interop.load import read_info
    from orthosae.models.bundled import ALIASES, BUNDLED_NAME

    name = opts.model or read_info(run_dir).get("model_name")
    if name is None:
        return None
    return BUNDLED_NAME if str(name).lower() in ALIASES else str(name)
