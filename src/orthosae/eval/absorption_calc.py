"""The absorption maths, as pure functions on tensors (SAEBench's feature_absorption_calculator semantics).

For one letter, given the test words the LM probe classifies correctly (probe true positives):

- main latents: the split features of the letter (the k-sparse probe's latents at the largest k reached by
  F1 jumps > f1_jump_threshold, see `split_features`);
- full absorption (the seed's `absorption_rate`): a word counts when (1) no main latent fires (all < 1e-8),
  (2) the latent with the largest projection a_j·cos(w_dec_j, p) onto the unit probe direction p has
  cos ≥ 0.025, (3) the LM activation's projection x·p is ≥ 0, and (4) that top latent's projection is
  ≥ 0.4 of x·p. absorption_rate = #absorbed / #probe true positives;
- absorption fraction (SAEBench's later metric, reported alongside): with M = Σ_main a_j cos_j and the
  top-3 other latents with cos ≥ 0.1 and positive projection summing to A: 0 when M ≥ x·p or A/(x·p) < 0.4;
  1 when M ≤ 0; else min(A, x·p − M) / (min(A, x·p − M) + M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-8


def split_features(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]], jump: float) -> list[int]:
    """The latents of the largest k reached while each step k-1 → k raises F1 by more than `jump`
    (k = 1 always counts against a start of -inf). SAEBench's add_feature_splits_to_metrics_df."""
    best = float("-inf")
    chosen: list[int] = []
    for f1, feats in zip(f1_by_k, feats_by_k, strict=True):
        if f1 > best + jump:
            best, chosen = f1, list(feats)
        else:
            break
    return chosen


def decoder_cos(direction: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """cos(probe direction, each decoder row), (d_sae,)."""
    unit = direction / direction.norm().clamp_min(EPS)
    return (W_dec.float() @ unit.float()) / W_dec.float().norm(dim=1).clamp_min(EPS)


def full_absorption(
    latents: torch.Tensor,
    lm_proj: torch.Tensor,
    cos: torch.Tensor,
    main_ids: Sequence[int],
    cos_threshold: float = 0.025,
    proportion_threshold: float = 0.4,
) -> torch.Tensor:
    """Boolean (N,): which words are fully absorbed. `latents` (N, d_sae), `lm_proj` (N,) = x·p̂."""
    proj = latents.float() * cos
    top_val, top_idx = proj.max(dim=1)
    if len(main_ids):
        main_silent = (latents[:, list(main_ids)] < EPS).all(dim=1)
    else:
        main_silent = torch.ones(latents.shape[0], dtype=torch.bool)
    aligned = cos[top_idx] >= cos_threshold
    positive = lm_proj >= 0
    # x·p = 0 with a positive top projection reads as an infinite share, as SAEBench's division would.
    share = top_val / lm_proj.where(lm_proj != 0, torch.full_like(lm_proj, EPS))
    return main_silent & aligned & positive & (share >= proportion_threshold)


def absorption_fraction(
    latents: torch.Tensor,
    lm_proj: torch.Tensor,
    cos: torch.Tensor,
    main_ids: Sequence[int],
    cos_threshold: float = 0.1,
    proportion_threshold: float = 0.4,
    max_absorbers: int = 3,
) -> torch.Tensor:
    """Float (N,) in [0, 1]: the share of the probe projection carried by absorbing latents."""
    proj = latents.float() * cos
    main = torch.zeros(latents.shape[1], dtype=torch.bool)
    main[list(main_ids)] = True
    main_proj = proj[:, main].sum(dim=1)
    candidate = (~main) & (cos >= cos_threshold)
    others = torch.where(candidate.unsqueeze(0) & (proj > 0), proj, torch.zeros_like(proj))
    k = min(max_absorbers, others.shape[1])
    absorb = others.topk(k, dim=1).values.sum(dim=1)
    share = absorb / lm_proj.where(lm_proj != 0, torch.full_like(lm_proj, EPS))
    unaccounted = lm_proj - main_proj
    absorbed = torch.minimum(absorb, unaccounted)
    frac = (absorbed / (absorbed + main_proj).clamp_min(EPS)).clamp(0.0, 1.0)
    frac = torch.where(main_proj <= 0, torch.ones_like(frac), frac)
    none = (main_proj >= lm_proj) | (share < proportion_threshold)
    return torch.where(none, torch.zeros_like(frac), frac)
