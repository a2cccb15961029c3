"""The TopK SAE (Gao et al. 2024), with dictionary_learning's AutoEncoderTopK/TopKTrainer semantics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from orthosae.errors import UserError
from orthosae.losses import reconstruction_loss
from orthosae.orthogonality import masked_activations
from orthosae.sae import kernels
from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import tied_unit_init_
from orthosae.sae.rule import Rule, zero_terms
from orthosae.train import distributed as ddp

if TYPE_CHECKING:
    from orthosae.train.config import TrainConfig


def sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j a_j · W_dec[idx_j] per token, touching only the k selected rows (no bias)."""
    return kernels.sparse_decode(top_acts, top_indices, W_dec)


class TopKSAE(SAE):
    arch = "topk"
    saelens_arch = "topk"
    threshold: torch.Tensor  # a registered buffer (typed here for checkers: nn.Module's getattr is loose)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        self.k = k
        # Inference threshold: EMA of the smallest kept activation; < 0 means "not tracked yet".
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=dtype, device=device))
        if generator is not None:
            tied_unit_init_(self, generator)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        top_acts, top_indices = pre.topk(self.k, dim=-1, sorted=False)
        x_hat = sparse_decode(top_acts, top_indices, self.W_dec) + self.b_dec
        return SAEOutput(x_hat=x_hat, latents=None, pre_acts=pre, top_acts=top_acts, top_indices=top_indices)

    def encode(self, x: torch.Tensor, use_threshold: bool = False) -> torch.Tensor:
        """Dense (B, d_sae) latents: the top k per token, or with `use_threshold` every latent above the
        learned threshold (a JumpReLU-style inference mode whose L0 varies per token)."""
        pre = self.pre_acts(x)
        if use_threshold:
            if float(self.threshold) < 0:
                raise ValueError("this SAE has no inference threshold yet (it is tracked after warm-up)")
            return pre * (pre > self.threshold)
        top_acts, top_indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top_indices, top_acts)

    def hyperparams(self) -> dict[str, object]:
        return {**super().hyperparams(), "k": self.k}

    def saelens_fields(self) -> dict[str, object]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}

    def state_cfg(self) -> dict[str, object]:
        # SAELens's TopKSAE refuses a `threshold` tensor, so the scalar lives in cfg.json (a float32 value
        # survives the JSON double exactly).
        return {"inference_threshold": float(self.threshold)}

    @torch.no_grad()
    def load_saved_(self, tensors: dict[str, torch.Tensor], cfg: dict[str, object]) -> None:
        super().load_saved_(tensors, cfg)
        value = cfg.get("inference_threshold", -1.0)  # absent: a TopK SAE written by another tool
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"cfg.json: 'inference_threshold' must be a finite number, found {value!r}")
        self.threshold.fill_(value)


@dataclass
class TopKPass:
    """What one training forward of a TopK SAE produces (the dense pre-activations are not kept)."""

    x_hat: torch.Tensor
    top_acts: torch.Tensor
    top_indices: torch.Tensor
    aux_acts: torch.Tensor | None  # (B, k_aux), 0 where the pick is not dead
    aux_indices: torch.Tensor | None
    dead: torch.Tensor
    l_orth: torch.Tensor | None  # the pairwise penalty when it was fused with the decode


