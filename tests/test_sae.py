"""TopK/ReLU SAE modules against literal dense references."""

from __future__ import annotations

import torch

from orthosae.sae import ReLUSAE, TopKSAE
from orthosae.sae.init import geometric_median
from orthosae.sae.topk import sparse_decode


def _topk_sae(d_in=12, d_sae=40, k=5, seed=0) -> TopKSAE:
    sae = TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial biases so that centring by b_dec matters
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae


def test_init_follows_topk_semantics():
    sae = _topk_sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert float(sae.threshold) < 0


def test_forward_equals_literal_dense_topk():
    sae = _topk_sae()
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(3))
    out = sae(x)
    # literal: centre, encode, ReLU, keep the k largest per row, decode densely
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    dense = torch.zeros_like(pre)
    for b in range(9):
        order = sorted(range(40), key=lambda i: -float(pre[b, i]))[:5]
        for i in order:
            dense[b, i] = pre[b, i]
    x_hat = dense @ sae.W_dec + sae.b_dec
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert torch.allclose(sae.encode(x), dense, atol=1e-6)
    assert out.top_acts is not None and out.top_acts.shape == (9, 5)


def test_sparse_decode_matches_dense_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(30, 7, generator=gen, requires_grad=True)
    acts = torch.rand(6, 4, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(30, generator=gen)[:4] for _ in range(6)])
    y = sparse_decode(acts, idx, W)
    dense = torch.zeros(6, 30).scatter(1, idx, acts)
    y_ref = dense @ W
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn(6, 7, generator=gen)
    ga, gw = torch.autograd.grad((y * g).sum(), (acts, W))
    ga_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), (acts, W))
    assert torch.allclose(ga, ga_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)


def test_k_equal_one_and_k_equal_d_sae():
    x = torch.randn(5, 12)
    one = _topk_sae(k=1)
    assert (one.encode(x) != 0).sum(dim=1).le(1).all()
    full = _topk_sae(k=40)
    pre = torch.relu((x - full.b_dec) @ full.W_enc + full.b_enc)
    assert torch.allclose(full.encode(x), pre)


def test_ties_keep_exactly_k():
    sae = TopKSAE(4, 8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.fill_(1.0)  # every latent gets the same pre-activation
    f = sae.encode(torch.ones(2, 4))
    assert ((f != 0).sum(dim=1) == 3).all()


def test_threshold_mode():
    sae = _topk_sae()
    x = torch.randn(4, 12)
    sae.threshold.fill_(0.05)
    f = sae.encode(x, use_threshold=True)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.equal(f, pre * (pre > 0.05))


def test_normalize_and_remove_parallel_grad():
    sae = _topk_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    g = sae.W_dec.grad.double()
    w = sae.W_dec.detach().double()
    expected = torch.stack([g[i] - (g[i] @ w[i]) / (w[i] @ w[i]) * w[i] for i in range(len(w))])  # literal
    sae.remove_parallel_grad_()
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * unit).sum(dim=1).abs().max() < 1e-5
    assert torch.allclose(sae.W_dec.grad.double(), expected, atol=1e-6)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)


def test_remove_parallel_grad_changes_something():
    sae = _topk_sae()
    g = sae.W_dec.detach().clone() * 3.0  # purely parallel: must vanish
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad_()
    assert sae.W_dec.grad.abs().max() < 1e-5


def test_relu_sae_is_dense_relu():
    sae = ReLUSAE(6, 10, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    out = sae(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert out.latents is not None and torch.allclose(out.latents, f)
    assert torch.allclose(out.x_hat, f @ sae.W_dec + sae.b_dec)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((10,), 0.1), atol=1e-6)


def _sum_dist(p: torch.Tensor, pts: torch.Tensor) -> float:
    return float((pts - p).norm(dim=1).sum())


def test_geometric_median_minimises_summed_distance():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    pts[:10] += 50.0  # outliers drag the mean, not the median
    med = geometric_median(pts)
    best = _sum_dist(med, pts)
    assert best < _sum_dist(pts.mean(dim=0), pts)
    for _ in range(50):  # no small perturbation does better (it is the minimiser)
        assert best <= _sum_dist(med + 1e-3 * torch.randn(5, generator=gen, dtype=torch.float64), pts) + 1e-9


def test_geometric_median_with_duplicate_points_is_finite():
    pts = torch.zeros(10, 3)
    assert torch.equal(geometric_median(pts), torch.zeros(3))
