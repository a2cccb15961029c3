"""The BatchTopK SAE (Bussmann et al. 2024) with dictionary_learning's BatchTopKSAE/BatchTopKTrainer
semantics: the B·k largest activations of the whole batch are kept during training (a token keeps a
variable number of latents), and inference keeps every activation above a learned threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthosae.errors import UserError
from orthosae.losses import reconstruction_loss
from orthosae.sae import kernels
from orthosae.sae.base import SAE, SAEOutput
from orthosae.sae.init import tied_unit_init_, uniform_unit_rows
from orthosae.sae.rule import Host, Rule, padded_codes, zero_terms

CANDIDATES_PER_K = 4  # each token offers its 4·k largest to the batch-wide selection (see below)


@torch.no_grad()
def batch_topk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) bool: the B·k largest entries of the whole (B, n) batch (ties broken as torch.topk does).

    A top-(B·k) over all B·n entries costs most of a BatchTopK step on CPU, so the cutoff is found among
    fewer candidates: each row's m = 4·k largest, plus every entry of the rows whose m-th largest reaches
    the cutoff those give ("full" rows: high-norm tokens can win hundreds). That is exact: candidates only
    raise the cutoff, and a row that is not full has its m-th largest below it, so every entry at or above
    the cutoff was a candidate. A zero cutoff or a tie at it falls back to the full selection."""
    total = min(k * pre.shape[0], pre.numel())
    m = CANDIDATES_PER_K * k
    if m < pre.shape[1]:
        cand = pre.topk(m, dim=1, sorted=False).values
        cut = cand.reshape(-1).topk(total, sorted=False).values.min()
        full = cand.min(dim=1).values >= cut
        if bool(full.any()):
            pool = torch.cat([cand[~full].reshape(-1), pre[full].reshape(-1)])
            cut = pool.topk(total, sorted=False).values.min()
        if cut > 0:
            mask = pre >= cut
            if int(mask.sum()) == total:  # no tie at the cutoff
                return mask
    flat = pre.reshape(-1)
    picks = flat.topk(total, sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, picks, True).view_as(pre)


def global_batch_topk_mask(pre: torch.Tensor, k: int, host: Host) -> torch.Tensor:
    """batch_topk_mask over the global batch when each rank holds a slice of it: the entries at or above
    the global (B·k)-th largest value. That cutoff is the (B·k)-th largest of the union of every rank's own
    B·k largest, so only those travel. Zeros are never picked (one process may pick some when fewer than
    B·k are positive; they add nothing to the decode, the losses or the firing counts)."""
    if host.world == 1:
        return batch_topk_mask(pre, k)
    n = k * pre.shape[0] * host.world
    flat = pre.reshape(-1)
    local = flat.topk(min(n, flat.numel()), sorted=False).values
    cutoff = host.all_gather(local.contiguous()).topk(n, sorted=False).values.min()
    return (pre >= cutoff) & (pre > 0)


class BatchTopKSAE(SAE):
    arch = "batchtopk"
    saelens_arch = "jumprelu"  # SAELens too saves a BatchTopK SAE as JumpReLU with one threshold per latent
    threshold: torch.Tensor  # a registered buffer: < 0 until tracked

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
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=dtype, device=device))
        if generator is not None:
            # dictionary_learning: a default-initialised decoder with unit-norm rows, encoder = its transpose.
            tied_unit_init_(self, generator, uniform_unit_rows)

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Dense (B, d_sae) latents: every activation above the learned threshold (the inference rule), or
        the batch's B·k largest (the training rule, also used while no threshold has been tracked)."""
        pre = self.pre_acts(x)
        if use_threshold and float(self.threshold) >= 0:
            return pre * (pre > self.threshold)
        return pre * batch_topk_mask(pre, self.k)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        f = pre * (pre > self.threshold) if float(self.threshold) >= 0 else pre * batch_topk_mask(pre, self.k)
        return SAEOutput(x_hat=self.decode(f), latents=f, pre_acts=pre)

    def hyperparams(self) -> dict[str, object]:
        return {**super().hyperparams(), "k": self.k}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saved_tensors(), "threshold": self.threshold.expand(self.d_sae)}

    @torch.no_grad()
    def load_saved_(self, tensors: dict[str, torch.Tensor], cfg: dict[str, object]) -> None:
        super().load_saved_(tensors, cfg)
        per_latent = tensors["threshold"]
        if per_latent.numel() and not bool((per_latent == per_latent[0]).all()):
            raise UserError(
                f"a {self.arch} SAE has one inference threshold, but the file's per-latent thresholds "
                "differ; load it as a jumprelu SAE"
            )
        self.threshold.copy_(per_latent[0])


