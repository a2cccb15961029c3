"""One SAE, its optimizer and its running statistics; `step(x)` is one optimizer step.

The loop that feeds batches lives in `train.loop`, so that several trainers can share one activation
stream (sweeps).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from orthosae.errors import UserError
from orthosae.losses import auxk_loss, l1_penalty, reconstruction_loss, scaled_orthogonality
from orthosae.orthogonality import orthogonality_penalty
from orthosae.sae import SAE, ReLUSAE, TopKSAE
from orthosae.sae.init import geometric_median
from orthosae.train.config import TrainConfig
from orthosae.train.schedule import lr_multiplier


def build_sae(cfg: TrainConfig, d_in: int) -> SAE:
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.arch == "topk":
        return TopKSAE(d_in, cfg.d_sae, cfg.k, generator=gen, device=cfg.device)
    return ReLUSAE(d_in, cfg.d_sae, generator=gen, device=cfg.device)


class Trainer:
    def __init__(self, cfg: TrainConfig, d_in: int):
        self.cfg = cfg
        self.sae = build_sae(cfg, d_in)
        self.is_topk = isinstance(self.sae, TopKSAE)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.resolved_lr(), betas=(0.9, 0.999))
        fn = lr_multiplier(cfg.steps, cfg.resolved_warmup(), cfg.decay_start)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda=fn)
        n, dev = cfg.d_sae, cfg.device
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        self.tokens_since_fired = torch.zeros(n, dtype=torch.long, device=dev)
        self.ema_mean = torch.zeros(n, device=dev)  # μ of the orthogonality mask
        self.l_orth_init = torch.zeros((), device=dev)  # first non-zero L_orth, 0 until seen
        self.step_idx = 0
        self.skipped = 0  # batches dropped for a non-finite loss

    def step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on a (B, d_in) batch. Returns detached 0-dim tensors (no host sync)."""
        cfg, sae = self.cfg, self.sae
        if self.step_idx == 0 and self.is_topk:
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(x))
        guard = cfg.max_skipped_batches > 0
        saved = self._running_state() if guard else None
        out = sae(x)
        terms = self._loss_terms(x, out)
        loss = sum(terms[name] for name in ("recon", "auxk_weighted", "l1_weighted", "orth_scaled"))
        assert isinstance(loss, torch.Tensor)
        if saved is not None and not bool(torch.isfinite(loss)):
            return self._skip(saved, terms, loss)

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.is_topk:
            sae.remove_parallel_grad_()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.is_topk:
            sae.normalize_decoder_()
        self.step_idx += 1
        terms["loss"] = loss
        terms["skipped"] = torch.zeros((), device=loss.device)
        return {name: t.detach() for name, t in terms.items()}

    def _running_state(self) -> list[torch.Tensor]:
        """Copies of the statistics a forward pass updates, to restore if the batch is skipped."""
        state = [self.tokens_since_fired, self.ema_mean, self.l_orth_init]
        if isinstance(self.sae, TopKSAE):
            state.append(self.sae.threshold)
        return [t.clone() for t in state]

    def _skip(self, saved: list[torch.Tensor], terms: dict[str, torch.Tensor], loss: torch.Tensor):
        self.skipped += 1
        if self.skipped > self.cfg.max_skipped_batches:
            raise UserError(
                f"loss was {float(loss)} on {self.skipped} batches, more than --max-skipped-batches "
                f"{self.cfg.max_skipped_batches}; stopping without saving; check the data or lower --lr"
            )
        current = [self.tokens_since_fired, self.ema_mean, self.l_orth_init]
        if isinstance(self.sae, TopKSAE):
            current.append(self.sae.threshold)
        with torch.no_grad():
            for dst, src in zip(current, saved, strict=True):
                dst.copy_(src)
        # Keep the statistics finite for logging; `skipped` tells the batch apart.
        stats = {name: torch.zeros_like(t.detach()) for name, t in terms.items()}
        stats["loss"] = torch.zeros((), device=loss.device)
        stats["skipped"] = torch.ones((), device=loss.device)
        return stats

    def _loss_terms(self, x: torch.Tensor, out: Any) -> dict[str, torch.Tensor]:
        cfg, sae = self.cfg, self.sae
        zero = x.new_zeros(())
        recon = reconstruction_loss(x, out.x_hat)
        terms = {"recon": recon, "auxk": zero, "auxk_weighted": zero, "l1": zero, "l1_weighted": zero}
        terms["orth"], terms["orth_scaled"] = zero, zero
        if self.is_topk:
            acts, idx = out.top_acts, out.top_indices
            self._track_firing(idx, x.shape[0])
            self._track_threshold(acts)
            dead = self.tokens_since_fired >= cfg.dead_tokens
            # A host sync on CPU is free; skipping AuxK when nothing is dead saves a (B, n) top-k.
            if cfg.auxk_alpha > 0 and bool(dead.any()):
                aux = auxk_loss((x - out.x_hat).detach(), out.pre_acts, dead, self.k_aux, sae.W_dec)
                terms["auxk"], terms["auxk_weighted"] = aux, cfg.auxk_alpha * aux
            if cfg.orth:
                terms["orth"], terms["orth_scaled"] = self._orthogonality(acts, idx, recon)
            terms["l0"] = (acts > 0).sum(dim=-1).float().mean()
            terms["dead_frac"] = dead.float().mean()
        else:
            f = out.latents
            terms["l1"] = l1_penalty(f, sae.W_dec)
            terms["l1_weighted"] = cfg.l1 * terms["l1"]
            fired_idx = (f > 0).any(dim=0)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired_idx] = 0
            terms["l0"] = (f > 0).sum(dim=-1).float().mean()
            terms["dead_frac"] = (self.tokens_since_fired >= cfg.dead_tokens).float().mean()
        return terms

    @torch.no_grad()
    def _track_firing(self, idx: torch.Tensor, batch: int) -> None:
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[idx.flatten()] = True
        self.tokens_since_fired += batch
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def _track_threshold(self, acts: torch.Tensor) -> None:
        """EMA of the per-token smallest positive kept activation, for threshold-mode inference."""
        if self.step_idx < self.cfg.resolved_threshold_start():
            return
        assert isinstance(self.sae, TopKSAE)
        positive = torch.where(acts > 0, acts, torch.full_like(acts, math.inf))
        mins = positive.min(dim=-1).values
        mins = mins[torch.isfinite(mins)]
        if mins.numel() == 0:
            return
        current = mins.mean()
        thr = self.sae.threshold
        beta = self.cfg.threshold_beta
        thr.copy_(torch.where(thr < 0, current, beta * thr + (1 - beta) * current))

    def _orthogonality(
        self, acts: torch.Tensor, idx: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, sae = self.cfg, self.sae
        with torch.no_grad():  # μ ← decay·μ + (1−decay)·mean_b f_b, before the mask (DESIGN §2)
            self.ema_mean.mul_(cfg.orth_ema_decay)
            self.ema_mean.index_add_(
                0, idx.flatten(), acts.flatten() * ((1 - cfg.orth_ema_decay) / len(acts))
            )
        weight = sae.W_dec if cfg.orth_weight == "decoder" else sae.W_enc.T
        l_orth = orthogonality_penalty(
            acts,
            idx,
            weight,
            self.ema_mean,
            threshold_ratio=cfg.orth_threshold_ratio,
            coactivation=cfg.orth_coactivation,
            method=cfg.orth_method,
        )
        with torch.no_grad():
            first = (self.l_orth_init == 0) & (l_orth > 0)
            self.l_orth_init.copy_(torch.where(first, l_orth.detach(), self.l_orth_init))
        return l_orth, scaled_orthogonality(l_orth, recon, self.l_orth_init, cfg.orth_lambda)

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
                "step": self.step_idx,
            "skipped": self.skipped,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.ema_mean.copy_(state["ema_mean"])
        self.l_orth_init.copy_(state["l_orth_init"])
        self.step_idx = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
