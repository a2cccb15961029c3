"""`orthosae report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orthosae.config import add_arguments, resolve
from orthosae.report.config import ReportConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write report.md and report.html for an experiment directory",
        description="(Re)generate runs/<name>/report.md and report.html: metric comparison, training "
        "curves, speed, plots and a feature browser.",
    )
    p.add_argument("experiment", metavar="EXPERIMENT_DIR", help="the experiment directory (runs/<name>)")
    add_arguments(p, ReportConfig)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from orthosae.report import FeatureOptions, build_report

    cfg = resolve(ReportConfig, ns, None)
    md, page = build_report(
        ns.experiment,
        cfg.baseline,
        features=cfg.features,
        recompute_features=cfg.recompute_features,
        feature_options=FeatureOptions(max_tokens=cfg.feature_tokens),
        progress=cfg.progress,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(f"wrote {md}\nwrote {page}")
    if cfg.open:
        _open(page)
    return 0


def _open(path: Path) -> None:
    import webbrowser

    try:
        if not webbrowser.open(path.resolve().as_uri()):
            print(f"no web browser found; open {path} yourself", file=sys.stderr)
    except Exception as exc:  # a broken browser setup must not fail the report that was written
        print(f"could not open a browser ({type(exc).__name__}); open {path} yourself", file=sys.stderr)
