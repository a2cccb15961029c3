"""`orthosae cache`, in one process or under torchrun (every rank harvests its own chunks of contexts)."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Literal

from orthosae.activations.cache_config import CacheConfig
from orthosae.config import add_arguments, cli_overrides, from_dict, resolve
from orthosae.errors import UserError


@dataclass
class HarvestOptions:
    """Where the model runs; machine settings, so command-line only (not part of the cache's config)."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Device the model runs on; with cuda under torchrun, each rank uses the GPU numbered its LOCAL_RANK."""
    model_device_map: str = "none"
    """One process only: spread the model over the visible GPUs (and CPU) with transformers' device_map,
    for a model too large for one GPU, instead of --device: auto, balanced, balanced_low_0, sequential, one
    device (cuda:1) or a JSON object of module → device ('{"model.layers": 0, "lm_head": 1}'); none loads
    it whole on --device."""
    dist_timeout: float = 300.0
    """Under torchrun: seconds a rank waits for the others (they exchange progress after every forward
    batch) before it stops with an error, so a hung rank never leaves the rest waiting forever."""


def register(sub: argparse._SubParsersAction) -> None:
    what = "harvest activations into an on-disk cache"
    p = sub.add_parser("cache", help=what, description=what)
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    add_arguments(p, CacheConfig)
    add_arguments(p, HarvestOptions)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.activations.cache import RESUME_HINT
    from orthosae.models import load_model
    from orthosae.models.placement import check_single_process, parse_device_map
    from orthosae.train import distributed

    cfg = resolve(CacheConfig, ns, ns.config)
    cfg.validate()
    opts = from_dict(HarvestOptions, cli_overrides(HarvestOptions, ns), source="command line")
    if not (math.isfinite(opts.dist_timeout) and opts.dist_timeout > 0):
        raise UserError(f"--dist-timeout must be a positive number of seconds, got {opts.dist_timeout}")
    assert cfg.out is not None and cfg.layer is not None
    world = distributed.world_size()
    device_map = parse_device_map(opts.model_device_map)
    check_single_process(device_map, world)
    device = "cpu" if device_map is not None else _device(opts.device, world)  # the map places the model
    # Every rank loads the model before joining, so identical errors stop all ranks at once.
    model = load_model(cfg.model, dtype=cfg.model_dtype, device=device, device_map=device_map)
    # The collectives only carry a few counts between hosts: gloo, whatever device the model is on.
    ranks = distributed.start("cpu", opts.dist_timeout, RESUME_HINT) if world > 1 else None
    try:
        out = cfg.build(model=model, ranks=ranks)
    finally:
        if ranks is not None:
            distributed.stop()
    if ranks is None or ranks.is_main:
        print(f"cache ready at {out}")
    return 0


def _device(device: str, world: int) -> str:
    """cuda:LOCAL_RANK under torchrun (one GPU per rank), else the device as given."""
    if device == "cpu":
        return device
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if local >= torch.cuda.device_count():
        raise UserError(
            f"--device cuda: LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); start at "
            "most one process per GPU (--nproc-per-node)"
        )
    return f"cuda:{local}"
