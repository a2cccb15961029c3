"""Mean-pooled activations for sparse probing, as SAEBench 0.6 pools them.

A text's vector is the mean over its kept tokens: every position except BOS, EOS and padding (SAEBench
zeroes those and averages over the rest). SAE latents are encoded per token and pooled afterwards, so a
latent's pooled value is its mean activation over the text.

The LM part does not depend on the SAE: `collect` runs the LM once and can keep every text's per-token
activations (`TokenActs`), so that each further SAE only encodes them.

Under torchrun (`ranks`) each rank runs its share of the forward batches (eval.ranks) and pooled rows are
summed over ranks, so every rank gets every text's row. Kept tokens are summed the same way (every rank
then holds one process's `TokenActs`), and an SAE encodes the chunks of `batch_texts` texts one process
encodes, chunk j on rank j mod W: the same inputs, also for an encoder whose output depends on the whole
batch (BatchTopK without a threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from orthosae.eval.prompt_acts import forward_batches
from orthosae.eval.ranks import check_same_inputs, owns, sum_rows_
from orthosae.models.loader import LoadedModel
from orthosae.train.distributed import Ranks

Encode = Callable[[torch.Tensor], torch.Tensor]


def pool_rows(values: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows, F) means of `values` (n, F) grouped by `row_of` (n,); a row with no values is 0."""
    sums = torch.zeros(n_rows, values.shape[1], dtype=values.dtype).index_add_(0, row_of, values)
    counts = torch.bincount(row_of, minlength=n_rows).clamp_min(1)
    return sums / counts.unsqueeze(1).to(values.dtype)


def kept_mask(seqs: Sequence[Sequence[int]], width: int, drop_ids: set[int]) -> torch.Tensor:
    """(B, width) bool: position t of text b is a real token that is not one of `drop_ids`."""
    keep = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        keep[row, : len(seq)] = torch.tensor([t not in drop_ids for t in seq], dtype=torch.bool)
    return keep


@dataclass
class TokenActs:
    """Kept-token activations of many texts, flattened in text order: text i is rows
    offsets[i]:offsets[i+1]."""

    acts: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_texts(self) -> int:
        return len(self.offsets) - 1

    @torch.no_grad()
    def pooled(
        self, encode: Encode | None = None, batch_texts: int = 125, ranks: Ranks | None = None
    ) -> torch.Tensor:
        """Per-text means of the activations, or (with `encode`) of encode(activations), encoded
        `batch_texts` texts at a time so only that many texts' latents are held at once. With `ranks`,
        chunk j is encoded by rank j mod W and every rank returns every row."""
        if encode is None:
            return self._pool(self.acts, 0, self.n_texts)
        width = None if ranks is None else _width(encode, self.acts.shape[1])
        parts = []
        for j, a in enumerate(range(0, self.n_texts, batch_texts)):
            b = min(a + batch_texts, self.n_texts)
            if not owns(j, ranks):
                parts.append(torch.zeros(b - a, width or 0))
                continue
            x = self.acts[int(self.offsets[a]) : int(self.offsets[b])]
            parts.append(self._pool(encode(x).float(), a, b))
        out = torch.cat(parts) if parts else torch.zeros(0, width or 0)
        return sum_rows_(out, ranks, "gathering pooled latents")

    def _pool(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        counts = self.offsets[a + 1 : b + 1] - self.offsets[a:b]
        row_of = torch.repeat_interleave(torch.arange(b - a), counts)
        return pool_rows(values, row_of, b - a)


def _width(encode: Encode, d: int) -> int:
    """The encoder's output width, so that a rank with no chunk of its own can still add its zeros."""
    return encode(torch.zeros(1, d)).shape[1]


def _kept_lengths(seqs: Sequence[Sequence[int]], drop_ids: set[int]) -> list[int]:
    return [sum(t not in drop_ids for t in s) for s in seqs]


@dataclass
class Collected:
    lm: torch.Tensor
    """(N, d_model) pooled LM activations."""
    latents: torch.Tensor | None
    """(N, d_sae) pooled SAE latents, when an encoder was given."""
    tokens: TokenActs | None
    """Every text's kept-token activations, when asked to keep them."""


@torch.no_grad()
def collect(
    loaded: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    drop_ids: set[int],
    *,
    encode: Encode | None = None,
    keep_tokens: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    ranks: Ranks | None = None,
) -> Collected:
    """One LM pass over `seqs` (block `layer`'s resid_post): pooled LM activations, optionally pooled
    `encode` latents, optionally the kept-token activations themselves."""
    check_same_inputs(seqs, ranks, "probing texts")
    n = len(seqs)
    lm = torch.zeros(n, loaded.d_model)
    latents: torch.Tensor | None = None
    if ranks is not None and encode is not None:  # a rank may run no batch but must still add its zeros
        latents = torch.zeros(n, _width(encode, loaded.d_model))
    per_text: list[torch.Tensor] = [torch.zeros(0, loaded.d_model)] * n
    batches = forward_batches(loaded, layer, seqs, batch_size, progress, "probing acts", ranks)
    for idx, acts, _mask in batches:
        keep = kept_mask([seqs[i] for i in idx], acts.shape[1], drop_ids)
        flat = acts[keep]
        row_of = torch.arange(len(idx)).unsqueeze(1).expand_as(keep)[keep]
        lm[idx] = pool_rows(flat, row_of, len(idx))
        if encode is not None:
            z = encode(flat).float()
            if latents is None:
                latents = torch.zeros(n, z.shape[1])
            latents[idx] = pool_rows(z, row_of, len(idx))
        if keep_tokens:
            for i, chunk in zip(idx, flat.split(keep.sum(dim=1).tolist()), strict=True):
                per_text[i] = chunk  # a view of `flat`, which holds kept tokens only
    sum_rows_(lm, ranks, "gathering pooled LM activations")
    if latents is not None:
        sum_rows_(latents, ranks, "gathering pooled SAE latents")
    tokens = None
    if keep_tokens:
        counts = [len(t) for t in per_text] if ranks is None else _kept_lengths(seqs, drop_ids)
        lengths = torch.tensor(counts, dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        if ranks is None:
            acts = torch.cat(per_text) if n else torch.zeros(0, loaded.d_model)
        else:  # this rank's texts at their rows, zeros at the others', summed over ranks
            acts = torch.zeros(int(offsets[-1]), loaded.d_model)
            for i, chunk in enumerate(per_text):
                acts[int(offsets[i]) : int(offsets[i]) + len(chunk)] = chunk
            sum_rows_(acts, ranks, "gathering kept-token activations")
        tokens = TokenActs(acts, offsets)
    return Collected(lm, latents, tokens)
