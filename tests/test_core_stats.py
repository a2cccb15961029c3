"""Core eval maths from per-context sums against literal per-token loops and literal bootstrap resampling."""

from __future__ import annotations

import math

import pytest
import torch

from orthosae.eval import core_stats as S
from orthosae.eval import metrics as M


def _draws(n: int, n_resamples: int, seed: int) -> list[list[int]]:
    """The contexts each bootstrap resample draws, as uncertainty.resample_counts draws them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_resamples, n), generator=gen).tolist()


def _percentiles(values: list[float]) -> list[float]:
    """2.5 and 97.5 percentiles with linear interpolation, written out."""
    s = sorted(v for v in values if math.isfinite(v))
    out = []
    for q in (0.025, 0.975):
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def _contexts(n_ctx: int = 9, d: int = 5, seed: int = 0):
    """Random tokens of n_ctx contexts of different lengths: x, x̂, sparse latents, context id per token."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n_ctx,), generator=gen)
    context = torch.repeat_interleave(torch.arange(n_ctx), lengths)
    T = len(context)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64) * 2 + 1
    x_hat = x + torch.randn(T, d, generator=gen, dtype=torch.float64) * 0.7
    acts = torch.rand(T, 4, generator=gen, dtype=torch.float64) * (torch.rand(T, 4, generator=gen) > 0.3)
    return x, x_hat, acts, context


def _sums(x, x_hat, acts, context, n_ctx):
    values = S.recon_token_values(x, x_hat, acts)
    values["legacy"] = S.legacy_token_values(x, x_hat)
    return S.by_context(values, context, n_ctx)


def test_recon_metrics_equal_per_token_loops():
    x, x_hat, acts, context = _contexts()
    got = S.point(S.recon_metrics, _sums(x, x_hat, acts, context, 9))
    T, d = x.shape
    rows, rows_hat = x.tolist(), x_hat.tolist()
    mu = [sum(r[i] for r in rows) / T for i in range(d)]
    sq = [sum((a - b) ** 2 for a, b in zip(r, h, strict=True)) for r, h in zip(rows, rows_hat, strict=True)]
    var = [sum((a - m) ** 2 for a, m in zip(r, mu, strict=True)) for r in rows]
    norm = [math.sqrt(sum(a * a for a in r)) for r in rows]
    norm_hat = [math.sqrt(sum(a * a for a in r)) for r in rows_hat]
    dot = [sum(a * b for a, b in zip(r, h, strict=True)) for r, h in zip(rows, rows_hat, strict=True)]
    mean_sq = sum(n * n for n in norm) / T
    want = {
        "explained_variance": 1 - sum(sq) / sum(var),
        "explained_variance_legacy": sum(1 - e / v for e, v in zip(sq, var, strict=True)) / T,
        "explained_variance_saebench": 1 - (sum(sq) / T) / (mean_sq - (mean_sq / d) ** 2),
        "mse": sum(sq) / T,
        "mse_per_element": sum(sq) / (T * d),
        "cossim": sum(p / (a * b) for p, a, b in zip(dot, norm, norm_hat, strict=True)) / T,
        "l2_norm_in": sum(norm) / T,
        "l2_norm_out": sum(norm_hat) / T,
        "l2_ratio": sum(b / a for a, b in zip(norm, norm_hat, strict=True)) / T,
        "relative_reconstruction_bias": sum(n * n for n in norm_hat) / sum(dot),
        "l0": sum(sum(1 for a in r if a > 0) for r in acts.tolist()) / T,
        "l1": sum(sum(r) for r in acts.tolist()) / T,
    }
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    # The same numbers as the streaming accumulator (one batch: its legacy batch mean is the global mean).
    r = M.ReconStats()
    r.update(x, x_hat)
    for k, v in r.result().items():
        assert got[k] == pytest.approx(v, rel=1e-9), k


