"""`orthosae train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orthosae.config import add_arguments, cli_overrides, read_toml, resolve
from orthosae.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on activations", description="Train an SAE.")
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, bit-exactly; its config is reused and "
        "only --steps, --log-every, --checkpoint-every, --max-skipped-batches, --device, --progress, "
        "--tensorboard and --wandb-project may change",
    )
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.train.checkpoint import Stopped, resumed_config
    from orthosae.train.loop import train

    if ns.resume is not None:
        given = {**(read_toml(ns.config) if ns.config else {}), **cli_overrides(TrainConfig, ns)}
        cfg = resumed_config(Path(ns.resume), given, source=ns.config or "command line")
    else:
        cfg = resolve(TrainConfig, ns, ns.config)
    try:
        out = train(cfg, resume=ns.resume is not None)
    except Stopped as e:
        print(e, file=sys.stderr)
        return e.exit_code
    print(f"saved SAE to {out}")
    return 0
