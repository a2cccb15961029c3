"""A toy superposition model with known features: ground truth for SAE recovery and absorption.

n true feature directions live in d < n dimensions. Each sample activates a few features with random
magnitudes and sums their directions. Optional hierarchy: some features are parents with children that
only fire when their parent fires (e.g. "starts with s" ⊃ "snake"), the pattern that causes absorption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TOY_STREAM, _SAMPLE_STREAM = 1_000_003, 2_000_003


@dataclass
class ToyModel:
    directions: torch.Tensor  # (n_features, d), unit rows
    p_active: torch.Tensor  # (n_features,) firing probability (for children: given the parent fires)
    parent: torch.Tensor  # (n_features,) index of the parent feature, -1 for roots

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]


def make_toy_model(
    n_features: int,
    d: int,
    *,
    p_active: float = 0.05,
    n_parents: int = 0,
    children_per_parent: int = 0,
    p_child: float = 0.5,
    seed: int = 0,
) -> ToyModel:
    """Random unit directions; the first n_parents features get `children_per_parent` children each,
    taken from the end of the feature list, that fire with probability p_child when the parent fires."""
    # Offset so the toy's stream never coincides with an SAE initialised from the same seed.
    gen = torch.Generator().manual_seed(_TOY_STREAM + seed)
    dirs = torch.randn(n_features, d, generator=gen, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=1, keepdim=True)).float()
    parent = torch.full((n_features,), -1, dtype=torch.long)
    p = torch.full((n_features,), p_active)
    n_children = n_parents * children_per_parent
    if n_parents + n_children > n_features:
        raise ValueError("not enough features for that hierarchy")
    for j in range(n_children):
        child = n_features - n_children + j
        parent[child] = j // children_per_parent
        p[child] = p_child
    return ToyModel(dirs, p, parent)


def sample_codes(model: ToyModel, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, n_features) non-negative codes: Bernoulli firing times Uniform(0.5, 1.5) magnitudes."""
    fire = torch.rand(n, model.n_features, generator=generator) < model.p_active
    has_parent = model.parent >= 0
    # A child fires only together with its parent; the parent keeps its own firing decision.
    fire[:, has_parent] &= fire[:, model.parent[has_parent]]
    mags = 0.5 + torch.rand(n, model.n_features, generator=generator)
    return fire.float() * mags


def sample_activations(model: ToyModel, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, codes) with x = codes @ directions, shape (n, d)."""
    gen = torch.Generator().manual_seed(_SAMPLE_STREAM + seed)
    codes = sample_codes(model, n, gen)
    return codes @ model.directions, codes


def max_cosines(true_dirs: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each true direction, the largest cosine with any learned row: (n_true,)."""
    t = true_dirs / true_dirs.norm(dim=1, keepdim=True)
    w = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ w.T).max(dim=1).values
