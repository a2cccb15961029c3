"""What every SAE shares: SAELens-layout parameters and the decoder-norm bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def stored_transposed(t: torch.Tensor) -> bool:
    """A 2-D tensor whose memory is its transpose's row-major block: how SAE stores W_enc."""
    return t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous()


@dataclass
class SAEOutput:
    """One forward pass. `top_acts`/`top_indices` are (B, k) for TopK; for the others they are None."""

    x_hat: torch.Tensor
    latents: torch.Tensor | None  # dense (B, d_sae) latents, where the architecture computes them
    pre_acts: torch.Tensor  # post-ReLU encoder output before any selection, (B, d_sae)
    top_acts: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None


class SAE(nn.Module):
    """Parameters named and laid out as SAELens does: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec.

    The input is centred by b_dec before encoding (dictionary_learning's and SAELens's
    apply_b_dec_to_input), and b_dec is added back after decoding.

    W_enc is stored feature-major: its memory is a (d_sae, d_in) row-major block seen through a transpose.
    The sparse encoder backward forms its gradient one feature row at a time, so the gradient then has the
    parameter's own layout and autograd keeps it as is, instead of a transposed copy of the whole matrix
    each step (47-60 ms at d_in=2304, d_sae=16384 on a 2-core CPU). Saved files hold the usual row-major
    (d_in, d_sae) tensor.
    """

    arch: str = ""
    saelens_arch: str = ""  # the SAELens inference class that computes the same function (cfg.json)
    apply_b_dec_to_input: bool = True  # centre the input by b_dec before encoding

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_in, **kw).T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU of the encoder pre-activations, (B, d_sae)."""
        centred = x - self.b_dec if self.apply_b_dec_to_input else x
        return torch.relu(centred @ self.W_enc + self.b_enc)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Dense decode of (B, d_sae) latents."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).x_hat

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project every decoder row back onto the unit sphere."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient along that row.

        With unit-norm rows, that component would only change the norm, which the projection after the
        step undoes anyway; removing it keeps Adam's moments from accumulating it.
        """
        W, grad = self.W_dec, self.W_dec.grad
        if grad is None:
            return
        # g −= (g·w / ‖w‖²) w in three passes over the (n, d) rows and no (n, d) temporaries: the row dots
        # as a batched (1×d)(d×1) product, the update as one addcmul (4x faster at n=16384, d=2304 on CPU).
        sq_norm = torch.linalg.vector_norm(W, dim=1).clamp_min(1e-6).square()
        dots = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).view(-1)
        grad.addcmul_(W, (dots / sq_norm).unsqueeze(1), value=-1)

    @torch.no_grad()
    def scale_input_(self, s: float) -> None:
        """Turn an SAE trained on x/s into one that takes x (dictionary_learning's scale_biases): biases and
        thresholds times s, so its codes and reconstructions are s times the trained SAE's on x/s (every
        architecture's encoder is positively homogeneous once its biases and thresholds scale with x)."""
        self.b_enc.mul_(s)
        self.b_dec.mul_(s)
        threshold = getattr(self, "threshold", None)
        if isinstance(threshold, torch.Tensor):  # a value < 0 means "not tracked yet" and stays so
            threshold.copy_(torch.where(threshold >= 0, threshold * s, threshold))

    def hyperparams(self) -> dict[str, object]:
        """Architecture settings that cfg.json must hold to rebuild this module."""
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the weights file: the names and shapes of SAELens's `saelens_arch` class."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    def saelens_fields(self) -> dict[str, object]:
        """cfg.json keys that SAELens's config class for `saelens_arch` reads beyond the shared ones."""
        return {}

    def state_cfg(self) -> dict[str, object]:
        """State that SAELens's class has no tensor for, kept in cfg.json under keys SAELens ignores."""
        return {}

    @torch.no_grad()
    def load_saved_(self, tensors: dict[str, torch.Tensor], cfg: dict[str, object]) -> None:
        """Copy in what `saved_tensors` and `state_cfg` wrote (shapes and dtypes already checked)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(tensors[name])
