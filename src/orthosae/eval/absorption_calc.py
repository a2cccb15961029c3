"""The absorption maths as pure functions on tensors: SAEBench 0.6's split-feature rule, its
FeatureAbsorptionCalculator scores per word, its per-letter aggregation, and bootstrap intervals.

Per word of a letter (a test word the LM probe classifies correctly, re-prompted), with p̂ the unit LM
probe direction of the letter, x the LM activation, a the SAE latents and cos_j = cos(p̂, W_dec[j]):
projections P = x·p̂ and q_j = a_j·cos_j; M = Σ_{j ∈ main} q_j over the letter's split features;
A = the sum of the (up to) 3 largest q_j > 0 over latents outside main with cos_j ≥ 0.1.

- absorption fraction: 0 when M ≥ P or A / P < 0.4; else 1 when M ≤ 0; else
  min(A, P − M) / (min(A, P − M) + M), clipped to [0, 1].
- full absorption: every main latent is silent (a_j < 1e-8), the latent j* of largest q has
  cos ≥ 0.025, P ≥ 0 and q_j* / P ≥ 0.4.

SAEBench divides by P without a guard (P = 0 raises there); here a word with P = 0 scores 0 and is not
fully absorbed. A letter's mean_absorption_fraction and full_absorption_rate are means over its words.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from orthosae.eval import uncertainty

EPS = 1e-8  # a main latent below this is silent
FULL_ABSORPTION_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3


def split_features(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]], jump: float) -> list[int]:
    """The latents of the k-sparse probe at the largest k reached while every step raises test F1 by
    more than `jump` (k = 1 always counts). SAEBench's add_feature_splits_to_metrics_df."""
    best = -100.0
    chosen: list[int] = []
    for f1, feats in zip(f1_by_k, feats_by_k, strict=True):
        if f1 > best + jump:
            best, chosen = f1, list(feats)
        else:
            break
    return chosen


def probe_cosines(direction: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """cos(probe direction, each decoder row), (d_sae,), as torch's cosine_similarity computes it."""
    unit = direction.float() / direction.float().norm()
    return F.cosine_similarity(unit.unsqueeze(0), W_dec.float(), dim=-1)


def word_scores(
    acts: torch.Tensor,
    latents: torch.Tensor,
    direction: torch.Tensor,
    cos: torch.Tensor,
    main_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction (N,) float64, full absorption (N,) bool) of N words of one letter.

    `acts` (N, d) LM activations, `latents` (N, d_sae), `direction` the letter's probe weights (d,),
    `cos` = probe_cosines(direction, W_dec). Projections are float32 as in SAEBench; the branch logic
    runs in float64 on them, as SAEBench's Python floats do.
    """
    n = acts.shape[0]
    ids = list(main_ids)
    cos = cos.float()
    unit = direction.float() / direction.float().norm()
    P = (acts.float() @ unit).double()
    q = latents.float() * cos
    main = torch.zeros(q.shape[1], dtype=torch.bool)
    main[ids] = True
    M = q[:, ids].sum(dim=1).double()  # summed in main_ids order, as SAEBench indexes them

    # Absorbing candidates: outside main, aligned with the probe, projecting positively (float32 tests).
    candidate = ~main & (cos >= FRACTION_COS)
    others = torch.where(candidate & (q > 0), q, torch.zeros_like(q))
    A = others.topk(min(MAX_ABSORBERS, q.shape[1]), dim=1).values.sum(dim=1).double()
    safe_P = torch.where(P != 0, P, torch.ones_like(P))
    share = torch.where(P != 0, A / safe_P, torch.zeros_like(P))
    absorbed = torch.minimum(A, P - M)
    partial = (absorbed / (absorbed + M)).clamp(0.0, 1.0)
    fraction = torch.where(M <= 0, torch.ones(n, dtype=torch.float64), partial)
    none = (M >= P) | (share < PROJECTION_SHARE) | (P == 0)
    fraction = torch.where(none, torch.zeros_like(fraction), fraction)

    # Full absorption: SAEBench takes the top latent's activation and cosine as Python floats.
    main_silent = (latents[:, ids].double() < EPS).all(dim=1)
    top = q.argmax(dim=1)
    top_cos = cos[top].double()
    top_q = latents.float().gather(1, top.unsqueeze(1)).squeeze(1).double() * top_cos
    full = main_silent & (top_cos >= FULL_ABSORPTION_COS) & (P > 0) & (top_q / safe_P >= PROJECTION_SHARE)
    return fraction, full


def letter_row(letter: str, fraction: torch.Tensor, full: torch.Tensor, split: Sequence[int]) -> dict:
    """One letter's entry of eval_result_details (SAEBench's AbsorptionResultDetail keys).
    num_split_features is len(split features), what SAEBench 0.6's main.py reports (its k-sparse
    artifact's `num_split_features` column is that minus one)."""
    n = int(fraction.numel())
    n_full = int(full.sum())
    return {
        "first_letter": letter,
        "mean_absorption_fraction": float(fraction.sum()) / n if n else 0.0,
        "full_absorption_rate": n_full / n if n else 0.0,
        "num_full_absorption": n_full,
        "num_probe_true_positives": n,
        "num_split_features": len(split),
    }


