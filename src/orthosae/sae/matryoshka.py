"""Matryoshka BatchTopK SAE (Bussmann et al. 2025) with dictionary_learning's MatryoshkaBatchTopKSAE/
MatryoshkaBatchTopKTrainer semantics: the dictionary is split into nested prefix groups, each prefix must
reconstruct the input on its own, and the reconstruction loss is the mean over prefixes of
weight_g · ‖x − x̂_{≤g}‖². Selection, AuxK, threshold and firing are BatchTopK's."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any

import torch

from orthosae.sae import kernels
from orthosae.sae.batchtopk import BatchTopKRule, BatchTopKSAE

# dictionary_learning's demo configuration: group i holds 1/2^(5-i) of the dictionary, the last the rest.
DEFAULT_FRACTIONS = "1/32,1/16,1/8,1/4,17/32"


def parse_fractions(text: str) -> list[float]:
    """'1/32,1/16,0.5' → [0.03125, 0.0625, 0.5]; raises ValueError on anything else."""
    return [float(Fraction(part.strip())) for part in text.split(",") if part.strip()]


def group_sizes(d_sae: int, fractions: list[float]) -> list[int]:
    """int(f·n) latents for every group but the last, which takes the remainder (dictionary_learning)."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    return [*sizes, d_sae - sum(sizes)]


def check_groups(d_sae: int, fractions: list[float], weights: list[float] | None) -> str | None:
    """Why these groups cannot be used, or None."""
    if not fractions or not math.isclose(sum(fractions), 1.0):
        return f"the group fractions must sum to 1, got {sum(fractions):.6g}"
    if any(s <= 0 for s in group_sizes(d_sae, fractions)):
        return f"every group must hold at least one of the {d_sae} latents; use fewer or larger fractions"
    if weights is not None and len(weights) != len(fractions):
        return f"give one weight per group: {len(fractions)} fractions but {len(weights)} weights"
    return None


class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"

    def __init__(self, d_in: int, d_sae: int, k: int, group_sizes: list[int], **kw: Any):
        super().__init__(d_in, d_sae, k, **kw)
        if sum(group_sizes) != d_sae or any(s <= 0 for s in group_sizes):
            raise ValueError(f"group sizes {group_sizes} must be positive and sum to d_sae={d_sae}")
        self.group_sizes = list(group_sizes)

    def hyperparams(self) -> dict[str, object]:
        return {**super().hyperparams(), "group_sizes": self.group_sizes}


def prefix_losses(
    x: torch.Tensor,
    acts: torch.Tensor,
    idx: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    sizes: list[int],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_g · mean_b ‖x_b − x̂_{b,≤g}‖² per group (G,), the full reconstruction x̂ (B, d)).

    x̂_{≤g} = b_dec + the decodes of groups 1..g, all G of them from one bagged decode of the (B, m) codes."""
    bounds = list(itertools.accumulate(sizes[:-1]))
    x_hat = b_dec.expand_as(x)
    losses = []
    # unbind, not indexing: its backward stacks the G gradients instead of G zero-filled (G, B, d) buffers.
    for part, weight in zip(kernels.grouped_decode(acts, idx, W_dec, bounds).unbind(0), weights, strict=True):
        x_hat = x_hat + part
        losses.append((x - x_hat).pow(2).sum(dim=-1).mean() * weight)
    return torch.stack(losses), x_hat


class MatryoshkaRule(BatchTopKRule):
    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert isinstance(self.sae, MatryoshkaSAE)
        sizes = self.sae.group_sizes
        weights = self.cfg.resolved_group_weights(len(sizes))
        c = self.codes(x)
        per_group, x_hat = prefix_losses(x, c.acts, c.idx, self.sae.W_dec, self.sae.b_dec, sizes, weights)
        terms = self.common_terms(x, c, x_hat, per_group.mean())
        terms["recon_full"] = (x - x_hat).detach().pow(2).sum(dim=-1).mean()
        return terms
