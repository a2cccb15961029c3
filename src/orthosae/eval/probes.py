"""Linear probes shared by the evals: logistic regression (full-batch L-BFGS), an L1 probe for latent
selection, top-k selection by class-mean difference, and F1 / accuracy.

Everything is one-vs-rest binary: y is (N,) or (N, C) with entries in {0, 1}; C probes train at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LogisticProbe:
    """logits = ((x - mean) / std) @ weight + bias; weight (d, C), bias (C,). `squeeze` for 1-D labels."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    squeeze: bool = False

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = ((x.float() - self.mean) / self.std) @ self.weight + self.bias
        return out.squeeze(-1) if self.squeeze else out

    def direction(self) -> torch.Tensor:
        """Weights in the input space (what the logit is linear in): (C, d), or (d,) when squeezed."""
        w = (self.weight / self.std.unsqueeze(1)).T
        return w.squeeze(0) if self.squeeze else w


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the training set; constant features keep std 1 (they stay 0)."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def balanced_weights(y: torch.Tensor) -> torch.Tensor:
    """sklearn's class_weight='balanced' per sample and per probe: each class gets half the total weight."""
    n = y.shape[0]
    pos = y.sum(dim=0).clamp_min(1)
    neg = (n - y.sum(dim=0)).clamp_min(1)
    return torch.where(y > 0.5, n / (2 * pos), n / (2 * neg))


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float | None = None,
    balanced: bool = True,
    standardize: bool = True,
    max_iter: int = 200,
) -> LogisticProbe:
    """L2-regularised logistic regression by full-batch L-BFGS: mean (weighted) log-loss + l2/2·‖W‖².

    `l2` defaults to 1/N, sklearn's default C = 1 (its loss is the sum, ours the mean). Features are
    standardised with the training set's statistics, so one l2 suits any feature scale.
    """
    squeeze = y.dim() == 1
    y2 = (y.unsqueeze(1) if squeeze else y).float()
    x = x.float()
    mean, std = standardizer(x) if standardize else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    xs = (x - mean) / std
    n, d = xs.shape
    lam = 1.0 / n if l2 is None else l2
    sample_w = balanced_weights(y2) if balanced else torch.ones_like(y2)
    weight = torch.zeros(d, y2.shape[1], requires_grad=True)
    bias = torch.zeros(y2.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xs @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, y2, weight=sample_w, reduction="sum") / n
        loss = loss + 0.5 * lam * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(weight.detach(), bias.detach(), mean, std, squeeze)


def fit_sklearn_logistic(
    x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0, max_iter: int = 1000, tol: float = 1e-10
) -> LogisticProbe:
    """The minimiser of sklearn's LogisticRegression(penalty="l2", C=c) objective for 1-D labels,
    Σ log-loss + ‖w‖²/(2c) with the intercept unpenalised, on the raw features with unweighted samples
    (SAEBench's sparse-probing probe, there with c = 1), found by L-BFGS in float64 to a max-abs gradient
    of `tol` on the per-sample objective. Features are centred first: exact, since the unpenalised
    intercept absorbs the shift, and it decouples the intercept from large-mean features."""
    x64, y64 = x.double(), y.double().reshape(-1)
    n, d = x64.shape
    mean = x64.mean(dim=0)
    xc = x64 - mean
    p = y64.mean().clamp(1e-6, 1 - 1e-6)
    weight = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    bias = torch.log(p / (1 - p)).reshape(1).requires_grad_()  # the optimum at w = 0
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=tol,
        tolerance_change=1e-16,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xc @ weight + bias, y64, reduction="sum")
        loss = (loss + 0.5 / c * weight.pow(2).sum()) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = weight.detach().float().unsqueeze(1)
    return LogisticProbe(w, bias.detach().float(), mean.float(), torch.ones(d), squeeze=True)


def fit_l1_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l1: float = 0.01,
    num_epochs: int = 50,
    batch_size: int = 4096,
    lr: float = 0.01,
    end_lr: float = 1e-5,
    l2: float = 1e-6,
    seed: int = 0,
) -> torch.Tensor:
    """Weights (C, d) of one-vs-rest probes trained with Adam, class-balanced BCE and an L1 penalty
    l1·mean_c ‖w_c‖₁ (SAEBench's k-sparse latent selection: the latents with the largest positive weight
    are the ones that predict the class). No standardisation: the L1 must see the latents' own scale."""
    y2 = (y.unsqueeze(1) if y.dim() == 1 else y).float()
    n, d = x.shape
    pos = y2.sum(dim=0).clamp_min(1)
    pos_weight = (n - pos) / pos
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(y2.shape[1], d, requires_grad=True)
    bias = torch.zeros(y2.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=l2)
    gamma = (end_lr / lr) ** (1.0 / max(num_epochs, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    with torch.enable_grad():
        for _ in range(num_epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                rows = perm[start : start + batch_size]
                logits = x[rows].float() @ weight.T + bias
                loss = F.binary_cross_entropy_with_logits(logits, y2[rows], pos_weight=pos_weight)
                loss = loss + l1 * weight.abs().sum(dim=-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return weight.detach()


def top_k_mean_diff(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k features whose class means differ most, |mean(x | y=1) − mean(x | y=0)|, largest
    first (SAEBench's sparse-probing selection). Ties break towards the lower index."""
    pos = y > 0.5
    diff = (x[pos].float().mean(dim=0) - x[~pos].float().mean(dim=0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices[:k]


def f1_score(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Binary F1 of boolean predictions; 0 when there is no positive in either."""
    t, p = y_true.bool(), y_pred.bool()
    tp = (t & p).sum().item()
    denom = t.sum().item() + p.sum().item()
    return 2.0 * tp / denom if denom else 0.0


def accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    return (y_true.bool() == y_pred.bool()).float().mean().item()