def test_bootstrap_of_recon_metrics_equals_literal_resampling():
    x, x_hat, acts, context = _contexts(n_ctx=11, seed=1)
    sums = _sums(x, x_hat, acts, context, 11)
    n_res, seed = 200, 7
    got = S.intervals(S.recon_metrics, sums, n_res, seed)
    per_ctx = [(context == c).nonzero()[:, 0] for c in range(11)]
    ev, mse, l0, rrb = [], [], [], []
    for draw in _draws(11, n_res, seed):
        rows = torch.cat([per_ctx[c] for c in draw])  # the raw tokens of the drawn contexts, repeats kept
        xs, xh = x[rows], x_hat[rows]
        ev.append(M.explained_variance(xs, xh))
        mse.append(M.mse_per_token(xs, xh))
        l0.append(float((acts[rows] > 0).sum(-1).double().mean()))
        rrb.append(float(xh.pow(2).sum() / (xs * xh).sum()))
    for key, values in (
        ("explained_variance", ev),
        ("mse", mse),
        ("l0", l0),
        ("relative_reconstruction_bias", rrb),
    ):
        assert got[key] == pytest.approx(_percentiles(values), rel=1e-9), key


def test_bootstrap_of_ce_and_kl_scores_equals_literal_resampling():
    gen = torch.Generator().manual_seed(2)
    B, T = 10, 7
    ce = {
        k: torch.rand(B, T - 1, generator=gen, dtype=torch.float64) * s
        for k, s in (("c", 2), ("s", 3), ("a", 5))
    }
    kl = {k: torch.rand(B, T, generator=gen, dtype=torch.float64) * s for k, s in (("s", 1), ("a", 4))}
    ce["a"] += 2  # ablation worse than the SAE, on average
    keep = torch.rand(B, T, generator=gen) > 0.3
    sums = {
        "ce_clean": (ce["c"] * keep[:, :-1]).sum(1),
        "ce_sae": (ce["s"] * keep[:, :-1]).sum(1),
        "ce_abl": (ce["a"] * keep[:, :-1]).sum(1),
        "n_ce": keep[:, :-1].double().sum(1),
        "kl_sae": (kl["s"] * keep).sum(1),
        "kl_abl": (kl["a"] * keep).sum(1),
        "n_kl": keep.double().sum(1),
    }
    got = S.intervals(S.loss_metrics, sums, 150, 3)
    ce_scores, kl_scores, ce_sae = [], [], []
    for draw in _draws(B, 150, 3):
        tot = {"c": 0.0, "s": 0.0, "a": 0.0, "n": 0, "ks": 0.0, "ka": 0.0, "kn": 0}
        for b in draw:
            for t in range(T):
                if keep[b, t]:
                    if t < T - 1:
                        for k in ("c", "s", "a"):
                            tot[k] += float(ce[k][b, t])
                        tot["n"] += 1
                    tot["ks"] += float(kl["s"][b, t])
                    tot["ka"] += float(kl["a"][b, t])
                    tot["kn"] += 1
        c, s, a = (tot[k] / tot["n"] for k in ("c", "s", "a"))
        ce_scores.append((a - s) / (a - c))
        ce_sae.append(s)
        kl_scores.append((tot["ka"] - tot["ks"]) / tot["ka"])
    assert got["ce_loss_score"] == pytest.approx(_percentiles(ce_scores), rel=1e-9)
    assert got["ce_loss_with_sae"] == pytest.approx(_percentiles(ce_sae), rel=1e-9)
    assert got["kl_div_score"] == pytest.approx(_percentiles(kl_scores), rel=1e-9)
    p = S.point(S.loss_metrics, sums)
    assert p["ce_loss_score"] == pytest.approx(
        M.score(p["ce_loss_with_ablation"], p["ce_loss_with_sae"], p["ce_loss_without_sae"])
    )


def test_orthogonality_sums_and_interval_equal_recomputing_on_resampled_tokens():
    gen = torch.Generator().manual_seed(4)
    n, d, k, n_ctx = 10, 4, 3, 8
    w = torch.randn(n, d, generator=gen)
    context = torch.repeat_interleave(torch.arange(n_ctx), torch.randint(1, 6, (n_ctx,), generator=gen))
    T = len(context)
    acts = torch.rand(T, k, generator=gen) * (torch.rand(T, k, generator=gen) > 0.2)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(T)])
    stats = M.CoactivationStats(w, chunk_tokens=5)
    per = stats.update(acts, idx)
    sums = S.by_context(
        {f"coact_{c}": per[:, j] for j, c in enumerate(("s", "c", "ps", "p"))}, context, n_ctx
    )
    point = S.point(S.orth_metrics, sums)
    for key in point:
        assert point[key] == pytest.approx(stats.result()[key], rel=1e-9)
    got = S.intervals(S.orth_metrics, sums, 60, 5)
    per_ctx = [(context == c).nonzero()[:, 0] for c in range(n_ctx)]
    weighted, product = [], []
    for draw in _draws(n_ctx, 60, 5):
        rows = torch.cat([per_ctx[c] for c in draw])
        again = M.CoactivationStats(w)
        again.update(acts[rows], idx[rows])
        r = again.result()
        weighted.append(r["coact_weighted_mean_cos2"])
        product.append(r["coact_product_weighted_mean_cos2"])
    assert got["coact_weighted_mean_cos2"] == pytest.approx(_percentiles(weighted), rel=1e-9)
    assert got["coact_product_weighted_mean_cos2"] == pytest.approx(_percentiles(product), rel=1e-9)


