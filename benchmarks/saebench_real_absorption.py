"""Absorption on real inputs: our eval and SAEBench 0.6.0's chain on the same words, prompts, LM activations
and SAE weights (benchmarks/saebench_real.py).

Ours: orthosae.eval.absorption's prepare_lm (with its PromptReader on the real model), score_sae and
summarize, exactly as `evaluate` calls them. The words are a seeded random subset of the model's
alphabetic tokens (the benchmark's size knob), given to both sides as the whole vocabulary (so `max_words`
is None and both sides draw the in-context examples from the same list); the latent-selection probe's
minibatch is SAEBench's 4096 scaled by the share of the alphabetic tokens used (as our max_words does), set
explicitly on both sides.

SAEBench (its own code in the peer venv, the chain of tests/test_absorption_saebench.py): get_alpha_tokens
on the real vocabulary (checked against ours), create_dataset_probe_training after random.seed(seed),
_parse_probe_data_split, train_linear_probe_for_task, train_k_sparse_probes (which trains the L1
latent-selection probe) after torch.manual_seed(seed), eval_probe_and_sae_k_sparse_raw_scores,
build_metrics_df, add_feature_splits_to_metrics_df, get_stats_and_likely_false_negative_tokens,
FeatureAbsorptionCalculator via calculate_projection_and_cos_sims, main.py's _aggregate_results_df, and
run_eval's gate and means over letters. The LM activations reach it through a stand-in model whose
run_with_cache looks each prompt text up in the table of activations our run read, so every prompt SAEBench
builds must be one we ran. Re-prompts of letters below the F1 gate, which our eval never runs, are served
the activation of the same word's own probe-data prompt instead, and counted: those letters are dropped
before any mean (SAEBench's calculator divides by the probe projection, so zeros would not do). Per SAE
the global `random` state is reset to the one after the probe data were drawn, so SAEBench re-draws the
same re-prompts we share across SAEs.

Two SAEBench variants: "as shipped" (its k-sparse probes are sklearn's default L-BFGS, which stops at a
gradient of 1e-4) and "newton" (the same objective solved to the optimum by sklearn's Newton-Cholesky, as
ours is) — the second isolates what the solver tolerance alone changes.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orthosae.eval import absorption as A
from orthosae.eval import absorption_calc as calc
from orthosae.eval.absorption_prompts import LETTERS, Prompt, alpha_tokens, letter_index
from orthosae.eval.context import EvalContext
from orthosae.eval.fold import folded
from saebench_peer import run_saebench
from saebench_real_common import PEER_PRELUDE, Row, encode_check, sae_weights

VARIANTS = ("shipped", "newton")
MIN_PER_LETTER = 8
VARIANT_TITLE = {
    "shipped": "SAEBench as shipped (k-sparse probes: sklearn default L-BFGS, tol 1e-4)",
    "newton": "SAEBench with its k-sparse probes solved to the optimum (sklearn newton-cholesky)",
}

PEER = r"""
import ast, importlib.util, random, statistics
from pathlib import Path
import numpy as np, pandas as pd, torch
from sklearn.linear_model import LogisticRegression as _LR
from sae_bench.evals.absorption import common, feature_absorption as fa, k_sparse_probing as ksp
from sae_bench.evals.absorption import probing, prompting, vocab as sbvocab
from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator

I = inputs
acts, seed, template, max_k, conv = I["acts"], I["seed"], I["template"], I["max_k"], I["convert"]
d_model = next(iter(acts.values())).shape[0]

class Tok:  # the real tokenizer's vocabulary and convert_tokens_to_string, as SAEBench's helpers use them
    def __init__(self, vocab): self.vocab = vocab
    def convert_tokens_to_string(self, toks): return conv[toks[0]]

outputs["alpha_tokens"] = sbvocab.get_alpha_tokens(Tok(I["vocab"]))

words = I["words"]
random.seed(seed)
train_ds, test_ds = probing.create_dataset_probe_training(
    vocab=words, formatter=prompting.first_letter_formatter(), num_prompts_per_token=1,
    base_template=template, max_icl_examples=I["n_icl"],
)
state_after_probe_data = random.getstate()
outputs["train_prompts"] = [p.base for p, _ in train_ds]
outputs["test_prompts"] = [p.base for p, _ in test_ds]
def frame(ds):
    return pd.DataFrame({"answer_class": [c for _, c in ds], "token": [p.word for p, _ in ds]})
