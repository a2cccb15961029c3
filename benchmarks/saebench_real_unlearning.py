"""Unlearning on real inputs: the steps of SAEBench 0.6.0's unlearning that its own code can run on our
inputs, compared with our eval's (benchmarks/saebench_real.py).

Ours: orthosae.eval.unlearning.evaluate, unchanged ('cloze' protocol: SmolLM2-135M is far too small for
SAEBench's WMDP/MMLU multiple choice, and those sets are not offline), at the benchmark's sizes.

SAEBench's own functions, run in the peer venv on the same real inputs:
1. firing frequencies: activation_collection.get_feature_activation_sparsity(mask_bos_pad_eos_tokens=True)
   over our packed forget / retain corpus tokens, its `model.run_with_cache` answered with our block-L
   activations of those tokens (a stand-in model), the SAE the stand-in of our folded SAE;
2. feature selection: feature_activation.get_top_features on those frequencies, for every retain threshold
   and n of the grid (compared with the latents our run clamped);
3. the intervention: intervention.anthropic_clamp_resid_SAE_features applied to real block-L activations
   (forget-corpus rows) with the latents and multipliers of our grid, against our edited_residual;
4. the score: our run's per-question correctness tables (every intervention, forget and retain), written as
   SAEBench's per-intervention metrics files and read back by main.get_metrics_df + get_unlearning_scores.
Not SAEBench's: the answers under each intervention (its calculate_MCQ_metrics needs a transformer_lens
Gemma chat model and its MCQ prompt; we answer cloze items with our model and clamp hook). A question our
run did not need to ask (the retain gate already failed everywhere) is '?' in our tables and is counted
correct on both sides, as our score does: the gate fails there either way.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from orthosae.eval import unlearning as U
from orthosae.eval.context import EvalContext
from orthosae.eval.fold import folded
from orthosae.eval.unlearning_prompts import counted_mask
from orthosae.eval.unlearning_score import score_from_tables, select_features
from saebench_peer import run_saebench
from saebench_real_common import PEER_PRELUDE, Row, encode_check, sae_weights

RETAIN_SUBJECTS = [  # SAEBench pools these four MMLU subjects into its retain accuracy
    "high_school_us_history",
    "college_computer_science",
    "high_school_geography",
    "human_aging",
]

PEER = r"""
import os, pickle
import numpy as np
import sae_bench.evals.unlearning.utils.feature_activation as fa
import sae_bench.evals.unlearning.utils.intervention as iv
import sae_bench.evals.unlearning.main as main
import sae_bench.sae_bench_utils.activation_collection as ac

class Tok:
    bos_token_id, eos_token_id, pad_token_id = inputs["specials"]

class CorpusModel(ac.HookedTransformer):  # the class its type check holds
    def __init__(self, acts):
        self.tokenizer = Tok()
        self.acts, self.at = acts, 0
    def run_with_cache(self, tokens, stop_at_layer=None, names_filter=None):
        z = self.acts[self.at : self.at + len(tokens)]
        self.at += len(tokens)
        return None, {names_filter: z}

outputs["per_sae"] = {}
hook = f"blocks.{inputs['layer']}.hook_resid_post"
for name, sae in SAES.items():
    out = {}
    freq = {}
    for split in ("forget", "retain"):
        c = inputs["corpora"][split]
        freq[split] = ac.get_feature_activation_sparsity(
            c["ids"], CorpusModel(c["acts"]), sae, inputs["batch"], inputs["layer"], hook,
            mask_bos_pad_eos_tokens=True,
        )
    out["freq"] = freq
    f, r = freq["forget"].double().numpy(), freq["retain"].double().numpy()
    out["top"] = {
        t: fa.get_top_features(f.copy(), r.copy(), retain_threshold=t).tolist() for t in inputs["thresholds"]
    }
    of, orr = (x.double().numpy() for x in inputs["our_freq"][name])
    out["top_on_our_freq"] = {
        t: fa.get_top_features(of.copy(), orr.copy(), retain_threshold=t).tolist()
        for t in inputs["thresholds"]
    }
    resid = inputs["clamp_resid"]
    out["clamped"] = {
        (tuple(feats), m): iv.anthropic_clamp_resid_SAE_features(resid.clone(), None, sae, list(feats), m)
        for feats, m in inputs["clamp_cases"][name]
    }
    if inputs["tables"][name] is None:
        out["score"] = None
        outputs["per_sae"][name] = out
        continue
    forget, retain, grid = inputs["tables"][name]
    folder = os.path.join("metrics", name)
    os.makedirs(folder, exist_ok=True)
    splits = np.array_split(np.arange(retain.shape[1]), len(inputs["retain_subjects"]))
    for i, (t, n, m) in enumerate(grid):
        row = {}
        for subject, cols in [("wmdp-bio", None), *zip(inputs["retain_subjects"], splits)]:
            table = forget[i] if cols is None else retain[i][cols]
            is_correct = table.to(torch.float)
            row[subject] = {
                "mean_correct": float(is_correct.mean().item()),
                "total_correct": int(np.sum(is_correct.numpy())),
                "is_correct": is_correct.numpy(),
            }
        row["ablate_params"] = {"multiplier": m}
        layer = inputs["layer"]
        fname = f"clamp_feature_activation_multiplier{m}_nfeatures{n}_layer{layer}_retainthres{t}.pkl"
        with open(os.path.join(folder, fname), "wb") as fh:
            pickle.dump(row, fh)
    out["score"] = float(main.get_unlearning_scores(main.get_metrics_df(folder)))
    outputs["per_sae"][name] = out
