"""Probe maths: logistic regression, L1 latent selection, mean-difference selection, F1."""

from __future__ import annotations

import pytest
import torch

from orthosae.eval.probes import (
    accuracy,
    balanced_weights,
    f1_score,
    fit_l1_probe,
    fit_logistic,
    fit_sklearn_logistic,
    top_k_mean_diff,
)


def _separable(n: int = 400, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 5.0, d)  # mixed scales: standardising matters
    y = (x[:, 0] * 2 + x[:, 1] > 0).float()
    return x, y


def test_logistic_recovers_a_separable_problem():
    x, y = _separable()
    probe = fit_logistic(x[:300], y[:300])
    assert accuracy(y[300:], probe.logits(x[300:]) > 0) > 0.95
    w = probe.direction()
    true = torch.zeros_like(w)
    true[0], true[1] = 2.0, 1.0
    assert torch.nn.functional.cosine_similarity(w, true, dim=0) > 0.95


def test_logistic_trains_one_vs_rest_columns_at_once():
    x, y = _separable()
    y2 = torch.stack([y, 1 - y], dim=1)
    probe = fit_logistic(x, y2)
    logits = probe.logits(x)
    assert logits.shape == (400, 2) and probe.direction().shape == (2, 8)
    assert accuracy(y, logits[:, 0] > 0) > 0.95 and accuracy(1 - y, logits[:, 1] > 0) > 0.95


def test_sklearn_logistic_solves_the_c_objective_by_hand():
    # x = ±1, y = 0/1: b = 0 by symmetry and 0 = ∂/∂w [2·log(1 + e^-w) + w²/(2C)] gives w = 2C·σ(−w):
    # w = 0.6748316143 for C = 1 (sklearn's default, SAEBench's probe) and 2.1280 for C = 10.
    x, y = torch.tensor([[-1.0], [1.0]]), torch.tensor([0.0, 1.0])
    probe = fit_sklearn_logistic(x, y)
    assert probe.direction().item() == pytest.approx(0.6748316143, abs=1e-6)
    assert fit_sklearn_logistic(x, y, c=10).direction().item() == pytest.approx(2.1280, abs=1e-3)
    # No standardisation: shifting the feature only moves the (unpenalised) intercept.
    shifted = fit_sklearn_logistic(x + 100, y)
    assert shifted.direction().item() == pytest.approx(0.6748316143, abs=1e-6)
    assert shifted.logits(x + 100).tolist() == pytest.approx([-0.6748316, 0.6748316], abs=1e-5)
    # An uninformative feature: w = 0 and the intercept is the unpenalised log-odds, log 3.
    flat = fit_sklearn_logistic(torch.zeros(4, 1), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert flat.direction().item() == 0.0 and flat.bias.item() == pytest.approx(1.0986123, abs=1e-6)


def test_constant_features_do_not_break_standardisation():
    x, y = _separable()
    x = torch.cat([x, torch.zeros(len(x), 3)], dim=1)
    probe = fit_logistic(x, y)
    assert torch.isfinite(probe.logits(x)).all()


def test_balanced_weights_give_each_class_half():
    y = torch.tensor([1.0, 0, 0, 0])
    w = balanced_weights(y.unsqueeze(1)).squeeze(1)
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])
    assert (w * y).sum() == pytest.approx((w * (1 - y)).sum())


def test_top_k_mean_diff_picks_the_planted_features():
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(300) % 2).float()
    x = torch.randn(300, 40, generator=g)
    x[:, 7] += 3 * y
    x[:, 21] -= 1.5 * y  # a negative shift counts too (absolute difference)
    assert top_k_mean_diff(x, y, 2).tolist() == [7, 21]


def test_l1_probe_ranks_the_planted_latent_first():
    g = torch.Generator().manual_seed(2)
    y = (torch.rand(600, generator=g) < 0.2).float()
    z = torch.relu(torch.randn(600, 30, generator=g)) * 0.3
    z[:, 12] = y * 2.0  # the planted latent fires exactly on positives
    w = fit_l1_probe(z, y, num_epochs=30, batch_size=128)
    assert w.shape == (1, 30)
    assert int(w[0].argmax()) == 12


def test_f1_and_accuracy_by_hand():
    t = torch.tensor([1, 1, 0, 0, 1])
    p = torch.tensor([1, 0, 1, 0, 1])
    assert f1_score(t, p) == pytest.approx(2 * 2 / (3 + 3))
    assert accuracy(t, p) == pytest.approx(3 / 5)
    assert f1_score(torch.zeros(3), torch.zeros(3)) == 0.0
