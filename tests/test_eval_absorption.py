"""Absorption: split-feature rule, full absorption and absorption fraction on hand-built cases, prompts."""

from __future__ import annotations

import random

import pytest
import torch

from orthosae.eval import absorption_calc as calc
from orthosae.eval.absorption_prompts import first_letter, icl_prompt, word_at

# Four latents in a 4-d space. The probe direction is e0; latent 0 is the main "starts with letter"
# latent, latent 1 an absorbing latent (cos 0.8 with the probe), latents 2 and 3 are unrelated (cos 0).
W_DEC = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.8, 0.6, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
PROBE = torch.tensor([2.0, 0.0, 0.0, 0.0])  # any positive scale: only the direction matters


def test_split_features_follow_the_f1_jumps():
    feats = [[5], [5, 9], [5, 9, 2], [5, 9, 2, 7]]
    # 0.50 → 0.60 jumps (> 0.03), 0.60 → 0.61 does not: stop at k = 2.
    assert calc.split_features([0.5, 0.6, 0.61, 0.9], feats, 0.03) == [5, 9]
    assert calc.split_features([0.5, 0.52, 0.9, 0.95], feats, 0.03) == [5]
    assert calc.split_features([0.1, 0.2, 0.3, 0.4], feats, 0.03) == [5, 9, 2, 7]


def test_decoder_cos():
    assert calc.decoder_cos(PROBE, W_DEC).tolist() == pytest.approx([1.0, 0.8, 0.0, 0.0])


def test_full_absorption_on_a_planted_case():
    # 10 probe true positives: 7 where the main latent fires, 2 where the absorbing latent fires instead,
    # 1 where only an unrelated latent fires. Expected absorption rate: 2 / 10.
    z = torch.zeros(10, 4)
    z[:7, 0] = 1.0
    z[7:9, 1] = 1.0
    z[9, 2] = 1.0
    lm_proj = torch.ones(10)  # x·p̂ of each word's LM activation
    cos = calc.decoder_cos(PROBE, W_DEC)
    absorbed = calc.full_absorption(z, lm_proj, cos, main_ids=[0])
    assert absorbed.tolist() == [False] * 7 + [True, True, False]
    assert absorbed.float().mean().item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("absorber_act", "lm_proj", "expected"),
    [
        (1.0, 1.0, True),  # 0.8 / 1.0 ≥ 0.4
        (0.4, 1.0, False),  # 0.32 / 1.0 < 0.4: the absorber carries too little of the probe projection
        (1.0, -1.0, False),  # the probe is not activated at all
        (1.0, 2.0, True),  # 0.8 / 2.0 = 0.4: at the threshold counts
    ],
)
def test_full_absorption_thresholds(absorber_act, lm_proj, expected):
    z = torch.tensor([[0.0, absorber_act, 0.0, 0.0]])
    cos = calc.decoder_cos(PROBE, W_DEC)
    assert calc.full_absorption(z, torch.tensor([lm_proj]), cos, [0]).item() is expected


def test_a_firing_main_latent_is_never_full_absorption():
    z = torch.tensor([[0.01, 5.0, 0.0, 0.0]])
    cos = calc.decoder_cos(PROBE, W_DEC)
    assert not calc.full_absorption(z, torch.tensor([1.0]), cos, [0]).item()


def test_absorption_fraction_by_hand():
    cos = calc.decoder_cos(PROBE, W_DEC)
    # main projection 0.5, absorber 0.5·0.8 = 0.4, x·p̂ = 1: share 0.4 ≥ 0.4, unaccounted 0.5,
    # absorbed min(0.4, 0.5) = 0.4 → fraction 0.4 / (0.4 + 0.5).
    z = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.2, 0.0, 0.0]])
    frac = calc.absorption_fraction(z, torch.tensor([1.0, 1.0, 1.0, 1.0]), cos, [0])
    # row 1: main silent → 1; row 2: main ≥ x·p̂ → 0; row 3: absorber share 0.16 < 0.4 → 0.
    assert frac.tolist() == pytest.approx([0.4 / 0.9, 1.0, 0.0, 0.0])


def test_icl_prompt_layout_and_word_position():
    rng = random.Random(0)
    p = icl_prompt(" cat", [" cat", " dog", " eel"], "{word} has the first letter:", rng, n_icl=2)
    lines = p.text.split("\n")
    assert lines[0] == ""  # the separator is prepended to the first example
    assert sorted(lines[1:3]) == [" dog has the first letter: D", " eel has the first letter: E"]
    assert lines[3] == " cat has the first letter:"
    assert first_letter(" Zebra") == "z"

    class Tok:
        def decode(self, ids):
            return {1: " cat", 2: " has"}.get(ids[0], "?")

    assert word_at([0, 1, 2, 2, 2, 2, 2], -6, Tok(), " cat")
    assert not word_at([0, 1, 2], -6, Tok(), " cat")


@pytest.mark.slow
def test_absorption_on_the_bundled_model():
    from orthosae.eval import absorption
    from orthosae.eval.context import EvalContext
    from orthosae.sae.topk import TopKSAE

    sae = TopKSAE(576, 256, 8, generator=torch.Generator().manual_seed(0))
    ctx = EvalContext(sae, {"d_in": 576, "d_sae": 256, "k": 8}, "smollm2-135m", 6, progress=False)
    cfg = absorption.Config(max_words=80, num_icl_examples=2, max_k_value=2, k_sparse_probe_num_epochs=3)
    out = absorption.evaluate(ctx, cfg)
    assert out["eval_type_id"] == "absorption_first_letter"
    assert set(out["eval_result_metrics"]["mean"]) == {"mean_absorption_score", "mean_num_split_features"}
    for row in out["eval_result_details"]:
        assert set(row) == {
            "first_letter",
            "absorption_rate",
            "num_absorption",
            "num_probe_true_positives",
            "num_split_features",
        }
        assert 0.0 <= row["absorption_rate"] <= 1.0
    un = out["eval_result_unstructured"]
    assert un["num_words"]["train"] + un["num_words"]["test"] > 60
    assert len(un["excluded_letters"]) + len(out["eval_result_details"]) == 26