def test_merged_accumulators_equal_one_pass_over_both_sets():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(12, 5, generator=gen)
    acts = torch.rand(30, 4, generator=gen) * (torch.rand(30, 4, generator=gen) > 0.25)
    idx = torch.stack([torch.randperm(12, generator=gen)[:4] for _ in range(30)])
    a, b, both = M.CoactivationStats(w), M.CoactivationStats(w), M.CoactivationStats(w)
    a.update(acts[:18], idx[:18])
    b.update(acts[18:], idx[18:])
    both.update(acts, idx)
    for key, value in both.result().items():
        assert a.merged(b).result()[key] == pytest.approx(value, rel=1e-12), key
    fa, fb, fboth = M.FeatureStats(12), M.FeatureStats(12), M.FeatureStats(12)
    fa.update(acts[:18], idx[:18])
    fb.update(acts[18:], idx[18:])
    fboth.update(acts, idx)
    merged = fa.merged(fb)
    assert merged.fires.tolist() == fboth.fires.tolist()
    for key in ("l0", "l1"):
        assert merged.result()[key] == pytest.approx(fboth.result()[key], rel=1e-12), key
    for key in ("frac_alive", "feature_density_histogram"):
        assert merged.result()[key] == fboth.result()[key], key


def test_excluded_shares_by_hand():
    x, x_hat, acts, context = _contexts(n_ctx=6, seed=8)
    x[3] *= 40  # one huge token, excluded
    out = torch.zeros(len(x), dtype=torch.bool)
    out[3] = True
    kept = S.by_context(S.recon_token_values(x[~out], x_hat[~out], acts[~out]), context[~out], 6)
    excl = S.by_context(S.recon_token_values(x[out], x_hat[out], acts[out]), context[out], 6)
    got = S.excluded_shares(kept, excl)
    mu = x.mean(0)
    var = (x - mu).pow(2).sum(-1)
    err = (x - x_hat).pow(2).sum(-1)
    assert got["frac_tokens"] == pytest.approx(1 / len(x))
    assert got["frac_squared_error"] == pytest.approx(float(err[3] / err.sum()), rel=1e-9)
    assert got["frac_ev_denominator"] == pytest.approx(float(var[3] / var.sum()), rel=1e-9)
    # The all-tokens sums are the kept plus the excluded ones.
    every = S.add_sums(kept, excl)
    assert S.point(S.recon_metrics, every)["explained_variance"] == pytest.approx(
        M.explained_variance(x, x_hat)
    )


def test_cos2_over_pairs_dense_and_sparse_paths_agree():
    gen = torch.Generator().manual_seed(9)
    unit = torch.nn.functional.normalize(torch.randn(700, 6, generator=gen, dtype=torch.float64), dim=1)
    seen = (torch.rand(700, 700, generator=gen) > 0.5).triu(1)
    n_pairs = int(seen.sum())
    i, j = seen.nonzero().T
    literal = float((unit[i] * unit[j]).sum(-1).pow(2).sum())
    assert M.sum_cos2_over_pairs(unit, seen, n_pairs) == pytest.approx(literal, rel=1e-10)  # dense path
    few = seen & (torch.rand(700, 700, generator=gen) > 0.99)
    i, j = few.nonzero().T
    literal = float((unit[i] * unit[j]).sum(-1).pow(2).sum())
    assert M.sum_cos2_over_pairs(unit, few, int(few.sum())) == pytest.approx(literal, rel=1e-10)
