"""Run the language model with block L's output hidden state captured, replaced, or zero-ablated.

A forward hook on decoder block L returns a modified output; blocks return a tensor (llama in transformers
5) or a tuple whose first item is the hidden state, and both shapes are handled. Positions outside `mask`
(BOS and other special tokens, SAEBench's `exclude_special_tokens_from_reconstruction`, and the core eval's
high-norm tokens) keep their original hidden state when splicing; zero ablation zeroes every position, as
SAEBench does.

`Splicer` runs the spliced and ablated passes from block L's output instead of from the tokens: blocks
0..L return the given hidden state without computing it, which saves about half of each pass at a middle
layer. Whether that gives the model's own logits is checked once per model and layer (`calibrate`: the
clean hidden state must reproduce the clean logits); a model whose later blocks need more than the
residual stream (state shared across layers, say) fails the check and is run from the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    return captured[0].to(tokens.device), out  # block L may sit on another device (device_map)


@torch.inference_mode()
def spliced_logits(
    model: torch.nn.Module, layer: int, tokens: torch.Tensor, replacement: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits with block L's output replaced by `replacement` (B, T, d) at the positions of `mask` (B, T);
    every other position keeps the hidden state the model computed."""

    def splice(h: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None].to(h.device), replacement.to(h.device, h.dtype), h)

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


@contextmanager
def given_block_output(model: torch.nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Blocks 0..L skip their computation and return `hidden` (B, T, d): block L's output is then exactly
    `hidden`, and blocks 0..L-1's outputs are never used."""
    blocks = find_blocks(model)
    layer = check_layer(layer, len(blocks))
    skipped = list(blocks[: layer + 1])
    # An instance attribute shadows the class's forward; keep any one already there (accelerate's hooks).
    saved = [b.__dict__.get("forward") for b in skipped]

    def give(*_args: object, **_kwargs: object) -> torch.Tensor:
        return hidden

    for b in skipped:
        b.forward = give
    try:
        yield
    finally:
        for b, old in zip(skipped, saved, strict=True):
            if old is None:
                del b.__dict__["forward"]
            else:
                b.forward = old


@torch.inference_mode()
def logits_from_block_output(
    model: torch.nn.Module, layer: int, tokens: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Logits of the model whose block L outputs `hidden`, running only blocks L+1.. and the head."""
    with given_block_output(model, layer, hidden):
        return logits(model, tokens)


CALIBRATION_TOLERANCE = 1e-4  # × the largest clean logit: fp reordering only, far below any real change


@dataclass
class Splicer:
    """Spliced and zero-ablated logits of one model at one layer, from block L's output when `calibrate`
    has shown that this reproduces the model (see the module doc), else from the tokens."""

    model: torch.nn.Module
    layer: int
    from_block_output: bool | None = field(default=None)  # None until calibrated

    def calibrate(self, tokens: torch.Tensor, hidden: torch.Tensor, clean_logits: torch.Tensor) -> bool:
        if self.from_block_output is None:
            got = logits_from_block_output(self.model, self.layer, tokens, hidden)
            err = float((got.float() - clean_logits.float()).abs().max())
            scale = float(clean_logits.float().abs().max())
            self.from_block_output = err <= CALIBRATION_TOLERANCE * max(scale, 1.0)
        return self.from_block_output

    def spliced(
        self, tokens: torch.Tensor, hidden: torch.Tensor, replacement: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """As spliced_logits; `hidden` is the clean block-L output of `tokens`."""
        if not self.from_block_output:
            return spliced_logits(self.model, self.layer, tokens, replacement, mask)
        full = torch.where(mask[..., None], replacement.to(hidden.dtype), hidden)
        return logits_from_block_output(self.model, self.layer, tokens, full)

    def ablated(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if not self.from_block_output:
            return ablated_logits(self.model, self.layer, tokens)
        return logits_from_block_output(self.model, self.layer, tokens, torch.zeros_like(hidden))
