"""Tokenise documents and pack them into fixed-length contexts, each starting with BOS.

Documents are tokenised without special tokens and joined into one stream with an end-of-document token
(EOS, else BOS) between them; the stream is cut into contexts of `context_size - 1` tokens and BOS is put in
front of each (SAEBench / SAELens convention). The trailing partial context is dropped. `mask` marks the
tokens whose activations are kept: everything except BOS and other special tokens (their residual norms are
outliers that dominate SAE training).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from orthosae.errors import UserError


@dataclass
class Contexts:
    """A batch of packed contexts: token ids (n, context_size) int64, mask (n, context_size) bool."""

    tokens: torch.Tensor
    mask: torch.Tensor
    first_index: int  # index of the first context within the whole packed corpus


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, set[int]]:
    """(bos, separator, all special ids) for a tokenizer; BOS falls back to EOS (gpt2, pythia, qwen2)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    specials = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    return bos, sep, specials | {i for i in (bos, sep) if i is not None}


def iter_contexts(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    context_size: int = 128,
    batch_contexts: int = 8,
    skip_contexts: int = 0,
    exclude_special: bool = True,
) -> Iterator[Contexts]:
    """Yield packed contexts in batches of `batch_contexts` (the last batch may be smaller).

    `skip_contexts` skips that many leading contexts (tokenising them, which is cheap) to resume a harvest.
    """
    if context_size < 2:
        raise UserError(f"context size {context_size} is too small: use at least 2")
    bos, sep, specials = special_ids(tokenizer)
    body = context_size - 1 if bos is not None else context_size
    special_tensor = torch.tensor(sorted(specials), dtype=torch.long)
    stream: list[int] = []
    rows: list[list[int]] = []
    index = 0  # contexts produced so far, skipped ones included
    produced_any = False

    def emit(rows: list[list[int]], first: int) -> Contexts:
        tokens = torch.tensor(rows, dtype=torch.long)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if exclude_special:
            mask &= ~torch.isin(tokens, special_tensor)
        elif bos is not None:
            mask[:, 0] = False  # BOS is never kept: it carries no information about the text
        return Contexts(tokens, mask, first)

    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
        while len(stream) >= body:
            chunk, stream = stream[:body], stream[body:]
            if index >= skip_contexts:
                rows.append([bos, *chunk] if bos is not None else chunk)
            index += 1
            if len(rows) == batch_contexts:
                yield emit(rows, index - len(rows))
                produced_any = True
                rows = []
    if rows:
        yield emit(rows, index - len(rows))
        produced_any = True
    if not produced_any and index == 0:
        raise UserError(f"the corpus is empty or shorter than one context ({context_size} tokens)")
