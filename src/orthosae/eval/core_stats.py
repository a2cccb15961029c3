"""The core eval's metrics as functions of per-context sums, for the point estimate and the bootstrap alike.

Every headline number of the core eval is a ratio of sums over tokens (EV about the mean also needs the
d-vector Σx). Keeping those sums per eval context, (C,) or (C, d), is enough to recompute every metric on
any weighting of the contexts: with W (R, C) holding how often each context is drawn in each of R bootstrap
resamples, `W @ sums` gives the R resampled totals at once. The point estimate is the same function at
W = ones(1, C). Contexts are the resampling unit because tokens of one context are correlated (they share
the text and attend to each other), so resampling tokens would understate the noise.

Sums over disjoint token sets add up: the all-tokens sums are the trained-set sums plus the excluded ones,
except for the legacy EV whose per-token ratio uses its own set's forward-batch mean (kept apart).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from orthosae.eval import uncertainty as U

Sums = dict[str, torch.Tensor]  # name → per-context sums, (C,) or (C, d)
MetricFn = Callable[[Sums, torch.Tensor], dict[str, torch.Tensor]]  # (sums, W (R, C)) → name → (R,)


# ----------------------------------------------------------------- per-token values → per-context sums


def recon_token_values(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> Sums:
    """Per-token terms of the reconstruction, shrinkage and sparsity metrics (float64), x and x̂ (T, d),
    latents `acts` (T, w) with act > 0 meaning the latent fires. Key 'x' stays a (T, d) vector for Σx."""
    x, x_hat = x.double(), x_hat.double()
    norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
    acts = acts.double()
    return {
        "n": torch.ones(len(x), dtype=torch.float64, device=x.device),
        "x": x,
        "x_sq": x.pow(2).sum(-1),
        "resid_sq": (x - x_hat).pow(2).sum(-1),
        "cos": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12),
        "norm_in": norm_in,
        "norm_out": norm_out,
        # SAEBench's ratio: a zero-norm token counts as norm 1 in the denominator.
        "ratio": norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in),
        "xhat_sq": x_hat.pow(2).sum(-1),
        "dot": (x * x_hat).sum(-1),
        "l0": (acts > 0).sum(-1).double(),
        "l1": acts.clamp_min(0).sum(-1),
    }


def legacy_token_values(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """SAEBench's legacy per-token EV, 1 − ‖x − x̂‖² / ‖x − μ_b‖², μ_b the mean of the given tokens (one
    forward batch of one token set)."""
    x, x_hat = x.double(), x_hat.double()
    return 1 - (x - x_hat).pow(2).sum(-1) / (x - x.mean(dim=0)).pow(2).sum(-1)


def by_context(values: Sums, context: torch.Tensor, n_contexts: int) -> Sums:
    """Sum per-token values (T, …) into per-context sums (n_contexts, …); `context` (T,) in [0, n)."""
    out: Sums = {}
    for k, v in values.items():
        z = torch.zeros((n_contexts, *v.shape[1:]), dtype=torch.float64, device=v.device)
        out[k] = z.index_add_(0, context.to(v.device), v.double()).cpu()
    return out


def add_sums(a: Sums, b: Sums) -> Sums:
    """Sums of two disjoint token sets over the same contexts (keys of `a` missing from `b` dropped)."""
    return {k: a[k] + b[k] for k in a if k in b}


class ContextSums:
    """Per-context sums collected batch by batch (each batch adds its own contexts), each part tagged with
    its forward batch so that the parts of several ranks can be put back in batch order (`in_batch_order`)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.batches: list[int] = []

    def add(self, sums: Sums, batch: int = 0) -> None:
        for k, v in sums.items():
            self.parts.setdefault(k, []).append(v)
        self.batches.append(batch)

    def stacked(self) -> Sums:
        return {k: torch.cat(v) for k, v in self.parts.items()}

    @property
    def n_contexts(self) -> int:
        return sum(len(v) for v in next(iter(self.parts.values()), []))


def in_batch_order(pieces: Sequence[ContextSums]) -> ContextSums:
    """The parts of several collectors (one per rank, each holding different batches) as one collector
    that saw every batch in order: the same per-context sums, in the same order, as one process."""
    where = sorted((b, i, j) for i, piece in enumerate(pieces) for j, b in enumerate(piece.batches))
    out = ContextSums()
    for b, i, j in where:
        out.add({k: v[j] for k, v in pieces[i].parts.items()}, b)
    return out


# ----------------------------------------------------------------- metrics of weighted contexts


