"""Sparse probing: SAEBench's task sizes and balance, kept-token pooling, bootstrap summaries, the result
layout, folding, and the LM part done once for several SAEs."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import byte_tokenizer, tiny_model
from orthosae.activations.harvest import resid_post
from orthosae.errors import UserError
from orthosae.eval import sparse_probing
from orthosae.eval.context import EvalContext
from orthosae.eval.datasets import DATASETS, LabelledTexts, detag
from orthosae.eval.probing_acts import TokenActs, collect, kept_mask, pool_rows
from orthosae.eval.probing_tasks import draw_negatives, make_tasks, split_per_class
from orthosae.eval.prompt_acts import acts_at_positions
from orthosae.eval.sparse_probing import (
    Config,
    probe_accuracies,
    resampled_accuracy,
    result_keys,
    summarise,
)
from orthosae.models.loader import LoadedModel
from orthosae.sae.relu import ReLUSAE


def test_top_k_accuracy_on_planted_features():
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(400) % 2).float()
    x = torch.randn(400, 60, generator=g)
    x[:, 13] += 4 * (2 * y - 1)  # one feature separates the classes almost perfectly
    acc = probe_accuracies(x[:300], y[:300], x[300:], y[300:], [1, 5])
    assert acc["top_1_test_accuracy"] > 0.97
    assert acc["test_accuracy"] > 0.9
    # Without the planted feature, one noise feature is at chance.
    acc_noise = probe_accuracies(x[:300, :13], y[:300], x[300:, :13], y[300:], [1])
    assert acc_noise["top_1_test_accuracy"] < 0.7


# ----------------------------------------------------------------- tasks (SAEBench's sizes)


def test_split_per_class_gives_half_the_task_size_per_class():
    pools = {"a": list(range(100)), "b": list(range(100, 110))}
    train, test = split_per_class(pools, 20, 10, random.Random(0))
    # A full class: n_train/2 and n_test/2. A short one (10 < 15): test keeps round(10·5/15) = 3.
    assert (len(train["a"]), len(test["a"])) == (10, 5)
    assert (len(train["b"]), len(test["b"])) == (7, 3)
    for c in pools:
        assert not set(train[c]) & set(test[c]) and set(train[c]) | set(test[c]) <= set(pools[c])


def test_negatives_are_drawn_evenly_from_the_other_classes():
    split = {"a": list(range(10)), "b": list(range(10, 13)), "c": list(range(20, 40))}
    cls = lambda i: "a" if i < 10 else "b" if i < 20 else "c"  # noqa: E731
    # Target a: ⌈10/2⌉ = 5 from each other class; b has only 3, so c makes up the other 2.
    neg = draw_negatives(split, "a", random.Random(0))
    assert sorted(cls(i) for i in neg) == ["b"] * 3 + ["c"] * 7
    # Target b: ⌈3/2⌉ = 2 from each, then 3 of those 4.
    neg = draw_negatives(split, "b", random.Random(0))
    assert len(neg) == 3 and {cls(i) for i in neg} <= {"a", "c"}
    # Target c: all 10 of a and all 3 of b: 13 negatives for 20 positives.
    assert len(draw_negatives(split, "c", random.Random(0))) == 13


def test_make_tasks_sizes_and_two_class_datasets():
    labels = ["x"] * 300 + ["y"] * 300 + ["z"] * 40 + [None] * 5
    tasks = make_tasks(labels, ["x", "y", "z"], 200, 100, random.Random(1))
    assert [t.target for t in tasks] == ["x", "y", "z"]
    x, z = tasks[0], tasks[2]
    # Each full task has the asked sizes, half positives.
    assert (len(x.train), sum(x.y_train), len(x.test), sum(x.y_test)) == (200, 100, 100, 50)
    # z has 40 texts: 27 train, 13 test (its 1/3 share), and as many negatives.
    assert (len(z.train), sum(z.y_train), len(z.test), sum(z.y_test)) == (54, 27, 26, 13)
    assert not set(x.train) & set(x.test)
    assert all(labels[i] is not None for t in tasks for i in (*t.train, *t.test))
    # Two classes: one task (the other is the same with labels flipped).
    two = make_tasks(["p"] * 50 + ["q"] * 50, ["p", "q"], 40, 20, random.Random(0))
    assert [t.target for t in two] == ["p"] and len(two[0].train) == 40


# ----------------------------------------------------------------- pooling


def test_pool_rows_and_kept_mask_by_hand():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert pool_rows(v, torch.tensor([0, 0, 2]), 3).tolist() == [[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]
    keep = kept_mask([[9, 1, 2, 7], [9, 3]], 4, {9, 7})
    assert keep.tolist() == [[False, True, True, False], [False, True, False, False]]


def test_token_acts_pool_per_text_in_batches():
    acts = torch.arange(12.0).reshape(6, 2)
    t = TokenActs(acts, torch.tensor([0, 1, 4, 6]))
    assert t.pooled().tolist() == [[0.0, 1.0], [4.0, 5.0], [9.0, 10.0]]
    sq = lambda x: x**2  # noqa: E731
    assert torch.equal(t.pooled(sq, batch_texts=2), TokenActs(acts**2, t.offsets).pooled())


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    model = tiny_model("llama", n_layers=3)
    return LoadedModel(model, byte_tokenizer(), "tiny", "0", 3, 32, "llama")


def test_collect_leaves_out_special_tokens_and_keeps_tokens(tiny):
    # 257 (EOS) inside a text is left out of the mean, as SAEBench masks BOS/EOS/pad wherever they are.
    seqs = [[256, 10, 20, 257, 40], [256, 7, 8], [256, 99, 98, 97]]
    encode = lambda x: torch.relu(x[:, :6]) * 2  # noqa: E731 - a stand-in "SAE": any per-token map
    got = collect(tiny, 1, seqs, {256, 257, 258}, encode=encode, keep_tokens=True, batch_size=2)
    assert got.latents is not None and got.tokens is not None
    for i, seq in enumerate(seqs):
        h = resid_post(tiny.model, torch.tensor([seq]), 1)[0]
        keep = torch.tensor([t < 256 for t in seq])
        assert torch.allclose(got.lm[i], h[keep].mean(dim=0), atol=1e-5)
        assert torch.allclose(got.latents[i], encode(h[keep]).mean(dim=0), atol=1e-5)
    assert got.tokens.offsets.tolist() == [0, 3, 5, 8]
    assert torch.allclose(got.tokens.pooled(encode), got.latents, atol=1e-6)


def test_acts_at_negative_positions_per_prompt(tiny):
    seqs = [[256, 1, 2, 3, 4, 5], [256, 9, 8]]
    out = acts_at_positions(tiny, 2, seqs, -2, batch_size=2)
    for i, seq in enumerate(seqs):
        h = resid_post(tiny.model, torch.tensor([seq]), 2)[0]
        assert torch.allclose(out[i], h[len(seq) - 2], atol=1e-5)


def test_detag():
    assert detag("The/DT cat/NN ,/, sat/VBD ./.") == "The cat, sat."


# ----------------------------------------------------------------- bootstrap summaries


def test_resampled_accuracy_by_hand():
    correct = torch.tensor([True, False, True, True])
    counts = torch.tensor([[1.0, 1, 1, 1], [4, 0, 0, 0], [0, 2, 0, 2]], dtype=torch.float64)
    assert resampled_accuracy(correct, counts).tolist() == [0.75, 1.0, 0.5]


def test_summarise_resamples_within_tasks_and_averages_up():
    c = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    w = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    per_task = {"d1": {"t1": {"m": c(1, 1, 0, 0)}}, "d2": {"t1": {"m": c(1, 1)}, "t2": {"m": c(1, 0)}}}
    counts = {
        "d1": {"t1": w([1, 1, 1, 1], [2, 2, 0, 0], [0, 0, 2, 2])},  # accuracies 0.5, 1, 0
        "d2": {"t1": w([1, 1], [2, 0], [0, 2]), "t2": w([1, 1], [2, 0], [0, 2])},  # 1, 1, 1 and .5, 1, 0
    }
    overall, by_dataset, by_task = summarise(per_task, counts, ["m", "absent"])
    assert by_task["d2"]["m"] == {"t1": 1.0, "t2": 0.5}
    assert by_dataset["d1"]["m"] == 0.5 and by_dataset["d2"]["m"] == 0.75
    assert overall["m"] == pytest.approx(0.625)
    # Resampled overall: mean of d1 (0.5, 1, 0) and d2 (0.75, 1, 0.5) = (0.625, 1, 0.25); the percentile
    # interval of three values interpolates linearly between the sorted ones.
    lo, hi = overall["m_ci95"]
    assert lo == pytest.approx(0.25 + 0.05 * 0.375) and hi == pytest.approx(0.625 + 0.95 * 0.375)
    assert by_dataset["d1"]["m_ci95"] == pytest.approx([0.025, 0.975])
    assert overall["absent"] is None and overall["absent_ci95"] is None and by_dataset["d1"]["absent"] is None


def test_result_keys_add_top_100_once():
    assert result_keys([1, 5])[-1] == "top_100_test_accuracy" and len(result_keys([1, 100])) == 3


@pytest.mark.parametrize(
    "field, value",
    [("probe_train_set_size", 1), ("context_length", 1), ("k_values", [0]), ("dataset_names", ["nope"])],
)
def test_bad_config_is_a_user_error(field, value):
    cfg = Config(**{field: value})
    with pytest.raises(UserError, match=field if field != "dataset_names" else "unknown probing dataset"):
        cfg.validate()


# ----------------------------------------------------------------- the eval end to end (tiny model)


def _toy() -> LabelledTexts:
    """Three classes told apart by their letters; 'c' is short (20 texts)."""
    rng = random.Random(0)
    texts, labels = [], []
    for label, letters, n in (("a", "abcde", 60), ("b", "vwxyz", 60), ("c", "klmno", 20)):
        for _ in range(n):
            texts.append(" ".join("".join(rng.choices(letters, k=4)) for _ in range(rng.randint(2, 5))))
            labels.append(label)
    return LabelledTexts("toy", texts, labels)


@pytest.fixture
def toy_data(monkeypatch):
    monkeypatch.setitem(DATASETS, "toy", _toy)
    monkeypatch.setattr(sparse_probing, "load_dataset", lambda name: _toy())


def _relu_sae(d_in: int, d_sae: int, seed: int) -> ReLUSAE:
    sae = ReLUSAE(d_in, d_sae, generator=torch.Generator().manual_seed(seed), init_norm=1.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    return sae


def test_evaluate_layout_sizes_folding_and_shared_lm(tiny, toy_data, monkeypatch):
    cfg = Config(
        dataset_names=["toy"],
        probe_train_set_size=40,
        probe_test_set_size=20,
        k_values=[1, 2],
        n_bootstrap=200,
    )
    unit = _relu_sae(32, 48, 0)
    # The same SAE with decoder rows scaled by s and encoder columns by s: folding gives `unit` back.
    scaled = _relu_sae(32, 48, 0)
    s = torch.linspace(0.2, 3.0, 48)
    with torch.no_grad():
        scaled.W_enc.div_(s)
        scaled.b_enc.div_(s)
        scaled.W_dec.mul_(s.unsqueeze(1))
    shared: dict = {}
    lm_runs = []
    real_collect = sparse_probing.collect
    monkeypatch.setattr(sparse_probing, "collect", lambda *a, **k: lm_runs.append(1) or real_collect(*a, **k))
    out = {}
    for name, sae in (("unit", unit), ("scaled", scaled)):
        ctx = EvalContext(
            sae, {"d_in": 32, "d_sae": 48}, "tiny", 1, progress=False, _model=tiny, shared=shared
        )
        out[name] = sparse_probing.evaluate(ctx, cfg)
    assert len(lm_runs) == 1  # the LM ran once for both SAEs (tokens kept, each SAE only encodes)
    a, b = out["unit"], out["scaled"]
    assert b["eval_config"]["decoder_norms_folded"] and not a["eval_config"]["decoder_norms_folded"]
    for key in ("eval_result_metrics", "eval_result_details", "eval_result_unstructured"):
        assert a[key] == b[key], key  # folding made the two SAEs the same
    m = a["eval_result_metrics"]
    assert (
        set(m["sae"]) == {f"sae_{k}{ci}" for k in result_keys([1, 2]) for ci in ("", "_ci95")}
        and m["sae"]["sae_top_100_test_accuracy"] is None
    )
    lo, hi = m["llm"]["llm_top_1_test_accuracy_ci95"]
    assert lo <= m["llm"]["llm_top_1_test_accuracy"] <= hi
    (detail,) = a["eval_result_details"]
    assert detail["dataset_name"] == "toy_results" and "sae_top_2_test_accuracy_ci95" in detail
    un = a["eval_result_unstructured"]["toy_results"]
    # SAEBench's layout, metric → class; sizes per task: a and b are full (20 + 20 train), c has 20 texts.
    assert set(un["sae_top_1_test_accuracy"]) == {"a", "b", "c"}
    assert un["n_train"] == {"a": 40, "b": 40, "c": 26} and un["n_test"] == {"a": 20, "b": 20, "c": 14}
    assert len(un["sae_top_latents"]["a"]) == 2 and un["skipped_tasks"] == {}
    cfgd = a["eval_config"]
    assert cfgd["probe_train_set_size"] == 40 and "best test accuracy" in cfgd["full_width_probe"]
    assert cfgd["bootstrap_config"]["n_resamples"] == 200 and cfgd["bootstrap_config"]["n_units"] == 54


def test_without_the_token_cache_the_lm_reruns_with_the_same_results(tiny, toy_data, monkeypatch):
    base = dict(
        dataset_names=["toy"], probe_train_set_size=40, probe_test_set_size=20, k_values=[1], n_bootstrap=50
    )
    sae = _relu_sae(32, 48, 1)
    runs = []
    real_collect = sparse_probing.collect
    monkeypatch.setattr(
        sparse_probing, "collect", lambda *a, **k: runs.append(k.get("encode")) or real_collect(*a, **k)
    )
    out = []
    for gb in (4.0, 0.0):
        ctx = EvalContext(sae, {"d_in": 32, "d_sae": 48}, "tiny", 1, progress=False, _model=tiny, shared={})
        out.append(sparse_probing.evaluate(ctx, Config(**base, token_cache_gb=gb)))
    # Cached: one LM pass without an encoder. Not cached: that pass, then one more with the SAE's encoder.
    assert [e is None for e in runs] == [True, True, False]
    for key in ("eval_result_metrics", "eval_result_details"):
        assert out[0][key] == out[1][key], key


@pytest.mark.slow
def test_sparse_probing_on_the_bundled_model():
    from orthosae.sae.topk import TopKSAE

    sae = TopKSAE(576, 256, 8, generator=torch.Generator().manual_seed(0))
    ctx = EvalContext(sae, {"d_in": 576, "d_sae": 256, "k": 8}, "smollm2-135m", 6, progress=False)
    cfg = sparse_probing.Config(
        dataset_names=["pang_lee_sentiment", "language_id"],
        probe_train_set_size=48,
        probe_test_set_size=24,
        context_length=24,
        k_values=[1, 5],
    )
    out = sparse_probing.evaluate(ctx, cfg)
    llm, sae_m = out["eval_result_metrics"]["llm"], out["eval_result_metrics"]["sae"]
    assert {k for k in llm if not k.endswith("_ci95")} == {
        "llm_test_accuracy",
        "llm_top_1_test_accuracy",
        "llm_top_5_test_accuracy",
        "llm_top_100_test_accuracy",
    }
    assert llm["llm_top_100_test_accuracy"] is None and sae_m["sae_top_100_test_accuracy"] is None
    assert [d["dataset_name"] for d in out["eval_result_details"]] == [
        "pang_lee_sentiment_results",
        "language_id_results",
    ]
    # Language id is easy even for a 135M model at layer 6.
    assert out["eval_result_details"][1]["llm_test_accuracy"] > 0.7
