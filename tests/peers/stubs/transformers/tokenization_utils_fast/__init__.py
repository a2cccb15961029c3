"""Stub of transformers.tokenization_utils_fast for the SAEBench peer venv (see ../../README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _placeholder import make_getattr

__getattr__ = make_getattr("transformers.tokenization_utils_fast")
