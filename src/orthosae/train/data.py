"""Turn the data options of a TrainConfig into an endless stream of (B, d) float32 batches.

Every stream can report its position (`state()`, a small JSON-able dict) and be reopened at it, which is
what a checkpoint stores. Finiteness: .npy/.safetensors files are scanned once when opened (the error names
the row and column); cache and live batches are checked one by one here (a cheap pass next to the SAE's
matmuls), because a cache is too large to scan up front and a live model can overflow at any point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthosae.activations.files import ArrayBatches, load_array
from orthosae.errors import UserError
from orthosae.train.config import TrainConfig


@dataclass
class ActivationStream:
    d_in: int
    batches: Iterator[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # model_name, hook_layer, hook_name when known
    state: Callable[[], dict[str, Any]] = dict  # the position after the last batch taken


def open_stream(
    cfg: TrainConfig, state: dict[str, Any] | None = None, part: tuple[int, int] = (0, 1)
) -> ActivationStream:
    """Open the data `cfg` names, at position `state` (from `ActivationStream.state()`) when given.

    `part=(rank, world)`: yield only this rank's rows [rank·B/world, (rank+1)·B/world) of each global
    batch of cfg.batch_size (B); the position stays the global one, the same on every rank. A live stream
    (--model) under torchrun also shares the forward passes: each rank harvests part of every window."""
    if cfg.activations is not None:
        path = Path(cfg.activations)
        if path.is_dir():
            return _named(_cache_stream(path, cfg, state, part), cfg)
        arr = load_array(path)
        inner = _inner(state, "array")
        batches = ArrayBatches(arr, cfg.batch_size, cfg.seed, cfg.device, state=inner, part=part)
        return _named(ActivationStream(arr.shape[1], batches, state=batches.state), cfg)
    return _named(_live_stream(cfg, state, part), cfg)


def _named(stream: ActivationStream, cfg: TrainConfig) -> ActivationStream:
    """Record --model-name/--hook-name where the data names no model/hook; refuse a contradiction."""
    from orthosae.interop.saelens import layer_of_hook

    given = {"model_name": cfg.model_name, "hook_name": cfg.hook_name}
    for key, value in given.items():
        recorded = stream.meta.get(key)
        if value is None:
            continue
        if recorded is not None and recorded != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value} contradicts the data, which records {recorded}; drop {flag}")
        stream.meta[key] = value
    # A residual hook names the block our evals splice at; other hooks train fine but are not evaluated.
    if cfg.hook_name is not None and stream.meta.get("hook_layer") is None:
        stream.meta["hook_layer"] = layer_of_hook(cfg.hook_name)
    return stream


def _inner(state: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    if state is not None and state.get("kind") != kind:
        raise UserError(
            f"the checkpoint was taken on {state.get('kind')!r} data, this run reads {kind!r} data; "
            "resume with the same --activations or --model"
        )
    return state


def _cache_stream(
    path: Path, cfg: TrainConfig, state: dict[str, Any] | None, part: tuple[int, int]
) -> ActivationStream:
    from orthosae.activations.source import from_cache

    inner = _inner(state, "cache")
    with _damaged_state(path):
        buffer_state = _buffer_state(inner, path)
        src = from_cache(path, batch_size=cfg.batch_size, seed=cfg.seed, state=buffer_state, part=part)
    cache = src.batches.source.cache  # pyright: ignore[reportAttributeAccessIssue]  (a cache's source)
    ident = {"n_tokens": cache.n_tokens, "d_model": src.d_model}
    for key, value in ident.items():
        if inner is not None and inner.get(key) != value:
            raise UserError(
                f"activation cache {path} has {key}={value}, the checkpointed run read {inner.get(key)}; "
                "resume with the same cache"
            )
    return _wrap(src, cfg, f"activation cache {path}", "cache", ident)


def _live_stream(cfg: TrainConfig, state: dict[str, Any] | None, part: tuple[int, int]) -> ActivationStream:
    from orthosae.activations.source import stream_activations
    from orthosae.models.placement import parse_device_map
    from orthosae.train import distributed

    assert cfg.model is not None and cfg.layer is not None
    inner = _inner(state, "stream")
    # Each context loses its BOS (and documents their EOS) to the special-token filter: ask for 5% extra.
    n_tokens = cfg.tokens
    if n_tokens is None:
        n_tokens = int(cfg.steps * cfg.batch_size * 1.05) + cfg.context_size
    with _damaged_state(cfg.model):
        src = stream_activations(
            cfg.model,
            cfg.layer,
            corpus=cfg.corpus,
            context_size=cfg.context_size,
            batch_size=cfg.batch_size,
            n_tokens=n_tokens,
            seed=cfg.seed,
            remove_high_norm=cfg.remove_high_norm,
            progress=False,
            state=_buffer_state(inner, cfg.model),
            model_dtype=cfg.model_dtype,
            model_device_map=parse_device_map(cfg.model_device_map),
            ranks=distributed.current() if part[1] > 1 else None,
        )
    return _wrap(src, cfg, f"activations of {cfg.model} layer {cfg.layer}", "stream", {})


@contextlib.contextmanager
def _damaged_state(what: Path | str) -> Iterator[None]:
    """The shuffle buffer checks a saved position with plain exceptions; name the checkpoint instead."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's position in {what} is invalid ({e}); start a new run") from None


def _buffer_state(state: dict[str, Any] | None, what: Path | str) -> dict[str, Any] | None:
    if state is None:
        return None
    buffer = state.get("buffer")
    if not isinstance(buffer, dict):
        raise UserError(f"the checkpoint's position in {what} is missing or damaged; start a new run")
    return buffer


def _wrap(src: Any, cfg: TrainConfig, where: str, kind: str, ident: dict[str, Any]) -> ActivationStream:
    def state() -> dict[str, Any]:
        return {"kind": kind, **ident, "buffer": src.state()}

    batches = _checked(src, cfg.device, where, skip_ok=cfg.max_skipped_batches > 0)
    return ActivationStream(src.d_model, batches, _cfg_meta(src.metadata), state)


def _checked(src: Any, device: str, where: str, skip_ok: bool) -> Iterator[torch.Tensor]:
    """Move batches to `device`; a non-finite one stops the run naming its position, unless the trainer
    may skip it (--max-skipped-batches), which counts it against that bound instead."""
    for x in src:
        if not skip_ok and not bool(torch.isfinite(x).all()):
            row, col = (int(v) for v in (~torch.isfinite(x)).nonzero()[0])
            n = src.state().get("batches", "?")  # type: ignore[attr-defined]
            raise UserError(
                f"non-finite activation {x[row, col].item()} in batch {n} (row {row}, column {col}) of "
                f"{where}; rebuild the cache or pass --max-skipped-batches to skip such batches"
            )
        yield x.to(device)


def _cfg_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Source metadata in cfg.json's vocabulary (SAELens key names where they exist)."""
    return {
        "model_name": meta.get("model_id"),
        "hook_name": meta.get("hook_name"),
        "hook_layer": meta.get("layer"),
        "activations_source": meta,
    }
