"""The JumpReLU SAE (Rajamanoharan et al. 2024) with dictionary_learning's JumpReluAutoEncoder/
JumpReluTrainer semantics: f = z·1[z > θ] with a learned threshold θ per latent, straight-through
gradients for θ through a rectangle kernel of width `bandwidth`, and an L0 penalty
coef·(L0/target − 1)² that ramps in linearly over the sparsity warm-up. The input is not centred by b_dec.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orthosae.losses import reconstruction_loss
from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import tied_unit_init_, uniform_unit_rows
from orthosae.sae.rule import Rule, padded_codes, zero_terms

INIT_THRESHOLD = 0.001  # the paper's Appendix I, dictionary_learning's default


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """1 on the open interval (−½, ½), else 0: the kernel of the straight-through estimators."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z·1[z > θ]; dz = 1[z > θ]·g, dθ = −(θ/ε)·rect((z − θ)/ε)·g summed over tokens."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > theta).to(grad.dtype) * grad
        grad_theta = (-(theta / eps) * rectangle((z - theta) / eps) * grad).sum(dim=0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """1[z > θ]; no gradient to z, dθ = −(1/ε)·rect((z − θ)/ε)·g summed over tokens."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).sum(dim=0)
        return torch.zeros_like(z), grad_theta, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(z, theta, bandwidth)


def sparsity_loss(l0: torch.Tensor, target: float, coef: float, scale: float) -> torch.Tensor:
    """coef·(L0/target − 1)²·scale (dictionary_learning's JumpReluTrainer; the paper uses coef·L0)."""
    return coef * (l0 / target - 1).pow(2) * scale


def sparsity_scale(step_idx: int, warmup: int) -> float:
    """Linear ramp 0 → 1 over `warmup` steps (step 0 gives 0); no warm-up gives 1."""
    return 1.0 if warmup <= 0 else min(step_idx / warmup, 1.0)


class JumpReLUSAE(SAE):
    arch = "jumprelu"
    saelens_arch = "jumprelu"
    apply_b_dec_to_input = False

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        self.threshold = nn.Parameter(torch.full((d_sae,), INIT_THRESHOLD, dtype=dtype, device=device))
        if generator is not None:
            tied_unit_init_(self, generator, uniform_unit_rows)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(z·1[z > θ]) with z = x·W_enc + b_enc: the inference rule."""
        z = x @ self.W_enc + self.b_enc
        return torch.relu(z * (z > self.threshold))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        z = x @ self.W_enc + self.b_enc
        f = torch.relu(z * (z > self.threshold))
        return SAEOutput(x_hat=self.decode(f), latents=f, pre_acts=torch.relu(z))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saved_tensors(), "threshold": self.threshold}

    @torch.no_grad()
    def load_saved_(self, tensors: dict[str, torch.Tensor], cfg: dict[str, object]) -> None:
        super().load_saved_(tensors, cfg)
        self.threshold.copy_(tensors["threshold"])


class JumpReLURule(Rule):
    """Dense autograd forward as dictionary_learning trains it; no b_dec median init, no AuxK (dead latents
    are only counted), Adam with β1 = 0."""

    median_init = False
    betas = (0.0, 0.999)
    sae: JumpReLUSAE

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, sae, host = self.cfg, self.sae, self.host
        eps = cfg.jumprelu_bandwidth
        z = x @ sae.W_enc + sae.b_enc
        f = jumprelu(z, sae.threshold, eps)
        x_hat = f @ sae.W_dec + sae.b_dec
        terms = zero_terms(x)
        recon = terms["recon"] = reconstruction_loss(x, x_hat)
        # dictionary_learning feeds the step function the JumpReLU output f, not z (same value for θ ≥ 0).
        l0 = step(f, sae.threshold, eps).sum(dim=-1).mean()
        scale = sparsity_scale(host.step_idx, cfg.resolved_sparsity_warmup())
        terms["sparsity"] = l0
        # The penalty is a square of the global batch's L0: use that value, with this rank's gradient
        # (averaging the ranks' gradients then gives one process's gradient exactly).
        l0_global = l0 + (host.all_reduce_mean(l0.detach()) - l0.detach()) if host.world > 1 else l0
        target = cfg.resolved_target_l0()
        terms["sparsity_weighted"] = sparsity_loss(l0_global, target, cfg.jumprelu_sparsity, scale)
        if cfg.penalty_kind() != "none":
            idx = padded_codes(f.detach() != 0)
            terms["orth"], terms["orth_scaled"] = host.penalty(f.gather(1, idx), idx, recon, ragged=True)
        host.mark_fired(f.detach().sum(dim=0) > 0, x.shape[0])
        terms["l0"] = (f.detach() != 0).sum(dim=-1).float().mean()
        terms["dead_frac"] = (host.tokens_since_fired >= cfg.dead_tokens).float().mean()
        return terms
