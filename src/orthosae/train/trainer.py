"""One SAE, its optimizer and its running statistics; `step(x)` is one optimizer step.

The loop that feeds batches lives in `train.loop`, so that several trainers can share one activation
stream (sweeps).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from orthosae.allocator import keep_freed_memory
from orthosae.errors import UserError
from orthosae.losses import auxk_loss_from_acts, ortsae_penalty, scaled_orthogonality
from orthosae.orthogonality import orthogonality_penalty, ragged_groups
from orthosae.sae.archs import ARCHS
from orthosae.sae.archs import build_sae as build_sae
from orthosae.sae.base import SAE, stored_transposed
from orthosae.sae.init import geometric_median
from orthosae.sae.rule import LOSS_TERMS
from orthosae.train import distributed as ddp
from orthosae.train.config import TrainConfig
from orthosae.train.distributed import Ranks
from orthosae.train.schedule import lr_multiplier


def adam(
    params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one: one pass over each parameter instead of the
    ~10 elementwise passes of the foreach version (4x faster at d=576, n=4608 on the 2-core CPU; the update
    is the same formula, differing in the last bit)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # a device without a fused Adam kernel
        return torch.optim.Adam(params, lr=lr, betas=betas)


def optimizer_views(sae: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(what Adam updates, the parameter) pairs: the parameter itself, or for W_enc, stored transposed (see
    SAE), a row-major Parameter over the same memory, whose gradient is W_enc.grad.T (a view, no copy).

    torch's fused Adam copies a non-contiguous parameter to a contiguous one and back every step (a
    transposed copy of the whole matrix: 60 ms at d_in=2304, d_sae=16384 on a 2-core CPU); Adam is
    elementwise, so updating the memory-order view is the same update."""
    pairs = []
    for p in sae.parameters():
        if stored_transposed(p):
            pairs.append((torch.nn.Parameter(p.detach().T, requires_grad=p.requires_grad), p))
        else:
            pairs.append((p, p))
    return pairs


def _transpose_moments(optimizer: dict[str, Any], transposed: list[bool]) -> dict[str, Any]:
    """An optimizer state from before W_enc was stored feature-major, with that parameter's moments turned
    into the memory-order view's shape."""
    state = {
        index: {
            key: value.T.contiguous() if transposed[index] and key in ("exp_avg", "exp_avg_sq") else value
            for key, value in entry.items()
        }
        for index, entry in optimizer["state"].items()
    }
    return {**optimizer, "state": state}


