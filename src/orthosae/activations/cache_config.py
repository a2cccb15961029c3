"""The `orthosae cache` config. Each field's docstring is its --help text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from orthosae.errors import UserError

if TYPE_CHECKING:
    from orthosae.models.loader import LoadedModel
    from orthosae.train.distributed import Ranks


@dataclass
class CacheConfig:
    out: str | None = None
    """Cache directory to create (or to resume, if an earlier run was interrupted)."""
    model: str = "smollm2-135m"
    """Language model: 'smollm2-135m' (bundled, offline), a Hugging Face hub id, or a local directory."""
    layer: int | None = None
    """Decoder block whose output (resid_post) is cached, 0-based."""
    tokens: int = 2_000_000
    """Activations to cache (accepts 2M, 500k). BOS and special tokens are not counted or stored."""
    corpus: str = "bundled"
    """Text: 'bundled', a .txt/.jsonl/.parquet file, or a Hugging Face dataset id."""
    text_field: str = "text"
    """Field or column holding the text in .jsonl/.parquet corpora."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype of the cached activations."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in (activations are stored as --dtype either way); recorded in the manifest,
    and a cache is only resumed or extended with the same one."""
    remove_high_norm: float = 10.0
    """Drop tokens whose norm exceeds this multiple of the batch median (attention sinks); 0 keeps all."""
    shard_tokens: int = 65_536
    """Activations per shard file (rounded down to whole contexts)."""
    progress: bool = True
    """Show a progress bar with tokens/s and ETA."""

    def validate(self) -> None:
        if self.out is None:
            raise UserError("--out is required: the cache directory to write")
        if self.layer is None:
            raise UserError("--layer is required: the decoder block whose output to cache (0-based)")
        for name in ("tokens", "context_size", "batch_size", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.remove_high_norm >= 0:
            raise UserError(f"--remove-high-norm must be ≥ 0, got {self.remove_high_norm}")
        if self.context_size < 2:
            raise UserError("--context-size must be at least 2 (BOS plus one token)")

    def build(self, model: LoadedModel | None = None, ranks: Ranks | None = None) -> Path:
        """Harvest (or resume, or reuse) the cache this config describes; `model` reuses a loaded model,
        `ranks` splits the harvest across torchrun ranks."""
        from orthosae.activations.cache import build_cache

        self.validate()
        assert self.out is not None and self.layer is not None
        if model is None and self.model_dtype != "float32":
            from orthosae.models import load_model

            model = load_model(self.model, dtype=self.model_dtype)
        return build_cache(
            self.out,
            model_name=self.model,
            layer=self.layer,
            n_tokens=self.tokens,
            corpus=self.corpus,
            text_field=self.text_field,
            context_size=self.context_size,
            batch_size=self.batch_size,
            dtype=self.dtype,
            model=model,
            remove_high_norm=self.remove_high_norm,
            shard_tokens=self.shard_tokens,
            progress=self.progress,
            ranks=ranks,
        )
