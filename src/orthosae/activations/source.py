"""One way for the trainer to consume activations: from a cache or harvested live, as float32 (B, d) batches.

src = from_cache("cache/smol-l15", batch_size=4096, seed=0)
src = stream_activations("smollm2-135m", 15, batch_size=4096, n_tokens=2_000_000)
for x in src: ...            # x: (4096, d_model) float32
src.d_model, src.metadata    # metadata goes into the SAE's cfg.json
saved = src.state()          # small dict; pass as state= to resume at the same batch
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthosae.activations.buffer import CacheWindows, ShuffleBuffer
from orthosae.activations.cache import open_cache
from orthosae.activations.harvest import hook_name
from orthosae.activations.stream import StreamWindows
from orthosae.data.texts import describe
from orthosae.models.blocks import check_layer
from orthosae.models.loader import LoadedModel, load_model
from orthosae.models.placement import DeviceMap
from orthosae.train.distributed import Ranks


@dataclass
class ActivationSource:
    batches: ShuffleBuffer
    d_model: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches

    def __next__(self) -> torch.Tensor:
        return next(self.batches)

    def state(self) -> dict[str, Any]:
        return self.batches.state()

    @property
    def epochs_completed(self) -> int:
        return self.batches.epochs_completed


def from_cache(
    path: str | Path,
    *,
    batch_size: int,
    seed: int = 0,
    max_epochs: int | None = None,
    window_tokens: int = 1 << 16,
    chunk_tokens: int = 1024,
    state: dict[str, Any] | None = None,
    model: str | None = None,
    layer: int | None = None,
    verify: bool = True,
    part: tuple[int, int] = (0, 1),
) -> ActivationSource:
    """Shuffled batches from an activation cache; `model`/`layer` (if given) must match the cache's.

    `part=(rank, world)`: only this rank's slice of each batch (see `ShuffleBuffer`)."""
    cache = open_cache(path, verify=verify)
    cache.check_matches(model=model, layer=layer)
    windows = CacheWindows(cache, seed=seed, window_tokens=window_tokens, chunk_tokens=chunk_tokens)
    buffer = ShuffleBuffer(
        windows, batch_size=batch_size, seed=seed, max_epochs=max_epochs, state=state, part=part
    )
    return ActivationSource(buffer, cache.d_model, cache.metadata())


def stream_activations(
    model_name: str,
    layer: int,
    corpus: str = "bundled",
    context_size: int = 128,
    batch_size: int = 4096,
    n_tokens: int | None = None,
    seed: int = 0,
    *,
    window_tokens: int = 1 << 15,
    forward_batch: int = 8,
    state: dict[str, Any] | None = None,
    model: LoadedModel | None = None,
    remove_high_norm: float = 10.0,
    progress: bool = True,
    model_dtype: str = "float32",
    ranks: Ranks | None = None,
    model_device_map: DeviceMap | None = None,
) -> ActivationSource:
    """Shuffled batches harvested on the fly (one pass over about `n_tokens` tokens; no disk).

    `model_dtype`: the dtype the model is loaded in (batches are float32 whatever it is); `model_device_map`:
    spread it over the visible GPUs (orthosae.models.placement; one process only). `ranks` (torchrun):
    every rank harvests its share of each window and yields its slice of each global batch (see
    orthosae.activations.stream); every rank must call this alike."""
    loaded = model or load_model(model_name, dtype=model_dtype, device_map=model_device_map)
    layer = check_layer(layer, loaded.n_layers)
    windows = StreamWindows(
        loaded,
        layer,
        corpus=corpus,
        context_size=context_size,
        n_tokens=n_tokens,
        window_tokens=window_tokens,
        forward_batch=forward_batch,
        remove_high_norm=remove_high_norm,
        progress=progress,
        ranks=ranks,
    )
    part = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    buffer = ShuffleBuffer(windows, batch_size=batch_size, seed=seed, max_epochs=1, state=state, part=part)
    metadata = {
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "model_dtype": loaded.dtype,
        "layer": layer,
        "hook_name": hook_name(layer),
        "context_size": context_size,
        "corpus": describe(corpus),
        "d_model": loaded.d_model,
        "activations": "stream",
        "remove_high_norm": remove_high_norm,
        "n_tokens": n_tokens,
    }
    return ActivationSource(buffer, loaded.d_model, metadata)
