"""Loss terms as pure functions. Shapes: x, x_hat (B, d); latents (B, n); W_dec (n, d)."""

from __future__ import annotations

import torch


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
    from orthosae.sae.kernels import sparse_decode  # here: the sae package's modules import this one

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


def ortsae_penalty(
    weight: torch.Tensor, perm: torch.Tensor, chunks: int, exponent: float, block_bytes: int = 64 * 2**20
) -> torch.Tensor:
    """OrtSAE's penalty (Korznikov et al. 2025): mean over features i of max_j |cos(w_i, w_j)|^exponent, the
    max taken over the other features of i's chunk when the permutation `perm` of the n rows of `weight`
    is split into `chunks` near-equal chunks (cost O(n²/chunks · d) instead of O(n² d)). A feature alone in
    its chunk contributes 0.

    The argmax is found without autograd, in row blocks of at most `block_bytes` of cosines; the value is
    then recomputed from the two rows of each maximising pair, which gives the max's exact gradient
    (torch's max backward also routes it to the one selected entry) with O(n·d) memory."""
    n = weight.shape[0]
    rows = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-8)
    partner = torch.full((n,), -1, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        detached = rows.detach()
        for ids in perm.tensor_split(chunks):
            size = ids.numel()
            if size < 2:
                continue
            members = detached[ids]
            step = max(1, block_bytes // (size * members.element_size()))
            for start in range(0, size, step):
                block = (members[start : start + step] @ members.T).abs_()
                own = torch.arange(start, start + block.shape[0], device=block.device)
                block[torch.arange(block.shape[0], device=block.device), own] = -1.0  # not itself
                partner[ids[start : start + step]] = ids[block.argmax(dim=1)]
    has = partner >= 0
    safe = torch.where(has, partner, torch.arange(n, device=weight.device))
    cos = (rows * rows[safe]).sum(dim=1).abs()
    return torch.where(has, cos.pow(exponent), torch.zeros_like(cos)).sum() / n
