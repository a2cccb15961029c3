"""Sparse probing on real inputs: our eval and SAEBench 0.6.0's own `run_eval_single_sae` on the same
texts, tasks, LM activations and SAE weights (benchmarks/saebench_real.py).

Ours: orthosae.eval.sparse_probing.evaluate, unchanged, on our offline labelled datasets (SAEBench's
HF datasets are not reachable offline), at the benchmark's sizes.

SAEBench: sparse_probing/main.py's run_eval_single_sae → run_eval_single_dataset (its LM-side probes,
create_meaned_model_activations, get_sae_meaned_activations, train_probe_on_activations with its
AdamW full-width probe and its sklearn top-k probes, get_top_k_mean_diff_mask, the averaging over classes
and datasets), with two inputs replaced:
- get_dataset_activations (tokenise + run the LM through transformer_lens) returns, per class, our kept-token
  activations of that class's train / test texts, zero-padded as SAEBench's masking leaves them (BOS, EOS
  and padding zeroed; its means count the non-zero positions);
- prepare_probe_data (which draws each one-vs-rest task's negatives with torch.randperm) returns the task
  our eval drew, the same texts with the same labels, so both sides probe identical tasks. A two-class
  dataset gets one task on our side (the other is its mirror); SAEBench runs both and averages them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from orthosae.eval import sparse_probing as SP
from orthosae.eval.context import EvalContext
from saebench_peer import run_saebench
from saebench_real_common import PEER_PRELUDE, Row, encode_check, sae_weights

PEER = r"""
import sae_bench.evals.sparse_probing.main as spm
import sae_bench.evals.sparse_probing.probe_training as pt
import sae_bench.sae_bench_utils.activation_collection as ac
from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

D = inputs["datasets"]

class Split(dict):  # a class → activations dict that knows whether it is the train or the test split
    split = None

CURRENT = {}
POOLED = {}  # (dataset, "llm" or "sae", split) → pooled activations SAEBench computed

def _tag(fn, kind):
    def wrapped(acts, *args, **kwargs):
        out = Split(fn(acts, *args, **kwargs))
        out.split = acts.split
        POOLED[(CURRENT["name"], kind, acts.split)] = out
        return out
    return wrapped

ac.create_meaned_model_activations = _tag(ac.create_meaned_model_activations, "llm")
ac.get_sae_meaned_activations = _tag(ac.get_sae_meaned_activations, "sae")

def padded(flat, offsets, rows):
    lengths = [int(offsets[r + 1] - offsets[r]) for r in rows]
    out = torch.zeros(len(rows), max(lengths) + 1, flat.shape[1])  # +1: the zeroed BOS position
    for i, (r, n) in enumerate(zip(rows, lengths)):
        out[i, 1 : 1 + n] = flat[int(offsets[r]) : int(offsets[r]) + n]
    return out

def get_dataset_activations(dataset_name, config, model, llm_batch_size, layer, hook_point, device):
    d = D[dataset_name]
    CURRENT["name"] = dataset_name
    out = []
    for split in ("train", "test"):
        acts = Split({c: padded(d["flat"], d["offsets"], rows) for c, rows in d["classes"][split].items()})
        acts.split = split
        out.append(acts)
    return tuple(out)

def prepare_probe_data(all_activations, class_name, perform_scr=False):
    members, labels = D[CURRENT["name"]]["tasks"][class_name][all_activations.split]
    x = torch.stack([all_activations[c][i] for c, i in members])
    return x, torch.tensor(labels, dtype=torch.int)

