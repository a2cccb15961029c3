"""Tests for orthosae.orthogonality: every method against a literal float64 reference, edge cases, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthosae import orthogonality
from orthosae.errors import UserError
from orthosae.orthogonality import (
    COACTIVATIONS,
    METHODS,
    auto_chunk_size,
    orthogonality_penalty,
    pairwise_penalty_from_rows,
)

RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------------
# Literal reference: dense f with Python loops, mask, C = A^T A, cos^2 with a double loop, all in float64.
# ----------------------------------------------------------------------------------------------------------


def reference_penalty(
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    weight: torch.Tensor,
    ema_mean: torch.Tensor,
    threshold_ratio: float = 0.1,
    coactivation: str = "product",
    pairs: str = "i<j",
) -> torch.Tensor:
    """The formula as written. ``pairs`` selects i<j (the real one), i<=j or i!=j (deliberately wrong)."""
    batch, k = top_acts.shape
    n = weight.shape[0]
    zero = top_acts.new_zeros(())
    rows = []
    for b in range(batch):
        entries = [zero] * n
        for p in range(k):
            i = int(top_indices[b, p])
            f_bi = top_acts[b, p]
            m_bi = 1.0 if float(f_bi.detach()) > float(ema_mean[i].detach()) * threshold_ratio else 0.0
            entries[i] = f_bi * m_bi if coactivation == "product" else top_acts.new_tensor(m_bi)
        rows.append(torch.stack(entries))
    a = torch.stack(rows) if rows else top_acts.new_zeros(0, n)
    co = a.T @ a
    total = zero
    for i in range(n):
        for j in range(n):
            if (pairs == "i<j" and i < j) or (pairs == "i<=j" and i <= j) or (pairs == "i!=j" and i != j):
                wi, wj = weight[i], weight[j]
                cos = (wi @ wj) / (wi.norm().clamp_min(1e-8) * wj.norm().clamp_min(1e-8))
                total = total + co[i, j] * cos**2
    return total


def make_inputs(
    batch: int, n: int, k: int, d: int, seed: int = 0, zero_frac: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Realistic fp32 inputs: distinct ids per token from a top-k, positive acts, ema from the batch mean."""
    gen = torch.Generator().manual_seed(seed)
    top_indices = torch.rand(batch, n, generator=gen).topk(k, dim=1).indices
    top_acts = torch.rand(batch, k, generator=gen) + 0.05
    if zero_frac > 0:
        top_acts = top_acts * (torch.rand(batch, k, generator=gen) >= zero_frac)
    weight = torch.randn(n, d, generator=gen)
    dense = torch.zeros(batch, n).scatter(1, top_indices, top_acts)
    # Scale the batch mean up so that threshold_ratio=0.1..1 masks a real fraction of the entries.
    ema_mean = dense.mean(dim=0) * 3.0 if batch else torch.zeros(n)
    return top_acts, top_indices, weight, ema_mean