train_df, test_df = frame(train_ds), frame(test_ds)
x_train = np.stack([acts[p.base].numpy() for p, _ in train_ds]).astype(np.float32)
x_test = np.stack([acts[p.base].numpy() for p, _ in test_ds]).astype(np.float32)

torch.manual_seed(seed)
probe, _ = probing.train_linear_probe_for_task(
    train_df, test_df, torch.device("cpu"), x_train, x_test, num_classes=26, batch_size=I["probe_batch"],
    num_epochs=I["probe_epochs"], lr=I["probe_lr"], weight_decay=I["probe_wd"],
)
probe = probe.float()
outputs["probe_weight"] = probe.weights.detach()
train_acts, train_data = common._parse_probe_data_split(
    Tok({}), torch.from_numpy(x_train), train_df["answer_class"].tolist(), train_df
)
test_acts, test_data = common._parse_probe_data_split(
    Tok({}), torch.from_numpy(x_test), test_df["answer_class"].tolist(), test_df
)

missing = []
suffix = template.replace("{word}", "")
test_prompt_of = {p.word: p.base for p, _ in test_ds}
class LookupModel:  # run_with_cache / to_tokens of a HookedTransformer, backed by our activations
    tokenizer = "stand-in"
    def run_with_cache(self, prompts, names_filter):
        rows = []
        for p in prompts:
            if p in acts:
                rows.append(acts[p])
            else:  # a re-prompt we never ran: the word's probe-prompt activation stands in (see above)
                missing.append(p)
                rows.append(acts[test_prompt_of[p.rsplit("\n", 1)[1][: -len(suffix)]]])
        out = torch.zeros(len(prompts), 6, d_model)
        out[:, 0] = torch.stack(rows)
        return None, {names_filter[0]: out}
    def to_tokens(self, text):
        return torch.zeros(1, 7, dtype=torch.long)

spec = importlib.util.find_spec("sae_bench.evals.absorption.main")
tree = ast.parse(Path(spec.origin).read_text())
fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_aggregate_results_df")
ns = {"pd": pd}
exec(compile(ast.Module(body=[fn], type_ignores=[]), spec.origin, "exec"), ns)
aggregate = ns["_aggregate_results_df"]
shipped_lr = ksp.LogisticRegression

def chain(name, sae, variant):
    ksp.LogisticRegression = shipped_lr if variant == "shipped" else (
        lambda **kw: _LR(**{**kw, "solver": "newton-cholesky", "tol": 1e-12, "max_iter": 1000})
    )
    random.setstate(state_after_probe_data)
    torch.manual_seed(seed)
    k_probes = ksp.train_k_sparse_probes(
        sae, train_data, train_acts, ks=list(range(1, max_k + 1)), batch_size=I["sparse_batch"],
        precalc_sae_acts=True,
    )
    raw_df = ksp.eval_probe_and_sae_k_sparse_raw_scores(sae, probe, k_probes, test_data, test_acts)
    meta = ksp.sae_k_sparse_metadata(sae, probe, k_probes, name, 0)
    metrics = ksp.build_metrics_df(raw_df, meta, max_k_value=max_k)
    ksp.add_feature_splits_to_metrics_df(metrics, max_k_value=max_k, f1_jump_threshold=I["f1_jump"])
    fa.load_experiment_df = lambda _name, _path: raw_df
    likely = fa.get_stats_and_likely_false_negative_tokens(metrics, name, 0, Path("."))
    calculator = FeatureAbsorptionCalculator(
        model=LookupModel(), icl_word_list=words, max_icl_examples=I["n_icl"], base_template=template,
        answer_formatter=prompting.first_letter_formatter(), word_token_pos=-6,
        full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        batch_size=I["llm_batch"],
    )
    missing.clear()
    df = fa.calculate_projection_and_cos_sims(calculator, sae, probe, 0, likely)
    agg = aggregate(df)
    f1 = dict(zip(metrics["letter"], metrics["f1_probe"]))
    rows = [r for _, r in agg.iterrows() if f1[r["letter"]] > I["min_f1"]]
    out = {
        "f1_probe": metrics["f1_probe"].tolist(),
        "f1_sparse": {
            l: [float(metrics[f"f1_sparse_sae_{k}"].iloc[i]) for k in range(1, max_k + 1)]
            for i, l in enumerate(metrics["letter"])
        },
        "split_feats": {l: list(map(int, s)) for l, s in zip(metrics["letter"], metrics["split_feats"])},
        "true_positives": {c: s.potential_false_negatives for c, s in likely.items()},
        "missing_prompts": list(missing),
        "reprompts": {c: g["prompt"].tolist() for c, g in df.groupby("letter")},
        "gate_passes": bool(sum(v > I["min_f1"] for v in f1.values()) >= I["min_letters"]),
        "letters_kept": [r["letter"] for r in rows],
        "details": {
            r["letter"]: {
                "mean_absorption_fraction": float(r["mean_absorption_fraction"]),
                "full_absorption_rate": float(r["full_absorption_rate"]),
                "num_full_absorption": int(r["num_full_absorption"]),
                "num_probe_true_positives": int(r["num_probe_true_positives"]),
                "num_split_features": int(r["num_split_feats"]),
            }
            for r in rows
        },
    }
    if len(rows) >= 2:
        out["mean"] = {
            "mean_absorption_fraction_score": statistics.mean(r["mean_absorption_fraction"] for r in rows),
            "mean_full_absorption_score": statistics.mean(r["full_absorption_rate"] for r in rows),
            "mean_num_split_features": statistics.mean(r["num_split_feats"] for r in rows),
            "std_dev_absorption_fraction_score": statistics.stdev(
                r["mean_absorption_fraction"] for r in rows
            ),
            "std_dev_full_absorption_score": statistics.stdev(r["full_absorption_rate"] for r in rows),
            "std_dev_num_split_features": statistics.stdev(r["num_split_feats"] for r in rows),
        }
    return out

