"""Folding decoder norms into the encoder: exact for ReLU, a no-op for TopK, the SAE itself untouched."""

from __future__ import annotations

import torch

from orthosae.eval.fold import fold_record, folded, needs_folding
from orthosae.sae.relu import ReLUSAE
from orthosae.sae.topk import TopKSAE


def _relu(seed: int = 0) -> ReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = ReLUSAE(8, 20, generator=g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1, generator=g) * 2 + 0.05)  # norms 0.005 … 0.2
        sae.W_dec[3] = 0.0  # a dead row stays as it is
        sae.b_enc.copy_(torch.randn(20, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(8, generator=g))
    return sae


def test_relu_fold_is_exact_and_literal():
    sae = _relu()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    f = folded(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(f.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-6)
    n = sae.W_dec.norm(dim=1)
    for i in range(20):  # latent i scaled by its decoder norm, row i unit norm (zero row untouched)
        scale = n[i].item() if n[i] > 0 else 1.0
        torch.testing.assert_close(f.encode(x)[:, i], sae.encode(x)[:, i] * scale, rtol=1e-5, atol=1e-6)
        want = 1.0 if n[i] > 0 else 0.0
        assert abs(f.W_dec[i].norm().item() - want) < 1e-5
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in the original"
    assert fold_record(sae)["decoder_norms_folded"] is True
    assert not needs_folding(f)


def test_topk_and_unit_norm_saes_are_returned_as_is():
    g = torch.Generator().manual_seed(0)
    top = TopKSAE(8, 20, k=3, generator=g)
    assert folded(top) is top
    relu = ReLUSAE(8, 20, generator=g)
    relu.normalize_decoder_()
    assert folded(relu) is relu
    assert fold_record(relu)["decoder_norms_folded"] is False


def test_jumprelu_fold_scales_its_thresholds():
    from orthosae.sae.jumprelu import JumpReLUSAE

    g = torch.Generator().manual_seed(2)
    sae = JumpReLUSAE(8, 20, generator=g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1, generator=g) * 2 + 0.05)
        sae.threshold.copy_(torch.rand(20, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(20, generator=g) * 0.1)
    f = folded(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(f.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-6)
    n = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(f.encode(x), sae.encode(x) * n, rtol=1e-5, atol=1e-6)
    assert (f.encode(x) > 0).sum() == (sae.encode(x) > 0).sum() > 0  # the same latents fire
