"""`orthosae run`: the whole experiment from one TOML file."""

from __future__ import annotations

import argparse

from orthosae.config import add_arguments, cli_overrides
from orthosae.experiment.config import ExperimentConfig


def register(sub: argparse._SubParsersAction) -> None:
    what = "run an experiment: cache, train every SAE from one stream, time, evaluate, report"
    p = sub.add_parser("run", help=what, description=what)
    p.add_argument("experiment", metavar="TOML", help="experiment file, e.g. experiments/seed.toml")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain SAEs whose run directories already exist"
    )
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the evaluations")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the report")
    add_arguments(p, ExperimentConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.experiment.config import load_experiment
    from orthosae.experiment.run import run_experiment

    exp = load_experiment(ns.experiment, overrides=cli_overrides(ExperimentConfig, ns))
    run_experiment(exp, overwrite=ns.overwrite, evals=ns.evaluate, report=ns.report)
    return 0
