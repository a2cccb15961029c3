"""Loss terms against literal per-token loops."""

from __future__ import annotations

import math

import torch

from orthosae.losses import auxk_loss, l1_penalty, reconstruction_loss, scaled_orthogonality
from orthosae.train.schedule import lr_multiplier


def test_reconstruction_loss_literal():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    ref = sum(sum((float(x[b, i]) - float(y[b, i])) ** 2 for i in range(3)) for b in range(4)) / 4
    assert math.isclose(float(reconstruction_loss(x, y)), ref, rel_tol=1e-6)


def test_l1_weighted_by_decoder_norms():
    f, W = torch.rand(3, 5), torch.randn(5, 4)
    ref = sum(float(f[b, i]) * float(W[i].norm()) for b in range(3) for i in range(5)) / 3
    assert math.isclose(float(l1_penalty(f, W)), ref, rel_tol=1e-6)


def _auxk_reference(residual, pre, dead, k_aux, W):
    B, n = pre.shape
    errs = []
    for b in range(B):
        dead_ids = [i for i in range(n) if dead[i]]
        chosen = sorted(dead_ids, key=lambda i: -float(pre[b, i].detach()))[:k_aux]
        recon = sum((pre[b, i] * W[i] for i in chosen), torch.zeros(W.shape[1], dtype=W.dtype))
        errs.append(((residual[b] - recon) ** 2).sum())
    mu = residual.mean(dim=0)
    denom = sum(((residual[b] - mu) ** 2).sum() for b in range(B)) / B
    return (sum(errs) / B) / denom


def test_auxk_matches_literal_reference_values_and_grads():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 20, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(20, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 7, 9, 13]] = True
    for k_aux in (1, 3, 5, 8):  # 8 > number of dead latents: extra picks must contribute nothing
        pre = torch.relu(z)  # as in the SAE: ReLU zeros carry no gradient, whichever tie is picked
        got = auxk_loss(residual, pre, dead, k_aux, W)
        ref = _auxk_reference(residual, pre, dead, k_aux, W)
        assert torch.allclose(got, ref, rtol=1e-10)
        g = torch.autograd.grad(got, (z, W), retain_graph=True)
        r = torch.autograd.grad(ref, (z, W))
        assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
        assert all(torch.allclose(a, c, rtol=1e-8, atol=1e-12) for a, c in zip(g, r, strict=True))


def test_auxk_is_zero_without_dead_latents():
    pre = torch.rand(4, 10, requires_grad=True)
    out = auxk_loss(torch.randn(4, 3), pre, torch.zeros(10, dtype=torch.bool), 2, torch.randn(10, 3))
    assert float(out.detach()) == 0.0


def test_scaled_orthogonality():
    l_orth, recon = torch.tensor(6.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    out = scaled_orthogonality(l_orth, recon, torch.tensor(2.0), 1e-3)
    assert math.isclose(float(out.detach()), 1e-3 * 3.0 / 2.0 * 6.0, rel_tol=1e-6)
    g_orth, g_recon = torch.autograd.grad(out, (l_orth, recon), allow_unused=True)
    assert math.isclose(float(g_orth), 1e-3 * 1.5, rel_tol=1e-6)
    assert g_recon is None or float(g_recon) == 0.0  # L_recon enters detached
    assert float(scaled_orthogonality(l_orth, recon, torch.tensor(0.0), 1e-3).detach()) == 0.0


def test_lr_schedule_shape():
    fn = lr_multiplier(100, 10, 0.8)
    assert fn(0) == 1 / 11 and fn(9) == 10 / 11
    assert fn(10) == 1.0 and fn(79) == 1.0
    assert fn(80) == 1.0 and math.isclose(fn(90), 0.5) and math.isclose(fn(99), 0.05)
    flat = lr_multiplier(100, 0, 1.0)
    assert all(flat(s) == 1.0 for s in range(100))
