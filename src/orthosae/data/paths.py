"""Where the bundled corpus lives: $ORTHOSAE_DATA, else data/corpora/ in the source checkout or cwd."""

from __future__ import annotations

import os
from pathlib import Path

SOURCES_FILE = "sources.json"  # written last by the fetch step: its presence marks a complete corpus
TEXT_FILE = "bundled.jsonl"  # the pretraining-style text: one {"text", "source"} document per line


def corpus_dir() -> Path:
    if env := os.environ.get("ORTHOSAE_DATA"):
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[3] / "data" / "corpora"  # src/orthosae/data/ → repo root
    if checkout.parent.parent.joinpath("pyproject.toml").is_file():
        return checkout
    return Path.cwd() / "data" / "corpora"
