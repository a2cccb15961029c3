"""The unlearning eval's arithmetic against literal, slow reference implementations: feature selection, the
answer choice, the orderings filter, the score with its retain gate and minimum over the grid, its
bootstrap, and the early-stop rule."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from orthosae.eval.uncertainty import resample_counts
from orthosae.eval.unlearning_score import (
    bootstrap_scores,
    choose,
    gate_fails_everywhere,
    orderings,
    permute,
    score_from_tables,
    select_features,
    survives_all_orderings,
    unlearning_score,
)

# ---------------------------------------------------------------- literal references


def ref_select(forget: list[float], retain: list[float], threshold: float, n: int) -> list[int]:
    eligible = [
        (f, i) for i, (f, r) in enumerate(zip(forget, retain, strict=True)) if r < threshold and f > 0
    ]
    eligible.sort(key=lambda fi: (-fi[0], fi[1]))
    return [i for _, i in eligible[:n]]


def ref_score(forget_rows: list[list[bool]], retain_rows: list[list[bool]], gate: float) -> float:
    effects = []
    for f, r in zip(forget_rows, retain_rows, strict=True):
        retain_acc = sum(r) / len(r)
        effects.append(sum(f) / len(f) if retain_acc >= gate else 1.0)
    return 1.0 - min(effects)


def ref_resampled_score(
    forget_rows: list[list[bool]], retain_rows: list[list[bool]], gate: float, fi: list[int], ri: list[int]
) -> float:
    """The score on a resample given as the drawn question indices."""
    return ref_score(
        [[row[i] for i in fi] for row in forget_rows], [[row[i] for i in ri] for row in retain_rows], gate
    )


def counts_of(indices: list[list[int]], n: int) -> torch.Tensor:
    w = torch.zeros(len(indices), n, dtype=torch.float64)
    for b, idx in enumerate(indices):
        for i in idx:
            w[b, i] += 1
    return w


def random_tables(seed: int, n_int: int, nf: int, nr: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Interventions of different strength: forget accuracy and retain accuracy fall together.
    strength = torch.rand(n_int, 1, generator=g)
    forget = torch.rand(n_int, nf, generator=g) > strength * 0.9
    retain = torch.rand(n_int, nr, generator=g) > strength * 0.03
    return forget, retain


# ---------------------------------------------------------------- tests


def test_select_features_on_planted_frequencies():
    forget = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.0, 0.35])
    retain = torch.tensor([0.0, 0.02, 0.0005, 0.0, 0.0, 0.005])
    # threshold 0.01 rules out latent 1; latent 4 never fires on forget text, so it is never chosen.
    assert select_features(forget, retain, 0.01, 10) == [0, 5, 2, 3]
    assert select_features(forget, retain, 0.01, 2) == [0, 5]
    # threshold 0.001 also rules out latent 5 (0.005 ≥ 0.001).
    assert select_features(forget, retain, 0.001, 10) == [0, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_select_features_matches_a_literal_loop(seed):
    g = torch.Generator().manual_seed(seed)
    d = 300
    # Frequencies with many zeros and exact ties, as counts / tokens give.
    forget = (torch.randint(0, 6, (d,), generator=g) * (torch.rand(d, generator=g) < 0.5)).float() / 64
    retain = torch.randint(0, 3, (d,), generator=g).float() / 256
    for threshold in (0.001, 0.005, 0.01):
        for n in (1, 10, 20, 500):
            assert select_features(forget, retain, threshold, n) == ref_select(
                forget.tolist(), retain.tolist(), threshold, n
            )


def test_choose_matches_a_literal_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20, generator=g)
    cands = [[[0, 4], [1, 5], [2, 6], [3, 7]]] * 3 + [[[9], [11]], [[12], [13], [14]], [[15, 16, 17], [18]]]
    got = choose(logits, cands)
    for row, choices in enumerate(cands):
        best, best_value = 0, -float("inf")
        for c, variants in enumerate(choices):
            value = max(float(logits[row, v]) for v in variants)
            if value > best_value:
                best, best_value = c, value
        assert int(got[row]) == best
    # Exact tie: the first choice wins.
    assert int(choose(torch.zeros(1, 4), [[[0], [1]]])[0]) == 0


def test_orderings_and_answer_mapping():
    perms = orderings(4)
    assert len(perms) == 24 and perms[0] == (0, 1, 2, 3) and len(set(perms)) == 24
    assert perms == list(itertools.permutations(range(4)))
    choices = ["w", "x", "y", "z"]
    for answer in range(4):
        for p in perms:
            shown, target = permute(choices, answer, p)
            assert shown == [choices[i] for i in p]
            assert shown[target] == choices[answer]


def test_survives_all_orderings_is_all_correct():
    rng = random.Random(0)
    table = [[rng.random() < 0.9 for _ in range(24)] for _ in range(50)]
    got = survives_all_orderings(torch.tensor(table)).tolist()
    assert got == [all(row) for row in table]
    assert any(got) and not all(got)


def test_score_with_gate_and_min_over_grid():
    runs = [
        {"forget_accuracy": 0.2, "retain_accuracy": 0.9},  # best forget drop but hurts retain: ignored
        {"forget_accuracy": 0.6, "retain_accuracy": 1.0},
        {"forget_accuracy": 0.7, "retain_accuracy": 0.995},
        {"forget_accuracy": None, "retain_accuracy": None},  # stopped early: the gate failed for sure
    ]
    assert unlearning_score(runs, 0.99) == pytest.approx(0.4)
    assert unlearning_score([{"forget_accuracy": 0.1, "retain_accuracy": 0.5}], 0.99) == 0.0
    assert unlearning_score([], 0.99) is None


@pytest.mark.parametrize("seed", range(6))
def test_score_from_tables_matches_a_literal_loop(seed):
    forget, retain = random_tables(seed, 16, 37, 120)
    got = score_from_tables(forget, retain, 0.99)
    assert got == ref_score(forget.tolist(), retain.tolist(), 0.99)


def test_gate_boundary_counts_exactly():
    # 99 of 100 retain answers right is exactly 0.99: the intervention counts (≥), as in SAEBench.
    retain = torch.ones(2, 100, dtype=torch.bool)
    retain[0, 0] = False
    retain[1, :2] = False
    forget = torch.tensor([[True, False, False, False], [False, False, False, False]])
    assert score_from_tables(forget, retain, 0.99) == 0.75


@pytest.mark.parametrize("seed", range(4))
def test_bootstrap_matches_a_literal_loop_over_drawn_questions(seed):
    forget, retain = random_tables(seed, 8, 23, 60)
    rng = random.Random(seed)
    draws_f = [[rng.randrange(23) for _ in range(23)] for _ in range(40)]
    draws_r = [[rng.randrange(60) for _ in range(60)] for _ in range(40)]
    got = bootstrap_scores(forget, retain, 0.99, counts_of(draws_f, 23), counts_of(draws_r, 60))
    for b in range(40):
        want = ref_resampled_score(forget.tolist(), retain.tolist(), 0.99, draws_f[b], draws_r[b])
        assert float(got[b]) == pytest.approx(want, abs=1e-12)


def test_bootstrap_of_identity_resample_is_the_score():
    forget, retain = random_tables(9, 16, 30, 80)
    ones_f = torch.ones(3, 30, dtype=torch.float64)
    ones_r = torch.ones(3, 80, dtype=torch.float64)
    scores = bootstrap_scores(forget, retain, 0.99, ones_f, ones_r)
    assert scores.tolist() == [score_from_tables(forget, retain, 0.99)] * 3


@pytest.mark.parametrize("seed", range(6))
def test_early_stop_rule_matches_a_literal_check_and_is_safe(seed):
    g = torch.Generator().manual_seed(seed)
    n = 200
    w = resample_counts(n, 300, seed)
    final_wrong = torch.rand(n, generator=g) < [0.002, 0.01, 0.03, 0.06, 0.1, 0.3][seed]
    order = torch.randperm(n, generator=g).tolist()
    stopped_at = None
    for k in range(0, n + 1, 10):
        known = torch.zeros(n, dtype=torch.bool)
        known[order[:k]] = final_wrong[order[:k]]
        got = gate_fails_everywhere(known, w, 0.99)
        # Literal: the best accuracy any sample can still reach is below the gate, in every sample.
        samples = [[1] * n, *w.long().tolist()]
        want = all(
            1 - sum(c * int(x) for c, x in zip(s, known.tolist(), strict=True)) / n < 0.99 for s in samples
        )
        assert got == want
        if got and stopped_at is None:
            stopped_at = k
    if stopped_at is not None:
        # Safe: with every answer known, the gate fails in the full sample and every resample too.
        retain = (~final_wrong).unsqueeze(0)
        forget = torch.zeros(1, 5, dtype=torch.bool)  # forget answers that would matter if the gate passed
        assert bootstrap_scores(forget, retain, 0.99, torch.ones(300, 5, dtype=torch.float64), w).eq(0).all()
        assert score_from_tables(forget, retain, 0.99) == 0.0
