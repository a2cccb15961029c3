"""`orthosae export`: an SAE in SAELens's or dictionary_learning's exact layout.

orthosae export runs/topk --to saelens out/topk-saelens
orthosae export runs/topk --to dictionary_learning out/topk-dl
orthosae export saelens_dir --to dictionary_learning out/dl    # any readable directory converts
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from orthosae.config import add_arguments, cli_overrides, from_dict
from orthosae.errors import UserError


@dataclass
class ExportOptions:
    to: str = ""
    """Target layout: 'saelens' (sae_weights.safetensors + cfg.json with SAELens's keys only) or
    'dictionary_learning' (ae.pt + config.json, loaded by its load_dictionary)."""
    overwrite: bool = False
    """Allow writing into a directory that is not empty."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write an SAE in SAELens's or dictionary_learning's layout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", metavar="SAE_DIR", help="an orthosae run, SAELens or dictionary_learning directory"
    )
    p.add_argument("out", metavar="OUT_DIR", help="directory to write")
    add_arguments(p, ExportOptions)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.interop.export import TARGETS, export

    opts = from_dict(ExportOptions, cli_overrides(ExportOptions, ns), source="command line")
    if not opts.to:
        raise UserError(f"say which layout to write: --to {' or --to '.join(TARGETS)}")
    for path in export(ns.source, opts.to, ns.out, overwrite=opts.overwrite):
        print(f"wrote {path}")
    return 0
