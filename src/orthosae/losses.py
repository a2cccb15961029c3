"""Loss terms as pure functions. Shapes: x, x_hat (B, d); latents (B, n); W_dec (n, d)."""

from __future__ import annotations

import torch

from orthosae.sae.topk import sparse_decode


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the model dimension, averaged over tokens (dictionary_learning's l2)."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()


def l1_penalty(latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i·‖W_dec[i]‖ averaged over tokens: L1 that a shrinking decoder row cannot dodge."""
    return (latents * W_dec.norm(dim=1)).sum(dim=-1).mean()


def auxk_loss(
    residual: torch.Tensor, pre_acts: torch.Tensor, dead: torch.Tensor, k_aux: int, W_dec: torch.Tensor
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, App. A.2): reconstruct the main residual from the top-k_aux dead latents.

    `residual` = x − x_hat, detached. The loss is normalised by the residual's variance about its batch
    mean, as the OpenAI and dictionary_learning implementations do, and is 0 when no latent is dead.
    Dead latents that are not selected, and selections beyond the number of dead latents, get weight 0.
    """
    k_aux = min(k_aux, pre_acts.shape[-1])
    masked = pre_acts.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    return auxk_loss_from_acts(residual, vals, idx, W_dec, dead.any())


def auxk_loss_from_acts(
    residual: torch.Tensor,
    aux_acts: torch.Tensor,
    aux_indices: torch.Tensor,
    W_dec: torch.Tensor,
    any_dead: torch.Tensor,
    denom: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK from already selected dead-latent activations (B, k_aux), 0 where a pick is not dead.

    `any_dead` is a 0-dim bool tensor: multiplying by it (instead of branching) keeps the step sync-free.
    `denom` replaces the residual's variance about its batch mean, when the batch is split across
    processes and the variance must be the whole batch's.
    """
    aux_hat = sparse_decode(aux_acts, aux_indices, W_dec)  # no bias: it explains the residual, not x
    err = (residual - aux_hat).pow(2).sum(dim=-1).mean()
    if denom is None:
        denom = (residual - residual.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()
    return (err / denom).nan_to_num(0.0) * any_dead


def scaled_orthogonality(
    l_orth: torch.Tensor, l_recon: torch.Tensor, l_orth_init: torch.Tensor, lam: float
) -> torch.Tensor:
    """λ·(L_recon.detach()/L_orth_init)·L_orth: the penalty in units of the current reconstruction loss.

    Zero until a non-zero L_orth_init exists.
    """
    ratio = l_recon.detach() / torch.where(l_orth_init > 0, l_orth_init, torch.ones_like(l_orth_init))
    return torch.where(l_orth_init > 0, lam * ratio * l_orth, torch.zeros_like(l_orth))
