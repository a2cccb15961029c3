"""Run the language model with block L's output hidden state captured, replaced, or zero-ablated.

A forward hook on decoder block L returns a modified output; blocks return a tensor (llama in transformers
5) or a tuple whose first item is the hidden state, and both shapes are handled. Positions outside `mask`
(BOS and other special tokens, SAEBench's `exclude_special_tokens_from_reconstruction`, and the core eval's
high-norm tokens) keep their original hidden state when splicing; zero ablation zeroes every position, as
SAEBench does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from orthosae.models.blocks import check_layer, find_blocks

Edit = Callable[[torch.Tensor], torch.Tensor | None]  # hidden (B, T, d) → new hidden, or None to keep it


@contextmanager
def edit_block_output(model: torch.nn.Module, layer: int, edit: Edit) -> Iterator[None]:
    blocks = find_blocks(model)
    block = blocks[check_layer(layer, len(blocks))]

    def hook(_m: torch.nn.Module, _args: object, output: object) -> object:
        is_seq = isinstance(output, tuple | list)
        hidden = output[0] if is_seq else output
        assert isinstance(hidden, torch.Tensor)
        new = edit(hidden)
        if new is None:
            return None
        if is_seq:
            return (new, *output[1:])  # type: ignore[index]
        return new

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


@torch.inference_mode()
def clean_run(model: torch.nn.Module, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block-L output (B, T, d), logits (B, T, V)) of the unmodified model."""
    captured: list[torch.Tensor] = []

    def capture(h: torch.Tensor) -> None:
        captured.append(h.detach())

    with edit_block_output(model, layer, capture):
        out = logits(model, tokens)
    return captured[0], out


@torch.inference_mode()
def spliced_logits(
    model: torch.nn.Module, layer: int, tokens: torch.Tensor, replacement: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits with block L's output replaced by `replacement` (B, T, d) at the positions of `mask` (B, T);
    every other position keeps the hidden state the model computed."""

    def splice(h: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None], replacement.to(h.dtype), h)

    with edit_block_output(model, layer, splice):
        return logits(model, tokens)


@torch.inference_mode()
def ablated_logits(model: torch.nn.Module, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits with block L's output zeroed at every position."""
    with edit_block_output(model, layer, torch.zeros_like):
        return logits(model, tokens)


@dataclass
class SpliceOutputs:
    hidden: torch.Tensor  # clean block-L output (B, T, d)
    clean: torch.Tensor  # logits (B, T, V)
    spliced: torch.Tensor
    ablated: torch.Tensor


@torch.inference_mode()
def run_spliced(
    model: torch.nn.Module,
    layer: int,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
) -> SpliceOutputs:
    """Clean, SAE-spliced and zero-ablated logits for one batch of contexts."""
    hidden, clean = clean_run(model, layer, tokens)
    replacement = hidden.clone()
    replacement[mask] = reconstruct(hidden[mask].float()).to(hidden.dtype)
    spliced = spliced_logits(model, layer, tokens, replacement, mask)
    return SpliceOutputs(hidden, clean, spliced, ablated_logits(model, layer, tokens))