def headline(rows: Sequence[dict]) -> dict[str, float]:
    """SAEBench's AbsorptionMeanMetrics over the included letters (means and sample std devs)."""
    frac = [r["mean_absorption_fraction"] for r in rows]
    full = [r["full_absorption_rate"] for r in rows]
    split = [r["num_split_features"] for r in rows]
    return {
        "mean_absorption_fraction_score": statistics.mean(frac),
        "mean_full_absorption_score": statistics.mean(full),
        "mean_num_split_features": statistics.mean(split),
        "std_dev_absorption_fraction_score": statistics.stdev(frac),
        "std_dev_full_absorption_score": statistics.stdev(full),
        "std_dev_num_split_features": statistics.stdev(split),
    }


def letter_mean_replicates(
    per_letter: Sequence[Sequence[torch.Tensor]],
    *,
    n_resamples: int = uncertainty.N_RESAMPLES,
    seed: int = 0,
) -> torch.Tensor | None:
    """Bootstrap resamples of mean-over-letters of per-letter word means, for several word values at once:
    (n_values, n_resamples) float64. per_letter[l] = (values_1 (n_l,), values_2 (n_l,), …) for letter l.
    Words are resampled within each letter (each letter keeps its count; letter l draws with seed + l, and
    one resample serves every value), and the mean over letters is recomputed per resample. None when a
    letter has no words, there are fewer than 2 words in all, or no resamples."""
    if not per_letter or n_resamples <= 0:
        return None
    counts = [int(values[0].numel()) for values in per_letter]
    if min(counts) == 0 or sum(counts) < 2:
        return None
    sums = torch.zeros(len(per_letter[0]), n_resamples, dtype=torch.float64)
    for li, (values, n) in enumerate(zip(per_letter, counts, strict=True)):
        w = uncertainty.resample_counts(n, n_resamples, seed=seed + li)
        for vi, v in enumerate(values):
            sums[vi] += (w @ v.double().flatten()) / n
    return sums / len(per_letter)


def letter_mean_intervals(
    per_letter: Sequence[Sequence[torch.Tensor]],
    *,
    n_resamples: int = uncertainty.N_RESAMPLES,
    seed: int = 0,
) -> list[list[float] | None]:
    """Bootstrap 95 % intervals of mean-over-letters of per-letter word means (`letter_mean_replicates`),
    one per word value; each None when there are no resamples."""
    if not per_letter:
        return []
    means = letter_mean_replicates(per_letter, n_resamples=n_resamples, seed=seed)
    return replicate_intervals(means, len(per_letter[0]))


def replicate_intervals(means: torch.Tensor | None, n_values: int) -> list[list[float] | None]:
    """The percentile interval of each row of `letter_mean_replicates`; n_values Nones without resamples."""
    if means is None:
        return [None] * n_values
    return [uncertainty.as_list(uncertainty.percentile_interval(m)) for m in means]
