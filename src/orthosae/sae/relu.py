"""The standard SAE: ReLU encoder, L1 on latents weighted by decoder row norms (Anthropic's April 2024
update, dictionary_learning's StandardTrainerAprilUpdate). Decoder norms are left free."""

from __future__ import annotations

import torch

from orthosae.losses import l1_penalty, reconstruction_loss
from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import random_unit_rows
from orthosae.sae.rule import Rule, padded_codes, zero_terms


class ReLUSAE(SAE):
    arch = "relu"
    saelens_arch = "standard"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        init_norm: float = 0.1,
    ):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        if generator is not None:
            w = (random_unit_rows(d_sae, d_in, generator) * init_norm).to(device=device, dtype=dtype)
            with torch.no_grad():
                self.W_dec.copy_(w)
                self.W_enc.copy_(w.T)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        f = self.pre_acts(x)
        return SAEOutput(x_hat=self.decode(f), latents=f, pre_acts=f)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x)


class ReLURule(Rule):
    """Dense autograd forward; the co-active entries of a token for the penalty are its non-zero latents."""

    median_init = False
    unit_decoder = False

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, host = self.cfg, self.host
        out = self.sae(x)
        f = out.latents
        assert f is not None
        terms = zero_terms(x)
        recon = terms["recon"] = reconstruction_loss(x, out.x_hat)
        terms["l1"] = l1_penalty(f, self.sae.W_dec)
        terms["l1_weighted"] = cfg.l1 * terms["l1"]
        if cfg.penalty_kind() != "none":
            idx = padded_codes(f.detach() > 0)
            terms["orth"], terms["orth_scaled"] = host.penalty(f.gather(1, idx), idx, recon, ragged=True)
        host.mark_fired((f > 0).any(dim=0), x.shape[0])
        terms["l0"] = (f > 0).sum(dim=-1).float().mean()
        terms["dead_frac"] = (host.tokens_since_fired >= cfg.dead_tokens).float().mean()
        return terms
