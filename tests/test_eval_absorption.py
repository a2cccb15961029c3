"""Absorption: SAEBench's rules on hand-built cases (literal references), prompts and words, the probe
recipes, the letter gate and intervals, and a short run on the bundled model (slow). The check against
SAEBench's own code is tests/test_absorption_saebench.py."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from orthosae.errors import UserError
from orthosae.eval import absorption as A
from orthosae.eval import absorption_calc as calc
from orthosae.eval.absorption_probes import fit_balanced_logistic, one_hot, pos_weights, train_ovr_probe
from orthosae.eval.absorption_prompts import (
    LETTERS,
    alpha_tokens,
    answer,
    first_letter,
    icl_prompt,
    is_alpha_word,
    keep_probe_word,
    split_words,
    word_at,
)

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
COS = calc.probe_cosines(PROBE, W_DEC)


def acts_with_projection(p: list[float]) -> torch.Tensor:
    """LM activations whose projection on the unit probe direction is p (one row per word)."""
    x = torch.zeros(len(p), 4)
    x[:, 0] = torch.tensor(p)
    return x


def scores(z: torch.Tensor, p: list[float], main: list[int]) -> tuple[list[float], list[bool]]:
    fraction, full = calc.word_scores(acts_with_projection(p), z, PROBE, COS, main)
    return fraction.tolist(), full.tolist()


def test_split_features_follow_the_f1_jumps():
    feats = [[5], [5, 9], [5, 9, 2], [5, 9, 2, 7]]
    # 0.50 → 0.60 jumps (> 0.03), 0.60 → 0.61 does not: stop at k = 2.
    assert calc.split_features([0.5, 0.6, 0.61, 0.9], feats, 0.03) == [5, 9]
    assert calc.split_features([0.5, 0.52, 0.9, 0.95], feats, 0.03) == [5]
    assert calc.split_features([0.1, 0.2, 0.3, 0.4], feats, 0.03) == [5, 9, 2, 7]
    assert calc.split_features([0.0, 0.0], feats[:2], 0.03) == [5]  # k = 1 always counts


def test_probe_cosines():
    assert COS.tolist() == pytest.approx([1.0, 0.8, 0.0, 0.0])


def test_full_absorption_on_a_planted_case():
    # 10 probe true positives: 7 where the main latent fires, 2 where the absorbing latent fires instead,
    # 1 where only an unrelated latent fires. Expected full absorption rate: 2 / 10.
    z = torch.zeros(10, 4)
    z[:7, 0] = 1.0
    z[7:9, 1] = 1.0
    z[9, 2] = 1.0
    _, full = scores(z, [1.0] * 10, [0])
    assert full == [False] * 7 + [True, True, False]
    row = calc.letter_row("q", torch.zeros(10), torch.tensor(full), [0])
    assert row["full_absorption_rate"] == pytest.approx(0.2) and row["num_full_absorption"] == 2


@pytest.mark.parametrize(
    ("absorber_act", "projection", "expected"),
    [
        (1.0, 1.0, True),  # 0.8 / 1.0 ≥ 0.4
        (0.4, 1.0, False),  # 0.32 / 1.0 < 0.4: the absorber carries too little of the probe projection
        (1.0, -1.0, False),  # the probe is not activated at all
        (1.0, 2.0, True),  # 0.8 / 2.0 = 0.4: at the threshold counts
        (1.0, 0.0, False),  # P = 0: SAEBench would divide by zero; not absorption here
    ],
)
def test_full_absorption_thresholds(absorber_act, projection, expected):
    z = torch.tensor([[0.0, absorber_act, 0.0, 0.0]])
    assert scores(z, [projection], [0])[1] == [expected]


def test_a_firing_main_latent_is_never_full_absorption():
    assert scores(torch.tensor([[0.01, 5.0, 0.0, 0.0]]), [1.0], [0])[1] == [False]


def test_a_poorly_aligned_top_latent_is_not_full_absorption():
    # The top projecting latent must have cos ≥ 0.025 with the probe.
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.02, 1.0, 0.0, 0.0]])
    cos = calc.probe_cosines(PROBE, w)
    x = acts_with_projection([0.01])
    _, full = calc.word_scores(x, torch.tensor([[0.0, 1.0]]), PROBE, cos, [0])
    assert full.tolist() == [False]


def test_absorption_fraction_by_hand():
    # Row 0: main projection 0.5, absorber 0.5·0.8 = 0.4, P = 1: share 0.4 ≥ 0.4, unaccounted 0.5,
    # absorbed min(0.4, 0.5) = 0.4 → fraction 0.4 / (0.4 + 0.5). Row 1: main silent → 1. Row 2: main
    # projection ≥ P → 0. Row 3: absorber share 0.16 < 0.4 → 0. Row 4: the main latent projects
    # negatively (M ≤ 0) while absorbers carry ≥ 40 % → 1. Row 5: P < 0 → 0.
    z = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [0.5, 0.2, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ]
    )
    w = W_DEC.clone()
    fraction, _ = scores(z[:4], [1.0] * 4, [0])
    assert fraction == pytest.approx([0.4 / 0.9, 1.0, 0.0, 0.0])
    w[2] = -W_DEC[0]  # a main latent anti-aligned with the probe
    cos = calc.probe_cosines(PROBE, w)
    z4 = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    assert calc.word_scores(acts_with_projection([1.0]), z4, PROBE, cos, [2])[0].tolist() == [1.0]
    assert scores(z[5:], [-1.0], [0])[0] == [0.0]


def test_at_most_three_absorbers_and_only_aligned_ones():
    # Five absorbing latents of cos 0.8 each projecting 0.8·a; only the 3 largest count. A latent of
    # cos 0.05 (< 0.1) never counts, however much it fires.
    w = torch.zeros(7, 4)
    w[0, 0] = 1.0
    w[1:6] = torch.tensor([0.8, 0.6, 0.0, 0.0])
    w[6] = torch.tensor([0.05, (1 - 0.05**2) ** 0.5, 0.0, 0.0])
    cos = calc.probe_cosines(PROBE, w)
    z = torch.tensor([[0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 100.0]])
    fraction, _ = calc.word_scores(acts_with_projection([2.0]), z, PROBE, cos, [0])
    absorbed = 0.8 * (0.5 + 0.4 + 0.3)  # = 0.96, share 0.48 ≥ 0.4; unaccounted 2 − 0.1
    assert fraction.item() == pytest.approx(absorbed / (absorbed + 0.1))


def test_headline_and_rows():
    rows = [
        calc.letter_row("a", torch.tensor([0.0, 1.0]), torch.tensor([False, True]), [1, 2]),
        calc.letter_row("b", torch.tensor([0.5, 0.5, 0.5]), torch.tensor([False] * 3), [3]),
    ]
    assert rows[0] == {
        "first_letter": "a",
        "mean_absorption_fraction": 0.5,
        "full_absorption_rate": 0.5,
        "num_full_absorption": 1,
        "num_probe_true_positives": 2,
        "num_split_features": 2,  # len(split features), as SAEBench's main.py reports it
    }
    h = calc.headline(rows)
    assert h["mean_absorption_fraction_score"] == pytest.approx(0.5)
    assert h["mean_full_absorption_score"] == pytest.approx(0.25)
    assert h["mean_num_split_features"] == pytest.approx(1.5)
    assert h["std_dev_full_absorption_score"] == pytest.approx(statistics.stdev([0.5, 0.0]))


def test_letter_mean_intervals():
    g = torch.Generator().manual_seed(0)
    letters = [
        (torch.rand(n, generator=g), (torch.rand(n, generator=g) < 0.3).double()) for n in (30, 50, 40)
    ]
    (lo, hi), (lo2, hi2) = calc.letter_mean_intervals(letters, seed=1)
    point = sum(v[0].mean() for v in letters) / 3
    point2 = sum(v[1].mean() for v in letters) / 3
    assert lo < point < hi and lo2 < point2 < hi2
    assert calc.letter_mean_intervals(letters, seed=1) == [[lo, hi], [lo2, hi2]]  # seeded
    wide = calc.letter_mean_intervals([(v[0][:8], v[1][:8]) for v in letters], seed=1)[0]
    assert wide is not None and wide[1] - wide[0] > hi - lo  # fewer words, wider interval
    assert calc.letter_mean_intervals([]) == []


def test_alpha_tokens_and_filters():
    class Tok:
        def get_vocab(self):
            return {"Ġcat": 3, "dog": 1, "Ġ": 2, "<0x6A>": 0, "ab1": 4, "▁Mist": 5, "Ġx": 6}

        def convert_tokens_to_string(self, toks):
            return toks[0].replace("Ġ", " ").replace("▁", "")

    assert alpha_tokens(Tok()) == ["dog", " cat", " Mist", " x"]  # token-id order; '▁' → leading space
    assert is_alpha_word(" McDonald") and not is_alpha_word("  two") and not is_alpha_word("café")
    assert [keep_probe_word(w) for w in ("<0x6A>", "3d", " cat", ">x", "a<b")] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert first_letter(" Zebra") == "z" and answer(" zebra") == " Z"
    with pytest.raises(UserError, match="no letter"):
        first_letter("   ")


def test_split_words_shuffles_then_cuts():
    vocab = [f"w{i}" for i in range(100)]
    train, test = split_words(vocab, random.Random(3), 0.8, None)
    assert (len(train), len(test)) == (80, 20) and sorted(train + test) == sorted(vocab)
    # max_words keeps a prefix of the same shuffle.
    train2, test2 = split_words(vocab, random.Random(3), 0.8, 50)
    assert train2 + test2 == (train + test)[:50] and len(train2) == 40


def test_icl_prompt_layout_and_no_self_example():
    rng = random.Random(0)
    pool = [" cat", " dog", " eel"]
    for _ in range(20):
        p = icl_prompt(" cat", pool, "{word} has the first letter:", rng, n_icl=2)
        lines = p.text.split("\n")
        assert lines[0] == ""  # the separator is prepended to the first example
        assert sorted(lines[1:3]) == [" dog has the first letter: D", " eel has the first letter: E"]
        assert lines[3] == " cat has the first letter:"
    with pytest.raises(UserError, match="in-context examples"):
        icl_prompt(" cat", [" cat", " dog"], "{word}:", rng, n_icl=2)

    class Tok:
        def decode(self, ids):
            return {1: " cat", 2: " has"}.get(ids[0], "?")

    assert word_at([0, 1, 2, 2, 2, 2, 2], -6, Tok(), " cat")
    assert not word_at([0, 1, 2], -6, Tok(), " cat")


def test_ovr_probe_is_seeded_and_learns():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 8, generator=g) + 3 * torch.nn.functional.one_hot(y, 8).float()
    kw = {"batch_size": 64, "num_epochs": 50, "weight_decay": 1e-4, "seed": 5}
    w1, b1 = train_ovr_probe(x, one_hot(y, 3), **kw)
    w2, b2 = train_ovr_probe(x, one_hot(y, 3), **kw)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert ((x @ w1.T + b1).argmax(dim=1) == y).float().mean() > 0.75  # chance: 1/3
    state = torch.random.get_rng_state()
    train_ovr_probe(x, one_hot(y, 3), **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator is untouched


def test_pos_weights_without_positives_stay_finite():
    y = one_hot(torch.tensor([0, 0, 2, 2]), 3)
    assert pos_weights(y).tolist() == [1.0, 1.0, 1.0]
    assert pos_weights(one_hot(torch.tensor([0, 1, 1, 1]), 2)).tolist() == pytest.approx([3.0, 1 / 3])


def test_balanced_logistic_is_at_the_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 200, 3, generator=g))
    y = torch.rand(2, 200, generator=g) < torch.sigmoid(x.sum(-1) - 2)
    coef, intercept = fit_balanced_logistic(x, y)
    w = torch.cat([coef, intercept.unsqueeze(1)], dim=1).requires_grad_(True)
    n_pos = y.sum(dim=1, keepdim=True)
    sw = torch.where(y, 200 / (2 * n_pos), 200 / (2 * (200 - n_pos))).double()
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], -1).double()
    from orthosae.eval.absorption_probes import balanced_logistic_objective

    balanced_logistic_objective(w, x1, y.double(), sw, 1.0 / sw.sum(dim=1)).sum().backward()
    assert w.grad is not None and w.grad.abs().max() < 1e-7
    with pytest.raises(ValueError, match="one class"):
        fit_balanced_logistic(x, torch.zeros(2, 200, dtype=torch.bool))


def test_config_validation():
    A.Config().validate()
    with pytest.raises(UserError, match="max_words"):
        A.Config(max_words=30).validate()
    A.Config(max_words=A.Config().min_words()).validate()
    with pytest.raises(UserError, match="prompt_template"):
        A.Config(prompt_template="no placeholder").validate()
    with pytest.raises(UserError, match="train_test_fraction"):
        A.Config(train_test_fraction=1.0).validate()


def _toy_world(n_per_letter: int = 20, strong: str = LETTERS):
    """Words with a clean letter direction (for `strong` letters) and an SAE with one latent per letter."""
    g = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    words = [c + "".join(rnd.choice(LETTERS) for _ in range(5)) for c in LETTERS for _ in range(n_per_letter)]
    u = torch.linalg.qr(torch.randn(40, 26, generator=g)).Q.T
    base = {w: (3.0 if w[0] in strong else 0.2) * u[LETTERS.index(w[0])] for w in words}

    def acts_fn(prompts, _desc):
        return torch.stack([base[p.word] + 0.1 * torch.randn(40, generator=g) for p in prompts])

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ u.T - 1.0)

    return words, acts_fn, encode, u


def test_gate_reports_null_with_a_reason():
    words, acts_fn, encode, W_dec = _toy_world(strong="abcde")
    cfg = A.Config(probe_num_epochs=10, k_sparse_probe_num_epochs=5, max_k_value=2, max_words=200)
    lm = A.prepare_lm(words, acts_fn, cfg, seed=0)
    scores = A.score_sae(lm, encode, W_dec, cfg, seed=0)
    metrics, details, un = A.summarize(lm, scores, cfg, 0)
    assert set(metrics["mean"]) == {*A.MEAN_KEYS, *(k + "_ci95" for k in A.HEADLINES)}
    assert all(v is None for v in metrics["mean"].values())
    assert details == [] and un["num_words_scored"] == 0
    assert "need 20" in un["reason"] and "max_words=200" in un["reason"]
    assert un["num_letters_kept"] < 20
    assert any("max_words=200" in d for d in un["departures_from_saebench"])
    assert A.replicates_record(A.headline_replicates(lm, scores, cfg, 0)) == {}  # no headline, no replicates


def test_clean_sae_has_no_absorption():
    words, acts_fn, encode, W_dec = _toy_world()
    cfg = A.Config(k_sparse_probe_num_epochs=20, k_sparse_probe_batch_size=64, max_k_value=3)
    lm = A.prepare_lm(words, acts_fn, cfg, seed=0)
    scores = A.score_sae(lm, encode, W_dec, cfg, seed=0)
    metrics, details, un = A.summarize(lm, scores, cfg, 0)
    assert un["reason"] is None and un["num_letters_kept"] >= 20
    mean = metrics["mean"]
    assert set(mean) == {*A.MEAN_KEYS, *(k + "_ci95" for k in A.HEADLINES)}
    assert mean["mean_absorption_fraction_score"] == 0.0 and mean["mean_full_absorption_score"] == 0.0
    assert mean["mean_absorption_fraction_score_ci95"] == [0.0, 0.0]
    assert all(scores.split_feats[r["first_letter"]] == [LETTERS.index(r["first_letter"])] for r in details)
    # The stored replicates are the vectors the intervals come from, over the words listed as the items.
    reps = A.replicates_record(A.headline_replicates(lm, scores, cfg, 0))
    assert set(reps) == {f"mean.{k}" for k in A.HEADLINES}
    assert all(len(v) == cfg.n_bootstrap and set(v) == {0.0} for v in reps.values())
    items = A.resampled_items(lm, scores)
    letters = "".join(c for c, _ in items["letters"])
    assert letters == un["letters_kept"] == "".join(r["first_letter"] for r in details)
    assert sum(n for _, n in items["letters"]) == un["num_words_scored"]


@pytest.mark.slow
def test_absorption_on_the_bundled_model():
    from orthosae.eval.context import EvalContext
    from orthosae.sae.topk import TopKSAE

    sae = TopKSAE(576, 256, 8, generator=torch.Generator().manual_seed(0))
    ctx = EvalContext(sae, {"d_in": 576, "d_sae": 256, "k": 8}, "smollm2-135m", 6, progress=False)
    cfg = A.Config(
        max_words=150, num_icl_examples=2, max_k_value=2, k_sparse_probe_num_epochs=3, probe_num_epochs=5
    )
    out = A.evaluate(ctx, cfg)
    assert out["eval_type_id"] == "absorption_first_letter"
    mean = out["eval_result_metrics"]["mean"]
    assert {"mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features"} <= set(
        mean
    )
    un = out["eval_result_unstructured"]
    assert un["num_words"]["used"] == 150 and un["num_words"]["alphabetic_tokens"] > 40_000
    assert (
        un["lm_diagnostics"]["prompts_whose_read_token_is_not_the_word"]
        < 0.1 * un["lm_diagnostics"]["prompts_run"]
    )
    assert len(un["letters"]) == 26
    if un["reason"] is not None:  # 150 words cannot train a 576-d probe well: the gate fails, visibly
        assert mean["mean_absorption_fraction_score"] is None and out["eval_result_details"] == []
    assert out["eval_config"]["bootstrap_config"]["method"] == "percentile bootstrap"
