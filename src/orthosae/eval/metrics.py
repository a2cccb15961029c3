"""Metric formulas shared by the evals: pure functions on tensors, plus streaming accumulators.

Every accumulator keeps float64 running sums, never the per-token values, so an eval over millions of tokens
holds O(d + n) numbers (O(n²) bits for the co-active pair set). The `FORMULAS` strings are written into
the results JSON next to the numbers they describe.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

# Notation: x_t the input activation of token t (d dims), x̂_t its reconstruction, N tokens, μ = mean_t x_t.
FORMULAS = {
    "explained_variance": (
        "1 - sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mu||^2, mu = mean of x over all eval tokens"
    ),
    "explained_variance_legacy": (
        "SAEBench 0.6 'explained_variance_legacy': mean_t [1 - ||x_t - xhat_t||^2 / ||x_t - mu_b||^2], "
        "mu_b = mean of x over the tokens of the forward batch b holding t (per-token ratio, batch mean)"
    ),
    "explained_variance_saebench": (
        "SAEBench 0.6 'explained_variance': 1 - mean_t ||x_t - xhat_t||^2 / (mean_t ||x_t||^2 - "
        "(mean_{t,i} x_ti^2)^2); nearly variance about zero, the subtracted term is not the mean"
    ),
    "mse": "mean_t sum_i (x_ti - xhat_ti)^2 (per token: squared error summed over the d dims)",
    "mse_per_element": "mean_t mean_i (x_ti - xhat_ti)^2 = mse / d",
    "cossim": "mean_t cos(x_t, xhat_t)",
    "l2_norm_in": "mean_t ||x_t||",
    "l2_norm_out": "mean_t ||xhat_t||",
    "l2_ratio": "mean_t ||xhat_t|| / ||x_t||",
    "relative_reconstruction_bias": (
        "sum_t ||xhat_t||^2 / sum_t <x_t, xhat_t> (Gao et al. eq. 10; 1 = unbiased)"
    ),
    "l0": "mean_t #{i : f_ti > 0}",
    "l1": "mean_t sum_i f_ti",
}


# ----------------------------------------------------------------- pure formulas on whole tensors


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float(1 - (x - x_hat).pow(2).sum() / total)


def explained_variance_legacy(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """SAEBench's legacy formula on one batch: the per-token ratio against the batch mean, averaged."""
    x, x_hat = x.double(), x_hat.double()
    per_token = 1 - (x - x_hat).pow(2).sum(-1) / (x - x.mean(dim=0)).pow(2).sum(-1)
    return float(per_token.mean())


def mse_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x.double() - x_hat.double()).pow(2).sum(-1).mean())


def score(with_ablation: float, with_sae: float, clean: float = 0.0) -> float:
    """(ablation − sae) / (ablation − clean): 1 = the SAE loses nothing, 0 = as bad as ablation.

    KL-div score is the case clean = 0 (the clean model's KL to itself)."""
    denom = with_ablation - clean
    return (with_ablation - with_sae) / denom if denom != 0 else math.nan


def kl_per_position(clean_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_new) at every position, (..., vocab) → (...)."""
    log_p = torch.log_softmax(clean_logits.float(), dim=-1)
    log_q = torch.log_softmax(new_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ce_per_position(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy predicted at positions 0..T-2, (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


# ----------------------------------------------------------------- streaming accumulators


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


@dataclass
class ReconStats:
    """Reconstruction quality and shrinkage, accumulated batch by batch."""

    n: int = 0
    sum_x: torch.Tensor | None = None  # (d,)
    sum_x_sq: float = 0.0  # Σ‖x‖²
    sum_resid_sq: float = 0.0  # Σ‖x − x̂‖²
    sum_legacy: float = 0.0  # Σ of SAEBench's per-token legacy ratio
    sum_cos: float = 0.0
    sum_norm_in: float = 0.0
    sum_norm_out: float = 0.0
    sum_ratio: float = 0.0
    sum_xhat_sq: float = 0.0
    sum_dot: float = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if len(x) == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        resid = (x - x_hat).pow(2).sum(-1)
        centred = (x - x.mean(dim=0)).pow(2).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += len(x)
        s = x.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x_sq += float(x.pow(2).sum())
        self.sum_resid_sq += float(resid.sum())
        self.sum_legacy += float((1 - resid / centred).sum())
        # SAEBench's cosine and ratio: a zero-norm token counts as norm 1 in the ratio's denominator.
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        self.sum_norm_in += float(norm_in.sum())
        self.sum_norm_out += float(norm_out.sum())
        self.sum_ratio += float((norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum())
        self.sum_xhat_sq += float(x_hat.pow(2).sum())
        self.sum_dot += float((x * x_hat).sum())

    def result(self) -> dict[str, float]:
        n = self.n
        if n == 0 or self.sum_x is None:
            return {}
        d = self.sum_x.numel()
        mean = self.sum_x / n
        total = self.sum_x_sq - n * float(mean.pow(2).sum())  # Σ‖x − μ‖²
        mean_sq = self.sum_x_sq / n
        return {
            "explained_variance": 1 - _div(self.sum_resid_sq, total),
            "explained_variance_legacy": self.sum_legacy / n,
            "explained_variance_saebench": 1 - _div(self.sum_resid_sq / n, mean_sq - (mean_sq / d) ** 2),
            "mse": self.sum_resid_sq / n,
            "mse_per_element": self.sum_resid_sq / (n * d),
            "cossim": self.sum_cos / n,
            "l2_norm_in": self.sum_norm_in / n,
            "l2_norm_out": self.sum_norm_out / n,
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": _div(self.sum_xhat_sq, self.sum_dot),
        }


def sparse_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (T, n) latents → (acts, idx) of width max_t L0 (entries with act 0 are padding)."""
    width = max(1, int((latents > 0).sum(-1).max())) if len(latents) else 1
    return latents.topk(min(width, latents.shape[-1]), dim=-1)