def match_layouts_(opt: torch.optim.Optimizer) -> None:
    """Give every gradient and Adam moment its parameter's memory layout (W_enc is stored transposed).

    The fused Adam kernel walks parameter, gradient and moments as flat memory, so a mismatch would pair
    wrong elements without any error. Autograd and our kernels already produce matching gradients and this
    is a metadata check then; checkpoints store the moments row-major, and those are copied here."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
            state = opt.state.get(p, {})
            for key, value in state.items():
                moment = isinstance(value, torch.Tensor) and value.shape == p.shape
                if moment and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


class Trainer:
    """With `ranks` (a data-parallel run), `step` takes this rank's equal share of the global batch and
    every rank ends the step with the same parameters and statistics as one process given the whole batch.

    What differs between architectures lives in the architecture's `Rule` (orthosae.sae.rule); this class
    never branches on the architecture. It is the rules' `Host`: firing statistics, AuxK, the penalties.
    """

    def __init__(self, cfg: TrainConfig, d_in: int, ranks: Ranks | None = None):
        self.cfg = cfg
        self.ranks = ranks
        self.world = ranks.world if ranks is not None else 1
        if cfg.cpu_allocator == "reuse" and torch.device(cfg.device).type == "cpu":
            keep_freed_memory()  # before the first large tensor: see orthosae.allocator
        self.sae = build_sae(cfg, d_in)
        self.rule = ARCHS[cfg.arch].rule(self.sae, self)
        self.optimized = optimizer_views(self.sae)
        self.opt = adam([view for view, _ in self.optimized], cfg.resolved_lr(), self.rule.betas)
        fn = lr_multiplier(cfg.steps, cfg.resolved_warmup(), cfg.decay_start)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda=fn)
        n, dev = cfg.d_sae, cfg.device
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        self.tokens_since_fired = torch.zeros(n, dtype=torch.long, device=dev)
        self.ema_mean = torch.zeros(n, device=dev)  # μ of the orthogonality mask
        self.l_orth_init = torch.zeros((), device=dev)  # first non-zero L_orth, 0 until seen
        # OrtSAE's chunks: a generator of its own, saved in checkpoints, so resuming draws the same chunks.
        self.chunk_gen = torch.Generator().manual_seed(cfg.seed)
        # Inputs are divided by this (TrainConfig.normalize_activations); None until the first batch sets it.
        self.norm_factor: float | None = None if cfg.resolved_normalize() else 1.0
        self.step_idx = 0
        self.skipped = 0  # batches dropped for a non-finite loss
        # Host-side upper bound on every tokens_since_fired entry: while it is below dead_tokens no latent
        # can be dead, so AuxK is provably 0 and is skipped without reading the device.
        self.tokens_bound = 0
        if cfg.compile:
            self.rule.compile()

    def step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on a (B, d_in) batch. Returns detached 0-dim tensors (no host sync, except
        for architectures whose per-token latent count varies: see sae.rule.padded_codes)."""
        cfg, sae, rule = self.cfg, self.sae, self.rule
        if self.norm_factor is None:
            self.norm_factor = self._measure_norm(x)
        if self.norm_factor != 1.0:
            x = x / self.norm_factor
        if self.step_idx == 0 and rule.median_init:
            with torch.no_grad():
                first = x if self.ranks is None else ddp.all_gather_rows(x, self.ranks)
                sae.b_dec.copy_(geometric_median(first))
        guard = cfg.max_skipped_batches > 0
        saved = self._running_state() if guard else None
        terms = rule.terms(x)
        loss = sum(terms[name] for name in LOSS_TERMS if name in terms)
        assert isinstance(loss, torch.Tensor)
        if saved is not None and not self._all_finite(loss):
            return self._skip(saved, terms, loss)

        sae.zero_grad(set_to_none=True)
        loss.backward()
        if self.ranks is not None:
            ddp.average_gradients_(list(sae.parameters()), self.ranks)
        if rule.unit_decoder:
            sae.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self._grads_to_optimizer()
        self.opt.step()
        self.sched.step()
        if rule.unit_decoder:
            sae.normalize_decoder_()
        self.step_idx += 1
        terms["loss"] = loss
        terms["skipped"] = torch.zeros((), device=loss.device)
        stats = {name: t.detach() for name, t in terms.items()}
        if self.norm_factor != 1.0:  # log the reconstruction error in the activations' own units
            stats["recon"] = stats["recon"] * self.norm_factor**2
        return stats

    @torch.no_grad()
    def _measure_norm(self, x: torch.Tensor) -> float:
        """sqrt of the mean squared norm of the first (global) batch: dividing by it gives unit mean
        squared norm. dictionary_learning averages 100 batches; one batch of thousands of tokens is within
        a few per cent, and needs no look-ahead in a stream."""
        rows = x if self.ranks is None else ddp.all_gather_rows(x, self.ranks, "measuring the input norm")
        factor = float(rows.double().pow(2).sum(dim=-1).mean().sqrt())
        if not (math.isfinite(factor) and factor > 0):
            raise UserError(
                f"the first batch's root mean squared norm is {factor}, so activations cannot be normalised; "
                "check the data for NaNs or zeros, or pass --no-normalize-activations"
            )
        return factor

    def trained_sae(self) -> SAE:
        """The SAE as it is saved: taking raw activations (the normalisation factor folded in)."""
        if self.norm_factor in (None, 1.0):
            return self.sae
        sae = copy.deepcopy(self.sae)
        sae.scale_input_(self.norm_factor)
        return sae

    def _grads_to_optimizer(self) -> None:
        """Hand W_enc's gradient to the row-major view Adam updates (see optimizer_views), then check that
        every gradient and moment has its parameter's layout."""
        for view, param in self.optimized:
            if view is not param:
                if view.data_ptr() != param.data_ptr() or view.dtype != param.dtype:
                    view.data = param.detach().T  # the module was moved or cast (sae.double(), .to())
                view.grad = None if param.grad is None else param.grad.T
        match_layouts_(self.opt)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (all must skip the same batches)."""
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.ranks is not None:
            finite = ddp.all_reduce_sum_(finite, self.ranks) == self.world
        return bool(finite)

    def _running_state(self) -> list[torch.Tensor]:
        """Copies of the statistics a forward pass updates, to restore if the batch is skipped."""
        state = [self.tokens_since_fired, self.ema_mean, self.l_orth_init, *self.rule.running()]
        return [t.clone() for t in state]

    def _skip(self, saved: list[torch.Tensor], terms: dict[str, torch.Tensor], loss: torch.Tensor):
        self.skipped += 1
        if self.skipped > self.cfg.max_skipped_batches:
            raise UserError(
                f"loss was {float(loss.detach())} on {self.skipped} batches, more than --max-skipped-batches "
                f"{self.cfg.max_skipped_batches}; stopping without saving; check the data or lower --lr"
            )
        # The bound may stay high; OrtSAE's generator moves on (a skipped batch draws other chunks next).
        current = [self.tokens_since_fired, self.ema_mean, self.l_orth_init, *self.rule.running()]
        with torch.no_grad():
            for dst, src in zip(current, saved, strict=True):
                dst.copy_(src)
        # Keep the statistics finite for logging; `skipped` tells the batch apart.
        stats = {name: torch.zeros_like(t.detach()) for name, t in terms.items()}
        stats["loss"] = torch.zeros((), device=loss.device)
        stats["skipped"] = torch.ones((), device=loss.device)
        return stats

    @torch.no_grad()
    def track_firing(self, idx: torch.Tensor, batch: int) -> None:
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[idx.flatten()] = True
        self.mark_fired(fired, batch)

    @torch.no_grad()
    def mark_fired(self, fired: torch.Tensor, batch: int) -> None:
        """Count `batch` tokens per rank; reset the latents that fired (on any rank: a MAX of the masks)."""
        if self.ranks is not None:
            fired = ddp.all_reduce_max_(fired.to(torch.uint8), self.ranks).bool()
        self.tokens_since_fired += batch * self.world
        self.tokens_since_fired.masked_fill_(fired, 0)  # masked_fill: boolean indexing would sync on GPU

    def auxk(
        self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor, idx: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """AuxK on the picks of `acts` (0 where a pick is not dead), against the residual x − x̂."""
        residual = (x - x_hat).detach()
        denom = None if self.ranks is None else self._global_variance(residual)
        return auxk_loss_from_acts(residual, acts, idx, self.sae.W_dec, dead.any(), denom)

    @torch.no_grad()
    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """The minimum over ranks (this rank's value when training alone)."""
        if self.ranks is None:
            return t
        return -ddp.all_reduce_max_(-t, self.ranks)

    @torch.no_grad()
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a statistic (this rank's value when training alone)."""
        if self.ranks is None:
            return t
        return ddp.all_reduce_mean_(t.clone(), self.ranks)

    @torch.no_grad()
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped `t`, concatenated along dim 0 in rank order."""
        if self.ranks is None:
            return t
        return ddp.all_gather_rows(t, self.ranks, "gathering the batch-wide selection")

    def penalty(
        self, acts: torch.Tensor, idx: torch.Tensor, recon: torch.Tensor, ragged: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, weighted) orthogonality penalty for the sparse codes `acts`/`idx` (B, m), padding at 0;
        `ragged`: tokens have different counts (padded to the largest), so the penalty runs on groups of
        tokens with similar counts (orthogonality.ragged_groups)."""
        if self.cfg.penalty_kind() == "ortsae":
            return self._ortsae()
        return self._orthogonality(acts, idx, recon, ragged)

    def _ortsae(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, sae = self.cfg, self.sae
        weight = sae.W_dec if cfg.orth_weight == "decoder" else sae.W_enc.T
        perm = torch.randperm(cfg.d_sae, generator=self.chunk_gen).to(weight.device)
        l_orth = ortsae_penalty(weight, perm, cfg.resolved_ortsae_chunks(), cfg.ortsae_exponent)
        return l_orth, cfg.ortsae_weight * l_orth

    @torch.no_grad()
    def _global_variance(self, residual: torch.Tensor) -> torch.Tensor:
        """AuxK's denominator over the global batch: Σ‖r − mean‖²/B with the global mean (two all-reduces)."""
        assert self.ranks is not None
        total = self.world * residual.shape[0]
        mean = ddp.all_reduce_sum_(residual.sum(dim=0, keepdim=True), self.ranks) / total
        return ddp.all_reduce_sum_((residual - mean).pow(2).sum(), self.ranks) / total

    def _orthogonality(
        self, acts: torch.Tensor, idx: torch.Tensor, recon: torch.Tensor, ragged: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, sae = self.cfg, self.sae
        self.update_ema(acts, idx)
        weight = sae.W_dec if cfg.orth_weight == "decoder" else sae.W_enc.T
        groups = (ragged_groups(acts, idx) if ragged else None) or [(acts, idx)]
        parts = [
            orthogonality_penalty(
                a,
                i,
                weight,
                self.ema_mean,
                threshold_ratio=cfg.orth_threshold_ratio,
                coactivation=cfg.orth_coactivation,
                method=cfg.orth_method,
            )
            for a, i in groups
        ]
        l_orth = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        return self.scale_orth(l_orth, recon)

    @torch.no_grad()
    def update_ema(self, acts: torch.Tensor, idx: torch.Tensor) -> None:
        """μ ← decay·μ + (1−decay)·mean_b f_b, before the mask (DESIGN §2)."""
        decay = self.cfg.orth_ema_decay
        scale = (1 - decay) / (len(acts) * self.world)
        if self.ranks is not None:  # the mean over the global batch: sum the ranks' contributions first
            step = torch.zeros_like(self.ema_mean).index_add_(
                0, idx.flatten(), acts.detach().flatten() * scale
            )
            self.ema_mean.mul_(decay).add_(ddp.all_reduce_sum_(step, self.ranks))
            return
        self.ema_mean.mul_(decay)
        self.ema_mean.index_add_(0, idx.flatten(), acts.detach().flatten() * scale)

    def scale_orth(self, l_orth: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = l_orth.detach()
        if self.ranks is not None:
            # L_orth is a sum over tokens, not a mean: the global value is the ranks' sum. Scaling this
            # rank's share by the world size makes the mean over ranks (what gradient averaging and the
            # logged metrics take) equal the global L_orth, and L_recon's global value is the ranks' mean.
            both = ddp.all_reduce_sum_(torch.stack([total, recon.detach()]), self.ranks)
            total, recon = both[0], both[1] / self.world
            l_orth = l_orth * self.world
        with torch.no_grad():
            first = (self.l_orth_init == 0) & (total > 0)
            self.l_orth_init.copy_(torch.where(first, total, self.l_orth_init))
        return l_orth, scaled_orthogonality(l_orth, recon, self.l_orth_init, self.cfg.orth_lambda)

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the data position and RNG states.

        A deep copy: torch's optimizer may otherwise share moment tensors with whoever loads it.
        """
        return copy.deepcopy(
            {
                "sae": self.sae.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "tokens_since_fired": self.tokens_since_fired.clone(),
                "ema_mean": self.ema_mean.clone(),
                "l_orth_init": self.l_orth_init.clone(),
                "moments": "memory-order",  # see optimizer_views
                "step": self.step_idx,
                "skipped": self.skipped,
                "tokens_bound": self.tokens_bound,
                "chunk_rng": self.chunk_gen.get_state(),
                "norm_factor": self.norm_factor,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        optimizer = state["optimizer"]
        if state.get("moments") != "memory-order":  # written before W_enc was stored feature-major
            optimizer = _transpose_moments(optimizer, [view is not p for view, p in self.optimized])
        self.opt.load_state_dict(optimizer)
        match_layouts_(self.opt)
        self.sched.load_state_dict(state["scheduler"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.ema_mean.copy_(state["ema_mean"])
        self.l_orth_init.copy_(state["l_orth_init"])
        self.step_idx = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        # Older states lack the bound: assume latents may be dead, so AuxK is always computed (exact).
        self.tokens_bound = int(state.get("tokens_bound", self.cfg.dead_tokens))
        # A state from before normalisation existed was trained on raw activations.
        self.norm_factor = state.get("norm_factor", 1.0)
        if "chunk_rng" in state:
            self.chunk_gen.set_state(state["chunk_rng"])
