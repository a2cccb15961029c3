"""Turn the data options of a TrainConfig into an endless stream of (B, d) float32 batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthosae.activations.files import iter_array_batches, load_array
from orthosae.train.config import TrainConfig


@dataclass
class ActivationStream:
    d_in: int
    batches: Iterator[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # model_name, hook_layer, hook_name when known


def open_stream(cfg: TrainConfig) -> ActivationStream:
    if cfg.activations is not None:
        path = Path(cfg.activations)
        if path.is_dir():
            return _cache_stream(path, cfg)
        arr = load_array(path)
        return ActivationStream(arr.shape[1], iter_array_batches(arr, cfg.batch_size, cfg.seed, cfg.device))
    return _live_stream(cfg)


def _cache_stream(path: Path, cfg: TrainConfig) -> ActivationStream:
    from orthosae.activations.source import from_cache

    src = from_cache(path, batch_size=cfg.batch_size, seed=cfg.seed)
    return ActivationStream(src.d_model, _to_device(src, cfg.device), _cfg_meta(src.metadata))


def _live_stream(cfg: TrainConfig) -> ActivationStream:
    from orthosae.activations.source import stream_activations

    assert cfg.model is not None and cfg.layer is not None
    # Each context loses its BOS (and documents their EOS) to the special-token filter: ask for 5% extra.
    n_tokens = cfg.tokens
    if n_tokens is None:
        n_tokens = int(cfg.steps * cfg.batch_size * 1.05) + cfg.context_size
    src = stream_activations(
        cfg.model,
        cfg.layer,
        corpus=cfg.corpus,
        context_size=cfg.context_size,
        batch_size=cfg.batch_size,
        n_tokens=n_tokens,
        seed=cfg.seed,
        progress=False,
    )
    return ActivationStream(src.d_model, _to_device(src, cfg.device), _cfg_meta(src.metadata))


def _to_device(batches: Iterator[torch.Tensor] | Any, device: str) -> Iterator[torch.Tensor]:
    for x in batches:
        yield x.to(device)


def _cfg_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Source metadata in cfg.json's vocabulary (SAELens key names where they exist)."""
    return {
        "model_name": meta.get("model_id"),
        "hook_name": meta.get("hook_name"),
        "hook_layer": meta.get("layer"),
        "activations_source": meta,
    }
