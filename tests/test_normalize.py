"""--normalize-activations: training on x / f with f the first batch's root mean squared norm, then folding f
into the saved SAE's biases and thresholds (dictionary_learning's normalize_activations + scale_biases).
Bit-exact resume with the factor: tests/test_archs.py::test_resume_from_state_is_bit_exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orthosae.errors import UserError
from orthosae.sae import load_sae, save_sae
from orthosae.train.config import TrainConfig
from orthosae.train.trainer import Trainer

D, N = 8, 32
ARCHS = ["topk", "relu", "batchtopk", "matryoshka", "jumprelu"]


def _cfg(**kw) -> TrainConfig:
    base = dict(activations="x.npy", d_sae=N, k=3, steps=50, batch_size=16, warmup_steps=2, seed=0,
                threshold_start_step=0, matryoshka_fractions="1/4,3/4", jumprelu_bandwidth=0.5)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _x(seed: int, scale: float = 40.0) -> torch.Tensor:
    """Activations far from unit scale, as a language model's residual stream is."""
    return (torch.randn(16, D, generator=torch.Generator().manual_seed(seed)) + 0.3) * scale


def _literal_factor(x: torch.Tensor) -> float:
    total = 0.0
    for row in x.tolist():
        total += sum(v * v for v in row)
    return math.sqrt(total / len(x))


def test_the_factor_is_the_first_batch_root_mean_squared_norm():
    tr = Trainer(_cfg(arch="topk", normalize_activations=True), D)
    tr.step(_x(0))
    tr.step(_x(1, scale=1000.0))  # later batches do not change it
    assert tr.norm_factor == pytest.approx(_literal_factor(_x(0)), rel=1e-12)


def test_jumprelu_normalises_by_default_and_the_others_do_not():
    for arch in ARCHS:
        assert _cfg(arch=arch).resolved_normalize() == (arch == "jumprelu")
        assert _cfg(arch=arch, normalize_activations=False).resolved_normalize() is False
    assert Trainer(_cfg(arch="topk"), D).norm_factor == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_raw_inputs_equals_training_on_prescaled_inputs_then_folding(arch: str):
    """The literal reference: a trainer without normalisation fed x / f by hand. Same parameters after
    every step; the folded SAE on x gives f times its codes and reconstructions on x / f."""
    xs = [_x(s) for s in range(4)]
    f = _literal_factor(xs[0])
    ours = Trainer(_cfg(arch=arch, normalize_activations=True), D)
    ref = Trainer(_cfg(arch=arch, normalize_activations=False), D)
    for x in xs:
        stats = ours.step(x)
        ref_stats = ref.step(x / f)
        assert float(stats["recon"]) == pytest.approx(float(ref_stats["recon"]) * f * f, rel=1e-5)
    for name, value in ours.sae.state_dict().items():
        assert torch.allclose(value, ref.sae.state_dict()[name], rtol=1e-5, atol=1e-6), name
    folded = ours.trained_sae().eval()
    assert folded is not ours.sae  # the training copy keeps its own scale
    x = _x(9)
    ref.sae.eval()
    assert torch.allclose(folded.reconstruct(x), f * ref.sae.reconstruct(x / f), rtol=1e-4, atol=1e-3)
    encode = (lambda s, v: s.encode(v)) if arch != "relu" else (lambda s, v: s.forward(v).latents)
    codes, ref_codes = encode(folded, x), encode(ref.sae, x / f)
    assert torch.equal(codes != 0, ref_codes != 0)  # the same latents fire
    assert torch.allclose(codes, f * ref_codes, rtol=1e-4, atol=1e-3)


def test_an_untracked_threshold_stays_untracked():
    tr = Trainer(_cfg(arch="batchtopk", normalize_activations=True, threshold_start_step=40), D)
    tr.step(_x(0))
    assert float(tr.sae.threshold) < 0
    assert float(tr.trained_sae().threshold) == float(tr.sae.threshold)


def test_saved_sae_takes_raw_activations_and_records_the_factor(tmp_path: Path):
    from orthosae.train.loop import run_cfg

    tr = Trainer(_cfg(arch="jumprelu"), D)
    for s in range(3):
        tr.step(_x(s))
    save_sae(tr.trained_sae(), tmp_path, run_cfg(tr.cfg, tr, {}, 48))
    sae, cfg = load_sae(tmp_path)
    assert cfg["training"]["norm_factor"] == tr.norm_factor
    x = _x(7)
    expected = tr.norm_factor * tr.sae.eval().reconstruct(x / tr.norm_factor)
    assert torch.allclose(sae.reconstruct(x), expected, rtol=1e-4, atol=1e-3)


def test_a_state_from_before_normalisation_resumes_unscaled():
    first = Trainer(_cfg(arch="topk"), D)
    first.step(_x(0))
    state = first.state_dict()
    del state["norm_factor"]
    resumed = Trainer(_cfg(arch="topk", normalize_activations=True), D)
    resumed.load_state_dict(state)
    assert resumed.norm_factor == 1.0


@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_a_first_batch_without_a_usable_norm_is_refused(bad: float):
    tr = Trainer(_cfg(arch="jumprelu"), D)
    with pytest.raises(UserError, match="cannot be normalised"):
        tr.step(torch.full((16, D), bad))


def test_cli_flag_turns_it_off(tmp_path: Path):
    import numpy as np

    from orthosae.cli import main

    acts = tmp_path / "acts.npy"
    np.save(acts, (40 * np.random.default_rng(0).standard_normal((128, D))).astype(np.float32))
    for flag, normalised in (("--normalize-activations", True), ("--no-normalize-activations", False)):
        out = tmp_path / flag
        args = ["train", "--activations", str(acts), "--arch", "jumprelu", "--d-sae", "32", "--k", "4", flag]
        args += ["--steps", "4", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--out", str(out)]
        assert main(args) == 0
        factor = load_sae(out)[1]["training"]["norm_factor"]
        assert (factor != 1.0) == normalised
