"""The sparse encoder backward and the fused decode+penalty against literal dense autograd."""

from __future__ import annotations

import pytest
import torch

from orthosae.orthogonality import orthogonality_penalty
from orthosae.sae.kernels import (
    _index_add_rows,
    auxk_indices,
    decode_pairwise,
    encoder_pre_acts,
    gather_pre_acts,
    grouped_decode,
    scatter_rows,
    sparse_decode,
    use_dense_backward,
)


def _params(d: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(d, n), (n,), (d,)]
    return [(torch.randn(*s, generator=gen, dtype=dtype) * 0.5).requires_grad_() for s in shapes]


def _dense_reference(x, W, be, bd, k, dead=None, k_aux=0):
    """Literal: dense pre-activations under autograd, top-k, AuxK picks from the dead latents."""
    pre = torch.relu((x - bd) @ W + be)
    vals, idx = pre.topk(k, dim=-1)
    if dead is None:
        return vals, idx, None
    masked = pre.masked_fill(~dead, float("-inf"))
    aux_vals, aux_idx = masked.topk(k_aux, dim=-1)
    aux_vals = torch.where(torch.isfinite(aux_vals), aux_vals, torch.zeros_like(aux_vals))
    return vals, idx, (aux_vals, aux_idx)


def _fast(x, W, be, bd, k, dense, dead=None, k_aux=0):
    pre = encoder_pre_acts(x, W, be, bd)
    idx = pre.topk(k, dim=-1).indices
    if dead is None:
        return gather_pre_acts(x, W, be, bd, pre, idx, dense=dense), idx, None
    aux_idx, valid = auxk_indices(pre, dead, k_aux)
    both = gather_pre_acts(x, W, be, bd, pre, torch.cat([idx, aux_idx], 1), dense=dense)
    aux = torch.where(valid, both[:, k:], torch.zeros_like(both[:, k:]))
    return both[:, :k], idx, (aux, aux_idx)


def _loss(vals, idx, aux, n, weights):
    """A loss that weights every kept entry differently, so that each gradient position matters."""
    dense = torch.zeros(vals.shape[0], n, dtype=vals.dtype).scatter(1, idx, vals)
    out = (dense * weights).sum() + (dense**2).sum()
    if aux is not None:
        out = out + (torch.zeros_like(dense).scatter(1, aux[1], aux[0]) * weights.flip(1)).sum()
    return out