outputs["per_sae"] = {
    name: {v: chain(name, sae, v) for v in I["variants"]} for name, sae in SAES.items()
}
"""


@dataclass
class Recorder:
    """acts_fn for prepare_lm: our PromptReader on the real model, remembering every prompt's activation."""

    reader: A.PromptReader
    table: dict[str, torch.Tensor]

    def __call__(self, prompts: Sequence[Prompt], desc: str) -> torch.Tensor:
        acts = self.reader(prompts, desc)
        for p, a in zip(prompts, acts, strict=True):
            self.table[p.text] = a.clone()
        return acts


def config(
    n_words: int, n_alpha: int, max_k: int, n_bootstrap: int, n_icl: int, min_letters: int
) -> A.Config:
    batch = max(1, round(A.SAEBENCH_SPARSE_BATCH * n_words / n_alpha))
    return A.Config(
        max_words=None,
        k_sparse_probe_batch_size=batch,
        max_k_value=max_k,
        n_bootstrap=n_bootstrap,
        num_icl_examples=n_icl,
        min_feats_for_eval=min_letters,
    )


def pick_words(vocab: list[str], n_words: int, seed: int, per_letter: int = MIN_PER_LETTER) -> list[str]:
    """A seeded random subset of the alphabetic tokens, topped up so that every first letter has at least
    `per_letter` words: a letter without train words makes SAEBench's latent-selection probe NaN (its
    positive weight divides by zero) and its k-sparse probes fail."""
    rng = random.Random(seed)
    shuffled = rng.sample(vocab, len(vocab))
    words = shuffled[:n_words]
    count = {c: 0 for c in LETTERS}
    for w in words:
        count[LETTERS[letter_index(w)]] += 1
    for w in shuffled[n_words:]:
        c = LETTERS[letter_index(w)]
        if count[c] < per_letter:
            words.append(w)
            count[c] += 1
    return words


def _means(details: dict[str, dict[str, float]]) -> dict[str, float] | None:
    rows = list(details.values())
    if len(rows) < 2:
        return None
    return {
        "mean_absorption_fraction_score": statistics.mean(r["mean_absorption_fraction"] for r in rows),
        "mean_full_absorption_score": statistics.mean(r["full_absorption_rate"] for r in rows),
        "mean_num_split_features": statistics.mean(r["num_split_features"] for r in rows),
    }


