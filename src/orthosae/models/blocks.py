"""Find the list of decoder blocks inside any Hugging Face causal LM, whatever the family calls it."""

from __future__ import annotations

from torch import nn

from orthosae.errors import UserError

# Attribute paths of the block list in the families we know; checked before the generic search
# because a model may hold other ModuleLists of the same length (e.g. per-layer norms).
_KNOWN_PATHS: tuple[str, ...] = (
    "model.layers",  # llama, mistral, qwen2, gemma2 (…ForCausalLM)
    "layers",  # the same families' bare base models
    "transformer.h",  # gpt2, gpt-j
    "h",  # gpt2 base model
    "gpt_neox.layers",  # pythia / gpt_neox
    "model.decoder.layers",  # opt
    "decoder.layers",
)


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def n_layers_of(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList of decoder blocks, in forward order."""
    expected = n_layers_of(model)
    for path in _KNOWN_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and (expected is None or len(found) == expected):
            return found
    # Unknown family: the longest ModuleList whose length matches the config's layer count.
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if expected is not None:
        candidates = [m for m in candidates if len(m) == expected]
    if not candidates:
        raise UserError(
            f"cannot locate the decoder blocks of {type(model).__name__}: no ModuleList with "
            f"{expected} entries; this model family is not supported"
        )
    return max(candidates, key=len)


def check_layer(layer: int, n_layers: int) -> int:
    """Validate a 0-based layer index (negative counts from the end, like Python)."""
    if not -n_layers <= layer < n_layers:
        raise UserError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    return layer % n_layers
