"""Sparse probing as SAEBench 0.6 runs it, on offline labelled English text (see eval.datasets).

Per dataset (its first `max_classes` classes), every class gives a one-vs-rest task of
`probe_train_set_size` training and `probe_test_set_size` test texts, half positives, the negatives
drawn evenly from the other classes (SAEBench's sizes and balancing; eval.probing_tasks). Texts are cut to
`context_length` tokens, BOS included. Each text is represented by the mean over its tokens, BOS/EOS/pad
left out, of (a) the LM's resid_post at the SAE's layer and (b) the SAE's latents encoded per token
(eval.probing_acts). The SAE's decoder norms are folded into its encoder first (eval.fold), as SAEBench
does, so that latents of unit-norm decoder rows are compared.

For each task and both representations, on the training texts the k features whose class means differ
most (|μ₊ − μ₋|) are chosen for k in `k_values`, and a logistic probe on them is scored on the test texts
(`*_top_{k}_test_accuracy`). Every probe minimises sklearn's LogisticRegression(C = 1) objective on the
raw features, SAEBench's top-k probe. `*_test_accuracy` is the same probe on all features, fitted on the
training texts and scored once on the test texts; SAEBench instead reports the best test accuracy over
AdamW epochs (FULL_WIDTH_PROBE, also written into the eval config).

A dataset's accuracy is the mean over its tasks, eval_result_metrics the mean over datasets. Every
accuracy has a bootstrap 95 % interval `<metric>_ci95`: test examples are resampled within each task
(the same resamples for every probe of the task), and the dataset and overall means are recomputed from
the resampled task accuracies. Tasks are resampled independently, although tasks of one dataset share
some test texts (one task's positive is another's negative); `*_top_100_test_accuracy` is None unless
100 is among the k values.

The LM part (tokenising, the forward pass, the LM probes) does not depend on the SAE and is done once per
model, layer and config for all SAEs of an experiment (EvalContext.memo); within `token_cache_gb` the
per-token activations are kept too, so each further SAE only encodes them.

Under torchrun (`ctx.ranks`) the LM forward and the SAE encoding are split between the ranks by batch
(eval.ranks, probing_acts), every rank gets every pooled row, and the probes are then fitted on every rank
on the same pooled vectors.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orthosae.errors import UserError
from orthosae.eval import uncertainty
from orthosae.eval.context import EvalContext
from orthosae.eval.datasets import DATASETS, LabelledTexts, load_dataset
from orthosae.eval.fold import fold_record, folded
from orthosae.eval.probes import fit_sklearn_logistic, top_k_mean_diff
from orthosae.eval.probing_acts import TokenActs, collect
from orthosae.eval.probing_tasks import Task, make_tasks
from orthosae.eval.results import section

EVAL_TYPE_ID = "sparse_probing"
PROBE = "sklearn LogisticRegression(penalty='l2', C=1) objective on the raw features, minimised by L-BFGS"
FULL_WIDTH_PROBE = (
    "llm_test_accuracy / sae_test_accuracy: the top-k probe's estimator on every feature, fitted on the "
    "training texts and scored once on the test texts (an honest held-out accuracy). SAEBench 0.6 trains "
    "this probe with AdamW for up to 100 epochs and reports the best test accuracy over the epochs, which "
    "selects on the test set; its numbers are optimistic by comparison."
)
SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
    probe_train_set_size: int = 4000
    """Training texts per one-vs-rest task, half of them positives (SAEBench's meaning and default)."""
    probe_test_set_size: int = 1000
    """Test texts per one-vs-rest task, half of them positives (SAEBench's meaning and default)."""
    context_length: int = 128
    """Tokens per text, BOS included; longer texts are truncated."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    """Numbers of selected features for the top-k probes."""
    llm_batch_size: int = 8
    """Texts per LM forward."""
    sae_batch_size: int = 125
    """Texts whose per-token latents are encoded and held at once."""
    max_classes: int = 6
    """At most this many classes (and one-vs-rest tasks) per dataset: the first ones in sorted order."""
    token_cache_gb: float = 4.0
    """Keep the texts' per-token LM activations in memory (4 bytes × d_model per token, all datasets
    together) up to this many GiB, so that each further SAE only encodes them; a dataset that does not
    fit (or 0) runs the LM again for every SAE."""
    n_bootstrap: int = uncertainty.N_RESAMPLES
    """Bootstrap resamples for the 95 % intervals."""

    def validate(self) -> None:
        for name in ("probe_train_set_size", "probe_test_set_size"):
            if getattr(self, name) < 2:
                raise UserError(
                    f"sparse_probing.{name} must be ≥ 2 (a task has both classes), got {getattr(self, name)}"
                )
        for name in ("context_length", "llm_batch_size", "sae_batch_size", "n_bootstrap"):
            if getattr(self, name) <= 0:
                raise UserError(f"sparse_probing.{name} must be positive, got {getattr(self, name)}")
        if self.token_cache_gb < 0:
            raise UserError(f"sparse_probing.token_cache_gb must be ≥ 0, got {self.token_cache_gb}")
        if self.context_length < 2:
            raise UserError(
                f"sparse_probing.context_length must be ≥ 2 (BOS and one token), got {self.context_length}"
            )
        if self.max_classes < 2:
            raise UserError(f"sparse_probing.max_classes must be ≥ 2, got {self.max_classes}")
        if not self.k_values or any(k <= 0 for k in self.k_values):
            raise UserError(f"sparse_probing.k_values must be positive integers, got {self.k_values}")
        if not self.dataset_names:
            raise UserError(
                "sparse_probing.dataset_names is empty: name one or more of " + ", ".join(DATASETS)
            )
        for name in self.dataset_names:
            if name not in DATASETS:
                raise UserError(f"unknown probing dataset {name!r}: use one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------- probes (pure maths)


def probe_correct(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    k_values: list[int],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per test example, is each probe right? ({'test_accuracy': all features, 'top_{k}_test_accuracy':
    the top-k mean-difference features} → bool (n_test,), the features ranked by |μ₊ − μ₋| up to max k)."""
    truth = y_test > 0.5
    probe = fit_sklearn_logistic(x_train, y_train)
    out = {"test_accuracy": (probe.logits(x_test) > 0) == truth}
    ranking = top_k_mean_diff(x_train, y_train, max(k_values))
    for k in k_values:
        idx = ranking[:k]  # the ranking is nested: the top k are the first k of the top max(k)
        probe = fit_sklearn_logistic(x_train[:, idx], y_train)
        out[f"top_{k}_test_accuracy"] = (probe.logits(x_test[:, idx]) > 0) == truth
    return out, ranking


