"""Sparse probing (SAEBench's method) on offline labelled English text (see eval.datasets).

For each dataset a class-balanced sample of `probe_train_set_size` + `probe_test_set_size` texts is drawn
(seeded) and truncated to `context_length` tokens after BOS. The LM runs to block L; per text we keep the
mean over its non-BOS tokens of (a) the LM's resid_post (d_model) and (b) the SAE's latents encoded per
token (d_sae; pooled after encoding, as SAEBench does). Each class gives a one-vs-rest binary task with
balanced positives/negatives (a two-class dataset gives one task). For each task and for both
representations: a logistic probe on all features (llm_test_accuracy / sae_test_accuracy) and, for each k,
a probe on the k features whose train-set class means differ most (|μ₊ − μ₋|), *_top_k_test_accuracy.
A dataset's accuracy is the mean over its tasks; eval_result_metrics are the means over datasets.
`*_top_100_test_accuracy` is None, as in the seed (k = 100 is not run).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orthosae.eval.context import EvalContext
from orthosae.eval.datasets import LabelledTexts, load_dataset
from orthosae.eval.probes import accuracy, fit_logistic, top_k_mean_diff
from orthosae.eval.prompt_acts import mean_pooled
from orthosae.eval.results import section

EVAL_TYPE_ID = "sparse_probing"


@dataclass
class Config:
    dataset_names: list[str] = field(
        default_factory=lambda: [
            "pang_lee_sentiment",
            "conll2010_uncertainty",
            "language_id",
            "wordnet_lexname",
            "fortune_topic",
        ]
    )
    """Datasets to probe (see orthosae.eval.datasets)."""
    probe_train_set_size: int = 400
    """Training texts per dataset (class-balanced)."""
    probe_test_set_size: int = 200
    """Test texts per dataset (class-balanced)."""
    context_length: int = 128
    """Tokens per text, BOS included; longer texts are truncated."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    """Numbers of selected features for the top-k probes."""
    llm_batch_size: int = 8
    """Texts per LM forward."""
    max_classes: int = 6
    """At most this many one-vs-rest tasks per dataset."""


def balanced_sample(data: LabelledTexts, n_train: int, n_test: int, rng: random.Random, max_classes: int):
    """(train, test) lists of (text, label): equal counts per class (as far as each class allows)."""
    classes = data.classes[:max_classes]
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for text, label in zip(data.texts, data.labels, strict=True):
        if label in by_class and text.strip():
            by_class[label].append(text)
    per_train, per_test = n_train // len(classes), n_test // len(classes)
    train, test = [], []
    for c in classes:
        items = rng.sample(by_class[c], min(len(by_class[c]), per_train + per_test))
        n_te = min(per_test, len(items) // 3)
        test += [(t, c) for t in items[:n_te]]
        train += [(t, c) for t in items[n_te : n_te + per_train]]
    return train, test


def one_vs_rest(labels: list[str], target: str, rng: random.Random) -> list[int]:
    """Indices of a balanced binary task: every `target` item and as many others, drawn at random."""
    pos = [i for i, lab in enumerate(labels) if lab == target]
    neg = [i for i, lab in enumerate(labels) if lab != target]
    neg = rng.sample(neg, min(len(pos), len(neg)))
    return sorted(pos + neg)


def probe_accuracies(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    k_values: list[int],
) -> dict[str, float]:
    """{'test_accuracy': full-width probe, 'top_{k}_test_accuracy': probe on the top-k mean-diff features}."""
    out = {}
    probe = fit_logistic(x_train, y_train)
    out["test_accuracy"] = accuracy(y_test, probe.logits(x_test) > 0)
    for k in k_values:
        idx = top_k_mean_diff(x_train, y_train, k)
        probe = fit_logistic(x_train[:, idx], y_train)
        out[f"top_{k}_test_accuracy"] = accuracy(y_test, probe.logits(x_test[:, idx]) > 0)
    return out


def _tokenize(tokenizer: Any, texts: list[str], context_length: int) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    seqs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: context_length - len(head)]
        seqs.append(head + list(ids) if ids else [*head, tokenizer.eos_token_id or 0])
    return seqs


def _result_keys(k_values: list[int]) -> list[str]:
    return ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in [*k_values, 100]]


def evaluate_dataset(ctx: EvalContext, cfg: Config, data: LabelledTexts, rng: random.Random):
    """Accuracies of one dataset: ({'llm_…', 'sae_…'} means over tasks, per-task results)."""
    train, test = balanced_sample(
        data, cfg.probe_train_set_size, cfg.probe_test_set_size, rng, cfg.max_classes
    )
    texts = [t for t, _ in train] + [t for t, _ in test]
    seqs = _tokenize(ctx.model.tokenizer, texts, cfg.context_length)
    lm, sae = mean_pooled(
        ctx.model,
        ctx.layer,
        seqs,
        encode=ctx.sae.encode,
        batch_size=cfg.llm_batch_size,
        progress=ctx.progress,
    )
    assert sae is not None
    n_tr = len(train)
    labels_tr, labels_te = [c for _, c in train], [c for _, c in test]
    classes = sorted(set(labels_tr))
    targets = classes[:1] if len(classes) == 2 else classes
    per_task = {}
    for target in targets:
        i_tr, i_te = one_vs_rest(labels_tr, target, rng), one_vs_rest(labels_te, target, rng)
        y_tr = torch.tensor([labels_tr[i] == target for i in i_tr], dtype=torch.float32)
        y_te = torch.tensor([labels_te[i] == target for i in i_te], dtype=torch.float32)
        task = {}
        for prefix, x in (("llm", lm), ("sae", sae)):
            acc = probe_accuracies(x[:n_tr][i_tr], y_tr, x[n_tr:][i_te], y_te, cfg.k_values)
            task.update({f"{prefix}_{key}": value for key, value in acc.items()})
        per_task[target] = task
    result: dict[str, float | None] = {}
    for prefix in ("llm", "sae"):
        for key in _result_keys(cfg.k_values):
            name = f"{prefix}_{key}"
            values = [t[name] for t in per_task.values() if name in t]
            result[name] = statistics.mean(values) if values else None
    return result, per_task


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    rng = random.Random(ctx.seed)
    torch.manual_seed(ctx.seed)
    details, unstructured = [], {}
    for name in cfg.dataset_names:
        result, per_task = evaluate_dataset(ctx, cfg, load_dataset(name), rng)
        details.append({"dataset_name": f"{name}_results", **result})
        unstructured[f"{name}_results"] = per_task
    metrics: dict[str, dict[str, float | None]] = {"llm": {}, "sae": {}}
    for prefix in ("llm", "sae"):
        for key in _result_keys(cfg.k_values):
            name = f"{prefix}_{key}"
            values = [d[name] for d in details if d[name] is not None]
            metrics[prefix][name] = statistics.mean(values) if values else None
    eval_config = {
        "random_seed": ctx.seed,
        **asdict(cfg),
        "model_name": ctx.model_name,
        "llm_dtype": "float32",
    }
    return section(ctx, EVAL_TYPE_ID, eval_config, metrics, details, unstructured)
