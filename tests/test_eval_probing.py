"""Sparse probing: top-k accuracy on planted features, balanced sampling, mean pooling with padding."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import byte_tokenizer, tiny_model
from orthosae.activations.harvest import resid_post
from orthosae.eval.datasets import LabelledTexts, detag
from orthosae.eval.prompt_acts import acts_at_positions, mean_pooled
from orthosae.eval.sparse_probing import balanced_sample, one_vs_rest, probe_accuracies
from orthosae.models.loader import LoadedModel


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


def test_balanced_sample_and_one_vs_rest():
    data = LabelledTexts("t", [f"text {i}" for i in range(100)], ["a"] * 70 + ["b"] * 20 + ["c"] * 10)
    train, test = balanced_sample(data, 30, 15, random.Random(0), max_classes=6)
    assert {c: sum(1 for _, lab in train if lab == c) for c in "abc"} == {"a": 10, "b": 10, "c": 7}
    # A small class keeps a third of its items for testing.
    assert {c: sum(1 for _, lab in test if lab == c) for c in "abc"} == {"a": 5, "b": 5, "c": 3}
    assert not {t for t, _ in train} & {t for t, _ in test}
    labels = [lab for _, lab in train]
    idx = one_vs_rest(labels, "b", random.Random(0))
    assert sum(labels[i] == "b" for i in idx) == 10 and len(idx) == 20


def test_detag():
    assert detag("The/DT cat/NN ,/, sat/VBD ./.") == "The cat, sat."


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    model = tiny_model("llama", n_layers=3)
    return LoadedModel(model, byte_tokenizer(), "tiny", "0", 3, 32, "llama")


def test_mean_pooling_ignores_padding_and_bos(tiny):
    seqs = [[256, 10, 20, 30, 40], [256, 7, 8], [256, 99, 98, 97]]
    encode = lambda x: torch.relu(x[:, :6]) * 2  # noqa: E731 - a stand-in "SAE": any per-token map
    lm, lat = mean_pooled(tiny, 1, seqs, encode=encode, batch_size=2)
    for i, seq in enumerate(seqs):
        h = resid_post(tiny.model, torch.tensor([seq]), 1)[0, 1:]  # unpadded, BOS left out
        assert torch.allclose(lm[i], h.mean(dim=0), atol=1e-5)
        assert torch.allclose(lat[i], encode(h).mean(dim=0), atol=1e-5)


def test_acts_at_negative_positions_per_prompt(tiny):
    seqs = [[256, 1, 2, 3, 4, 5], [256, 9, 8]]
    out = acts_at_positions(tiny, 2, seqs, -2, batch_size=2)
    for i, seq in enumerate(seqs):
        h = resid_post(tiny.model, torch.tensor([seq]), 2)[0]
        assert torch.allclose(out[i], h[len(seq) - 2], atol=1e-5)


@pytest.mark.slow
def test_sparse_probing_on_the_bundled_model():
    from orthosae.eval import sparse_probing
    from orthosae.eval.context import EvalContext
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
    assert set(llm) == {
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