spm.get_dataset_activations = get_dataset_activations
pt.prepare_probe_data = prepare_probe_data
config = SparseProbingEvalConfig(
    random_seed=inputs["seed"], dataset_names=list(D), probe_train_set_size=inputs["n_train"],
    probe_test_set_size=inputs["n_test"], context_length=inputs["context_length"],
    sae_batch_size=inputs["sae_batch"], llm_batch_size=8, llm_dtype="float32", model_name="stand-in",
    k_values=inputs["k_values"], lower_vram_usage=False,
)
outputs["per_sae"] = {}
for name, sae in SAES.items():
    sae.cfg.hook_layer, sae.cfg.hook_name = inputs["layer"], f"blocks.{inputs['layer']}.hook_resid_post"
    results, per_class = spm.run_eval_single_sae(
        config, sae, None, "cpu", "artifacts", save_activations=False
    )
    # The full-width probe as SAEBench's sklearn path (train_probe_on_activations, use_sklearn=True) fits
    # it, on the same pooled activations and tasks: separates the estimator from everything else.
    sk = {}
    for kind in ("llm", "sae"):
        accs = []
        for d in D:
            CURRENT["name"] = d
            _, acc = pt.train_probe_on_activations(
                POOLED[(d, kind, "train")], POOLED[(d, kind, "test")], select_top_k=None, use_sklearn=True
            )
            accs.append(sum(acc.values()) / len(acc))
        sk[f"{kind}_test_accuracy"] = sum(accs) / len(accs)
    outputs["per_sae"][name] = {"results": results, "per_class": per_class, "sklearn_full_width": sk}
