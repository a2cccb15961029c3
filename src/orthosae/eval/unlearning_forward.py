"""The unlearning eval's model runs: answers with block L's output captured, and answers from an edited
block-L output running only the blocks after L.

Every intervention edits block L's output and leaves blocks 0..L untouched, so their output (unedited) is
computed once, with the baseline answers, and each intervention runs blocks L+1.. only: blocks 0..L are
given the captured output to return (`splice.given_block_output`, the core eval's shortcut too). That is
exact unless the model carries state from one block to the next outside the hidden state, so it is checked
against the full forward before use (`upper_matches`), and the full forward with a hook that edits block
L's output is used otherwise.

Under torchrun `answer` runs only the batches a `Deal` gives this rank (eval.ranks) and sums the answers over
ranks (each row filled by one rank, zeros elsewhere: exact); `gathered` puts the captured block outputs
back the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence

import torch

from orthosae.eval.prompt_acts import pad_id_of, pad_right
from orthosae.eval.ranks import Deal, sum_rows_
from orthosae.eval.splice import edit_block_output, given_block_output
from orthosae.eval.unlearning_score import choose
from orthosae.models.loader import LoadedModel
from orthosae.models.placement import input_device
from orthosae.train.distributed import Ranks

Edit = Callable[[torch.Tensor], torch.Tensor]  # block-L output (B, T, d) → edited


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in length order, `batch_size` at a time (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _last_logits(model: torch.nn.Module, mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real token, (B, V) float32 on CPU; only those rows go through the LM
    head where the model takes `logits_to_keep` positions (a 49k vocabulary costs as much as 7 blocks)."""
    last = mask.sum(dim=1) - 1
    device = input_device(model)
    kw: dict[str, object] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = last.unsqueeze(1).to(device)
    logits = model(attention_mask=mask.long().to(device), use_cache=False, **inputs, **kw).logits
    if logits.shape[1] == 1 and mask.shape[1] > 1:
        return logits[:, 0].float().cpu()
    return logits[torch.arange(len(last)), last.to(logits.device)].float().cpu()


@torch.no_grad()
def answer(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    cands: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
    *,
    capture: bool = False,
    edit: Edit | None = None,
    deal: Deal | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
    """Full forwards: each prompt's chosen answer (N,), and with `capture` block L's output per prompt
    ((T_i, d) float32 on CPU). `edit` replaces block L's output on the way (the fallback path). With
    `deal`, this rank runs only the batches dealt to it: every rank gets every answer, but block L's
    output only of its own prompts (None at the others': see `gathered`)."""
    device = input_device(loaded.model)
    pad = pad_id_of(loaded.tokenizer)
    preds = torch.zeros(len(seqs), dtype=torch.long)
    hidden: list[torch.Tensor | None] = [None] * len(seqs)
    for idx in _batches([len(s) for s in seqs], batch_size):
        if deal is not None and not deal.take():
            continue
        ids, mask = pad_right([seqs[i] for i in idx], pad)
        seen: list[torch.Tensor] = []

        def hook(h: torch.Tensor, seen: list[torch.Tensor] = seen) -> torch.Tensor:
            seen.append(h)
            return edit(h) if edit is not None else h

        with edit_block_output(loaded.model, layer, hook):
            last = _last_logits(loaded.model, mask, input_ids=ids.to(device))
        preds[idx] = choose(last, [cands[i] for i in idx])
        if capture:
            h = seen[0].float().cpu()
            for row, i in enumerate(idx):
                hidden[i] = h[row, : len(seqs[i])].clone()
    if deal is not None:
        sum_rows_(preds, deal.ranks, "gathering the unlearning answers")
    return preds, (hidden if capture else None)


def gathered(
    hidden: Sequence[torch.Tensor | None], lengths: Sequence[int], d: int, ranks: Ranks | None
) -> list[torch.Tensor]:
    """Every prompt's block-L output (prompt i: `lengths[i]` tokens) on every rank, from each rank's own
    (None at the others'): all at their rows of one flat (Σ T_i, d) tensor, zeros where another rank ran
    the prompt, summed over ranks (x + 0 is exact). In one process, the outputs as they are."""
    if ranks is None:
        assert all(h is not None for h in hidden), "one process captures every prompt"
        return [h for h in hidden if h is not None]
    flat = torch.zeros(sum(lengths), d)
    start = 0
    for h, n in zip(hidden, lengths, strict=True):
        if h is not None:
            flat[start : start + n] = h
        start += n
    sum_rows_(flat, ranks, "gathering the unlearning prompts' block outputs")
    return list(flat.split(list(lengths)))


def _padded(hidden: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """(B, width, d): each prompt's block-L output, right-padded with zeros like its token ids."""
    h = torch.zeros(len(hidden), width, hidden[0].shape[-1])
    for row, one in enumerate(hidden):
        h[row, : len(one)] = one
    return h


def _logits_from_hidden(
    loaded: LoadedModel, layer: int, seqs: Sequence[Sequence[int]], h: torch.Tensor
) -> torch.Tensor:
    """Last-token logits (B, V) of the prompts `seqs` whose block L outputs `h` (B, T, d), running blocks
    layer+1.. and the head only."""
    ids, mask = pad_right(seqs, pad_id_of(loaded.tokenizer))
    dtype = next(loaded.model.parameters()).dtype
    with given_block_output(loaded.model, layer, h.to(dtype)):
        return _last_logits(loaded.model, mask, input_ids=ids.to(input_device(loaded.model)))


@torch.no_grad()
def answer_from_hidden(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    hidden: Sequence[torch.Tensor],
    cands: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
    edit: Edit | None = None,
) -> torch.Tensor:
    """Each prompt's chosen answer, (N,), running blocks layer+1.. from its (edited) block-L output."""
    device = input_device(loaded.model)
    preds = torch.zeros(len(hidden), dtype=torch.long)
    for idx in _batches([len(h) for h in hidden], batch_size):
        width = max(len(hidden[i]) for i in idx)
        h = _padded([hidden[i] for i in idx], width).to(device)
        if edit is not None:
            h = edit(h)
        last = _logits_from_hidden(loaded, layer, [seqs[i] for i in idx], h)
        preds[idx] = choose(last, [cands[i] for i in idx])
    return preds


@torch.no_grad()
def upper_matches(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    hidden: Sequence[torch.Tensor],
    tol: float = 1e-4,
) -> tuple[bool, float]:
    """Does running blocks layer+1.. from the captured block-L output give the full forward's last-token
    logits (max |Δ| ≤ tol × max |logit|)? Checked on a few prompts; returns (ok, relative max |Δ|)."""
    if not seqs:
        return False, float("nan")
    take = list(range(min(4, len(seqs))))
    ids, mask = pad_right([seqs[i] for i in take], pad_id_of(loaded.tokenizer))
    full = _last_logits(loaded.model, mask, input_ids=ids.to(input_device(loaded.model)))
    h = _padded([hidden[i] for i in take], ids.shape[1]).to(input_device(loaded.model))
    upper = _logits_from_hidden(loaded, layer, [seqs[i] for i in take], h)
    rel = float((upper - full).abs().max() / full.abs().max().clamp_min(1e-12))
    return rel <= tol, rel
