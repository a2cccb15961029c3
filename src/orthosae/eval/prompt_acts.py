"""Run the LM on many short prompts and collect resid_post of block L: batched, right-padded, truncated.

Right padding is safe for causal models: a real token never attends to the pad tokens after it, so the
activations of real tokens are those of the unpadded prompt. Prompts are batched in length order (less
padding, fewer wasted FLOPs) and the results are returned in the caller's order. Under torchrun each
rank runs every W-th of those batches and the rows are summed over ranks (eval.ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from orthosae.activations.harvest import resid_post
from orthosae.eval.ranks import check_same_inputs, owns, sum_rows_
from orthosae.models.loader import LoadedModel
from orthosae.models.placement import input_device
from orthosae.train.distributed import Ranks


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, T_max): sequences left-aligned, padded on the right with `pad_id`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask


def pad_id_of(tokenizer: object) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def forward_batches(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "LM forward",
    ranks: Ranks | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (indices into `seqs`, resid_post (B, T, d) float32 on CPU, mask (B, T)) per batch.

    Batches hold prompts of similar length; `indices` says which prompts each batch row is. With `ranks`,
    only this rank's batches (batch j of one process's order on rank j mod W), with the same contents.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = pad_id_of(loaded.tokenizer)
    device = input_device(loaded.model)  # a spread model: its embedding's device
    starts = [s for j, s in enumerate(range(0, len(order), batch_size)) if owns(j, ranks)]
    for start in tqdm(starts, disable=not progress, desc=desc, leave=False):
        idx = order[start : start + batch_size]
        ids, mask = pad_right([seqs[i] for i in idx], pad)
        acts = resid_post(loaded.model, ids.to(device), layer, attention_mask=mask.long().to(device))
        yield idx, acts.float().cpu(), mask


def acts_at_positions(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    position: int,
    batch_size: int = 16,
    progress: bool = False,
    ranks: Ranks | None = None,
) -> torch.Tensor:
    """resid_post at one position of every prompt, (N, d). A negative `position` counts from each prompt's
    own end (-1 = its last token), so prompts of different lengths can share a template offset. With
    `ranks`, each rank runs its batches and every rank returns all N rows."""
    check_same_inputs(seqs, ranks, "prompts")
    out = torch.zeros(len(seqs), loaded.d_model)
    batches = forward_batches(loaded, layer, seqs, batch_size, progress, "prompt acts", ranks)
    for idx, acts, mask in batches:
        lengths = mask.sum(dim=1)
        pos = lengths + position if position < 0 else torch.full_like(lengths, position)
        if (pos < 0).any() or (pos >= lengths).any():
            raise ValueError(f"position {position} is outside a prompt of the batch")
        out[idx] = acts[torch.arange(len(idx)), pos]
    return sum_rows_(out, ranks, "gathering prompt activations")
