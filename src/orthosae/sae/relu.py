"""The standard SAE: ReLU encoder, L1 on latents weighted by decoder row norms (Anthropic's April 2024
update, dictionary_learning's StandardTrainerAprilUpdate). Decoder norms are left free."""

from __future__ import annotations

import torch

from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import random_unit_rows


class ReLUSAE(SAE):
    arch = "relu"

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