@dataclass
class BatchCodes:
    """A training forward's sparse codes, padded per token to the batch's largest count m."""

    acts: torch.Tensor  # (B, m), 0 at padding, with gradients to the encoder
    idx: torch.Tensor  # (B, m) distinct latent ids per token
    aux_acts: torch.Tensor | None
    aux_idx: torch.Tensor | None
    dead: torch.Tensor


class BatchTopKRule(Rule):
    """The encoder GEMM outside autograd, the batch top-k selection, then autograd over the selected
    latents only (the same sparse kernels as TopK), padded per token to the largest count in the batch."""

    sae: BatchTopKSAE

    def running(self) -> list[torch.Tensor]:
        return [self.sae.threshold]

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.codes(x)
        x_hat = kernels.sparse_decode(c.acts, c.idx, self.sae.W_dec) + self.sae.b_dec
        return self.common_terms(x, c, x_hat, reconstruction_loss(x, x_hat))

    def codes(self, x: torch.Tensor) -> BatchCodes:
        cfg, sae, host = self.cfg, self.sae, self.host
        pre = kernels.encoder_pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec)
        selected = global_batch_topk_mask(pre, sae.k, host)
        idx = padded_codes(selected)
        valid = selected.gather(1, idx)
        # dictionary_learning counts a latent as fired when its selected activations sum above 0.
        host.mark_fired((selected & (pre > 0)).any(dim=0), x.shape[0])
        host.tokens_bound += x.shape[0] * host.world
        dead = host.tokens_since_fired >= cfg.dead_tokens
        m = idx.shape[1]
        aux_idx = aux_valid = None
        all_idx = idx
        if cfg.auxk_alpha > 0 and host.tokens_bound >= cfg.dead_tokens:
            aux_idx, aux_valid = kernels.auxk_indices(pre, dead, host.k_aux)
            all_idx = torch.cat([idx, aux_idx], dim=1)
        dense = kernels.use_dense_backward(cfg.kernel, sae.d_sae, all_idx.shape[1])
        vals = kernels.gather_pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec, pre, all_idx, dense=dense)
        del pre
        acts = torch.where(valid, vals[:, :m], torch.zeros_like(vals[:, :m]))
        aux_acts = None
        if aux_idx is not None and aux_valid is not None:
            aux_acts = torch.where(aux_valid, vals[:, m:], torch.zeros_like(vals[:, m:]))
        return BatchCodes(acts, idx, aux_acts, aux_idx, dead)

    def common_terms(
        self, x: torch.Tensor, c: BatchCodes, x_hat: torch.Tensor, recon: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Every term but the reconstruction's definition (which Matryoshka changes)."""
        cfg, host = self.cfg, self.host
        terms = zero_terms(x)
        terms["recon"] = recon
        self.track_threshold(c.acts)
        if c.aux_acts is not None and c.aux_idx is not None:
            aux = host.auxk(x, x_hat, c.aux_acts, c.aux_idx, c.dead)
            terms["auxk"], terms["auxk_weighted"] = aux, cfg.auxk_alpha * aux
        if cfg.penalty_kind() != "none":
            terms["orth"], terms["orth_scaled"] = host.penalty(c.acts, c.idx, recon, ragged=True)
        terms["l0"] = (c.acts > 0).sum(dim=-1).float().mean()
        terms["dead_frac"] = c.dead.float().mean()
        return terms

    @torch.no_grad()
    def track_threshold(self, acts: torch.Tensor) -> None:
        """dictionary_learning's rule: after threshold_start_step (strictly), an EMA of the batch's smallest
        positive kept activation (0 when none is positive); the first value replaces the -1 placeholder."""
        if self.host.step_idx <= self.cfg.resolved_threshold_start():
            return
        positive = torch.where(acts > 0, acts.detach(), torch.full_like(acts, float("inf")))
        smallest = self.host.all_reduce_min(positive.min())
        current = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
        thr, beta = self.sae.threshold, self.cfg.threshold_beta
        thr.copy_(torch.where(thr < 0, current, beta * thr + (1 - beta) * current))
