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
    from orthosae.activations.cache import build_cache

    cfg = resolve(CacheConfig, ns, ns.config)
    assert cfg.out is not None and cfg.layer is not None
    model = None
    if cfg.model_dtype != "float32":
        from orthosae.models import load_model

        model = load_model(cfg.model, dtype=cfg.model_dtype)
    out = build_cache(
        cfg.out,
        model_name=cfg.model,
        layer=cfg.layer,
        n_tokens=cfg.tokens,
        corpus=cfg.corpus,
        text_field=cfg.text_field,
        context_size=cfg.context_size,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        model=model,
        remove_high_norm=cfg.remove_high_norm,
        shard_tokens=cfg.shard_tokens,
        progress=cfg.progress,
    )
    print(f"cache ready at {out}")
    return 0
