"""`orthosae cache`."""

from __future__ import annotations

import argparse

from orthosae.activations.cache_config import CacheConfig
from orthosae.config import add_arguments, resolve


def register(sub: argparse._SubParsersAction) -> None:
    what = "harvest activations into an on-disk cache"
    p = sub.add_parser("cache", help=what, description=what)
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    add_arguments(p, CacheConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    out = resolve(CacheConfig, ns, ns.config).build()
    print(f"cache ready at {out}")
    return 0
