"""Probe maths: logistic regression, mean-difference selection, F1."""

from __future__ import annotations

import pytest
import torch

from orthosae.eval.probes import (
    accuracy,
    f1_score,
    fit_sklearn_logistic,
    top_k_mean_diff,
)


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


def test_top_k_mean_diff_picks_the_planted_features():
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(300) % 2).float()
    x = torch.randn(300, 40, generator=g)
    x[:, 7] += 3 * y
    x[:, 21] -= 1.5 * y  # a negative shift counts too (absolute difference)
    assert top_k_mean_diff(x, y, 2).tolist() == [7, 21]


def test_f1_and_accuracy_by_hand():
    t = torch.tensor([1, 1, 0, 0, 1])
    p = torch.tensor([1, 0, 1, 0, 1])
    assert f1_score(t, p) == pytest.approx(2 * 2 / (3 + 3))
    assert accuracy(t, p) == pytest.approx(3 / 5)
    assert f1_score(torch.zeros(3), torch.zeros(3)) == 0.0