def _w(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return w @ v


def recon_metrics(s: Sums, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction, shrinkage and sparsity metrics (see metrics.FORMULAS) for each row of weights w."""
    n = _w(w, s["n"])
    sum_x = _w(w, s["x"])  # (R, d)
    d = s["x"].shape[1]
    x_sq, resid = _w(w, s["x_sq"]), _w(w, s["resid_sq"])
    total = x_sq - sum_x.pow(2).sum(-1) / n  # Σ‖x − μ‖² = Σ‖x‖² − ‖Σx‖²/n
    mean_sq = x_sq / n
    out = {
        "explained_variance": 1 - resid / total,
        "explained_variance_saebench": 1 - (resid / n) / (mean_sq - (mean_sq / d) ** 2),
        "mse": resid / n,
        "mse_per_element": resid / (n * d),
        "cossim": _w(w, s["cos"]) / n,
        "l2_norm_in": _w(w, s["norm_in"]) / n,
        "l2_norm_out": _w(w, s["norm_out"]) / n,
        "l2_ratio": _w(w, s["ratio"]) / n,
        "relative_reconstruction_bias": _w(w, s["xhat_sq"]) / _w(w, s["dot"]),
        "l0": _w(w, s["l0"]) / n,
        "l1": _w(w, s["l1"]) / n,
    }
    if "legacy" in s:
        out["explained_variance_legacy"] = _w(w, s["legacy"]) / n
    return out


def loss_metrics(s: Sums, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """CE and KL with the SAE spliced in and with zero ablation, and their scores (ablation − sae) /
    (ablation − clean), from per-context sums of per-position losses and position counts."""
    out: dict[str, torch.Tensor] = {}
    if "n_kl" in s:
        n = _w(w, s["n_kl"])
        kl_sae, kl_abl = _w(w, s["kl_sae"]) / n, _w(w, s["kl_abl"]) / n
        out |= {"kl_div_score": (kl_abl - kl_sae) / kl_abl, "kl_div_with_ablation": kl_abl}
        out["kl_div_with_sae"] = kl_sae
    if "n_ce" in s:
        n = _w(w, s["n_ce"])
        clean, sae, abl = (_w(w, s[k]) / n for k in ("ce_clean", "ce_sae", "ce_abl"))
        out |= {"ce_loss_score": (abl - sae) / (abl - clean), "ce_loss_with_ablation": abl}
        out |= {"ce_loss_with_sae": sae, "ce_loss_without_sae": clean}
    return out


def orth_metrics(s: Sums, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The co-activation weighted decoder cos² means (metrics.COACT_FORMULAS) from per-context sums of
    Σ S_ij, the pair count, Σ a_i a_j S_ij and Σ a_i a_j over each token's co-active pairs."""
    return {
        "coact_weighted_mean_cos2": _w(w, s["coact_s"]) / _w(w, s["coact_c"]),
        "coact_product_weighted_mean_cos2": _w(w, s["coact_ps"]) / _w(w, s["coact_p"]),
    }


def point(fn: MetricFn, s: Sums) -> dict[str, float]:
    """The metrics on the eval contexts themselves (every context weighted once)."""
    n = len(next(iter(s.values())))
    return {k: float(v[0]) for k, v in fn(s, torch.ones(1, n, dtype=torch.float64)).items()}


def resampled(fn: MetricFn, s: Sums, n_resamples: int, seed: int) -> dict[str, torch.Tensor] | None:
    """Every metric `fn` computes on each of the seeded bootstrap resamples of the contexts, (R,) each;
    None with fewer than 2 contexts or no resamples. The same (n, R, seed) gives the same draws for every
    SAE, so two SAEs' vectors pair resample by resample."""
    n = len(next(iter(s.values())))
    if n < 2 or n_resamples <= 0:
        return None
    return fn(s, U.resample_counts(n, n_resamples, seed))


def intervals_of(
    fn: MetricFn, s: Sums, reps: dict[str, torch.Tensor] | None
) -> dict[str, list[float] | None]:
    """The percentile intervals of `resampled`'s vectors; null for each metric when there are none."""
    if reps is None:
        n = len(next(iter(s.values())))
        return dict.fromkeys(fn(s, torch.ones(1, n, dtype=torch.float64)), None)
    return {k: U.as_list(U.percentile_interval(v)) for k, v in reps.items()}


def intervals(fn: MetricFn, s: Sums, n_resamples: int, seed: int) -> dict[str, list[float] | None]:
    """Percentile-bootstrap 95 % intervals of every metric `fn` computes, resampling contexts; null where
    there are fewer than 2 contexts or too few finite resampled values."""
    return intervals_of(fn, s, resampled(fn, s, n_resamples, seed))


# ----------------------------------------------------------------- what the excluded tokens carry


def excluded_shares(kept: Sums, excluded: Sums) -> dict[str, float]:
    """Share of the tokens, of Σ‖x − x̂‖² and of EV's denominator Σ‖x − μ‖² (μ the mean of all tokens)
    that the excluded tokens carry, within kept ∪ excluded."""
    n_k, n_e = float(kept["n"].sum()), float(excluded["n"].sum())
    sx_k, sx_e = kept["x"].sum(0), excluded["x"].sum(0)
    n = n_k + n_e
    mu = (sx_k + sx_e) / n
    # Σ_e ‖x − μ‖² = Σ_e ‖x‖² − 2 μ·Σ_e x + n_e ‖μ‖², and likewise over all tokens.
    den_e = float(excluded["x_sq"].sum() - 2 * mu @ sx_e + n_e * mu @ mu)
    den = float(kept["x_sq"].sum() + excluded["x_sq"].sum() - n * mu @ mu)
    resid_e = float(excluded["resid_sq"].sum())
    resid = resid_e + float(kept["resid_sq"].sum())
    return {
        "frac_tokens": n_e / n if n else float("nan"),
        "frac_squared_error": resid_e / resid if resid else float("nan"),
        "frac_ev_denominator": den_e / den if den else float("nan"),
    }
