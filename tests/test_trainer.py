"""The trainer against a literal, dense re-implementation of one step, plus ground-truth recovery."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from orthosae.errors import UserError
from orthosae.sae.base import stored_transposed
from orthosae.sae.init import geometric_median
from orthosae.synthetic import make_toy_model, max_cosines, sample_activations
from orthosae.train.config import TrainConfig
from orthosae.train.trainer import Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(activations="x.npy", d_sae=24, k=3, steps=50, batch_size=16, warmup_steps=5, seed=0)
    return TrainConfig(**{**base, **kw})


def _literal_orth(f: torch.Tensor, W: torch.Tensor, ema: torch.Tensor, ratio: float) -> torch.Tensor:
    A = f * (f > ema * ratio)
    C = A.T @ A
    Wn = W / W.norm(dim=1, keepdim=True)
    S = (Wn @ Wn.T) ** 2
    n = f.shape[1]
    return sum(C[i, j] * S[i, j] for i in range(n) for j in range(i))  # type: ignore[return-value]


def _reference_first_step(cfg: TrainConfig, params: dict[str, torch.Tensor], x: torch.Tensor):
    """One TopK(+orth) step written out densely: loss, parallel-grad removal, clip, Adam, projection."""
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.no_grad():
        p["b_dec"].copy_(geometric_median(x))
    pre = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    vals, idx = pre.topk(cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter(1, idx, vals)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    recon = ((x - x_hat) ** 2).sum(dim=1).mean()
    loss = recon
    if cfg.orth:
        ema = (1 - cfg.orth_ema_decay) * f.detach().mean(dim=0)
        l_orth = _literal_orth(f, p["W_dec"], ema, cfg.orth_threshold_ratio)
        loss = loss + cfg.orth_lambda * (recon.detach() / l_orth.detach()) * l_orth
    loss.backward()
    with torch.no_grad():
        unit = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
        p["W_dec"].grad -= (p["W_dec"].grad * unit).sum(dim=1, keepdim=True) * unit
    order = ["W_enc", "b_enc", "W_dec", "b_dec"]
    torch.nn.utils.clip_grad_norm_([p[k] for k in order], cfg.grad_clip)
    lr = cfg.resolved_lr() * 1 / (cfg.resolved_warmup() + 1)
    opt = torch.optim.Adam([p[k] for k in order], lr=lr)
    opt.step()
    with torch.no_grad():
        p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
    return p, float(loss.detach())


@pytest.mark.parametrize("orth,share", [(False, False), (True, False), (True, True)])
def test_first_step_matches_literal_reference(orth: bool, share: bool):
    cfg = _cfg(orth=orth, orth_method="pairwise", orth_share_gather=share)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    tr = Trainer(cfg, 8)
    before = {k: v.detach().clone() for k, v in tr.sae.named_parameters()}
    stats = tr.step(x)
    ref, ref_loss = _reference_first_step(cfg, before, x)
    assert math.isclose(float(stats["loss"]), ref_loss, rel_tol=1e-5)
    for name, value in tr.sae.named_parameters():
        assert torch.allclose(value, ref[name], rtol=1e-4, atol=1e-6), name
        assert not torch.equal(value, before[name]), f"{name} did not move"


def test_orth_state_ema_and_first_nonzero_init():
    cfg = _cfg(orth=True)
    tr = Trainer(cfg, 8)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    ema = torch.zeros(24)
    stats = []
    with torch.no_grad():  # the trainer sets b_dec from the first batch before its first forward
        tr.sae.b_dec.copy_(geometric_median(xs[0]))
    for x in xs:
        with torch.no_grad():
            f = tr.sae.encode(x)  # the latents this step will see (parameters are updated after)
        ema = 0.99 * ema + 0.01 * f.mean(dim=0)
        stats.append(tr.step(x))
        assert torch.allclose(tr.ema_mean, ema, atol=1e-7)
    first = float(stats[0]["orth"])
    assert first > 0 and float(tr.l_orth_init) == pytest.approx(first)
    assert float(stats[2]["orth"]) != first  # the init stays fixed while L_orth moves


def test_orth_init_waits_for_first_nonzero_value():
    cfg = _cfg(orth=True, k=1)  # k=1: no pair is ever co-active, L_orth is 0
    tr = Trainer(cfg, 8)
    for _ in range(3):
        s = tr.step(torch.randn(16, 8))
        assert float(s["orth"]) == 0.0 and float(s["orth_scaled"]) == 0.0
    assert float(tr.l_orth_init) == 0.0


def test_dead_latents_feed_auxk():
    cfg = _cfg(dead_tokens=16, d_sae=64, k=2)  # dead after one batch without firing
    tr = Trainer(cfg, 8)
    tr.step(torch.randn(16, 8))
    s = tr.step(torch.randn(16, 8))
    assert float(s["dead_frac"]) > 0 and float(s["auxk"]) > 0
    assert int((tr.tokens_since_fired == 0).sum()) <= 2 * 16


def test_inference_threshold_is_tracked_after_warmup():
    cfg = _cfg(warmup_steps=2, threshold_beta=0.5)
    tr = Trainer(cfg, 8)
    x = torch.randn(16, 8)
    tr.step(x)
    tr.step(x)
    assert float(tr.sae.threshold) < 0  # not before the threshold start
    with torch.no_grad():
        acts = tr.sae(x).top_acts
    assert acts is not None
    expected = acts.masked_fill(acts <= 0, math.inf).min(dim=1).values.mean()
    tr.step(x)
    assert float(tr.sae.threshold) == pytest.approx(float(expected), rel=1e-5)


def test_relu_step_uses_weighted_l1_and_leaves_decoder_norms_free():
    cfg = _cfg(arch="relu", l1=0.5)
    tr = Trainer(cfg, 8)
    s = tr.step(torch.randn(16, 8))
    assert float(s["l1_weighted"]) == pytest.approx(0.5 * float(s["l1"]))
    assert float(s["loss"]) == pytest.approx(float(s["recon"]) + float(s["l1_weighted"]), rel=1e-6)
    norms = tr.sae.W_dec.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))


def _train_toy(cfg: TrainConfig, steps: int) -> tuple[Trainer, torch.Tensor]:
    toy = make_toy_model(64, 32, p_active=0.05, seed=cfg.seed)
    x, _ = sample_activations(toy, steps * cfg.batch_size, seed=cfg.seed)
    tr = Trainer(cfg, 32)
    for s in range(steps):
        tr.step(x[s * cfg.batch_size : (s + 1) * cfg.batch_size])
    return tr, max_cosines(toy.directions, tr.sae.W_dec.detach())


@pytest.mark.parametrize("orth", [False, True])
def test_recovers_known_sparse_dictionary(orth: bool):
    """A toy superposition model (64 true directions in 32 dims, ~3 active per sample): TopK must find them.

    Measured (seeds 0-2, no orth): trained mean max-cosine 0.997-0.998, min 0.993; untrained 0.43-0.44.
    """
    cfg = _cfg(d_sae=128, k=4, steps=400, batch_size=256, warmup_steps=20, lr=1e-2, orth=orth)
    untrained = max_cosines(make_toy_model(64, 32, seed=0).directions, Trainer(cfg, 32).sae.W_dec.detach())
    assert float(untrained.mean()) < 0.6
    _, mc = _train_toy(cfg, 400)
    assert float(mc.mean()) > 0.97, mc.mean()


def test_state_dict_round_trip_continues_identically():
    cfg = _cfg(orth=True, dead_tokens=16)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, 8, generator=gen) for _ in range(6)]
    a = Trainer(cfg, 8)
    for x in xs[:3]:
        a.step(x)
    b = Trainer(cfg, 8)
    b.load_state_dict(a.state_dict())
    for x in xs[3:]:
        sa, sb = a.step(x), b.step(x)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for (name, pa), pb in zip(a.sae.named_parameters(), b.sae.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_non_finite_batches_are_skipped_up_to_a_bound():
    cfg = _cfg(orth=True, max_skipped_batches=2)
    tr = Trainer(cfg, 8)
    good = torch.randn(16, 8)
    tr.step(good)
    before = {k: v.detach().clone() for k, v in tr.sae.state_dict().items()}
    ema, fired = tr.ema_mean.clone(), tr.tokens_since_fired.clone()
    bad = good.clone()
    bad[3, 2] = float("nan")
    s = tr.step(bad)
    assert float(s["skipped"]) == 1.0 and tr.skipped == 1
    for k, v in tr.sae.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing moved
    assert torch.equal(tr.ema_mean, ema) and torch.equal(tr.tokens_since_fired, fired)
    assert float(tr.step(good)["skipped"]) == 0.0
    tr.step(bad)
    with pytest.raises(UserError, match="--max-skipped-batches 2"):
        tr.step(bad)


class _DenseAutogradTrainer(Trainer):
    """The TopK forward written with plain dense autograd (B×n gradients, masked top-k AuxK)."""

    def _topk_pass(self, x):
        from orthosae.sae.topk import sparse_decode
        from orthosae.train.trainer import TopKPass

        sae, cfg = self.sae, self.cfg
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        acts, idx = pre.topk(sae.k, dim=-1)
        self._track_firing(idx, x.shape[0])
        dead = self.tokens_since_fired >= cfg.dead_tokens
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(min(self.k_aux, pre.shape[1]), dim=-1)
        aux_vals = torch.where(torch.isfinite(aux_vals), aux_vals, torch.zeros_like(aux_vals))
        x_hat = sparse_decode(acts, idx, sae.W_dec) + sae.b_dec
        return TopKPass(x_hat, acts, idx, aux_vals, aux_idx, dead, None)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
@pytest.mark.parametrize("k_aux", [3, 40])  # fewer / more AuxK picks than dead latents
def test_steps_with_dead_latents_match_dense_autograd(kernel: str, k_aux: int):
    share = kernel == "sparse"  # the shared-gather decode, once
    cfg = _cfg(dead_tokens=16, d_sae=64, k=2, k_aux=k_aux, kernel=kernel, orth=True, orth_share_gather=share)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    fast, ref = Trainer(cfg, 8), _DenseAutogradTrainer(cfg, 8)
    for tr in (fast, ref):
        tr.sae.double()
        tr.ema_mean, tr.l_orth_init = tr.ema_mean.double(), tr.l_orth_init.double()
    for x in xs:
        sf, sr = fast.step(x), ref.step(x)
        for name in ("loss", "recon", "auxk", "orth", "dead_frac"):
            assert torch.allclose(sf[name], sr[name], rtol=1e-9, atol=1e-12), name
    assert float(sf["auxk"]) > 0  # AuxK ran on the later steps
    for (name, a), b in zip(fast.sae.named_parameters(), ref.sae.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_auxk_is_skipped_only_while_nothing_can_be_dead():
    cfg = _cfg(dead_tokens=40, d_sae=64, k=2)
    tr = Trainer(cfg, 8)
    s1, s2 = tr.step(torch.randn(16, 8)), tr.step(torch.randn(16, 8))
    assert tr.tokens_bound == 32 and float(s1["auxk"]) == float(s2["auxk"]) == 0.0
    assert float(tr.step(torch.randn(16, 8))["auxk"]) > 0  # 48 tokens ≥ 40: AuxK runs


def _can_compile() -> bool:
    try:
        return bool(torch.compile(lambda t: t * 2)(torch.ones(2)).eq(2).all())
    except Exception:  # no C++ compiler or headers on this machine
        return False


def test_compiled_step_matches_eager():
    """--compile must not change the maths: same parameters after a few TopK+orth steps (AuxK active)."""
    if not _can_compile():
        pytest.skip("torch.compile cannot build kernels on this machine")
    cfg = _cfg(orth=True, k=2, dead_tokens=16, k_aux=3)  # 32 picks of 24 latents: some go dead
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 8, generator=gen) * 2 + 0.5 for _ in range(4)]
    eager, compiled = Trainer(cfg, 8), Trainer(dataclasses.replace(cfg, compile=True), 8)
    for x in xs:
        a, b = eager.step(x), compiled.step(x)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert float(eager.step(xs[0])["auxk"]) > 0  # AuxK ran inside the compiled region too
    compiled.step(xs[0])
    for (name, p), q in zip(eager.sae.named_parameters(), compiled.sae.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_gradients_and_moments_keep_each_parameters_layout(kernel: str):
    # W_enc is stored transposed; its gradient must come out in that layout (else autograd copies it), Adam
    # updates its row-major view (else fused Adam copies it) and every moment matches what Adam updates.
    tr = Trainer(_cfg(kernel=kernel, orth=True), d_in=8)
    assert tr.sae.W_enc.stride() == (1, 8)
    assert stored_transposed(tr.sae.W_enc) and not stored_transposed(tr.sae.W_dec)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    before = tr.sae.W_enc.detach().clone()
    tr.step(x)
    tr.step(x)
    assert not torch.equal(tr.sae.W_enc, before)  # the view's update reached W_enc
    for name, p in tr.sae.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), name
    for view, p in tr.optimized:
        assert view.is_contiguous() and view.data_ptr() == p.data_ptr()
        for value in tr.opt.state[view].values():
            assert value.shape != view.shape or value.stride() == view.stride()


def test_encoder_keeps_training_after_the_module_is_cast():
    tr = Trainer(_cfg(), d_in=8)
    tr.sae.double()  # replaces every parameter's storage
    tr.ema_mean, tr.l_orth_init = tr.ema_mean.double(), tr.l_orth_init.double()
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tr.step(x)
    before = tr.sae.W_enc.detach().clone()
    tr.step(x)
    assert not torch.equal(tr.sae.W_enc, before)


def test_resume_from_a_checkpoint_written_before_the_feature_major_encoder():
    # Such a state has no "moments" marker and W_enc's Adam moments in (d_in, d_sae) shape.
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 8, generator=gen) for _ in range(4)]
    cfg = _cfg(orth=True, d_sae=8)  # square W_enc: only the marker can tell the layouts apart
    a = Trainer(cfg, 8)
    for x in xs[:2]:
        a.step(x)
    state = a.state_dict()
    del state["moments"]
    for index, (view, p) in enumerate(a.optimized):
        if view is not p:
            moments = state["optimizer"]["state"][index]
            for key in ("exp_avg", "exp_avg_sq"):
                moments[key] = moments[key].T.contiguous()
    b = Trainer(cfg, 8)
    b.load_state_dict(state)
    for x in xs[2:]:
        a.step(x)
        b.step(x)
    for (name, pa), pb in zip(a.sae.named_parameters(), b.sae.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_match_layouts_makes_fused_adam_pair_the_right_elements():
    from orthosae.train.trainer import adam, match_layouts_

    base = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for fix in (False, True):
        p = torch.nn.Parameter(base.clone().T)  # transposed layout, like W_enc
        p.grad = grad.clone()  # row-major: a different layout
        opt = adam([p], lr=0.1)
        if fix:
            match_layouts_(opt)
        opt.step()
        results.append(p.detach())
    expected = base.T - 0.1 * grad.sign()  # Adam's first step moves each element by lr against its gradient
    torch.testing.assert_close(results[1], expected)
    # Without the fix the fused kernel pairs wrong elements, silently: the test above has teeth.
    assert not torch.allclose(results[0], expected)
