"""Sparse probing against SAEBench 0.6.0's own functions (run in the peer venv, tests/saebench_peer.py).

On the same synthetic mean-pooled features (sparse SAE-like latents and dense LM-like activations, with
planted class signals of several strengths):

* top-k selection: SAEBench's `get_top_k_mean_diff_mask` keeps exactly the latents we rank first;
* the probe: our `fit_sklearn_logistic` minimises the objective of SAEBench's `train_sklearn_probe`
  (sklearn LogisticRegression, C = 1). Against sklearn run to convergence (tol 1e-10) every test prediction
  is the same. Against SAEBench's call itself (sklearn's default tol = 1e-4) accuracies agree within 1 %
  of the test set: sklearn stops early, so a few test points within its optimisation error of the
  decision boundary can fall on the other side; our objective is never worse than its;
* pooling: SAEBench's masked means (`create_meaned_model_activations`, `get_sae_meaned_activations`)
  equal our kept-token means of the LM activations and of the encoded latents;
* task balance: SAEBench's `prepare_probe_data` builds one-vs-rest tasks of the same size and with the same
  number of negatives from each other class as ours.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from orthosae.eval.probes import fit_sklearn_logistic, top_k_mean_diff
from orthosae.eval.probing_acts import TokenActs
from orthosae.eval.probing_tasks import make_task
from saebench_peer import run_saebench

K_VALUES = [1, 2, 5, 10, 20, 50]
N_TRAIN, N_TEST = 640, 320

PEER = """
import numpy as np
from sklearn.linear_model import LogisticRegression
import sae_bench.evals.sparse_probing.probe_training as pt
import sae_bench.sae_bench_utils.activation_collection as ac

for name, (xtr, ytr, xte, yte) in inputs["tasks"].items():
    for k in [*inputs["k_values"], None]:
        if k is None:
            a, b, kept = xtr, xte, None
        else:
            mask = pt.get_top_k_mean_diff_mask(xtr, ytr, k)
            a, b = pt.apply_topk_mask_reduce_dim(xtr, mask), pt.apply_topk_mask_reduce_dim(xte, mask)
            kept = (~mask).nonzero().flatten()
        probe, acc = pt.train_sklearn_probe(a, ytr, b, yte)
        tight = LogisticRegression(C=1.0, tol=1e-10, max_iter=100000).fit(a.numpy(), ytr.numpy())
        outputs[(name, k)] = {
            "kept": kept,
            "acc": float(acc),
            "pred": torch.tensor(probe.predict(b.numpy())),
            "coef": torch.tensor(probe.coef_[0]),
            "intercept": float(probe.intercept_[0]),
            "tight_pred": torch.tensor(tight.predict(b.numpy())),
        }

class ReluSAE:
    dtype = torch.float32
    def encode(self, x):
        return torch.relu(x @ inputs["W"] + inputs["b"])

acts = {"c": inputs["token_acts"]}
outputs["lm_pooled"] = ac.create_meaned_model_activations(acts)["c"]
outputs["sae_pooled"] = ac.get_sae_meaned_activations(acts, ReluSAE(), 3)["c"]

for name, by_class in inputs["classes"].items():
    torch.manual_seed(0)
    x, y = pt.prepare_probe_data(by_class, "a")
    outputs[("task", name)] = (x[:, 0], y)
"""


def _features(seed: int, dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_TRAIN + N_TEST, d) features, labels 0/1 balanced, with planted signals."""
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    y = (torch.arange(n) % 2).float()
    if dense:  # LM-like: dense, feature scales over 2.5 decades, two informative directions
        d = 96
        x = torch.randn(n, d, generator=g) * torch.logspace(-1, 1.5, d)[torch.randperm(d, generator=g)]
        x[:, 3] += (0.5 + seed) * (2 * y - 1)
        x[:, 40] += 2.0 * y
    else:  # SAE-like: non-negative, mostly zero, lognormal scales; strong, weak and tiny planted latents
        d = 768
        scale = torch.exp(torch.randn(d, generator=g))
        x = torch.relu(torch.randn(n, d, generator=g) - 1.0) * scale * 0.1
        x[:, 7] += (0.05 + 0.05 * seed) * y * torch.rand(n, generator=g)
        x[:, 100] += 0.05 * (1 - y) * torch.rand(n, generator=g)
        x[:, 200] += 0.02 * y
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


