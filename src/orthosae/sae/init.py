"""Initialisation helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from orthosae.sae.base import SAE


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to `points` (N, d).

    Used to initialise b_dec from the first batch; it is robust to the heavy-norm outlier tokens that
    pull a plain mean.
    """
    pts = points.double()
    guess = pts.mean(dim=0)
    for _ in range(max_iter):
        # A point sitting exactly on the guess would get infinite weight; the clamp keeps it finite.
        weights = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        weights = weights / weights.sum()
        new = (weights[:, None] * pts).sum(dim=0)
        moved = (new - guess).norm()
        guess = new
        if moved < tol:
            break
    return guess.to(points.dtype)


def random_unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def uniform_unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Rows with i.i.d. uniform entries scaled to unit norm: the directions of dictionary_learning's
    default-initialised (Kaiming-uniform) decoders once normalised, whatever the uniform's bound."""
    w = torch.rand(n, d, generator=generator, dtype=torch.float64) * 2 - 1
    return (w / w.norm(dim=1, keepdim=True)).float()


@torch.no_grad()
def tied_unit_init_(
    sae: SAE,
    generator: torch.Generator,
    rows: Callable[[int, int, torch.Generator], torch.Tensor] = random_unit_rows,
) -> None:
    """Unit-norm random decoder rows drawn by `rows`, encoder = decoder transposed (dictionary_learning's
    TopK family: Gaussian directions for TopK, uniform ones for its BatchTopK and JumpReLU trainers)."""
    w = rows(sae.d_sae, sae.d_in, generator).to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.T)
