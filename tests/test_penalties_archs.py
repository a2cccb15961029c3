"""The co-activation penalty on variable-count codes (BatchTopK, JumpReLU, ReLU) and OrtSAE's penalty, each
against a literal slow reference: values and gradients, k=1 rows, empty masks, ties."""

from __future__ import annotations

import itertools

import pytest
import torch

from orthosae.losses import ortsae_penalty
from orthosae.orthogonality import METHODS, orthogonality_penalty
from orthosae.sae.rule import padded_codes


def _literal_coactive(f: torch.Tensor, W: torch.Tensor, ema: torch.Tensor, ratio: float) -> torch.Tensor:
    """Σ_{i<j} (AᵀA)_ij cos²(w_i, w_j) over the dense latents, as DESIGN §2 writes it."""
    A = f * (f > ema * ratio)
    C = A.T @ A
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    S = (Wn @ Wn.T) ** 2
    return sum(C[i, j] * S[i, j] for i in range(f.shape[1]) for j in range(i))  # type: ignore[return-value]


def _variable_codes(seed: int) -> torch.Tensor:
    """Dense (B, n) latents with a different count per row: 0 (empty), 1 (k=1), several, tied values."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(6, 12, generator=g) * (torch.rand(6, 12, generator=g) < 0.4)
    f[0] = 0.0  # an empty row
    f[1] = 0.0
    f[1, 3] = 0.7  # a single active latent (k=1)
    f[2, :4] = 0.5  # ties
    return f.double()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_coactive_penalty_on_variable_counts_matches_literal(method: str, seed: int):
    f = _variable_codes(seed).requires_grad_()
    W = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    W.requires_grad_()
    ema = torch.rand(12, generator=torch.Generator().manual_seed(seed + 20), dtype=torch.float64) * 0.5
    idx = padded_codes(f.detach() != 0)
    fast = orthogonality_penalty(f.gather(1, idx), idx, W, ema, threshold_ratio=0.5, method=method)
    ref = _literal_coactive(f, W, ema, 0.5)
    g_fast = torch.autograd.grad(fast, (f, W))
    g_ref = torch.autograd.grad(ref, (f, W))
    assert torch.allclose(fast, ref, rtol=1e-10)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_coactive_penalty_all_empty_is_zero_with_zero_grads():
    f = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    idx = padded_codes(f.detach() != 0)
    for method in METHODS:
        val = orthogonality_penalty(
            f.gather(1, idx), idx, W, torch.zeros(6, dtype=torch.float64), method=method
        )
        grads = torch.autograd.grad(val, (f, W))
        assert float(val.detach()) == 0.0 and all(float(g.abs().sum()) == 0.0 for g in grads)


def _literal_ortsae(W: torch.Tensor, perm: torch.Tensor, chunks: int, p: float) -> torch.Tensor:
    """mean_i max_{j ≠ i in i's chunk} |cos(w_i, w_j)|^p with Python loops (0 for a feature alone)."""
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    total = (W * 0).sum()  # in the graph, so an all-alone dictionary still has a (zero) gradient
    for chunk in perm.tensor_split(chunks):
        ids = chunk.tolist()
        for i in ids:
            others = [torch.dot(Wn[i], Wn[j]).abs() for j in ids if j != i]
            if others:
                total = total + torch.stack(others).max() ** p
    return total / W.shape[0]


@pytest.mark.parametrize(
    "n,chunks,p,block", [(16, 1, 2.0, 10**9), (16, 4, 2.0, 10**9), (17, 5, 1.0, 64), (10, 10, 2.0, 10**9)]
)
def test_ortsae_matches_literal_reference(n: int, chunks: int, p: float, block: int):
    g = torch.Generator().manual_seed(n + chunks)
    W = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(n, generator=g)
    fast = ortsae_penalty(W, perm, chunks, p, block_bytes=block)  # block=64: one row of cosines per block
    ref = _literal_ortsae(W, perm, chunks, p)
    assert torch.allclose(fast, ref, rtol=1e-12)
    (g_fast,) = torch.autograd.grad(fast, W)
    (g_ref,) = torch.autograd.grad(ref, W)
    assert torch.allclose(g_fast, g_ref, rtol=1e-9, atol=1e-12)
    if chunks == n:  # every feature alone in its chunk
        assert float(fast) == 0.0 and float(g_fast.abs().sum()) == 0.0


def test_ortsae_ties_and_zero_rows():
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    val = ortsae_penalty(W, torch.arange(4), 1, 2.0)
    # rows 0-2 each have a partner at |cos| = 1 (tied); the zero row's best |cos| is 0.
    assert float(val) == pytest.approx(3 / 4)
    assert float(val) == pytest.approx(float(_literal_ortsae(W, torch.arange(4), 1, 2.0)))


def test_ortsae_is_linear_in_chunks():
    """With chunks of fixed size the work is n/c Gram blocks of c²: the penalty of one chunk is the
    penalty restricted to it (a sanity check that chunks never see each other)."""
    W = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    perm = torch.arange(8)
    halves = [ortsae_penalty(W[h], torch.arange(4), 1, 2.0) for h in (slice(0, 4), slice(4, 8))]
    assert torch.allclose(ortsae_penalty(W, perm, 2, 2.0), sum(halves) / 2)


@pytest.mark.parametrize("k", [1, 3])
def test_pairwise_on_fixed_k_unchanged(k: int):
    """TopK codes (k per row, all positive) still equal the literal reference, k = 1 included."""
    g = torch.Generator().manual_seed(k)
    f = torch.zeros(5, 9, dtype=torch.float64)
    for b, j in itertools.product(range(5), range(k)):
        f[b, (b + 2 * j) % 9] = 0.1 + torch.rand((), generator=g, dtype=torch.float64)
    f.requires_grad_()
    W = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    idx = padded_codes(f.detach() != 0)
    assert idx.shape[1] == k
    ema = torch.zeros(9, dtype=torch.float64)
    fast = orthogonality_penalty(f.gather(1, idx), idx, W, ema)
    assert torch.allclose(fast, _literal_coactive(f, W, ema, 0.1), rtol=1e-10)


def _heavy_tailed_codes(seed: int, tokens: int = 40, n: int = 30) -> torch.Tensor:
    """Dense latents whose per-token counts spread from 0 to n, as BatchTopK's do around k."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(tokens, 1, generator=g) ** 3  # most tokens few latents, a few very many
    f = torch.rand(tokens, n, generator=g) * (torch.rand(tokens, n, generator=g) < keep)
    f[0] = 0.0
    f[1] = 0.0
    f[1, 4] = 0.3  # one entry: no pairs
    f[2, :8] = 0.5  # ties
    return f.double()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_groups_sum_to_the_literal_penalty(method: str, seed: int):
    """The trainer's grouped evaluation of variable-count codes: values and gradients equal the literal
    dense reference, and the groups cost less than padding every token to the largest count."""
    from orthosae.orthogonality import ragged_groups

    f = _heavy_tailed_codes(seed).requires_grad_()
    n = f.shape[1]
    W = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    W.requires_grad_()
    ema = torch.rand(n, generator=torch.Generator().manual_seed(seed + 20), dtype=torch.float64) * 0.3
    idx = padded_codes(f.detach() != 0)
    groups = ragged_groups(f.gather(1, idx), idx)
    grouped = torch.stack(
        [orthogonality_penalty(a, i, W, ema, threshold_ratio=0.5, method=method) for a, i in groups]
    ).sum()
    ref = _literal_coactive(f, W, ema, 0.5)
    assert torch.allclose(grouped, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(grouped, (f, W)), torch.autograd.grad(ref, (f, W)), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    counts = (f.detach() != 0).sum(dim=1)
    assert sum(a.shape[0] for a, _ in groups) == int((counts >= 2).sum())  # every token with a pair, once
    cost = sum(a.shape[0] * a.shape[1] ** 2 for a, _ in groups)
    assert cost < idx.shape[0] * idx.shape[1] ** 2
    for a, _ in groups:  # no group pads beyond 1/0.75 of its smallest member's count
        widths = (a.detach() != 0).sum(dim=1)
        assert int(widths.max()) == a.shape[1] and float(widths.min()) > 0.75 * a.shape[1]


def test_ragged_groups_of_codes_without_pairs_are_empty():
    from orthosae.orthogonality import ragged_groups

    f = torch.zeros(4, 6, dtype=torch.float64)
    f[0, 2] = 1.0
    idx = padded_codes(f != 0)
    assert ragged_groups(f.gather(1, idx), idx) == []