def value_and_grads(
    fn: Callable[..., torch.Tensor],
    top_acts: torch.Tensor,
    weight: torch.Tensor,
    *args: object,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value plus gradients w.r.t. top_acts and weight (zeros where the graph does not reach an input)."""
    acts = top_acts.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    value = fn(acts, args[0], w, *args[1:], **kwargs)
    assert value.shape == () and value.requires_grad  # connected to the graph even when it is 0
    g_acts, g_w = torch.autograd.grad(value, [acts, w], allow_unused=True)
    g_acts = torch.zeros_like(acts) if g_acts is None else g_acts
    g_w = torch.zeros_like(w) if g_w is None else g_w
    return value.detach(), g_acts, g_w


def reference_value_and_grads(
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    weight: torch.Tensor,
    ema_mean: torch.Tensor,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return value_and_grads(
        reference_penalty, top_acts.double(), weight.double(), top_indices, ema_mean.double(), **kwargs
    )


def method_value_and_grads(
    top_acts: torch.Tensor,
    top_indices: torch.Tensor,
    weight: torch.Tensor,
    ema_mean: torch.Tensor,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return value_and_grads(orthogonality_penalty, top_acts, weight, top_indices, ema_mean, **kwargs)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> None:
    """rtol 1e-4, plus an absolute slack of rtol * max|expected| (gradient entries can cancel to ~0) and
    ``floor`` (fp32 rounding of gradients that are exactly 0 in theory, e.g. d=1 where every cos^2 is 1)."""
    expected = expected.double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=RTOL * scale + floor + 1e-12)


def assert_matches(
    got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    want: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Value at rtol 1e-4; gradients likewise, with a floor of ~10 fp32 ulps of the penalty's magnitude."""
    floor = 1e-6 * max(1.0, abs(float(want[0])))
    assert_close_rel(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert torch.isfinite(g).all()
        assert_close_rel(g, w, floor)


# ----------------------------------------------------------------------------------------------------------
# The reference itself: it must be right, and distinguishable from plausible mistakes.
# ----------------------------------------------------------------------------------------------------------


def test_reference_hand_computed() -> None:
    # Two features 60 degrees apart (cos^2 = 1/4), one token with activations 2 and 3.
    weight = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    acts = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    ema = torch.zeros(2, dtype=torch.float64)
    assert float(reference_penalty(acts, idx, weight, ema)) == pytest.approx(2 * 3 * 0.25)
    assert float(reference_penalty(acts, idx, weight, ema, coactivation="binary")) == pytest.approx(0.25)
    # Including the diagonal adds f^2 * cos^2(w, w) = 4 + 9: a reference that did so would be caught.
    assert float(reference_penalty(acts, idx, weight, ema, pairs="i<=j")) == pytest.approx(1.5 + 13.0)
    for method in METHODS:
        assert float(orthogonality_penalty(acts, idx, weight, ema, method=method)) == pytest.approx(1.5)


def test_reference_distinguishes_diagonal_and_double_counting() -> None:
    acts, idx, weight, ema = make_inputs(6, 10, 4, 5, seed=1)
    lower = float(reference_penalty(acts.double(), idx, weight.double(), ema.double()))
    with_diag = float(reference_penalty(acts.double(), idx, weight.double(), ema.double(), pairs="i<=j"))
    ordered = float(reference_penalty(acts.double(), idx, weight.double(), ema.double(), pairs="i!=j"))
    assert lower > 0
    assert with_diag > lower * 1.01
    assert ordered == pytest.approx(2 * lower)  # each unordered pair counted once, not twice
    got = float(orthogonality_penalty(acts, idx, weight, ema))
    assert got == pytest.approx(lower, rel=RTOL)
    assert got != pytest.approx(with_diag, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Every method against the reference, values and gradients.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coactivation", COACTIVATIONS)
@pytest.mark.parametrize(
    ("shape", "threshold_ratio", "seed"),
    [((7, 12, 4, 5), 0.1, 0), ((5, 9, 3, 3), 1.0, 1), ((9, 10, 5, 4), 0.0, 2), ((4, 6, 6, 2), 0.2, 3)],
)
def test_methods_match_reference(
    method: str, coactivation: str, shape: tuple[int, int, int, int], threshold_ratio: float, seed: int
) -> None:
    acts, idx, weight, ema = make_inputs(*shape, seed=seed)
    kwargs = {"threshold_ratio": threshold_ratio, "coactivation": coactivation}
    want = reference_value_and_grads(acts, idx, weight, ema, **kwargs)
    got = method_value_and_grads(acts, idx, weight, ema, method=method, **kwargs)
    assert float(want[0]) > 0
    assert_matches(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_binary_mode_sends_no_gradient_to_activations(method: str) -> None:
    acts, idx, weight, ema = make_inputs(6, 10, 4, 5, seed=4)
    acts.requires_grad_(True)
    weight.requires_grad_(True)
    binary = orthogonality_penalty(acts, idx, weight, ema, coactivation="binary", method=method)
    assert torch.autograd.grad(binary, [acts], allow_unused=True) == (None,)
    product = orthogonality_penalty(acts, idx, weight, ema, coactivation="product", method=method)
    (g_product,) = torch.autograd.grad(product, [acts])
    assert bool(g_product.abs().sum() > 0)


@pytest.mark.parametrize("method", METHODS)
def test_ema_mean_gets_no_gradient(method: str) -> None:
    acts, idx, weight, ema = make_inputs(6, 10, 4, 5, seed=5)
    ema.requires_grad_(True)
    weight.requires_grad_(True)
    value = orthogonality_penalty(acts, idx, weight, ema, method=method)
    g_ema, g_w = torch.autograd.grad(value, [ema, weight], allow_unused=True)
    assert g_ema is None
    assert g_w is not None and bool(g_w.abs().sum() > 0)


# ----------------------------------------------------------------------------------------------------------
# Edge cases.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_k1_is_exactly_zero(method: str) -> None:
    acts, idx, weight, ema = make_inputs(8, 10, 1, 4, seed=6)
    value, g_acts, g_w = method_value_and_grads(acts, idx, weight, ema, method=method, threshold_ratio=0.0)
    assert float(value) == 0.0
    assert bool((g_acts == 0).all()) and bool((g_w == 0).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coactivation", COACTIVATIONS)
def test_all_masked_is_zero_without_nan(method: str, coactivation: str) -> None:
    acts, idx, weight, ema = make_inputs(8, 10, 4, 4, seed=7)
    ema = torch.full_like(ema, 1e30)
    value, g_acts, g_w = method_value_and_grads(
        acts, idx, weight, ema, method=method, coactivation=coactivation
    )
    assert float(value) == 0.0
    for g in (g_acts, g_w):
        assert not g.isnan().any() and bool((g == 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_is_zero(method: str) -> None:
    acts, idx, weight, ema = make_inputs(0, 10, 4, 4)
    assert acts.shape == (0, 4)
    value, g_acts, g_w = method_value_and_grads(acts, idx, weight, ema, method=method)
    assert value.shape == () and float(value) == 0.0
    assert g_acts.shape == (0, 4) and bool((g_w == 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_single_active_feature_is_zero_but_backward_works(method: str) -> None:
    # Only one entry passes the mask anywhere: n_act = 1 in masked_dense, no pairs in the other methods.
    acts = torch.tensor([[5.0, 0.1], [5.0, 0.1]])
    idx = torch.tensor([[3, 1], [3, 2]])
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    ema = torch.full((5,), 10.0)
    value, g_acts, g_w = method_value_and_grads(acts, idx, weight, ema, method=method)
    assert float(value) == 0.0 and bool((g_w == 0).all()) and bool((g_acts == 0).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coactivation", COACTIVATIONS)
def test_identical_feature_sets_accumulate_per_token(method: str, coactivation: str) -> None:
    # Every token uses the same features (in shuffled order): C_ij sums over tokens, so B copies of one token
    # give B times its value; the sparse method must sum the repeated coordinates when it coalesces.
    one_acts, one_idx, weight, _ = make_inputs(1, 8, 5, 4, seed=8)
    ema = torch.zeros(8)
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(5, generator=gen) for _ in range(6)]
    acts = torch.cat([one_acts[:, p] for p in perms])
    idx = torch.cat([one_idx[:, p] for p in perms])
    single = orthogonality_penalty(one_acts, one_idx, weight, ema, method=method, coactivation=coactivation)
    want = reference_value_and_grads(acts, idx, weight, ema, coactivation=coactivation)
    got = method_value_and_grads(acts, idx, weight, ema, method=method, coactivation=coactivation)
    assert_matches(got, want)
    assert float(got[0]) == pytest.approx(6 * float(single), rel=RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_overlapping_feature_sets(method: str) -> None:
    # Tokens draw 4 ids from only 6 features, so most pairs recur in several tokens.
    gen = torch.Generator().manual_seed(9)
    idx = torch.stack([torch.randperm(6, generator=gen)[:4] for _ in range(10)])
    acts = torch.rand(10, 4, generator=gen) + 0.1
    weight = torch.randn(6, 3, generator=gen)
    ema = torch.full((6,), 0.5)
    want = reference_value_and_grads(acts, idx, weight, ema, threshold_ratio=1.0)
    got = method_value_and_grads(acts, idx, weight, ema, method=method, threshold_ratio=1.0)
    assert_matches(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_ties_in_activation_values(method: str) -> None:
    acts, idx, weight, ema = make_inputs(6, 9, 4, 3, seed=10)
    acts = torch.ones_like(acts)
    ema = torch.full_like(ema, 0.5)
    want = reference_value_and_grads(acts, idx, weight, ema)
    got = method_value_and_grads(acts, idx, weight, ema, method=method)
    assert_matches(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_threshold_is_strict(method: str) -> None:
    # f == ema * ratio exactly (ratio 1) fails the mask; nudging f above it makes the entry count.
    acts = torch.tensor([[1.0, 2.0, 3.0]])
    idx = torch.tensor([[0, 1, 2]])
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ema = torch.tensor([1.0, 0.0, 0.0])
    at = float(orthogonality_penalty(acts, idx, weight, ema, threshold_ratio=1.0, method=method))
    above = float(orthogonality_penalty(acts * 1.001, idx, weight, ema, threshold_ratio=1.0, method=method))
    assert at == pytest.approx(2 * 3 * 0.5)  # only the pair (1, 2): cos^2 = 1/2
    assert above == pytest.approx(1.001**2 * (1 * 2 * 0.5 + 2 * 3 * 0.5 + 0.0), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coactivation", COACTIVATIONS)
def test_zero_activations_never_pass(method: str, coactivation: str) -> None:
    acts, idx, weight, ema = make_inputs(8, 10, 4, 4, seed=11, zero_frac=0.4)
    ema = torch.zeros_like(ema)  # with threshold 0 only the zeros in top_acts are masked
    assert bool((acts == 0).any())
    kwargs = {"threshold_ratio": 0.0, "coactivation": coactivation}
    want = reference_value_and_grads(acts, idx, weight, ema, **kwargs)
    got = method_value_and_grads(acts, idx, weight, ema, method=method, **kwargs)
    assert_matches(got, want)
    if coactivation == "binary":  # binary would count the zeros as co-active if they passed
        assert float(got[0]) < float(orthogonality_penalty(torch.ones_like(acts), idx, weight, ema, **kwargs))


@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_counts_every_positive_entry(method: str) -> None:
    acts, idx, weight, ema = make_inputs(7, 10, 4, 4, seed=12)
    zero = orthogonality_penalty(acts, idx, weight, ema, threshold_ratio=0.0, method=method)
    masked = orthogonality_penalty(acts, idx, weight, ema, threshold_ratio=1.0, method=method)
    unmasked = pairwise_penalty_from_rows(acts, orthogonality.normalize_rows(weight)[idx])
    assert float(zero) == pytest.approx(float(unmasked), rel=RTOL)
    assert float(zero) > float(masked) > 0
    assert_matches(
        method_value_and_grads(acts, idx, weight, ema, threshold_ratio=0.0, method=method),
        reference_value_and_grads(acts, idx, weight, ema, threshold_ratio=0.0),
    )


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_weight_row(method: str) -> None:
    acts, idx, weight, ema = make_inputs(6, 8, 4, 3, seed=13)
    weight[int(idx[0, 0])] = 0.0
    want = reference_value_and_grads(acts, idx, weight, ema, threshold_ratio=0.0)
    got = method_value_and_grads(acts, idx, weight, ema, method=method, threshold_ratio=0.0)
    assert_matches(got, want)
    # A zero row has S = 0 with every partner: dropping its entries leaves the value unchanged.
    dropped = acts.clone()
    dropped[idx == int(idx[0, 0])] = 0.0
    assert float(got[0]) == pytest.approx(
        float(orthogonality_penalty(dropped, idx, weight, ema, threshold_ratio=0.0, method=method)), rel=RTOL
    )


@pytest.mark.parametrize("method", METHODS)
def test_one_dimensional_rows(method: str) -> None:
    # With d=1 every cos^2 is exactly 1, so L = sum_{i<j} C_ij and the weight gradient is 0 in theory; in
    # fp32 it is rounding noise amplified by 1/|w_i| (the normalisation), hence the absolute check.
    acts, idx, weight, ema = make_inputs(12, 9, 3, 1, seed=28438, zero_frac=0.3)
    want = reference_value_and_grads(acts, idx, weight, ema)
    value, g_acts, g_w = method_value_and_grads(acts, idx, weight, ema, method=method)
    assert_close_rel(value, want[0])
    assert_close_rel(g_acts, want[1], floor=1e-6 * float(value))
    assert float(g_w.abs().max()) < 1e-5 * float(value) / float(weight.abs().min())


@pytest.mark.parametrize("method", METHODS)
def test_negative_ema_follows_the_formula(method: str) -> None:
    # Not expected in training, but the mask is literal: with a negative threshold a zero activation passes,
    # contributes 0 to the value and still receives gradient sum_q A_bq S_pq (as in the reference).
    acts, idx, weight, ema = make_inputs(6, 9, 4, 3, seed=18, zero_frac=0.4)
    ema = -torch.ones_like(ema)
    assert bool((acts == 0).any())
    want = reference_value_and_grads(acts, idx, weight, ema)
    got = method_value_and_grads(acts, idx, weight, ema, method=method)
    assert_matches(got, want)
    assert bool((got[1][acts == 0] != 0).any())


def test_mixed_dtypes_promote() -> None:
    acts, idx, weight, ema = make_inputs(5, 8, 3, 4, seed=14)
    got = orthogonality_penalty(acts, idx, weight.double(), ema)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(
        float(reference_penalty(acts.double(), idx, weight.double(), ema)), rel=1e-6
    )


# ----------------------------------------------------------------------------------------------------------
# Pairwise internals: chunking, the lower-level entry point, no host syncs.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coactivation", COACTIVATIONS)
def test_chunk_sizes_agree(coactivation: str) -> None:
    acts, idx, weight, ema = make_inputs(10, 16, 5, 6, seed=15)
    results = [
        method_value_and_grads(acts, idx, weight, ema, chunk_size=c, coactivation=coactivation)
        for c in (1, 3, 10, 1000, None)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert_matches(results[0], reference_value_and_grads(acts, idx, weight, ema, coactivation=coactivation))


def test_auto_chunking_splits_when_over_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_chunk_size(32, 512, 4) == 1024  # 1024 x 32 x 512 fp32 = 64 MiB
    assert auto_chunk_size(32, 512, 4, budget_bytes=1) == 1
    acts, idx, weight, ema = make_inputs(9, 12, 4, 5, seed=16)
    whole = orthogonality_penalty(acts, idx, weight, ema)
    calls: list[list[int]] = []
    original = orthogonality.chunks

    def counting(batch: int, size: int) -> list[slice]:
        out = original(batch, size)
        calls.append([len(range(batch)[sl]) for sl in out])
        return out

    monkeypatch.setattr(orthogonality, "chunks", counting)
    monkeypatch.setattr(orthogonality, "CHUNK_BYTES", 2 * 4 * 5 * 4)  # two tokens' rows per chunk
    split = orthogonality_penalty(acts, idx, weight, ema)
    assert calls == [[2, 2, 2, 2, 1]]
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0.0)
    # Gradients too: one accumulated (n, d) gradient across chunks equals the unchunked one.
    w1, w2 = weight.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    orthogonality_penalty(acts.detach(), idx, w1, ema).backward()
    monkeypatch.setattr(orthogonality, "CHUNK_BYTES", 1 << 30)
    orthogonality_penalty(acts.detach(), idx, w2, ema).backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_masked_activations() -> None:
    acts = torch.tensor([[0.5, 0.0, 2.0]], requires_grad=True)
    idx = torch.tensor([[0, 1, 2]])
    ema = torch.tensor([10.0, 0.0, 10.0])  # thresholds at ratio 0.1: 1, 0, 1
    product = orthogonality.masked_activations(acts, idx, ema, 0.1, "product")
    binary = orthogonality.masked_activations(acts, idx, ema, 0.1, "binary")
    assert product.tolist() == [[0.0, 0.0, 2.0]]
    assert binary.tolist() == [[0.0, 0.0, 1.0]] and not binary.requires_grad
    (grad,) = torch.autograd.grad(product.sum(), [acts])
    assert grad.tolist() == [[0.0, 0.0, 1.0]]  # the mask is a constant: masked entries get no gradient


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages that autograd keeps for backward while ``fn`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().backward()
    return sum(storages.values())


def test_chunking_bounds_what_autograd_keeps() -> None:
    acts, idx, weight, ema = make_inputs(64, 40, 8, 128, seed=19)
    acts.requires_grad_(True)
    weight.requires_grad_(True)
    gathered = 64 * 8 * 128 * 4  # all tokens' rows, fp32

    def run(chunk: int) -> torch.Tensor:
        return orthogonality_penalty(acts, idx, weight, ema, chunk_size=chunk)

    # Only the (chunk, k, k) Grams are kept, never the gathered (chunk, k, d) rows, whatever the chunking.
    assert _saved_bytes(lambda: run(64)) < gathered / 3
    assert _saved_bytes(lambda: run(4)) < gathered / 3


def test_sparse_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    acts, idx, weight, ema = make_inputs(10, 16, 5, 6, seed=20)
    whole = method_value_and_grads(acts, idx, weight, ema, method="sparse")
    monkeypatch.setattr(orthogonality, "CHUNK_BYTES", 3 * 2 * 6 * 4)  # three pairs per chunk
    split = method_value_and_grads(acts, idx, weight, ema, method="sparse")
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_pairwise_penalty_from_rows_direct() -> None:
    rows = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # cos^2: (0,1)=0, (0,2)=.36, (1,2)=.64
    acts = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(pairwise_penalty_from_rows(acts, rows)) == pytest.approx(1 * 3 * 0.36 + 2 * 3 * 0.64)
    assert float(pairwise_penalty_from_rows(acts[:, :1], rows[:, :1])) == 0.0  # own diagonal excluded


def test_pairwise_custom_backward_gradcheck() -> None:
    gen = torch.Generator().manual_seed(23)
    acts = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rows_normed = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(5)])
    idx[1] = idx[0]  # repeated ids across tokens: the scatter-add must sum them

    def gathered(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return orthogonality._pairwise(a, idx, w, 2)  # 3 chunks accumulating one gradient

    def from_rows(a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return pairwise_penalty_from_rows(a, rows)

    assert torch.autograd.gradcheck(gathered, (acts, rows_normed))
    rows = rows_normed.detach()[idx].requires_grad_(True)
    assert torch.autograd.gradcheck(from_rows, (acts, rows))
    # Only the needed gradients are formed: binary mode passes acts without requires_grad.
    (g_w,) = torch.autograd.grad(gathered(acts.detach(), rows_normed), [rows_normed])
    (g_ref,) = torch.autograd.grad(gathered(acts, rows_normed), [rows_normed])
    torch.testing.assert_close(g_w, g_ref)


def test_pairwise_never_reads_tensor_data() -> None:
    # Meta tensors carry shapes but no data: anything that syncs to read values (.item(), nonzero, a
    # data-dependent shape) raises. The pairwise path, forward and backward, must run on them.
    acts = torch.empty(8, 4, device="meta", requires_grad=True)
    idx = torch.empty(8, 4, dtype=torch.long, device="meta")
    weight = torch.empty(20, 5, device="meta", requires_grad=True)
    ema = torch.empty(20, device="meta")
    value = orthogonality_penalty(acts, idx, weight, ema, chunk_size=3)
    g_acts, g_w = torch.autograd.grad(value, [acts, weight])
    assert value.shape == () and g_acts.shape == (8, 4) and g_w.shape == (20, 5)
    # The data-dependent methods do fail here, so the check above has teeth.
    with pytest.raises(NotImplementedError):
        orthogonality_penalty(acts, idx, weight, ema, method="masked_dense")


def test_sparse_method_stores_only_coactive_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    acts, idx, weight, ema = make_inputs(6, 50, 4, 4, seed=17)
    built: list[torch.Tensor] = []
    original = torch.sparse_coo_tensor

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = original(*args, **kwargs)  # type: ignore[arg-type]
        built.append(out)
        return out

    monkeypatch.setattr(torch, "sparse_coo_tensor", spy)
    orthogonality_penalty(acts, idx, weight, ema, threshold_ratio=1.0, method="sparse")
    (co,) = built
    passing = orthogonality.entry_mask(acts, idx, ema, 1.0).sum(dim=1)
    assert 0 < int(passing.sum()) < acts.numel()  # the threshold masks some entries but not all
    # One stored entry per co-active pair and token (before coalescing), never n^2 and no masked pairs.
    assert co.is_sparse and co.shape == (50, 50)
    assert co._nnz() == int((passing * (passing - 1) // 2).sum())
    rows_i, rows_j = co.coalesce().indices()
    assert bool((rows_i > rows_j).all())


# ----------------------------------------------------------------------------------------------------------
# Property tests: the three methods agree with each other on random inputs.
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 12),
    n=st.integers(2, 24),
    k=st.integers(1, 6),
    d=st.integers(2, 6),  # d=1 has its own test: its weight gradient is 0 up to fp32 noise / |w|
    seed=st.integers(0, 2**16),
    threshold_ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    coactivation=st.sampled_from(COACTIVATIONS),
    zero_frac=st.sampled_from([0.0, 0.3]),
    chunk_size=st.one_of(st.none(), st.integers(1, 5)),
)
def test_methods_agree_on_random_inputs(
    batch: int,
    n: int,
    k: int,
    d: int,
    seed: int,
    threshold_ratio: float,
    coactivation: str,
    zero_frac: float,
    chunk_size: int | None,
) -> None:
    k = min(k, n)
    acts, idx, weight, ema = make_inputs(batch, n, k, d, seed=seed, zero_frac=zero_frac)
    kwargs = {"threshold_ratio": threshold_ratio, "coactivation": coactivation}
    pairwise = method_value_and_grads(acts, idx, weight, ema, chunk_size=chunk_size, **kwargs)
    for method in ("masked_dense", "sparse"):
        assert_matches(method_value_and_grads(acts, idx, weight, ema, method=method, **kwargs), pairwise)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), coactivation=st.sampled_from(COACTIVATIONS))
def test_pairwise_matches_reference_on_random_inputs(seed: int, coactivation: str) -> None:
    acts, idx, weight, ema = make_inputs(5, 9, 4, 3, seed=seed)
    want = reference_value_and_grads(acts, idx, weight, ema, coactivation=coactivation)
    assert_matches(method_value_and_grads(acts, idx, weight, ema, coactivation=coactivation), want)


# ----------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    acts, idx, weight, ema = make_inputs(4, 6, 2, 3)
    return {"top_acts": acts, "top_indices": idx, "weight": weight, "ema_mean": ema}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "dense"}, "pairwise, masked_dense, sparse"),
        ({"coactivation": "sum"}, "product, binary"),
        ({"top_acts": torch.rand(4)}, "top_acts must be 2-D"),
        ({"top_acts": torch.ones(4, 2, dtype=torch.long)}, "top_acts must be a floating-point"),
        ({"top_indices": torch.zeros(4, 3, dtype=torch.long)}, "same (batch, k) shape"),
        ({"top_indices": torch.zeros(4, 2, dtype=torch.int32)}, "torch.int64"),
        ({"top_indices": torch.zeros(4, 2)}, "torch.int64"),
        ({"weight": torch.rand(6)}, "weight must be 2-D"),
        ({"weight": torch.ones(6, 3, dtype=torch.long)}, "weight must be a floating-point"),
        ({"ema_mean": torch.rand(5)}, "ema_mean must have shape (6,)"),
        ({"ema_mean": torch.rand(6, 1)}, "ema_mean must have shape (6,)"),
        ({"ema_mean": torch.ones(6, dtype=torch.long)}, "ema_mean must be a floating-point"),
        ({"ema_mean": [0.0] * 6}, "ema_mean must be a torch.Tensor"),
        ({"threshold_ratio": -0.1}, "threshold_ratio must be a finite number >= 0"),
        ({"threshold_ratio": float("nan")}, "threshold_ratio must be a finite number >= 0"),
        ({"threshold_ratio": "0.1"}, "threshold_ratio must be a finite number >= 0"),
        ({"chunk_size": 0}, "chunk_size must be None (automatic) or an integer >= 1"),
        ({"chunk_size": 2.5}, "chunk_size must be None (automatic) or an integer >= 1"),
    ],
)
def test_bad_input_raises_user_error(change: dict[str, object], expected: str) -> None:
    kwargs = _good()
    orthogonality_penalty(**kwargs)  # type: ignore[arg-type]  # the unchanged inputs are fine
    kwargs.update(change)
    with pytest.raises(UserError) as info:
        orthogonality_penalty(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_exported_names() -> None:
    assert METHODS == ("pairwise", "masked_dense", "sparse")
    assert COACTIVATIONS == ("product", "binary")


def test_pairwise_forms_no_gradients_outside_grad_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pairwise forward computes its gradients eagerly; under no_grad (evaluation) it must not.
    gen = torch.Generator().manual_seed(3)
    acts = torch.rand(6, 3, generator=gen, requires_grad=True)
    weight = torch.randn(10, 4, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(10, generator=gen)[:3] for _ in range(6)])
    ema = torch.zeros(10)
    expected = orthogonality_penalty(acts, idx, weight, ema)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("gradients formed under no_grad")

    monkeypatch.setattr(orthogonality, "_pairwise_grads", refuse)
    with torch.no_grad():
        value = orthogonality_penalty(acts, idx, weight, ema)
    assert value.grad_fn is None
    torch.testing.assert_close(value, expected.detach())
    with pytest.raises(AssertionError, match="no_grad"):  # and with grad mode on they are formed
        orthogonality_penalty(acts, idx, weight, ema)
