"""Spreading one language model over several devices with transformers' `device_map` (accelerate).

`--model-device-map` takes what `from_pretrained(device_map=...)` takes: a strategy ('auto', 'balanced',
'balanced_low_0', 'sequential'), one device ('cuda:1'), or a JSON object of module name → device
('{"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}'); 'none' (the default)
loads the model whole onto --device. A spread model's blocks run where the map puts them, so token ids go to
the device of the input embedding (`input_device`) and a block's output comes back on that block's device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from orthosae.errors import UserError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFF = ("none", "")

DeviceMap = str | dict[str, int | str]  # what from_pretrained(device_map=...) receives

_HINT = (
    "use none, auto, balanced, balanced_low_0, sequential, one device (cuda:1) or a JSON object of "
    'module name → device, e.g. {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}'
)


def parse_device_map(
    value: str | Mapping[Any, Any] | None, flag: str = "--model-device-map"
) -> DeviceMap | None:
    """The device map `value` names, checked; None for 'none' (the model is then loaded whole)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _checked_dict(value, flag)
    text = value.strip()
    if text.lower() in OFF:
        return None
    if text in STRATEGIES:
        return text
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{flag} {text!r} is not valid JSON ({e.msg} at character {e.pos}); {_HINT}"
            ) from None
        if not isinstance(parsed, dict):
            raise UserError(f"{flag} {text!r} is not a JSON object; {_HINT}")
        return _checked_dict(parsed, flag)
    return _checked_name(text, flag)


def _checked_dict(mapping: Mapping[Any, Any], flag: str) -> dict[str, int | str]:
    if not mapping:
        raise UserError(f"{flag} is an empty JSON object: give each module a device, or use auto")
    out: dict[str, int | str] = {}
    for name, device in mapping.items():
        if not isinstance(name, str):
            raise UserError(f"{flag}: module name {name!r} is not a string; {_HINT}")
        out[name] = _checked_device(device, flag, f"module {name!r}")
    return out


def _checked_device(device: object, flag: str, what: str) -> int | str:
    """A GPU index (int ≥ 0) or a device name."""
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise UserError(f"{flag}: {what} has device {device}; a GPU index is ≥ 0 (use 'cpu' for the CPU)")
        return device
    if not isinstance(device, str):
        raise UserError(f"{flag}: {what} has device {device!r}, not a GPU index or a device name; {_HINT}")
    return _checked_name(device, flag)


def _checked_name(device: str, flag: str) -> str:
    """A torch device name; 'disk' (it needs an offload folder) and 'meta' (no weights) are refused."""
    if device in ("disk", "meta"):
        raise UserError(f"{flag}: placing modules on {device!r} is not supported; use cpu")
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag}: {device!r} is not a strategy or a device; {_HINT}") from None
    return device


def check_single_process(device_map: DeviceMap | None, world: int, flag: str = "--model-device-map") -> None:
    """A device map spreads one model over this process's devices: refused under torchrun, where each rank
    holds its own copy of the model on its own GPU."""
    if device_map is not None and world > 1:
        raise UserError(
            f"{flag} runs one process whose model spans the GPUs: drop torchrun, or drop {flag} to give "
            "each rank its own copy of the model"
        )


def check_visible(device_map: DeviceMap) -> None:
    """Every GPU the map names exists here (transformers would fail with an assertion instead)."""
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    for device in devices:
        if isinstance(device, str) and device in STRATEGIES:
            continue
        parsed = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        if parsed.type != "cuda":
            continue
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise UserError(
                f"--model-device-map places modules on {parsed}, but {count} GPU(s) are visible here "
                "(CUDA_VISIBLE_DEVICES)"
            )


def input_device(model: nn.Module) -> torch.device:
    """The device the token ids must be on: where the input embedding runs.

    A model that accelerate dispatched over several devices carries a hook on every module naming its
    execution device (an offloaded module's weights sit on "meta" until it runs, so its parameters do not
    say); otherwise the embedding's weight is where it runs."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module):
        return next(model.parameters()).device
    device = _hook_device(getattr(embedding, "_hf_hook", None))
    if device is not None:
        return device
    return next(embedding.parameters()).device


def _hook_device(hook: object) -> torch.device | None:
    """accelerate's AlignDevicesHook's execution device (inside a SequentialHook too), if any."""
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)  # an int is a GPU index, as accelerate reads it
    return None
