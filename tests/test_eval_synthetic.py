"""Synthetic ground truth: the absorption metric on hand-built SAEs, and the benchmark end to end."""

from __future__ import annotations

import math

import pytest
import torch

from orthosae.eval import synthetic as S
from orthosae.synthetic import ToyModel


def _toy() -> ToyModel:
    # Features: 0 = parent, 1 and 2 = roots, 3 = child of 0. Orthogonal directions keep cosines exact.
    parent = torch.tensor([-1, -1, -1, 0])
    return ToyModel(torch.eye(4), torch.full((4,), 0.5), parent)


# Samples: parent+child, parent alone, root 1, parent+child+root 2.
CODES = torch.tensor(
    [
        [1.0, 0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 1.0, 1.0],
    ]
)


def test_absorbed_parent_is_reported():
    toy = _toy()
    # Latent 1 is the child latent with the parent folded into its decoder row; latent 0 (the parent
    # latent) goes silent whenever the child is present.
    w_dec = torch.stack([toy.directions[0], (toy.directions[3] + toy.directions[0]) / math.sqrt(2)])
    w_dec = torch.cat([w_dec, toy.directions[1:3]])
    latents = torch.tensor(
        [
            [0.0, 1.4, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 1.4, 0.0, 1.0],
        ]
    )
    r = S.absorption(toy, CODES, latents, w_dec, absorb_cos=0.3)
    assert r["absorption_rate"] == 1.0
    assert r["parent_recall_with_child"] == 0.0
    assert r["parent_recall_alone"] == 1.0
    assert r["child_parent_cos"] == pytest.approx(1 / math.sqrt(2))
    assert r["per_parent"][0]["n_with_child"] == 2


def test_clean_sae_has_no_absorption():
    toy = _toy()
    r = S.absorption(toy, CODES, CODES.clone(), torch.eye(4), absorb_cos=0.3)
    assert r["absorption_rate"] == 0.0
    assert r["parent_recall_with_child"] == 1.0
    assert r["child_parent_cos"] == pytest.approx(0.0)


def test_silent_parent_without_carrier_is_not_absorption():
    # The parent latent misses, but no other firing latent carries the parent: a recall failure only.
    toy = _toy()
    latents = CODES.clone()
    latents[:, 0] = 0.0
    r = S.absorption(toy, CODES, latents, torch.eye(4), absorb_cos=0.3)
    assert r["absorption_rate"] == 0.0
    assert r["parent_recall_with_child"] == 0.0


def test_benchmark_runs_fast_and_reports_every_variant():
    cfg = S.Config(seeds=2, steps=200, orth_lambdas="1", n_test=3000)
    result = S.run(cfg)
    assert set(result["summary"]) == {"topk", "topk+orth λ=1"}
    for stats in result["summary"].values():
        assert stats["l0"]["mean"] == pytest.approx(cfg.k, abs=0.5)  # TopK: k latents (a few may be 0)
        assert 0.0 <= stats["absorption_rate"]["mean"] <= 1.0
        assert stats["recovery_mean_max_cos"]["mean"] > 0.5
    assert len(result["runs"]) == 4
    table = S.format_table(result)
    assert "absorption_rate" in table and "±" in table


def test_config_rejects_bad_lambdas():
    from orthosae.errors import UserError

    with pytest.raises(UserError, match="orth_lambdas"):
        S.Config(orth_lambdas="1e-3,abc").validate()
