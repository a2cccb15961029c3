"""Stub of sae_lens for the SAEBench peer venv (see ../README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _placeholder import make_getattr

__getattr__ = make_getattr("sae_lens")
