"""BatchTopK, Matryoshka and JumpReLU: one training step against literal dense references, the selection
helpers, save/load and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orthosae.errors import UserError
from orthosae.sae import load_sae, save_sae
from orthosae.sae.batchtopk import batch_topk_mask
from orthosae.sae.init import geometric_median
from orthosae.sae.matryoshka import group_sizes, parse_fractions
from orthosae.sae.rule import padded_codes
from orthosae.train.config import TrainConfig
from orthosae.train.trainer import Trainer

D, N = 8, 32


def _cfg(**kw) -> TrainConfig:
    base = dict(activations="x.npy", d_sae=N, k=3, steps=50, batch_size=16, warmup_steps=5, seed=0)
    return TrainConfig(**{**base, **kw})


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(16, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _finish_step(cfg: TrainConfig, p: dict[str, torch.Tensor], loss: torch.Tensor, betas=(0.9, 0.999)):
    """Backward, parallel-grad removal, clip, Adam, projection: the literal tail of every step."""
    loss.backward()
    with torch.no_grad():
        unit = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
        p["W_dec"].grad -= (p["W_dec"].grad * unit).sum(dim=1, keepdim=True) * unit
    order = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if name in p]
    torch.nn.utils.clip_grad_norm_([p[k] for k in order], cfg.grad_clip)
    lr = cfg.resolved_lr() * 1 / (cfg.resolved_warmup() + 1)
    torch.optim.Adam([p[k] for k in order], lr=lr, betas=betas).step()
    with torch.no_grad():
        p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
    return p


def _literal_batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    flat = pre.flatten()
    keep = torch.zeros_like(flat)
    for i in flat.argsort(descending=True)[: k * pre.shape[0]].tolist():
        keep[i] = 1.0
    return pre * keep.view_as(pre)


def _reference_batchtopk(cfg: TrainConfig, params, x, groups: list[int] | None = None):
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.no_grad():
        p["b_dec"].copy_(geometric_median(x))
    pre = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    f = _literal_batch_topk(pre, cfg.k)
    if groups is None:
        loss = ((x - (f @ p["W_dec"] + p["b_dec"])) ** 2).sum(dim=1).mean()
    else:  # dictionary_learning's Matryoshka: mean over prefixes of weight·‖x − x̂_prefix‖²
        losses, x_hat, lo = [], p["b_dec"].expand_as(x), 0
        for size in groups:
            x_hat = x_hat + f[:, lo : lo + size] @ p["W_dec"][lo : lo + size]
            losses.append(((x - x_hat) ** 2).sum(dim=1).mean() / len(groups))
            lo += size
        loss = torch.stack(losses).mean()
    return _finish_step(cfg, p, loss), float(loss.detach())


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_family_first_step_matches_literal_reference(arch: str):
    cfg = _cfg(arch=arch, matryoshka_fractions="1/4,1/4,1/2")
    tr = Trainer(cfg, D)
    before = {k: v.detach().clone() for k, v in tr.sae.named_parameters()}
    stats = tr.step(_x())
    groups = [8, 8, 16] if arch == "matryoshka" else None
    ref, ref_loss = _reference_batchtopk(cfg, before, _x(), groups)
    assert math.isclose(float(stats["loss"]), ref_loss, rel_tol=1e-5)
    assert float(stats["l0"]) == pytest.approx(cfg.k)  # B·k kept over B tokens
    for name, value in tr.sae.named_parameters():
        assert torch.allclose(value, ref[name], rtol=1e-4, atol=1e-6), name


def _ste_jumprelu(z, theta, eps):
    """The straight-through estimator written with detach: value z·H(z−θ), dθ = −(θ/ε)·rect((z−θ)/ε)."""
    rect = (((z.detach() - theta.detach()) / eps).abs() < 0.5).float()
    h = (z.detach() > theta.detach()).float()
    return z * h + (theta - theta.detach()) * (-(theta.detach() / eps) * rect)


def _ste_step(f, theta, eps):
    rect = (((f.detach() - theta.detach()) / eps).abs() < 0.5).float()
    h = (f.detach() > theta.detach()).float()
    return h + (theta - theta.detach()) * (-(1.0 / eps) * rect)


def test_jumprelu_steps_match_literal_reference():
    cfg = _cfg(
        arch="jumprelu",
        sparsity_warmup_steps=2,
        jumprelu_bandwidth=0.5,  # a wide kernel: dθ ≠ 0
        normalize_activations=False,
    )  # the step on raw inputs (test_normalize covers scaling)
    tr = Trainer(cfg, D)
    with torch.no_grad():
        tr.sae.threshold.fill_(0.3)
    p = {k: v.detach().clone().requires_grad_() for k, v in tr.sae.named_parameters()}
    opt_ref = None
    for step in range(3):
        x = _x(step)
        stats = tr.step(x)
        z = x @ p["W_enc"] + p["b_enc"]  # no b_dec centring
        f = _ste_jumprelu(z, p["threshold"], cfg.jumprelu_bandwidth)
        recon = ((x - (f @ p["W_dec"] + p["b_dec"])) ** 2).sum(dim=1).mean()
        l0 = _ste_step(f, p["threshold"], cfg.jumprelu_bandwidth).sum(dim=1).mean()
        scale = min(step / 2, 1.0)
        loss = recon + cfg.jumprelu_sparsity * (l0 / cfg.k - 1) ** 2 * scale
        assert math.isclose(float(stats["loss"]), float(loss), rel_tol=1e-5)
        loss.backward()
        with torch.no_grad():
            unit = p["W_dec"] / p["W_dec"].norm(dim=1, keepdim=True)
            p["W_dec"].grad -= (p["W_dec"].grad * unit).sum(dim=1, keepdim=True) * unit
        order = [p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")]
        torch.nn.utils.clip_grad_norm_(order, cfg.grad_clip)
        if opt_ref is None:
            opt_ref = torch.optim.Adam(order, lr=cfg.resolved_lr(), betas=(0.0, 0.999))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt_ref, lambda s: (s + 1) / (cfg.resolved_warmup() + 1)
            )
        opt_ref.step()
        sched.step()
        opt_ref.zero_grad()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
    assert not torch.equal(tr.sae.threshold, torch.full((N,), 0.3))  # the thresholds learn
    for name, value in tr.sae.named_parameters():
        assert torch.allclose(value, p[name], rtol=1e-4, atol=1e-6), name


def test_batch_topk_mask_and_padded_codes():
    pre = torch.tensor([[5.0, 4.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = batch_topk_mask(pre, 1)  # 3 picks over the batch: 5, 4 and 1
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False], [False] * 4]
    idx = padded_codes(mask)
    assert idx.shape == (3, 2)  # the largest row count
    for row, ids in zip(mask, idx, strict=True):
        assert len(set(ids.tolist())) == ids.numel()  # distinct ids per row
        assert set(row.nonzero().flatten().tolist()) <= set(ids.tolist())  # every selection covered
    assert padded_codes(torch.zeros(2, 4, dtype=torch.bool)).shape == (2, 1)  # nothing selected: m = 1
    ties = batch_topk_mask(torch.ones(2, 3), 1)  # ties: exactly B·k picks all the same
    assert int(ties.sum()) == 2


@pytest.mark.parametrize(
    "case", ["spread", "one_hot_row", "mostly_zero", "k1"]
)  # the candidate shortcut, its fallbacks (a row with > 4k winners, a zero cutoff), and k = 1
def test_batch_topk_mask_matches_the_literal_selection(case: str):
    g = torch.Generator().manual_seed(3)
    B, n, k = 24, 200, (1 if case == "k1" else 5)
    pre = torch.rand(B, n, generator=g, dtype=torch.float64)
    if case == "one_hot_row":
        pre[7] += 10  # one token owns every winner: more than 4·k of them
    if case == "mostly_zero":
        pre = torch.relu(pre - 0.99)  # about 2 positives per row: fewer than B·k, the cutoff is 0
    mask = batch_topk_mask(pre.float(), k)
    assert int(mask.sum()) == B * k
    if case == "mostly_zero":
        assert bool(mask[pre > 0].all())  # every positive entry is among the picks
    else:
        assert torch.equal(mask, _literal_batch_topk(pre.float(), k) != 0)  # all entries > 0 here


def test_matryoshka_groups_follow_dictionary_learning():
    assert group_sizes(100, parse_fractions("1/32,1/16,1/8,1/4,17/32")) == [3, 6, 12, 25, 54]
    with pytest.raises(UserError, match="sum to 1"):
        _cfg(arch="matryoshka", matryoshka_fractions="1/2,1/4").validate()
    with pytest.raises(UserError, match="one weight per group"):
        _cfg(arch="matryoshka", matryoshka_fractions="1/2,1/2", matryoshka_weights="1").validate()
    with pytest.raises(UserError, match="comma-separated"):
        _cfg(arch="matryoshka", matryoshka_fractions="half,half").validate()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_save_load_round_trip(tmp_path: Path, arch: str):
    tr = Trainer(_cfg(arch=arch, matryoshka_fractions="1/4,3/4", threshold_start_step=0), D)
    for s in range(3):
        tr.step(_x(s))
    save_sae(tr.sae, tmp_path)
    sae, cfg = load_sae(tmp_path)
    assert type(sae) is type(tr.sae) and cfg["arch"] == arch
    for name, t in tr.sae.saved_tensors().items():
        assert torch.equal(sae.saved_tensors()[name], t), name
    x = _x(9)
    assert torch.equal(sae.reconstruct(x), tr.sae.eval().reconstruct(x))
    assert cfg["apply_b_dec_to_input"] == (arch != "jumprelu")


@pytest.mark.parametrize(
    "arch,kind,normalize",
    [
        ("batchtopk", "coactive", None),
        ("matryoshka", "ortsae", None),
        ("jumprelu", "coactive", None),  # normalises its inputs by default
        ("topk", None, True),
    ],
)
def test_resume_from_state_is_bit_exact(arch: str, kind: str | None, normalize: bool | None):
    cfg = _cfg(arch=arch, orth_kind=kind, matryoshka_fractions="1/4,3/4", threshold_start_step=1,
               ortsae_chunks=3, dead_tokens=32, normalize_activations=normalize)  # fmt: skip
    xs = [_x(s) for s in range(6)]
    whole = Trainer(cfg, D)
    for x in xs:
        whole.step(x)
    first = Trainer(cfg, D)
    for x in xs[:3]:
        first.step(x)
    resumed = Trainer(cfg, D)
    resumed.load_state_dict(first.state_dict())
    assert resumed.norm_factor == first.norm_factor
    for x in xs[3:]:
        resumed.step(x)
    for name, t in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], t), name


def test_cli_trains_each_new_arch(tmp_path: Path):
    import numpy as np

    from orthosae.cli import main

    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((256, D)).astype(np.float32))
    for arch, extra in (
        ("batchtopk", ["--orth"]),
        ("matryoshka", ["--orth-kind", "ortsae"]),
        ("jumprelu", []),
    ):
        out = tmp_path / arch
        args = ["train", "--activations", str(acts), "--arch", arch, "--d-sae", "32", "--k", "4"]
        args += ["--steps", "6", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--out", str(out)]
        assert main([*args, *extra]) == 0
        sae, cfg = load_sae(out)
        assert sae.arch == arch and cfg["training"]["arch"] == arch
