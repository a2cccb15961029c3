"""The TopK SAE (Gao et al. 2024), with dictionary_learning's AutoEncoderTopK semantics."""

from __future__ import annotations

import torch

from orthosae.sae import kernels
from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import random_unit_rows


def sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j a_j · W_dec[idx_j] per token, touching only the k selected rows (no bias)."""
    return kernels.sparse_decode(top_acts, top_indices, W_dec)


class TopKSAE(SAE):
    arch = "topk"
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
            w = random_unit_rows(d_sae, d_in, generator).to(device=device, dtype=dtype)
            with torch.no_grad():
                self.W_dec.copy_(w)
                self.W_enc.copy_(w.T)  # encoder starts as the decoder's transpose

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
