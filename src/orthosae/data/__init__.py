"""Corpora: the bundled offline text, local files, HF datasets; tokenise and pack into BOS-led contexts."""

from orthosae.data.pack import Contexts, iter_contexts, special_ids
from orthosae.data.paths import corpus_dir
from orthosae.data.texts import BUNDLED, describe, iter_texts

__all__ = ["BUNDLED", "Contexts", "corpus_dir", "describe", "iter_contexts", "iter_texts", "special_ids"]