def run(
    ctxs: dict[str, EvalContext],
    *,
    n_words: int,
    max_k: int,
    seed: int,
    workdir: Path,
    n_bootstrap: int = 1000,
    n_icl: int = 10,
    min_letters: int = 20,
    variants: Sequence[str] = VARIANTS,
    log: Any = print,
) -> dict[str, Any]:
    import time

    ctx0 = next(iter(ctxs.values()))
    tok = ctx0.model.tokenizer
    vocab_all = alpha_tokens(tok)
    words = pick_words(vocab_all, n_words, seed)
    cfg = config(len(words), len(vocab_all), max_k, n_bootstrap, n_icl, min_letters)
    cfg.validate()
    reader = A.PromptReader(ctx0, cfg.prompt_token_pos, cfg.llm_batch_size)
    table: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    lm = A.prepare_lm(
        words, Recorder(reader, table), cfg, seed, convert=lambda w: tok.convert_tokens_to_string([w])
    )
    t_lm = time.perf_counter() - t0
    log(f"absorption: LM part {t_lm:.0f} s ({reader.n_prompts} prompts, {reader.n_tokens} tokens)")

    ours: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, ctx in ctxs.items():
        sae = folded(ctx.sae)

        def encode(x: torch.Tensor, sae: Any = sae) -> torch.Tensor:
            return sae.encode(x).float()

        scores = A.score_sae(lm, encode, sae.W_dec.detach().float(), cfg, seed)
        ours[name] = (scores, *A.summarize(lm, scores, cfg, seed))
    t_ours = time.perf_counter() - t0
    log(f"absorption: our SAE part {t_ours:.0f} s")

    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for t, i in by_id}
    convert = {t: tok.convert_tokens_to_string([t]) for t in vocab}
    for w in words:
        convert.setdefault(w, tok.convert_tokens_to_string([w]))
    probe_rows = torch.stack(list(table.values())[:256])
    inputs = {
        "acts": table,
        "words": words,
        "vocab": vocab,
        "convert": convert,
        "seed": seed,
        "template": cfg.prompt_template,
        "n_icl": cfg.num_icl_examples,
        "max_k": max_k,
        "sparse_batch": cfg.k_sparse_probe_batch_size,
        "f1_jump": cfg.f1_jump_threshold,
        "min_f1": cfg.min_GT_probe_f1,
        "min_letters": cfg.min_feats_for_eval,
        "probe_batch": cfg.probe_batch_size,
        "probe_epochs": cfg.probe_num_epochs,
        "probe_lr": cfg.probe_lr,
        "probe_wd": cfg.probe_weight_decay,
        "llm_batch": cfg.llm_batch_size,
        "variants": list(variants),
        "saes": {name: sae_weights(ctx.sae) for name, ctx in ctxs.items()},
        "encode_probe": probe_rows,
    }
    t0 = time.perf_counter()
    peer = run_saebench(PEER_PRELUDE + PEER, inputs, workdir / "absorption", timeout=3600)
    t_peer = time.perf_counter() - t0
    log(f"absorption: SAEBench part {t_peer:.0f} s")

    enc = encode_check({n: c.sae for n, c in ctxs.items()}, probe_rows, peer["encode_check"])
    ours_prompts = list(table)
    n_probe = len(peer["train_prompts"]) + len(peer["test_prompts"])
    lm_checks = {
        "alphabetic_tokens_equal": sorted(alpha_tokens(tok)) == sorted(peer["alpha_tokens"]),
        "n_alphabetic_tokens": len(vocab_all),
        "n_words_used": len(words),
        "probe_prompts_equal": ours_prompts[:n_probe] == peer["train_prompts"] + peer["test_prompts"],
        "n_prompts_run_by_us": len(ours_prompts),
        "prompt_tokens_run_by_us": reader.n_tokens,
        "prompts_whose_read_token_is_not_the_word": reader.n_off_position,
        "lm_probe_weight_max_abs_diff": float((lm.probe_weight - peer["probe_weight"]).abs().max()),
        "latent_selection_minibatch": cfg.k_sparse_probe_batch_size,
        "stand_in_encode_max_abs_diff": enc,
        "seconds": {
            "lm_part": round(t_lm, 1),
            "our_sae_part": round(t_ours, 1),
            "saebench": round(t_peer, 1),
        },
    }
    results: dict[str, Any] = {"lm": lm_checks, "saes": {}}
    for name, (scores, metrics, details, un) in ours.items():
        mean = metrics["mean"]
        our_details = {r["first_letter"]: r for r in details}
        intervals = {k: mean.get(k + "_ci95") for k in A.HEADLINES}
        if un["reason"] is not None:  # gate failed: compare over the letters that pass F1 anyway
            our_details = {e["first_letter"]: e["detail"] for e in un["letters"] if "detail" in e}
            # The interval summarize would report had the gate passed: the same function and seed.
            kept = [c for c in lm.usable if c in scores.word_fraction]
            values = [(scores.word_fraction[c], scores.word_full[c].double()) for c in kept]
            got = calc.letter_mean_intervals(values, n_resamples=cfg.n_bootstrap, seed=seed)
            intervals = dict(zip(A.HEADLINES, got or [None, None], strict=True))
        sae_out: dict[str, Any] = {
            "ours_reason": un["reason"],
            "ours_ci95_over": "letters passing the LM probe's F1 gate ("
            + ("summarize's interval)" if un["reason"] is None else "gate failed: letter_mean_intervals)"),
            "variants": {},
        }
        for variant, theirs in peer["per_sae"][name].items():
            their_mean = theirs.get("mean") if theirs["gate_passes"] else _means(theirs["details"])
            our_mean = mean if un["reason"] is None else _means(our_details)
            rows = []
            for key in (
                "mean_absorption_fraction_score",
                "mean_full_absorption_score",
                "mean_num_split_features",
            ):
                rows.append(
                    Row(
                        key,
                        None if our_mean is None else our_mean.get(key),
                        None if their_mean is None else their_mean.get(key),
                        intervals.get(key),
                    )
                )
            letters = {}
            for c in LETTERS:
                o, t = our_details.get(c), theirs["details"].get(c)
                if o is None and t is None:
                    continue
                letters[c] = {
                    "ours": None
                    if o is None
                    else {
                        k: o[k]
                        for k in ("mean_absorption_fraction", "full_absorption_rate", "num_split_features")
                    },
                    "saebench": t,
                    "split_feats_ours": scores.split_feats.get(c),
                    "split_feats_saebench": theirs["split_feats"].get(c),
                    "sparse_f1_ours": scores.sparse_f1_by_k.get(c),
                    "sparse_f1_saebench": theirs["f1_sparse"].get(c),
                }
            f1_diffs = [
                abs(a - b)
                for c in scores.sparse_f1_by_k
                for a, b in zip(scores.sparse_f1_by_k[c], theirs["f1_sparse"].get(c, []), strict=False)
            ]
            reprompt_letters = {p_letter for p_letter, ps in theirs["reprompts"].items() if ps}
            missing_letters = sorted(
                {
                    c
                    for c, ps in theirs["reprompts"].items()
                    for p in ps
                    if p in set(theirs["missing_prompts"])
                }
            )
            checks = {
                "letters_kept_equal": "".join(sorted(our_details)) == "".join(sorted(theirs["letters_kept"])),
                "letters_kept_ours": "".join(sorted(our_details)),
                "letters_kept_saebench": "".join(theirs["letters_kept"]),
                "gate_passes_saebench": theirs["gate_passes"],
                "lm_probe_f1_max_abs_diff": max(
                    abs(a - b) for a, b in zip(lm.probe_f1, theirs["f1_probe"], strict=True)
                ),
                "true_positives_equal": lm.true_positives == theirs["true_positives"],
                "split_features_equal_letters": sum(
                    scores.split_feats.get(c) == theirs["split_feats"].get(c) for c in LETTERS
                ),
                "sparse_probe_f1_max_abs_diff": max(f1_diffs) if f1_diffs else None,
                "sparse_probe_f1_n_differing": sum(d > 1e-12 for d in f1_diffs),
                "n_reprompts_saebench": sum(len(v) for v in theirs["reprompts"].values()),
                "n_reprompt_letters_saebench": len(reprompt_letters),
                "missing_prompts_served_stand_ins": len(theirs["missing_prompts"]),
                "letters_of_missing_prompts": "".join(missing_letters),
                "missing_prompts_only_in_letters_not_kept": not set(missing_letters) & set(our_details),
            }
            sae_out["variants"][variant] = {
                "rows": rows,
                "letters": letters,
                "checks": checks,
                "per_letter_rows": _letter_rows(our_details, theirs["details"]),
            }
        results["saes"][name] = sae_out
    return results


def _letter_rows(ours: dict[str, dict], theirs: dict[str, dict]) -> list[Row]:
    rows = []
    for c in LETTERS:
        o, t = ours.get(c), theirs.get(c)
        if o is None and t is None:
            continue
        for key, short in (
            ("mean_absorption_fraction", "frac"),
            ("full_absorption_rate", "full"),
            ("num_split_features", "n_split"),
        ):
            rows.append(
                Row(
                    f"{c}.{short}", None if o is None else float(o[key]), None if t is None else float(t[key])
                )
            )
    return rows
