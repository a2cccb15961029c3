"""`orthosae train`."""

from __future__ import annotations

import argparse

from orthosae.config import add_arguments, resolve
from orthosae.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on activations", description="Train an SAE.")
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.train.loop import train

    cfg = resolve(TrainConfig, ns, ns.config)
    out = train(cfg)
    print(f"saved SAE to {out}")
    return 0
