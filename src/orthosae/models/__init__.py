"""Language models: load any HF causal LM (bundled offline default included) and find its decoder blocks."""

from orthosae.models.blocks import check_layer, find_blocks
from orthosae.models.bundled import BUNDLED_NAME, user_cache_dir
from orthosae.models.loader import LoadedModel, load_model, resolve_dtype

__all__ = [
    "BUNDLED_NAME",
    "LoadedModel",
    "check_layer",
    "find_blocks",
    "load_model",
    "resolve_dtype",
    "user_cache_dir",
]
