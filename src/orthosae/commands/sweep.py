"""`orthosae sweep`: several SAEs (a grid over λ, k, …) trained from ONE activation stream."""

from __future__ import annotations

import argparse

from orthosae.config import add_arguments, cli_overrides
from orthosae.experiment.config import ExperimentConfig


def register(sub: argparse._SubParsersAction) -> None:
    what = "train several SAEs (a [sweep] grid and/or [saes.*] tables) from one activation stream"
    p = sub.add_parser("sweep", help=what, description=what)
    p.add_argument("experiment", metavar="TOML", help="sweep file, e.g. experiments/orth_lambda.toml")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain SAEs whose run directories already exist"
    )
    p.add_argument(
        "--eval", dest="evaluate", action="store_true", help="also run the file's evaluations + report"
    )
    add_arguments(p, ExperimentConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.experiment.config import load_experiment
    from orthosae.experiment.run import run_experiment

    overrides = cli_overrides(ExperimentConfig, ns)
    if not ns.evaluate:
        overrides.setdefault("speed_steps", 0)
        overrides["evals"] = ""
    exp = load_experiment(ns.experiment, overrides=overrides)
    run_experiment(exp, overwrite=ns.overwrite, evals=ns.evaluate, report=ns.evaluate)
    return 0
