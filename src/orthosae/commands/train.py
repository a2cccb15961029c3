"""`orthosae train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orthosae.config import add_arguments, cli_overrides, read_toml, resolve
from orthosae.errors import UserError
from orthosae.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on activations", description="Train an SAE.")
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, bit-exactly; its config is reused and "
        "only --steps, --log-every, --checkpoint-every, --max-skipped-batches, --device, --progress, "
        "--tensorboard, --wandb-project and --dist-timeout may change; under torchrun, use the same world "
        "size",
    )
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.models.placement import check_single_process, parse_device_map
    from orthosae.train import distributed
    from orthosae.train.checkpoint import Stopped, resumed_config
    from orthosae.train.loop import train

    if ns.resume is not None:
        given = {**(read_toml(ns.config) if ns.config else {}), **cli_overrides(TrainConfig, ns)}
        cfg = resumed_config(Path(ns.resume), given, source=ns.config or "command line")
    else:
        cfg = resolve(TrainConfig, ns, ns.config)
    world = distributed.world_size()
    check_single_process(parse_device_map(cfg.model_device_map), world)
    if world == 1:
        ranks = None
    else:  # launched by torchrun: every rank checks the same options, then joins the group
        distributed.check_options(batch_size=cfg.batch_size, world=world, compiled=cfg.compile)
        ranks = distributed.start(cfg.device, cfg.dist_timeout)
    main = ranks is None or ranks.is_main
    try:
        out = train(cfg, resume=ns.resume is not None, ranks=ranks)
    except Stopped as e:
        if main:
            print(e, file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if main or str(e).startswith("rank "):
            raise
        raise UserError(f"rank {ranks.rank}: {e}") from None  # type: ignore[union-attr]
    finally:
        if ranks is not None:
            distributed.stop()
    if main:
        print(f"saved SAE to {out}")
    return 0
