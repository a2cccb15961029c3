"""The training interface every architecture implements, and what it may ask of the trainer.

An architecture module (topk, relu, batchtopk, matryoshka, jumprelu) holds its SAE class (init, inference
rule, SAELens name) and a `Rule`: the forward to sparse codes and the loss terms of one training step. The
trainer owns what all architectures share (optimizer, schedule, firing statistics, AuxK's dead mask, the
orthogonality penalties, data-parallel reductions) and offers it to the rules as a `Host`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from orthosae.sae.base import SAE
    from orthosae.train.config import TrainConfig
    from orthosae.train.distributed import Ranks

# Terms that enter the loss, in the order they are summed (kept fixed: the sum's rounding depends on it).
LOSS_TERMS: tuple[str, ...] = ("recon", "auxk_weighted", "l1_weighted", "orth_scaled", "sparsity_weighted")


class Host(Protocol):
    """What the trainer offers a rule (see train.trainer.Trainer)."""

    cfg: TrainConfig
    ranks: Ranks | None
    world: int
    step_idx: int
    tokens_bound: int
    tokens_since_fired: torch.Tensor
    ema_mean: torch.Tensor
    k_aux: int

    def mark_fired(self, fired: torch.Tensor, batch: int) -> None: ...

    def track_firing(self, idx: torch.Tensor, batch: int) -> None: ...

    def auxk(
        self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor, idx: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor: ...

    def penalty(
        self, acts: torch.Tensor, idx: torch.Tensor, recon: torch.Tensor, ragged: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update_ema(self, acts: torch.Tensor, idx: torch.Tensor) -> None: ...

    def scale_orth(self, l_orth: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...


class Rule:
    """One architecture's training step. `terms(x)` returns 0-dim tensors: at least every name in LOSS_TERMS
    it uses, plus "l0" and "dead_frac" for the logs; the trainer sums the LOSS_TERMS present."""

    median_init = True  # b_dec starts at the geometric median of the first batch
    unit_decoder = True  # decoder rows kept at unit norm (parallel gradient removed, rows re-projected)
    betas: tuple[float, float] = (0.9, 0.999)

    def __init__(self, sae: SAE, host: Host):
        self.sae, self.host, self.cfg = sae, host, host.cfg

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - per architecture
        raise NotImplementedError

    def running(self) -> list[torch.Tensor]:
        """Statistics a forward updates besides the trainer's own (restored when a batch is skipped)."""
        return []

    def compile(self) -> None:
        """torch.compile the forward and loss where it is worth it (TopK); others run eager."""


def zero_terms(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every logged term at 0, for a rule to fill in."""
    zero = x.new_zeros(())
    names = ("recon", "auxk", "auxk_weighted", "l1", "l1_weighted", "orth", "orth_scaled")
    return dict.fromkeys(names, zero)


@torch.no_grad()
def padded_codes(selected: torch.Tensor) -> torch.Tensor:
    """(B, m) latent ids covering every True of a (B, n) selection, m = the largest row count (at least 1).

    Rows with fewer selections are padded with unselected ids; ids within a row are distinct (a top-m of the
    0/1 mask), which the penalty's identity Σ_{i<j} C_ij S_ij = Σ_b Σ_{p<q} A_bp A_bq S needs. Reads m on
    the host: the one sync a variable-count architecture pays per step."""
    m = max(1, int(selected.sum(dim=1).max()))
    m = min(m, selected.shape[1])
    return selected.to(torch.float32).topk(m, dim=1, sorted=False).indices