"""


def _dataset_input(prep: SP.Prepared, classes: list[str]) -> dict[str, Any]:
    """Per class its train / test rows (SAEBench's class → activations dicts) and every task as (class,
    index within the class's tensor) members with labels."""
    assert prep.tokens is not None
    by_target = {t.target: t for t in prep.tasks}
    members: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
    for c in classes:
        if c in by_target:
            t = by_target[c]
            members["train"][c] = [i for i, y in zip(t.train, t.y_train, strict=True) if y == 1]
            members["test"][c] = [i for i, y in zip(t.test, t.y_test, strict=True) if y == 1]
    if len(classes) == 2 and classes[1] not in members["train"]:
        t = by_target[classes[0]]
        members["train"][classes[1]] = [i for i, y in zip(t.train, t.y_train, strict=True) if y == 0]
        members["test"][classes[1]] = [i for i, y in zip(t.test, t.y_test, strict=True) if y == 0]
    where = {
        split: {row: (c, j) for c, rows in members[split].items() for j, row in enumerate(rows)}
        for split in members
    }
    tasks: dict[str, dict[str, tuple[list[tuple[str, int]], list[int]]]] = {}
    for c in members["train"]:
        if c in by_target:
            t = by_target[c]
            spec = {
                "train": ([where["train"][i] for i in t.train], list(t.y_train)),
                "test": ([where["test"][i] for i in t.test], list(t.y_test)),
            }
        else:  # the mirror of a two-class dataset's one task
            t = by_target[classes[0]]
            spec = {
                "train": ([where["train"][i] for i in t.train], [1 - y for y in t.y_train]),
                "test": ([where["test"][i] for i in t.test], [1 - y for y in t.y_test]),
            }
        tasks[c] = spec
    rows = sorted({r for split in members.values() for rs in split.values() for r in rs})
    # Send only the rows used, renumbered.
    renum = {r: i for i, r in enumerate(rows)}
    toks = prep.tokens
    pieces = [toks.acts[int(toks.offsets[r]) : int(toks.offsets[r + 1])] for r in rows]
    lengths = torch.tensor([len(p) for p in pieces])
    return {
        "flat": torch.cat(pieces).clone(),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "classes": {s: {c: [renum[r] for r in rs] for c, rs in m.items()} for s, m in members.items()},
        "tasks": tasks,
    }


def run(
    ctxs: dict[str, EvalContext],
    *,
    cfg: SP.Config,
    workdir: Path,
    log: Any = print,
) -> dict[str, Any]:
    cfg = replace(cfg, token_cache_gb=64.0)  # keep the tokens: SAEBench gets them
    ours: dict[str, Any] = {}
    t0 = time.perf_counter()
    times = {}
    for name, ctx in ctxs.items():
        t = time.perf_counter()
        ours[name] = SP.evaluate(ctx, cfg)
        times[name] = round(time.perf_counter() - t, 1)
        log(f"sparse_probing: ours on {name} {times[name]:.0f} s")
    t_ours = time.perf_counter() - t0
    ctx0 = next(iter(ctxs.values()))
    preps = {p.name: p for p in ctx0.shared.values() if isinstance(p, SP.Prepared)}
    from orthosae.eval.datasets import load_dataset

    datasets = {}
    for dname in cfg.dataset_names:
        classes = load_dataset(dname).classes[: cfg.max_classes]
        datasets[dname] = _dataset_input(preps[dname], classes)
    probe_rows = datasets[cfg.dataset_names[0]]["flat"][:256]
    inputs = {
        "datasets": datasets,
        "seed": ctx0.seed,
        "n_train": cfg.probe_train_set_size,
        "n_test": cfg.probe_test_set_size,
        "context_length": cfg.context_length,
        "sae_batch": cfg.sae_batch_size,
        "k_values": list(cfg.k_values),
        "layer": ctx0.layer,
        "saes": {name: sae_weights(ctx.sae) for name, ctx in ctxs.items()},
        "encode_probe": probe_rows,
    }
    t0 = time.perf_counter()
    peer = run_saebench(PEER_PRELUDE + PEER, inputs, workdir / "sparse_probing", timeout=3600)
    t_peer = time.perf_counter() - t0
    log(f"sparse_probing: SAEBench part {t_peer:.0f} s")
    enc = encode_check({n: c.sae for n, c in ctxs.items()}, probe_rows, peer["encode_check"])

    results: dict[str, Any] = {
        "common": {
            "n_texts": {d: int(len(v["offsets"]) - 1) for d, v in datasets.items()},
            "n_tokens": {d: int(v["offsets"][-1]) for d, v in datasets.items()},
            "tasks": {d: len(v["tasks"]) for d, v in datasets.items()},
            "stand_in_encode_max_abs_diff": enc,
            "seconds": {"ours_total": round(t_ours, 1), "ours_per_sae": times, "saebench": round(t_peer, 1)},
        },
        "saes": {},
    }
    keys = ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in cfg.k_values]
    for name, section in ours.items():
        m = section["eval_result_metrics"]
        theirs = peer["per_sae"][name]["results"]
        rows = []
        for prefix in ("sae", "llm"):
            for k in keys:
                key = f"{prefix}_{k}"
                note = "SAEBench: AdamW, best test epoch" if k == "test_accuracy" else ""
                rows.append(Row(key, m[prefix].get(key), theirs.get(key), m[prefix].get(key + "_ci95"), note))
        for prefix in ("sae", "llm"):
            key = f"{prefix}_test_accuracy"
            rows.append(
                Row(
                    f"{key} [SAEBench sklearn]",
                    m[prefix].get(key),
                    peer["per_sae"][name]["sklearn_full_width"][key],
                    m[prefix].get(key + "_ci95"),
                    "SAEBench's train_sklearn_probe path",
                )
            )
        per_dataset = []
        for d in section["eval_result_details"]:
            dname = d["dataset_name"]
            their = theirs.get(dname, {})
            for prefix in ("sae", "llm"):
                for k in keys:
                    key = f"{prefix}_{k}"
                    per_dataset.append(
                        Row(
                            f"{dname.removesuffix('_results')}.{key}",
                            d.get(key),
                            their.get(key),
                            d.get(key + "_ci95"),
                        )
                    )
        results["saes"][name] = {
            "checks": _task_agreement(section, peer["per_sae"][name]["per_class"], cfg.k_values),
            "rows": rows,
            "per_dataset_rows": per_dataset,
            "per_class_saebench": peer["per_sae"][name]["per_class"],
            "per_task_ours": {
                d: {k: v for k, v in blk.items() if k.endswith("accuracy")}
                for d, blk in section["eval_result_unstructured"].items()
            },
        }
    return results


def _task_agreement(section: dict[str, Any], theirs: dict[str, Any], k_values: list[int]) -> dict[str, Any]:
    """Per task and top-k probe (the same features, the same objective on both sides): how many of the
    accuracies differ, and by how many test texts at most. (The full-width probes differ by design.)"""
    n, differ, worst = 0, 0, 0
    for d, blk in section["eval_result_unstructured"].items():
        n_test = blk["n_test"]
        for prefix in ("sae", "llm"):
            for k in k_values:
                key = f"{prefix}_top_{k}_test_accuracy"
                for task, ours in blk.get(key, {}).items():
                    other = theirs[d][key][task]
                    n += 1
                    texts = round(abs(ours - other) * n_test[task])
                    differ += texts > 0
                    worst = max(worst, texts)
    return {
        "top_k_task_accuracies_compared": n,
        "top_k_task_accuracies_differing": differ,
        "top_k_max_difference_in_test_texts": worst,
    }
