"""`orthosae` command line. Each sub-command's options come from a config dataclass's field docs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from orthosae import __version__
from orthosae.config import add_arguments, resolve
from orthosae.errors import UserError


def _train(ns: argparse.Namespace) -> int:
    from orthosae.train.config import TrainConfig
    from orthosae.train.loop import train

    cfg = resolve(TrainConfig, ns, ns.config)
    out = train(cfg)
    print(f"saved SAE to {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cache(ns: argparse.Namespace) -> int:
    from orthosae.activations.cache import build_cache
    from orthosae.activations.cache_config import CacheConfig

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
        shard_tokens=cfg.shard_tokens,
        progress=cfg.progress,
    )
    print(f"cache ready at {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from orthosae.activations.cache_config import CacheConfig
    from orthosae.train.config import TrainConfig

    parser = _Parser(
        prog="orthosae", description="Train and evaluate TopK SAEs with an orthogonality regulariser."
    )
    parser.add_argument("--version", action="version", version=f"orthosae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an SAE on activations", description="Train an SAE.")
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=_train)

    p = sub.add_parser("cache", help="harvest activations into an on-disk cache", description="Build a cache.")
    p.add_argument("--config", metavar="TOML", help="read options from a TOML file; flags override it")
    add_arguments(p, CacheConfig)
    p.set_defaults(func=_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code or 0)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"orthosae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orthosae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