def probe_accuracies(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    k_values: list[int],
) -> dict[str, float]:
    """{'test_accuracy': full-width probe, 'top_{k}_test_accuracy': probe on the top-k mean-diff features}."""
    correct, _ = probe_correct(x_train, y_train, x_test, y_test, k_values)
    return {key: c.float().mean().item() for key, c in correct.items()}


def result_keys(k_values: list[int]) -> list[str]:
    """Metric names without the llm_/sae_ prefix; top_100 always (None when k = 100 is not run)."""
    ks = list(dict.fromkeys([*k_values, 100]))
    return ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in ks]


# ----------------------------------------------------------------- bootstrap (pure maths)


def task_counts(n_test: int, n_resamples: int, seed: int) -> torch.Tensor:
    """(n_resamples, n_test) resample counts of one task's test examples."""
    return uncertainty.resample_counts(n_test, n_resamples, seed)


def resampled_accuracy(correct: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(n_resamples,) accuracy of the probe on each resample of its test examples."""
    return (counts @ correct.double()) / counts.sum(dim=1).clamp_min(1)


def interval(samples: torch.Tensor) -> list[float] | None:
    return uncertainty.as_list(uncertainty.percentile_interval(samples))


def task_seed(base: int, dataset: str, target: str) -> int:
    """A task's bootstrap seed: fixed by its names, so adding a dataset changes no other interval."""
    return base + zlib.crc32(f"{dataset}/{target}".encode()) % (2**31)


# ----------------------------------------------------------------- data and the LM part


@dataclass
class Prepared:
    """One dataset's SAE-independent part: texts, tasks, pooled LM activations and the LM probes."""

    name: str
    seqs: list[list[int]]
    tasks: list[Task]
    lm: torch.Tensor
    tokens: TokenActs | None
    llm_correct: list[dict[str, torch.Tensor]]
    llm_ranking: list[torch.Tensor]
    skipped: dict[str, str]


def tokenize(tokenizer: Any, texts: list[str], context_length: int) -> list[list[int]]:
    """BOS + the text's tokens, at most `context_length` in all."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    return [
        head + list(tokenizer(t, add_special_tokens=False)["input_ids"])[: context_length - len(head)]
        for t in texts
    ]


def special_ids(tokenizer: Any) -> set[int]:
    """Token ids SAEBench leaves out of the mean: BOS, EOS and padding."""
    return {v for a in SPECIAL_TOKEN_ATTRS if isinstance(v := getattr(tokenizer, a, None), int)}


def task_tensors(
    x: torch.Tensor, task: Task
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y_tr = torch.tensor(task.y_train, dtype=torch.float32)
    y_te = torch.tensor(task.y_test, dtype=torch.float32)
    return x[task.train], y_tr, x[task.test], y_te


def usable(task: Task) -> str | None:
    """Why a task cannot be probed, or None."""
    for split, y in (("train", task.y_train), ("test", task.y_test)):
        if 0 not in y or 1 not in y:
            return f"no {'positive' if 1 not in y else 'negative'} {split} texts"
    return None


def prepare(ctx: EvalContext, cfg: Config, data: LabelledTexts) -> Prepared:
    """Sample the tasks, tokenise only the texts they use, run the LM once, probe the LM activations."""
    rng = random.Random(f"{ctx.seed}/{data.name}")  # per dataset: results do not depend on dataset order
    classes = data.classes[: cfg.max_classes]
    labels = [lab if text.strip() else None for text, lab in zip(data.texts, data.labels, strict=True)]
    tasks = make_tasks(labels, classes, cfg.probe_train_set_size, cfg.probe_test_set_size, rng)
    skipped = {t.target: why for t in tasks if (why := usable(t))}
    tasks = [t for t in tasks if t.target not in skipped]
    used = sorted({i for t in tasks for i in (*t.train, *t.test)})
    where = {i: row for row, i in enumerate(used)}
    tasks = [
        Task(t.target, [where[i] for i in t.train], t.y_train, [where[i] for i in t.test], t.y_test)
        for t in tasks
    ]
    loaded = ctx.model
    seqs = tokenize(loaded.tokenizer, [data.texts[i] for i in used], cfg.context_length)
    drop = special_ids(loaded.tokenizer)
    need = sum(t not in drop for s in seqs for t in s) * loaded.d_model * 4
    held = sum(
        p.tokens.acts.numel() * 4
        for p in ctx.shared.values()
        if isinstance(p, Prepared) and p.tokens is not None
    )
    got = collect(
        loaded,
        ctx.layer,
        seqs,
        drop,
        keep_tokens=held + need <= cfg.token_cache_gb * 2**30,
        batch_size=cfg.llm_batch_size,
        progress=ctx.progress,
        ranks=ctx.ranks,
    )
    llm = [probe_correct(*task_tensors(got.lm, t), cfg.k_values) for t in tasks]
    return Prepared(
        data.name, seqs, tasks, got.lm, got.tokens, [c for c, _ in llm], [r for _, r in llm], skipped
    )


def sae_pooled(ctx: EvalContext, cfg: Config, prep: Prepared, encode: Any) -> torch.Tensor:
    """(N, d_sae) pooled latents of the dataset's texts: from the kept tokens, or by running the LM again.
    Under torchrun every rank gets every row (probing_acts)."""
    if prep.tokens is not None:
        return prep.tokens.pooled(encode, cfg.sae_batch_size, ctx.ranks)
    got = collect(
        ctx.model,
        ctx.layer,
        prep.seqs,
        special_ids(ctx.model.tokenizer),
        encode=encode,
        batch_size=cfg.llm_batch_size,
        progress=ctx.progress,
        ranks=ctx.ranks,
    )
    assert got.latents is not None
    return got.latents


# ----------------------------------------------------------------- results


def summarise(
    per_task: dict[str, dict[str, dict[str, torch.Tensor]]],
    counts: dict[str, dict[str, torch.Tensor]],
    keys: list[str],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """From per-example correctness {dataset: {task: {metric: bool (n,)}}} and each task's resample counts:
    (overall {metric, metric_ci95}, per dataset the same, per dataset {metric: {task: value}} and
    {metric_ci95: {task: interval}}). Metrics missing from every task are None."""
    overall: dict[str, Any] = {}
    by_dataset: dict[str, dict[str, Any]] = {d: {} for d in per_task}
    by_task: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in per_task}
    for key in keys:
        dataset_values, dataset_samples = [], []
        for d, tasks in per_task.items():
            values, samples = {}, {}
            for t, metrics in tasks.items():
                if key in metrics:
                    values[t] = metrics[key].float().mean().item()
                    samples[t] = resampled_accuracy(metrics[key], counts[d][t])
            if values:
                by_task[d][key] = values
                by_task[d][uncertainty.ci_key(key)] = {t: interval(s) for t, s in samples.items()}
                mean_samples = torch.stack(list(samples.values())).mean(dim=0)
                by_dataset[d][key] = sum(values.values()) / len(values)
                by_dataset[d][uncertainty.ci_key(key)] = interval(mean_samples)
                dataset_values.append(by_dataset[d][key])
                dataset_samples.append(mean_samples)
            else:
                by_dataset[d][key] = by_dataset[d][uncertainty.ci_key(key)] = None
        if dataset_values:
            overall[key] = sum(dataset_values) / len(dataset_values)
            overall[uncertainty.ci_key(key)] = interval(torch.stack(dataset_samples).mean(dim=0))
        else:
            overall[key] = overall[uncertainty.ci_key(key)] = None
    return overall, by_dataset, by_task


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    cfg.validate()
    sae = folded(ctx.sae)  # unit-norm decoder rows, so latents are comparable (SAEBench folds too)
    device = sae.W_dec.device

    def encode(x: torch.Tensor) -> torch.Tensor:  # activations are kept on the host; the SAE may not be
        return sae.encode(x.to(device)).float().cpu()

    memo_key = (
        EVAL_TYPE_ID,
        cfg.probe_train_set_size,
        cfg.probe_test_set_size,
        cfg.context_length,
        cfg.max_classes,
        tuple(cfg.k_values),
    )  # not token_cache_gb: whether tokens are kept changes the speed, not the results
    per_task: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    counts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, Any]] = {}
    for name in cfg.dataset_names:
        prep: Prepared = ctx.memo((*memo_key, name), lambda name=name: prepare(ctx, cfg, load_dataset(name)))
        z = sae_pooled(ctx, cfg, prep, encode)
        d = f"{name}_results"
        per_task[d], counts[d] = {}, {}
        sae_rank = {}
        for task, llm in zip(prep.tasks, prep.llm_correct, strict=True):
            sae_correct, sae_rank[task.target] = probe_correct(*task_tensors(z, task), cfg.k_values)
            per_task[d][task.target] = {f"llm_{k}": v for k, v in llm.items()} | {
                f"sae_{k}": v for k, v in sae_correct.items()
            }
            seed = task_seed(ctx.seed, name, task.target)
            counts[d][task.target] = task_counts(len(task.test), cfg.n_bootstrap, seed)
        extras[d] = {
            "n_train": {t.target: len(t.train) for t in prep.tasks},
            "n_test": {t.target: len(t.test) for t in prep.tasks},
            "llm_top_features": {
                t.target: r.tolist() for t, r in zip(prep.tasks, prep.llm_ranking, strict=True)
            },
            "sae_top_latents": {t: r.tolist() for t, r in sae_rank.items()},
            "skipped_tasks": prep.skipped,
        }
    keys = [f"{p}_{k}" for p in ("llm", "sae") for k in result_keys(cfg.k_values)]
    overall, by_dataset, by_task = summarise(per_task, counts, keys)
    metrics = {p: {k: v for k, v in overall.items() if k.startswith(f"{p}_")} for p in ("llm", "sae")}
    details = [{"dataset_name": d, **values} for d, values in by_dataset.items()]
    unstructured = {d: by_task[d] | extras[d] for d in per_task}
    n_test = sum(c.shape[1] for tasks in counts.values() for c in tasks.values())
    eval_config = {
        "random_seed": ctx.seed,
        **asdict(cfg),
        "model_name": ctx.model_name,
        "llm_dtype": "float32",
        "lower_vram_usage": False,
        "probe": PROBE,
        "full_width_probe": FULL_WIDTH_PROBE,
        **fold_record(ctx.sae),
        "bootstrap_config": {
            **uncertainty.bootstrap_config(
                "test examples, resampled within each task", n_test, cfg.n_bootstrap, ctx.seed
            ),
            "task_seed": "seed + crc32('<dataset>/<class>') mod 2^31",
        },
    }
    return section(ctx, EVAL_TYPE_ID, eval_config, metrics, details, unstructured)