@dataclass
class FeatureStats:
    """L0, L1 and per-feature firing counts from sparse latents (acts, idx); act > 0 means "fires"."""

    d_sae: int
    n: int = 0
    sum_l0: float = 0.0
    sum_l1: float = 0.0
    fires: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)

    def update(self, acts: torch.Tensor, idx: torch.Tensor) -> None:
        on = acts > 0
        self.n += len(acts)
        self.sum_l0 += float(on.sum())
        self.sum_l1 += float(acts.clamp_min(0).double().sum())
        self.fires.index_add_(0, idx[on].cpu(), torch.ones(int(on.sum()), dtype=torch.float64))

    def merged(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both token sets together."""
        out = FeatureStats(
            self.d_sae, self.n + other.n, self.sum_l0 + other.sum_l0, self.sum_l1 + other.sum_l1
        )
        out.fires = self.fires + other.fires
        return out

    def density(self) -> torch.Tensor:
        return self.fires / max(self.n, 1)

    def result(self, bins_per_decade: int = 4, min_log10: float = -7.0) -> dict[str, object]:
        density = self.density()
        alive = density > 0
        hist = density_histogram(density, bins_per_decade, min_log10)
        return {
            "l0": self.sum_l0 / max(self.n, 1),
            "l1": self.sum_l1 / max(self.n, 1),
            "frac_alive": float(alive.double().mean()),
            "frac_dead": float((~alive).double().mean()),
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.1).double().mean()),
            "feature_density_histogram": hist,
        }


def density_histogram(density: torch.Tensor, bins_per_decade: int = 4, min_log10: float = -7.0) -> dict:
    """Counts of alive features per log10(density) bin; dead features (density 0) are counted apart."""
    edges = torch.arange(0, int(-min_log10 * bins_per_decade) + 1, dtype=torch.float64)
    edges = min_log10 + edges / bins_per_decade
    alive = density[density > 0]
    logs = alive.log10().clamp(min_log10, 0.0)
    counts = torch.histogram(logs, bins=edges).hist if len(logs) else torch.zeros(len(edges) - 1)
    return {
        "log10_density_bin_edges": [round(float(e), 6) for e in edges],
        "counts": [int(c) for c in counts],
        "n_dead": int((density <= 0).sum()),
        "note": "alive features per bin of log10(fraction of eval tokens on which the feature fires)",
    }


@dataclass
class CoactivationStats:
    """cos² of the decoder rows of latent pairs that fire on the same token.

    With S_ij = cos²(w_i, w_j) over decoder rows and C_ij = the number of eval tokens on which both i and
    j fire (i < j): the mean and max of S over the distinct co-active pairs (C_ij > 0), and the weighted
    mean Σ C_ij S_ij / Σ C_ij. Computed per token over its k active latents (C = AᵀA), so nothing n×n is
    formed except a bool matrix marking which pairs were seen (skipped above `max_pair_features`).
    """

    w_dec: torch.Tensor  # (n, d)
    max_pair_features: int = 1 << 15
    chunk_tokens: int = 256
    sum_s: float = 0.0
    sum_c: float = 0.0
    sum_prod_s: float = 0.0
    sum_prod: float = 0.0
    max_s: float = 0.0
    seen: torch.Tensor | None = field(init=False)
    unit: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        w = self.w_dec.detach().double().cpu()
        self.unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        n = len(w)
        self.seen = torch.zeros(n, n, dtype=torch.bool) if n <= self.max_pair_features else None

    def update(self, acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Add tokens' latents (acts, idx) (T, k); returns each token's (Σ S_ij, pair count, Σ a_i a_j S_ij,
        Σ a_i a_j) over its co-active pairs, (T, 4) float64, for per-context sums."""
        acts, idx = acts.detach().double().cpu(), idx.cpu()
        k = acts.shape[1]
        upper = torch.ones(k, k, dtype=torch.bool).triu(1)
        per_token = torch.zeros(len(acts), 4, dtype=torch.float64)
        for s in range(0, len(acts), self.chunk_tokens):
            a, i = acts[s : s + self.chunk_tokens], idx[s : s + self.chunk_tokens]
            w = self.unit[i]  # (T, k, d)
            cos2 = torch.bmm(w, w.transpose(1, 2)).pow(2)
            on = a > 0
            pair = upper & on[:, :, None] & on[:, None, :]
            if not bool(pair.any()):
                continue
            pf = pair.double()
            prod = a[:, :, None] * a[:, None, :] * pf
            sums = torch.stack(
                [(cos2 * pf).sum((1, 2)), pf.sum((1, 2)), (prod * cos2).sum((1, 2)), prod.sum((1, 2))], 1
            )
            per_token[s : s + len(a)] = sums
            self.max_s = max(self.max_s, float(cos2[pair].max()))
            if self.seen is not None:
                ii = i[:, :, None].expand_as(pair)[pair]
                jj = i[:, None, :].expand_as(pair)[pair]
                self.seen[torch.minimum(ii, jj), torch.maximum(ii, jj)] = True
        total = per_token.sum(0).tolist()
        self.sum_s += total[0]
        self.sum_c += total[1]
        self.sum_prod_s += total[2]
        self.sum_prod += total[3]
        return per_token

    def merged(self, other: CoactivationStats) -> CoactivationStats:
        """The statistics of both token sets together (same decoder)."""
        out = copy.copy(self)
        out.sum_s, out.sum_c = self.sum_s + other.sum_s, self.sum_c + other.sum_c
        out.sum_prod_s, out.sum_prod = self.sum_prod_s + other.sum_prod_s, self.sum_prod + other.sum_prod
        out.max_s = max(self.max_s, other.max_s)
        out.seen = None if self.seen is None or other.seen is None else self.seen | other.seen
        return out

    def result(self) -> dict[str, float | int | None]:
        n = len(self.unit)
        # Mean cos² over all distinct pairs, for reference: Σ_{i≠j} S_ij = ‖ŴᵀŴ‖_F² − n (a d×d Gram).
        all_pairs = (float((self.unit.T @ self.unit).pow(2).sum()) - n) / max(n * (n - 1), 1)
        out: dict[str, float | int | None] = {
            "coact_weighted_mean_cos2": self.sum_s / self.sum_c if self.sum_c else math.nan,
            "coact_product_weighted_mean_cos2": self.sum_prod_s / self.sum_prod
            if self.sum_prod
            else math.nan,
            "max_cos2_coactive_pairs": self.max_s if self.sum_c else math.nan,
            "mean_cos2_coactive_pairs": None,
            "n_coactive_pairs": None,
            "mean_cos2_all_pairs": all_pairs,
            "total_coactivations": int(self.sum_c),
        }
        if self.seen is not None:
            n_pairs = int(self.seen.sum())
            out["n_coactive_pairs"] = n_pairs
            if n_pairs:
                out["mean_cos2_coactive_pairs"] = sum_cos2_over_pairs(self.unit, self.seen, n_pairs) / n_pairs
        return out


def sum_cos2_over_pairs(unit: torch.Tensor, seen: torch.Tensor, n_pairs: int) -> float:
    """Σ (u_i·u_j)² over the pairs marked in the upper-triangular bool matrix `seen` (n, n)."""
    n = len(unit)
    total = 0.0
    if n_pairs * 16 >= n * n // 2:
        # Many pairs (a TopK SAE's co-active pairs cover most of the triangle): row blocks of the Gram
        # matrix through the matmul are ~50× faster than gathering the pairs' rows (measured, n = 4608).
        for i in range(0, n, 512):
            gram = (unit[i : i + 512] @ unit[i:].T).pow(2)
            total += float(gram[seen[i : i + 512, i:]].sum())
        return total
    pairs = seen.nonzero()
    for s in range(0, len(pairs), 1 << 15):
        p = pairs[s : s + (1 << 15)]
        total += float((unit[p[:, 0]] * unit[p[:, 1]]).sum(-1).pow(2).sum())
    return total


COACT_FORMULAS = {
    "S_ij": "cos^2 of decoder rows i and j",
    "C_ij": "number of eval tokens on which latents i and j both fire (f > 0), i < j",
    "mean_cos2_coactive_pairs": "mean of S_ij over distinct pairs i<j with C_ij > 0",
    "max_cos2_coactive_pairs": "max of S_ij over pairs with C_ij > 0",
    "coact_weighted_mean_cos2": "sum_{i<j} C_ij S_ij / sum_{i<j} C_ij",
    "coact_product_weighted_mean_cos2": (
        "same with C = A^T A, A = latent activations (the penalty's weights, no mask)"
    ),
    "mean_cos2_all_pairs": "mean of S_ij over all pairs i != j (reference)",
}