def _objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: float) -> float:
    """sklearn's C = 1 objective: Σ log-loss + ‖w‖²/2."""
    logits = x.double() @ w.double() + b
    return float(
        F.binary_cross_entropy_with_logits(logits, y.double(), reduction="sum")
        + 0.5 * w.double().pow(2).sum()
    )


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    tasks = {}
    for seed in range(3):
        for dense in (False, True):
            x, y = _features(seed, dense)
            tasks[f"{'dense' if dense else 'sparse'}{seed}"] = (
                x[:N_TRAIN],
                y[:N_TRAIN].int(),
                x[N_TRAIN:],
                y[N_TRAIN:].int(),
            )
    g = torch.Generator().manual_seed(5)
    token_acts = torch.randn(4, 7, 6, generator=g)
    lengths = [7, 3, 5, 1]  # kept tokens per text; the rest is masked (zeroed, as SAEBench does)
    for i, n in enumerate(lengths):
        token_acts[i, n:] = 0.0
    # One-vs-rest tasks over classes of equal and of unequal sizes; column 0 tells the class.
    classes = {
        "equal3": {c: torch.full((50, 2), float(i)) for i, c in enumerate("abc")},
        "equal4": {c: torch.full((60, 2), float(i)) for i, c in enumerate("abcd")},
    }
    inputs = {
        "tasks": tasks,
        "k_values": K_VALUES,
        "token_acts": token_acts,
        "W": torch.randn(6, 10, generator=g),
        "b": torch.randn(10, generator=g) * 0.5,
        "classes": classes,
    }
    out = run_saebench(PEER, inputs, tmp_path_factory.mktemp("probing_peer"))
    return inputs | {"lengths": lengths}, out


def test_top_k_selection_and_probe_match_saebench(peer):
    inputs, out = peer
    worst = 0.0
    for name, (xtr, ytr, xte, yte) in inputs["tasks"].items():
        ranking = top_k_mean_diff(xtr, ytr.float(), max(K_VALUES))
        for k in [*K_VALUES, None]:
            ref = out[(name, k)]
            idx = torch.arange(xtr.shape[1]) if k is None else ranking[:k]
            if k is not None:
                assert sorted(idx.tolist()) == ref["kept"].tolist(), (name, k)
                idx = ref["kept"]  # SAEBench keeps them in index order; the fit does not care
            probe = fit_sklearn_logistic(xtr[:, idx], ytr.float())
            pred = (probe.logits(xte[:, idx]) > 0).long()
            # Against sklearn at convergence: the same minimiser, so the same predictions.
            assert torch.equal(pred, ref["tight_pred"].long()), (name, k)
            # Against SAEBench's call (sklearn's default tol): within 1 % of the test set, ours no worse.
            acc = (pred == yte.long()).float().mean().item()
            assert acc == pytest.approx(ref["acc"], abs=0.01), (name, k)
            worst = max(worst, abs(acc - ref["acc"]))
            w = probe.weight[:, 0]
            ours = _objective(xtr[:, idx], ytr, w, float(probe.bias[0] - probe.mean @ w))
            theirs = _objective(xtr[:, idx], ytr, ref["coef"], ref["intercept"])
            assert ours <= theirs + 1e-6 * abs(theirs), (name, k)
    assert worst <= 0.01


def test_mean_pooling_matches_saebench(peer):
    inputs, out = peer
    acts, lengths = inputs["token_acts"], inputs["lengths"]
    flat = torch.cat([acts[i, :n] for i, n in enumerate(lengths)])
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    tokens = TokenActs(flat, offsets)
    assert torch.allclose(tokens.pooled(), out["lm_pooled"], atol=1e-6)
    encode = lambda x: torch.relu(x @ inputs["W"] + inputs["b"])  # noqa: E731 - the peer's stand-in SAE
    assert torch.allclose(tokens.pooled(encode, batch_texts=3), out["sae_pooled"], atol=1e-6)


def test_task_sizes_and_negative_mix_match_saebench(peer):
    inputs, out = peer
    for name, by_class in inputs["classes"].items():
        theirs_class, theirs_y = out[("task", name)]
        split = {c: list(range(i * 1000, i * 1000 + len(v))) for i, (c, v) in enumerate(by_class.items())}
        task = make_task(split, split, "a", random.Random(0))
        assert len(task.train) == len(theirs_y) and sum(task.y_train) == int(theirs_y.sum())
        neg_theirs = sorted(torch.bincount(theirs_class[theirs_y == 0].long()).tolist()[1:])
        ours_classes = [i // 1000 for i, y in zip(task.train, task.y_train, strict=True) if y == 0]
        neg_ours = sorted(torch.bincount(torch.tensor(ours_classes)).tolist()[1:])
        # Each other class gives ⌈n_pos / (C − 1)⌉ before the final cut to n_pos: the counts differ by ≤ 1.
        assert sum(neg_ours) == sum(neg_theirs) and max(neg_ours) - min(neg_ours) <= 1
        assert max(neg_theirs) - min(neg_theirs) <= 1