def _check(dtype, d, n, k, *, dense, x=None, params=None, dead=None, k_aux=0, tol=None):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, d, generator=gen, dtype=dtype) if x is None else x
    W, be, bd = _params(d, n, dtype) if params is None else params
    weights = torch.randn(7, n, generator=gen, dtype=dtype)
    ref = _dense_reference(x, W, be, bd, k, dead, k_aux)
    got = _fast(x, W, be, bd, k, dense, dead, k_aux)
    assert torch.equal(ref[1].sort(1).values, got[1].sort(1).values)
    tol = tol or ({"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5})
    g_ref = torch.autograd.grad(_loss(*ref, n, weights), (W, be, bd))
    g_got = torch.autograd.grad(_loss(*got, n, weights), (W, be, bd))
    assert torch.allclose(_loss(*ref, n, weights), _loss(*got, n, weights), **tol)
    for name, a, b in zip(("W_enc", "b_enc", "b_dec"), g_ref, g_got, strict=True):
        assert torch.allclose(a, b, **tol), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k", [1, 4, 30])  # 30 = d_sae: every latent kept
def test_encoder_backward_matches_dense_autograd(dtype, dense, k):
    _check(dtype, 6, 30, k, dense=dense)


@pytest.mark.parametrize("dense", [False, True])
def test_encoder_backward_with_ties_and_zeros(dense):
    # Equal pre-activations tie for the last slots, and ReLU zeros get picked when k exceeds the positives.
    W, be, bd = (torch.zeros(4, 10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64), None)
    W[:, :3] = 1.0  # three equal positive latents for every token
    be[5] = -1.0
    bd = torch.zeros(4, dtype=torch.float64)
    params = [t.requires_grad_() for t in (W, be, bd)]
    x = torch.ones(7, 4, dtype=torch.float64)
    for k in (2, 5):
        _check(torch.float64, 4, 10, k, dense=dense, x=x, params=params)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("n_dead", [0, 3, 20])  # none dead, fewer dead than k_aux, more dead than k_aux
def test_auxk_positions_get_their_gradients(dense, n_dead):
    dead = torch.zeros(30, dtype=torch.bool)
    dead[torch.randperm(30, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    _check(torch.float64, 6, 30, 3, dense=dense, dead=dead, k_aux=5)


def test_gradient_to_the_input_when_it_requires_grad():
    W, be, bd = _params(5, 12, torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    pre = encoder_pre_acts(x, W, be, bd)
    idx = pre.topk(3, dim=-1).indices
    (gx,) = torch.autograd.grad(gather_pre_acts(x, W, be, bd, pre, idx).square().sum(), x)
    (gx_ref,) = torch.autograd.grad(torch.relu((x - bd) @ W + be).gather(1, idx).square().sum(), x)
    assert torch.allclose(gx, gx_ref)


def test_auto_rule():
    assert not use_dense_backward("auto", 16384, 40)
    assert use_dense_backward("auto", 64, 40)
    assert use_dense_backward("dense", 16384, 40) and not use_dense_backward("sparse", 64, 40)
    with pytest.raises(ValueError):
        use_dense_backward("fast", 10, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 3])  # 3: several checkpointed chunks
@pytest.mark.parametrize("k", [1, 4])
def test_decode_pairwise_matches_embedding_bag_and_penalty(dtype, chunk_size, k):
    gen = torch.Generator().manual_seed(0)
    n, d, b = 20, 6, 8
    W = torch.randn(n, d, generator=gen, dtype=dtype)
    W[2] = 0.0  # an all-zero row: the penalty treats its cos² as 0, not NaN
    W.requires_grad_()
    acts = torch.rand(b, k, generator=gen, dtype=dtype).requires_grad_()
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
    ema = torch.rand(n, generator=gen, dtype=dtype) * 0.5
    masked = acts * (acts.detach() > ema[idx] * 0.9)
    x_hat, pen = decode_pairwise(acts, idx, masked, W, chunk_size)
    x_ref = torch.zeros(b, n, dtype=dtype).scatter(1, idx, acts) @ W
    pen_ref = orthogonality_penalty(acts, idx, W, ema, threshold_ratio=0.9, method="masked_dense")
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert torch.allclose(x_hat, x_ref, **tol) and torch.allclose(pen, pen_ref, **tol)
    g = torch.randn(b, d, generator=gen, dtype=dtype)
    got = torch.autograd.grad((x_hat * g).sum() + 3 * pen, (acts, W))
    want = torch.autograd.grad((x_ref * g).sum() + 3 * pen_ref, (acts, W))
    for a, c in zip(got, want, strict=True):
        assert torch.allclose(a, c, **tol)


def test_bf16_encoder_gemm_is_close_and_keeps_fp32_gradients():
    W, be, bd = _params(16, 64, torch.float32)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5))
    pre32 = encoder_pre_acts(x, W, be, bd)
    pre16 = encoder_pre_acts(x, W, be, bd, torch.bfloat16)
    assert pre16.dtype == torch.float32
    assert torch.allclose(pre16, pre32, rtol=2e-2, atol=2e-2)
    idx = pre32.topk(4, dim=-1).indices
    vals = gather_pre_acts(x, W, be, bd, pre16, idx)
    (g16,) = torch.autograd.grad(vals.sum(), W)
    (g32,) = torch.autograd.grad(gather_pre_acts(x, W, be, bd, pre32, idx).sum(), W)
    assert g16.dtype == torch.float32 and torch.allclose(g16, g32)  # same positions, exact fp32 grads


def _literal_scatter_rows(indices, weights, rows, n):
    out = torch.zeros(n, rows.shape[1], dtype=rows.dtype)
    for b in range(indices.shape[0]):
        for p in range(indices.shape[1]):
            out[indices[b, p]] += weights[b, p] * rows[b]
    return out


@pytest.mark.parametrize("m", [1, 3, 8])
def test_scatter_rows_matches_literal_loop_with_repeats(m: int):
    gen = torch.Generator().manual_seed(m)
    n, batch = 10, 7
    idx = torch.randint(0, n, (batch, m), generator=gen)  # repeats within a token and across tokens
    if m > 1:
        idx[0, 1] = idx[0, 0]
    w, rows = torch.randn(batch, m, generator=gen), torch.randn(batch, 5, generator=gen)
    expected = _literal_scatter_rows(idx, w, rows, n)
    assert torch.allclose(scatter_rows(idx, w, rows, n), expected, atol=1e-5)
    assert torch.allclose(_index_add_rows(idx, w, rows, n), expected, atol=1e-5)  # the non-CPU path


def test_scatter_rows_empty_batch():
    out = scatter_rows(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0, 3), 6)
    assert out.shape == (6, 3) and not out.any()


@pytest.mark.parametrize("m", [1, 4])
def test_sparse_decode_gradients_with_repeated_indices(m: int):
    """The CPU backward (CSR products) against dense autograd, in fp64 with gradcheck as well."""
    gen = torch.Generator().manual_seed(2)
    n, batch, d = 12, 5, 6
    idx = torch.randint(0, n, (batch, m), generator=gen)
    if m > 1:
        idx[1, 2] = idx[1, 0]
    acts = torch.rand(batch, m, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    y = sparse_decode(acts, idx, W)
    y_ref = torch.zeros(batch, n, dtype=torch.float64).scatter_add(1, idx, acts) @ W
    assert torch.allclose(y, y_ref)
    g = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((y * g).sum(), (acts, W))
    ref = torch.autograd.grad((y_ref * g).sum(), (acts, W))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(lambda a, w: sparse_decode(a, idx, w), (acts, W))


def test_sparse_decode_gradient_to_one_input_only():
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 9, (4, 3), generator=gen)
    acts, W = torch.rand(4, 3, generator=gen), torch.randn(9, 5, generator=gen)
    (gw,) = torch.autograd.grad(sparse_decode(acts, idx, W.requires_grad_()).sum(), W)
    assert torch.allclose(gw, _literal_scatter_rows(idx, acts, torch.ones(4, 5), 9), atol=1e-6)
    (ga,) = torch.autograd.grad(sparse_decode(acts.requires_grad_(), idx, W.detach()).sum(), acts)
    assert torch.allclose(ga, W.detach()[idx].sum(-1), atol=1e-5)


def _literal_grouped_decode(acts, idx, W, bounds):
    """Loop over every entry: slice g of the result adds acts·W[idx] of the entries in group g."""
    ends = [*bounds, W.shape[0]]
    out = torch.zeros(len(ends), idx.shape[0], W.shape[1], dtype=W.dtype)
    for b in range(idx.shape[0]):
        for p in range(idx.shape[1]):
            g = next(i for i, end in enumerate(ends) if int(idx[b, p]) < end)
            out[g, b] = out[g, b] + acts[b, p] * W[idx[b, p]]
    return out


@pytest.mark.parametrize(
    ("m", "bounds"),
    [(4, [2, 5, 8]), (1, [3]), (3, []), (5, [0, 6])],  # several groups, k=1, one group, an empty group
)
def test_grouped_decode_matches_literal_loop_values_and_gradients(m: int, bounds: list[int]):
    gen = torch.Generator().manual_seed(m)
    n, batch, d = 12, 5, 4
    idx = torch.randint(0, n, (batch, m), generator=gen)
    acts = torch.rand(batch, m, generator=gen, dtype=torch.float64)
    if m > 1:
        idx[1, 1], acts[1, 1] = idx[1, 0], 0.0  # a padded code repeats an index with a zero value
    acts.requires_grad_()
    W = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    y = grouped_decode(acts, idx, W, bounds)
    y_ref = _literal_grouped_decode(acts, idx, W, bounds)
    assert y.shape == (len(bounds) + 1, batch, d) and torch.allclose(y, y_ref)
    if m == 5:
        assert not y[0].any()  # no latent below 0: the first group is empty
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((y * g).sum(), (acts, W))
    ref = torch.autograd.grad((y_ref * g).sum(), (acts, W))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(lambda a, w: grouped_decode(a, idx, w, bounds), (acts, W))


def test_grouped_decode_sums_to_the_plain_decode_and_takes_no_codes():
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 16, (6, 3), generator=gen)
    acts, W = torch.rand(6, 3, generator=gen), torch.randn(16, 4, generator=gen)
    assert torch.allclose(grouped_decode(acts, idx, W, [4, 8]).sum(0), sparse_decode(acts, idx, W), atol=1e-6)
    empty = grouped_decode(torch.zeros(6, 0), torch.zeros(6, 0, dtype=torch.long), W, [4])
    assert empty.shape == (2, 6, 4) and not empty.any()
