"""The experiment report: comparison tables, plots, a feature browser; report.md and a self-contained
report.html. Entry points: `build_report` and `compute_features`."""

from orthosae.report.build import build_report
from orthosae.report.features import FeatureOptions, compute_features, ensure_features, load_features

__all__ = ["FeatureOptions", "build_report", "compute_features", "ensure_features", "load_features"]