"""


def _table(marks: str) -> torch.Tensor:
    """Per question True = right ('1', or '?' = not run: counted right, as our score does)."""
    return torch.tensor([c != "0" for c in marks], dtype=torch.bool)


def _corpora(ctx: EvalContext, cfg: U.Config) -> dict[str, U.Corpus]:
    paths = U._paths(cfg)
    found = {}
    for name in ("forget", "retain"):
        fp = U._fingerprint(paths[f"{name}_corpus"])
        for key, value in ctx.shared.items():
            if isinstance(value, U.Corpus) and fp in key:
                found[name] = value
    return found


def _same_up_to_ties(ours: list[int], theirs: list[int], freq: torch.Tensor) -> bool:
    """Same length and, position by position, latents of equal forget frequency (SAEBench's argsort is not
    stable, so its order among tied latents is arbitrary)."""
    if len(ours) != len(theirs):
        return False
    return bool(torch.equal(freq[ours], freq[theirs])) if ours else True


def run(
    ctxs: dict[str, EvalContext],
    *,
    cfg: U.Config,
    workdir: Path,
    log: Any = print,
) -> dict[str, Any]:
    cfg = U.resolved(cfg)
    ours: dict[str, Any] = {}
    times = {}
    for name, ctx in ctxs.items():
        t = time.perf_counter()
        ours[name] = U.evaluate(ctx, replace(cfg))
        times[name] = round(time.perf_counter() - t, 1)
        log(f"unlearning: ours on {name} {times[name]:.0f} s")
    ctx0 = next(iter(ctxs.values()))
    corpora = _corpora(ctx0, cfg)
    if set(corpora) != {"forget", "retain"} or any(c.acts is None for c in corpora.values()):
        raise RuntimeError("unlearning: the corpus activations were not kept (corpora too large?)")
    tok = ctx0.model.tokenizer
    specials = tuple(getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id"))
    our_freq, tables, clamp_cases = {}, {}, {}
    for name, ctx in ctxs.items():
        sae = folded(ctx.sae) if cfg.fold_decoder_norms else ctx.sae
        our_freq[name] = tuple(
            U.firing_frequency(ctx.model, ctx.layer, sae, corpora[s], cfg.llm_batch_size)
            for s in ("forget", "retain")
        )
        rows = ours[name]["eval_result_unstructured"]["interventions"]
        grid = [(r["retain_threshold"], r["n_features"], r["multiplier"]) for r in rows]
        if all("forget_correct" in r for r in rows):
            tables[name] = (
                torch.stack([_table(r["forget_correct"]) for r in rows]),
                torch.stack([_table(r["retain_correct"]) for r in rows]),
                grid,
            )
        else:  # no kept questions in a set: nothing was asked, there is no score on either side
            tables[name] = None
        seen = []
        for r in rows:
            if r["features"] and (tuple(r["features"]), r["multiplier"]) not in seen:
                seen.append((tuple(r["features"]), r["multiplier"]))
        clamp_cases[name] = seen
    clamp_resid = corpora["forget"].acts[:4].clone()
    probe_rows = clamp_resid.reshape(-1, clamp_resid.shape[-1])[:256]
    inputs = {
        "specials": specials,
        "layer": ctx0.layer,
        "batch": cfg.llm_batch_size,
        "thresholds": list(cfg.retain_thresholds),
        "corpora": {s: {"ids": c.ids, "acts": c.acts} for s, c in corpora.items()},
        "our_freq": our_freq,
        "clamp_resid": clamp_resid,
        "clamp_cases": clamp_cases,
        "tables": tables,
        "retain_subjects": RETAIN_SUBJECTS,
        "saes": {
            name: sae_weights(ctx.sae) if cfg.fold_decoder_norms else _unfolded(ctx.sae)
            for name, ctx in ctxs.items()
        },
        "encode_probe": probe_rows,
    }
    t0 = time.perf_counter()
    peer = run_saebench(PEER_PRELUDE + PEER, inputs, workdir / "unlearning", timeout=3600)
    t_peer = time.perf_counter() - t0
    log(f"unlearning: SAEBench part {t_peer:.0f} s")
    enc = encode_check({n: c.sae for n, c in ctxs.items()}, probe_rows, peer["encode_check"])
    masks_equal = all(
        torch.equal(counted_mask(c.ids, tok), c.counted) for c in corpora.values()
    )  # our counted mask as the eval built it; SAEBench's is recomputed inside its function

    results: dict[str, Any] = {
        "common": {
            "corpus_tokens_counted": {s: int(c.counted.sum()) for s, c in corpora.items()},
            "counted_mask_is_ours": masks_equal,
            "stand_in_encode_max_abs_diff": enc,
            "seconds": {"ours_per_sae": times, "saebench": round(t_peer, 1)},
            "saebench_steps_run": [
                "get_feature_activation_sparsity (firing frequencies)",
                "get_top_features (feature selection)",
                "anthropic_clamp_resid_SAE_features (the clamp edit on real activations)",
                "get_metrics_df + get_unlearning_scores (the score from our correctness tables)",
            ],
            "saebench_steps_not_run": [
                "calculate_MCQ_metrics / the 24-ordering filter (Gemma chat MCQ; we use the cloze protocol)",
                "the edited model's answers (our model, our clamp hook)",
            ],
        },
        "saes": {},
    }
    for name, section in ours.items():
        theirs = peer["per_sae"][name]
        un = section["eval_result_unstructured"]
        m = section["eval_result_metrics"]["unlearning"]
        fo, ro = our_freq[name]
        ft, rt = theirs["freq"]["forget"].float(), theirs["freq"]["retain"].float()
        sel_rows, sel_exact, sel_ties, sel_ourfreq = 0, 0, 0, 0
        for r in un["interventions"]:
            t, n = r["retain_threshold"], r["n_features"]
            their_feats = theirs["top"][t][:n]
            mine = select_features(fo, ro, t, n)
            assert mine == r["features"]
            sel_rows += 1
            sel_exact += their_feats == r["features"]
            sel_ties += _same_up_to_ties(r["features"], their_feats, fo.double())
            sel_ourfreq += theirs["top_on_our_freq"][t][:n] == r["features"]
        clamp_diff = 0.0
        clamp_scale = float(clamp_resid.norm(dim=-1).mean())
        sae = folded(ctxs[name].sae) if cfg.fold_decoder_norms else ctxs[name].sae
        with torch.no_grad():
            for (feats, mult), their in theirs["clamped"].items():
                mine_h = U.edited_residual(clamp_resid, sae, list(feats), mult)
                clamp_diff = max(clamp_diff, float((mine_h - their).abs().max()))
        ours_table_score = None
        n_kept = (0, 0)
        if tables[name] is not None:
            forget_t, retain_t, _ = tables[name]
            ours_table_score = score_from_tables(forget_t, retain_t, cfg.retain_accuracy_min)
            n_kept = (int(forget_t.shape[1]), int(retain_t.shape[1]))
        rows = [
            Row(
                "unlearning_score",
                m["unlearning_score"],
                theirs["score"],
                m.get("unlearning_score_ci95"),
                "SAEBench's scoring of our answer tables",
            ),
            Row(
                "score_from_tables (ours, same tables)",
                ours_table_score,
                theirs["score"],
            ),
        ]
        results["saes"][name] = {
            "rows": rows,
            "checks": {
                "firing_frequency_max_abs_diff": {
                    "forget": float((fo - ft).abs().max()),
                    "retain": float((ro - rt).abs().max()),
                },
                "feature_selection_rows": sel_rows,
                "feature_selection_identical": sel_exact,
                "feature_selection_identical_up_to_ties": sel_ties,
                "feature_selection_identical_on_our_frequencies": sel_ourfreq,
                "clamp_cases": len(theirs["clamped"]),
                "clamp_edit_max_abs_diff": clamp_diff,
                "clamp_mean_resid_norm": clamp_scale,
                "n_forget_kept": n_kept[0],
                "n_retain_kept": n_kept[1],
            },
        }
    return results


def _unfolded(sae: Any) -> dict[str, Any]:
    return {
        "W_enc": sae.W_enc.detach().float().contiguous().clone(),
        "b_enc": sae.b_enc.detach().float().clone(),
        "W_dec": sae.W_dec.detach().float().clone(),
        "b_dec": sae.b_dec.detach().float().clone(),
        "k": int(sae.k) if getattr(sae, "arch", "") == "topk" else None,
    }
