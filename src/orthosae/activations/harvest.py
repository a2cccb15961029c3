"""Residual-stream activations at the output of decoder block L, from a forward pass stopped after block L.

"Layer L" (0-based) means the output of block L (TransformerLens `blocks.L.hook_resid_post`), which equals
`output_hidden_states[L + 1]` for every L except the last: transformers (4.x and 5.x) replaces the last
hidden state by the final-norm output (`last_hidden_state`), while we always return the raw block output.
A forward hook on block L stores its output and raises StopForward, so later blocks and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from orthosae.data.pack import Contexts
from orthosae.models.blocks import check_layer, find_blocks
from orthosae.models.loader import LoadedModel
from orthosae.models.placement import input_device


class StopForward(Exception):
    """Raised inside block L's forward hook to abandon the rest of the forward pass."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@torch.inference_mode()
def resid_post(
    model: torch.nn.Module, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of decoder block `layer`, (batch, seq, d_model), running blocks 0..layer only; on the device of
    `input_ids` wherever block `layer` ran (a model spread by a device map holds it on another GPU)."""
    blocks = find_blocks(model)
    layer = check_layer(layer, len(blocks))
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
        # Blocks return a tensor (llama in transformers 5) or a tuple whose first item is the hidden state.
        hidden = output[0] if isinstance(output, tuple | list) else output
        assert isinstance(hidden, torch.Tensor)
        captured.append(hidden)
        raise StopForward

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} never ran: the model's forward skipped it")
    return captured[0].to(input_ids.device)


@dataclass
class Harvest:
    """Kept activations of a batch of contexts (masked tokens removed), in (context, position) order."""

    acts: torch.Tensor  # (n, d_model) float32, on CPU
    token_ids: torch.Tensor  # (n,) int32
    context_index: torch.Tensor  # (n,) int64, index in the packed corpus
    position: torch.Tensor  # (n,) int32, position within the context
    end_context: int  # index after the last context of this batch (all contexts before it are done)


def high_norm_kept(acts: torch.Tensor, mask: torch.Tensor, factor: float) -> torch.Tensor:
    """`mask` (B, T) less its tokens whose norm exceeds `factor` × the median norm of `mask`'s tokens in this
    batch of contexts (`acts` (B, T, d)); `mask` unchanged when factor is 0 or it selects nothing."""
    if factor <= 0 or not mask.any():
        return mask
    norms = acts.float().norm(dim=-1)
    return mask & (norms <= norms[mask].median() * factor)


def harvest(
    loaded: LoadedModel, layer: int, batches: Iterable[Contexts], remove_high_norm: float = 0.0
) -> Iterator[Harvest]:
    """Run each batch of contexts through blocks 0..layer and yield the kept tokens' activations.

    With `remove_high_norm` > 0, tokens whose norm exceeds that many times the batch's median norm are
    dropped too: some models (SmolLM2 among them) put rare attention-sink tokens at norms ~100× the
    median, and a single one dominates a batch's squared error (dictionary_learning's remove_high_norm).
    """
    layer = check_layer(layer, loaded.n_layers)
    device = input_device(loaded.model)  # a spread model: its embedding's device
    for batch in batches:
        acts = resid_post(loaded.model, batch.tokens.to(device), layer).float().cpu()
        mask = high_norm_kept(acts, batch.mask, remove_high_norm)
        rows, cols = mask.nonzero(as_tuple=True)
        yield Harvest(
            acts=acts[mask],
            token_ids=batch.tokens[mask].to(torch.int32),
            context_index=(rows + batch.first_index).to(torch.int64),
            position=cols.to(torch.int32),
            end_context=batch.first_index + batch.tokens.shape[0],
        )
