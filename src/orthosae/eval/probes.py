"""Linear probes shared by the evals: logistic regression with sklearn's C objective, top-k selection by
class-mean difference, and F1 / accuracy (absorption's own probes are in absorption_probes).

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