class TopKRule(Rule):
    """Encoder GEMM outside autograd, top-k, AuxK picks, then autograd only over the m selected latents per
    token (sae.kernels): no B×n gradient and no host sync."""

    sae: TopKSAE

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss_terms(x, self.forward_pass(x))

    def running(self) -> list[torch.Tensor]:
        return [self.sae.threshold]

    def compile(self) -> None:
        # The forward and losses only: the backward runs through autograd either way, and the optimizer is
        # already one fused kernel per parameter.
        self.forward_pass = torch.compile(self.forward_pass)  # type: ignore[method-assign]
        self.loss_terms = torch.compile(self.loss_terms)  # type: ignore[method-assign]

    def forward_pass(self, x: torch.Tensor) -> TopKPass:
        cfg, sae, host = self.cfg, self.sae, self.host
        k = sae.k
        gemm_dtype = torch.bfloat16 if cfg.bf16_encoder else None
        pre = kernels.encoder_pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec, gemm_dtype)
        top_idx = pre.topk(k, dim=-1, sorted=False).indices
        host.track_firing(top_idx, x.shape[0])
        host.tokens_bound += x.shape[0] * host.world
        dead = host.tokens_since_fired >= cfg.dead_tokens
        aux_idx = valid = None
        idx = top_idx
        if cfg.auxk_alpha > 0 and host.tokens_bound >= cfg.dead_tokens:
            aux_idx, valid = kernels.auxk_indices(pre, dead, host.k_aux)
            idx = torch.cat([top_idx, aux_idx], dim=1)
        dense = kernels.use_dense_backward(cfg.kernel, sae.d_sae, idx.shape[1])
        vals = kernels.gather_pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec, pre, idx, dense=dense)
        del pre
        acts = vals[:, :k]
        aux_acts = None
        if aux_idx is not None and valid is not None:
            aux_acts = torch.where(valid, vals[:, k:], torch.zeros_like(vals[:, k:]))
        l_orth = None
        if fused_orth(self.cfg):
            host.update_ema(acts, top_idx)
            masked = masked_activations(
                acts, top_idx, host.ema_mean, cfg.orth_threshold_ratio, cfg.orth_coactivation
            )
            decoded, l_orth = kernels.decode_pairwise(acts, top_idx, masked, sae.W_dec)
        else:
            decoded = sparse_decode(acts, top_idx, sae.W_dec)
        return TopKPass(decoded + sae.b_dec, acts, top_idx, aux_acts, aux_idx, dead, l_orth)

    def loss_terms(self, x: torch.Tensor, p: TopKPass) -> dict[str, torch.Tensor]:
        cfg, host = self.cfg, self.host
        terms = zero_terms(x)
        recon = terms["recon"] = reconstruction_loss(x, p.x_hat)
        self.track_threshold(p.top_acts)
        if p.aux_acts is not None and p.aux_indices is not None:
            aux = host.auxk(x, p.x_hat, p.aux_acts, p.aux_indices, p.dead)
            terms["auxk"], terms["auxk_weighted"] = aux, cfg.auxk_alpha * aux
        if p.l_orth is not None:
            terms["orth"], terms["orth_scaled"] = host.scale_orth(p.l_orth, recon)
        elif cfg.penalty_kind() != "none":
            terms["orth"], terms["orth_scaled"] = host.penalty(p.top_acts, p.top_indices, recon)
        terms["l0"] = (p.top_acts > 0).sum(dim=-1).float().mean()
        terms["dead_frac"] = p.dead.float().mean()
        return terms

    @torch.no_grad()
    def track_threshold(self, acts: torch.Tensor) -> None:
        """EMA of the per-token smallest positive kept activation, for threshold-mode inference."""
        if self.host.step_idx < self.cfg.resolved_threshold_start():
            return
        positive = torch.where(acts > 0, acts, torch.full_like(acts, math.inf))
        mins = positive.min(dim=-1).values
        # Mean over the tokens with a positive activation, without indexing by a data-dependent mask.
        finite = torch.isfinite(mins)
        count = finite.sum()
        total = torch.where(finite, mins, torch.zeros_like(mins)).sum()
        ranks = self.host.ranks
        if ranks is not None:  # the mean over the global batch's tokens
            both = ddp.all_reduce_sum_(torch.stack([total, count.to(total.dtype)]), ranks)
            total, count = both[0], both[1].round().long()
        current = total / count.clamp_min(1)
        thr = self.sae.threshold
        beta = self.cfg.threshold_beta
        new = torch.where(thr < 0, current, beta * thr + (1 - beta) * current)
        thr.copy_(torch.where(count > 0, new, thr))  # no positive activation at all: keep it


def fused_orth(cfg: TrainConfig) -> bool:
    """Decode and pairwise penalty on decoder rows from one row gather (opt-in: see orth_share_gather)."""
    pairwise_dec = cfg.orth_method == "pairwise" and cfg.orth_weight == "decoder"
    return cfg.penalty_kind() == "coactive" and cfg.orth_share_gather and pairwise_dec
