"""The two probe recipes of SAEBench 0.6's absorption eval.

- `train_ovr_probe`: one-vs-rest linear probes trained together with Adam on shuffled minibatches,
  BCE-with-logits whose positives are weighted by #negatives / #positives per class, an exponential
  learning-rate decay from `lr` to `end_lr` over the epochs (stepped once per epoch), Adam's (coupled)
  weight decay, and an optional L1 penalty `l1 · mean_c ‖w_c‖₁`. SAEBench trains the LM probe with it
  (batch 64, 50 epochs, lr 1e-2, weight decay 1e-4) and, with the L1 term, the latent-selection probe
  on SAE latents (batch 4096, 50 epochs, lr 1e-2, weight decay 1e-6, L1 0.01). The initialisation
  (torch's nn.Linear) and the minibatch order (torch's shuffling DataLoader) come from torch's global
  generator seeded with `seed`, inside a fork so the caller's random state is untouched: after
  `torch.manual_seed(seed)` SAEBench's train_multi_probe draws the same numbers and trains the same probe.
- `fit_balanced_logistic`: the minimiser of sklearn's LogisticRegression(C=1, class_weight="balanced")
  objective, SAEBench's k-sparse probe on k latents. sklearn stops L-BFGS at a gradient of 1e-4
  (max_iter 500); here Newton's method runs to the optimum in float64, many small problems at once.
"""

from __future__ import annotations

from math import exp, log

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset


def one_hot(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """(N, C) int64; C = max label + 1 unless given (SAEBench's k-sparse labels use the default)."""
    return F.one_hot(labels.long(), num_classes=-1 if num_classes is None else num_classes)


def pos_weights(y: torch.Tensor) -> torch.Tensor:
    """#negatives / #positives per class. A class without positives gets 1 (SAEBench's division gives
    inf there, and the loss NaN); it then just learns to say no."""
    pos = y.sum(dim=0).float()
    neg = len(y) - pos
    return torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))


def train_ovr_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    num_epochs: int,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 0.0,
    l1: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C, d) and biases (C,) of one-vs-rest probes on x (N, d) for labels y (N, C) in {0, 1}."""
    x = x.detach()
    dataset = TensorDataset(x, y.to(dtype=x.dtype))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weights(y))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        probe = nn.Linear(x.shape[1], y.shape[1]).to(dtype=x.dtype)
        # Shuffled minibatches drawn as DataLoader(shuffle=True) draws them (same generator calls), but
        # indexed a batch at a time instead of collated row by row (much faster, same tensors).
        sampler = BatchSampler(RandomSampler(dataset), batch_size, drop_last=False)
        loader = DataLoader(dataset, batch_size=None, sampler=sampler)
        opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
        gamma = exp(log(end_lr / lr) / num_epochs)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        for _ in range(num_epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss = loss_fn(probe(xb), yb)
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(dim=-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


def balanced_logistic_objective(
    w: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, reg: torch.Tensor
) -> torch.Tensor:
    """Per problem: mean_sw(log-loss) + reg/2 · ‖w without intercept‖². w (P, k+1), x1 (P, N, k+1)."""
    z = torch.einsum("pnk,pk->pn", x1, w)
    loss = (sw * (F.softplus(z) - y * z)).sum(dim=1) / sw.sum(dim=1)
    return loss + 0.5 * reg * w[:, :-1].pow(2).sum(dim=1)


def fit_balanced_logistic(
    x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0, max_iter: int = 100, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """P independent binary problems: x (P, N, k), y (P, N) in {0, 1} → coefficients (P, k) and
    intercepts (P,) minimising Σ s_i·logloss_i + ‖w‖²/(2c), s_i = N / (2·#class(y_i)) (sklearn's
    'balanced' weights), the intercept unpenalised. Every problem needs both classes."""
    x = x.double()
    y = y.double()
    n_pos = y.sum(dim=1, keepdim=True)
    n = y.shape[1]
    if bool(((n_pos == 0) | (n_pos == n)).any()):
        raise ValueError("fit_balanced_logistic: a problem has only one class")
    sw = torch.where(y > 0.5, n / (2 * n_pos), n / (2 * (n - n_pos)))
    ssum = sw.sum(dim=1)
    reg = 1.0 / (c * ssum)  # sklearn scales its objective by 1 / Σ s_i; the minimiser is the same
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    p_count, _, dim = x1.shape
    w = torch.zeros(p_count, dim, dtype=torch.float64)
    pen = torch.ones(dim, dtype=torch.float64)
    pen[-1] = 0.0  # the intercept is not penalised
    f = balanced_logistic_objective(w, x1, y, sw, reg)
    done = torch.zeros(p_count, dtype=torch.bool)
    for _ in range(max_iter):
        prob = torch.sigmoid(torch.einsum("pnk,pk->pn", x1, w))
        r = sw * (prob - y) / ssum.unsqueeze(1)
        grad = torch.einsum("pnk,pn->pk", x1, r) + reg.unsqueeze(1) * pen * w
        done |= grad.abs().amax(dim=1) < tol
        if bool(done.all()):
            break
        h_w = sw * prob * (1 - prob) / ssum.unsqueeze(1)
        hess = (x1 * h_w.unsqueeze(-1)).transpose(1, 2) @ x1 + torch.diag_embed(reg.unsqueeze(1) * pen)
        # A tiny ridge keeps the solve defined when a feature never varies in a problem.
        hess = hess + 1e-12 * torch.eye(dim, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        decrease = (grad * step).sum(dim=1)
        # The Newton decrement estimates f - f*; below float64 resolution of f there is nothing left.
        done |= decrease < 1e-15 * f.abs().clamp_min(1.0)
        if bool(done.all()):
            break
        t = torch.ones(p_count, dtype=torch.float64)
        accepted = done.clone()
        for _ in range(40):  # backtracking (Armijo), per problem
            cand = w - t.unsqueeze(1) * step
            cand_f = balanced_logistic_objective(cand, x1, y, sw, reg)
            ok = ~accepted & (cand_f <= f - 1e-4 * t * decrease)
            w = torch.where(ok.unsqueeze(1), cand, w)
            f = torch.where(ok, cand_f, f)
            accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t / 2)
        # No decrease along the Newton direction: the problem is at its optimum to rounding.
        done |= ~accepted
    return w[:, :-1].clone(), w[:, -1].clone()
