"""Options of `orthosae report` (field docstrings are the CLI help)."""

from __future__ import annotations

from dataclasses import dataclass

from orthosae.errors import UserError


@dataclass
class ReportConfig:
    baseline: str = "topk"
    """The SAE (directory name under saes/) the others are compared against."""
    open: bool = False
    """Open report.html in a web browser afterwards (does nothing where there is none)."""
    features: bool = True
    """Compute the feature browser (loads the model and scans the activation cache) unless features.json is
    up to date; --no-features only reuses an existing features.json."""
    recompute_features: bool = False
    """Recompute features.json even if it is up to date."""
    feature_tokens: int = 200_000
    """Cached tokens scanned for the feature browser (spread over all shards)."""
    progress: bool = True
    """Show a progress bar for the feature-browser pass."""

    def validate(self) -> None:
        if self.feature_tokens <= 0:
            raise UserError(f"--feature-tokens must be positive, got {self.feature_tokens}")
