"""Fold decoder norms into the encoder, so every latent's decoder row has unit norm (SAEBench's
`fold_W_dec_norm`, applied before sparse probing and unlearning).

A latent's value then measures how far the reconstruction moves along a unit direction, and latents of one
SAE (or of two SAEs) are comparable. For an SAE whose latent i is relu(pre_i) with pre_i linear in x,
scaling W_enc[:, i] and b_enc[i] by n_i = ‖W_dec[i]‖ and W_dec[i] by 1/n_i leaves the reconstruction
exactly unchanged (relu(n·a) = n·relu(a) for n > 0). A JumpReLU latent z·1[z > θ_i] stays exact when θ_i is
scaled with it. For TopK and the BatchTopK family the selection would change (it ranks the scaled
pre-activations, or compares them with one shared threshold), but their decoders are unit norm by
construction, so nothing is done there.
"""

from __future__ import annotations

import copy

import torch

from orthosae.sae import SAE

UNIT_NORM_TOL = 1e-3
RANKED = ("topk", "batchtopk", "matryoshka")  # selection compares latents: folding would change it


def decoder_norms(sae: SAE) -> torch.Tensor:
    return sae.W_dec.detach().float().norm(dim=1)


def needs_folding(sae: SAE, tol: float = UNIT_NORM_TOL) -> bool:
    """Are the decoder rows (of non-zero rows) off unit norm by more than `tol`?"""
    n = decoder_norms(sae)
    n = n[n > 0]
    return bool(n.numel()) and bool(((n - 1).abs() > tol).any())


@torch.no_grad()
def folded(sae: SAE) -> SAE:
    """A copy of `sae` with decoder norms folded into the encoder (the SAE itself is not changed).
    Rows of zero norm are left as they are (their latent never reaches the output)."""
    if getattr(sae, "arch", "") in RANKED or not needs_folding(sae):
        return sae
    out = copy.deepcopy(sae)
    n = decoder_norms(sae).to(out.W_dec.dtype)
    scale = torch.where(n > 0, n, torch.ones_like(n))
    out.W_enc.mul_(scale.unsqueeze(0))
    out.b_enc.mul_(scale)
    out.W_dec.div_(scale.unsqueeze(1))
    threshold = getattr(out, "threshold", None)
    if isinstance(threshold, torch.Tensor) and threshold.shape == scale.shape:  # JumpReLU's per-latent θ
        threshold.mul_(scale)
    return out


def fold_record(sae: SAE) -> dict[str, object]:
    """What the eval config records about folding."""
    n = decoder_norms(sae)
    did = getattr(sae, "arch", "") not in RANKED and needs_folding(sae)
    return {
        "decoder_norms_folded": did,
        "decoder_norm_min": float(n.min()) if n.numel() else None,
        "decoder_norm_max": float(n.max()) if n.numel() else None,
    }
