"""Feature absorption on the first-letter task (Chanin et al., "A is for Absorption"; SAEBench's method).

Steps:
1. Words: vocabulary tokens that are a leading space plus a real English word (wordfreq), shuffled with
   the seed, capped at `max_words`, split into train/test words.
2. Prompts: SAEBench's ICL format, `num_icl_examples` examples from the same split, then
   "{word} has the first letter:"; the LM's resid_post at block L is read at `prompt_token_pos` (-6: the
   word's token). Words whose token is not at that position after tokenisation are dropped (counted).
3. LM probe: one-vs-rest logistic regression per letter on the LM activations (train words); its F1 on
   the test words says whether the model represents that letter linearly. Letters whose probe F1 is
   below `min_probe_f1` (0.6, SAEBench's min_GT_probe_f1) or that have fewer than
   `min_probe_true_positives` probe true positives are excluded and listed in the JSON.
4. k-sparse probes on SAE latents: an L1-penalised probe per letter on the latents picks the latents with
   the largest positive weight; for k = 1..max_k_value a logistic probe on those k latents is fit and its
   test F1 recorded. The split features are the latents of the largest k reached while F1 keeps jumping by
   more than f1_jump_threshold; num_split_features is their count.
5. Absorption (see absorption_calc): over the probe's true positives of the letter, absorption_rate =
   the share of words where no split feature fires and one probe-aligned latent carries ≥ 40 % of the
   probe projection. mean_absorption_score is the mean over included letters; the later SAEBench
   "absorption fraction" metric is reported in eval_result_unstructured.

Departures from SAEBench: the LM probe is full-batch L-BFGS on standardised activations (its direction is
mapped back to activation space), probes are scored on a smaller word set (CPU budget), and train/test
is split by word with `train_fraction` (SAEBench: 0.8). Small models spell worse, so expect excluded
letters; the per-letter counts are small, so rates are noisy (see the module's tests and the report).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from orthosae.eval import absorption_calc as calc
from orthosae.eval.absorption_prompts import (
    LETTERS,
    encode_prompt,
    first_letter,
    icl_prompt,
    word_at,
    word_tokens,
)
from orthosae.eval.context import EvalContext
from orthosae.eval.probes import f1_score, fit_l1_probe, fit_logistic
from orthosae.eval.prompt_acts import acts_at_positions
from orthosae.eval.results import section

EVAL_TYPE_ID = "absorption_first_letter"


@dataclass
class Config:
    f1_jump_threshold: float = 0.03
    """Test-F1 rise over k-1 above which the k-th latent of a k-sparse probe counts as a split feature."""
    max_k_value: int = 10
    """Largest k of the k-sparse probes on SAE latents."""
    prompt_template: str = "{word} has the first letter:"
    """Prompt whose `{word}` is the vocabulary token (with its leading space)."""
    prompt_token_pos: int = -6
    """Position (from the prompt's end) of the word's token, where the LM activation is read."""
    num_icl_examples: int = 10
    """In-context examples before the word (SAEBench: 10)."""
    llm_batch_size: int = 16
    """Prompts per LM forward."""
    k_sparse_probe_l1_decay: float = 0.01
    """L1 weight of the latent-selection probe."""
    k_sparse_probe_batch_size: int = 4096
    """Minibatch of the latent-selection probe."""
    k_sparse_probe_num_epochs: int = 50
    """Epochs of the latent-selection probe."""
    max_words: int = 2000
    """Words evaluated (a random subset of the vocabulary's words; bounds CPU time)."""
    train_fraction: float = 0.6
    """Share of the words that train the probes; absorption is measured on the rest (test words)."""
    min_word_len: int = 2
    """Shortest word kept."""
    min_probe_f1: float = 0.6
    """Letters whose LM probe has a lower test F1 are excluded (SAEBench's min_GT_probe_f1)."""
    min_probe_true_positives: int = 5
    """Letters with fewer LM-probe true positives among the test words are excluded (too few to rate)."""


def _letter_labels(words: list[str]) -> torch.Tensor:
    y = torch.zeros(len(words), len(LETTERS))
    for i, w in enumerate(words):
        y[i, LETTERS.index(first_letter(w))] = 1.0
    return y


def _encode_all(sae: Any, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sae.encode(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def _prompts(ctx: EvalContext, cfg: Config, words: list[str], rng: random.Random):
    tok = ctx.model.tokenizer
    kept, ids = [], []
    for w in words:
        p = icl_prompt(w, words, cfg.prompt_template, rng, cfg.num_icl_examples)
        seq = encode_prompt(tok, p.text)
        if word_at(seq, cfg.prompt_token_pos, tok, w):
            kept.append(w)
            ids.append(seq)
    return kept, ids


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    rng = random.Random(ctx.seed)
    torch.manual_seed(ctx.seed)
    loaded = ctx.model
    vocab = word_tokens(loaded.tokenizer, cfg.min_word_len)
    words = rng.sample(vocab, min(cfg.max_words, len(vocab)))
    n_train = int(len(words) * cfg.train_fraction)
    train_words, train_ids = _prompts(ctx, cfg, words[:n_train], rng)
    test_words, test_ids = _prompts(ctx, cfg, words[n_train:], rng)
    n_dropped = len(words) - len(train_words) - len(test_words)
    if not train_words or not test_words:
        raise ValueError(
            f"no word's token sits at prompt_token_pos={cfg.prompt_token_pos} for this tokenizer; "
            "adjust the template or the position"
        )

    acts = {
        name: acts_at_positions(
            loaded, ctx.layer, seqs, cfg.prompt_token_pos, cfg.llm_batch_size, ctx.progress
        )
        for name, seqs in (("train", train_ids), ("test", test_ids))
    }
    y_train, y_test = _letter_labels(train_words), _letter_labels(test_words)

    # 1) The LM probe: one logistic regression per letter, all at once.
    lm_probe = fit_logistic(acts["train"], y_train)
    lm_logits = lm_probe.logits(acts["test"])
    directions = lm_probe.direction()  # (26, d), activation space

    # 2) SAE latents and the L1 probe that ranks latents per letter.
    z_train = _encode_all(ctx.sae, acts["train"])
    z_test = _encode_all(ctx.sae, acts["test"])
    l1_w = fit_l1_probe(
        z_train,
        y_train,
        l1=cfg.k_sparse_probe_l1_decay,
        num_epochs=cfg.k_sparse_probe_num_epochs,
        batch_size=cfg.k_sparse_probe_batch_size,
        seed=ctx.seed,
    )
    W_dec = ctx.sae.W_dec.detach().float().cpu()

    details, unstructured_letters, excluded = [], [], []
    for c, letter in enumerate(
        tqdm(LETTERS, disable=not ctx.progress, desc="absorption letters", leave=False)
    ):
        truth = y_test[:, c] > 0.5
        probe_pred = lm_logits[:, c] > 0
        probe_f1 = f1_score(truth, probe_pred)
        if y_train[:, c].sum() == 0 or truth.sum() == 0:
            excluded.append(
                {"first_letter": letter, "reason": "no train or test words", "probe_f1": probe_f1}
            )
            continue
        feats_by_k, f1_by_k = [], []
        order = l1_w[c].topk(cfg.max_k_value).indices
        for k in range(1, cfg.max_k_value + 1):
            feats = order[:k]
            probe_k = fit_logistic(z_train[:, feats], y_train[:, c], max_iter=100)
            f1_by_k.append(f1_score(truth, probe_k.logits(z_test[:, feats]) > 0))
            feats_by_k.append(feats.tolist())
        split = calc.split_features(f1_by_k, feats_by_k, cfg.f1_jump_threshold)

        tp = truth & probe_pred
        n_tp = int(tp.sum())
        cos = calc.decoder_cos(directions[c], W_dec)
        unit = directions[c] / directions[c].norm()
        lm_proj = acts["test"][tp] @ unit
        absorbed = calc.full_absorption(z_test[tp], lm_proj, cos, split)
        fraction = calc.absorption_fraction(z_test[tp], lm_proj, cos, split)
        row = {
            "first_letter": letter,
            "absorption_rate": int(absorbed.sum()) / n_tp if n_tp else 0.0,
            "num_absorption": int(absorbed.sum()),
            "num_probe_true_positives": n_tp,
            "num_split_features": len(split),
        }
        extra = {
            "first_letter": letter,
            "probe_f1": probe_f1,
            "num_test_words": int(truth.sum()),
            "mean_absorption_fraction": float(fraction.mean()) if n_tp else 0.0,
            "split_feats": split,
            "sparse_sae_f1_by_k": f1_by_k,
        }
        unstructured_letters.append(extra)
        if probe_f1 < cfg.min_probe_f1:
            excluded.append(
                {"first_letter": letter, "reason": f"probe F1 < {cfg.min_probe_f1}", "probe_f1": probe_f1}
            )
        elif n_tp < cfg.min_probe_true_positives:
            excluded.append(
                {
                    "first_letter": letter,
                    "reason": f"< {cfg.min_probe_true_positives} probe true positives",
                    "probe_f1": probe_f1,
                }
            )
        else:
            details.append(row)

    rates = [d["absorption_rate"] for d in details]
    splits = [d["num_split_features"] for d in details]
    kept = {d["first_letter"] for d in details}
    fractions = [u["mean_absorption_fraction"] for u in unstructured_letters if u["first_letter"] in kept]
    metrics = {
        "mean": {
            "mean_absorption_score": statistics.mean(rates) if rates else None,
            "mean_num_split_features": statistics.mean(splits) if splits else None,
        }
    }
    unstructured = {
        "num_letters_evaluated": len(details),
        "excluded_letters": excluded,
        "mean_absorption_fraction_score": statistics.mean(fractions) if fractions else None,
        "std_dev_absorption_score": statistics.stdev(rates) if len(rates) > 1 else None,
        "num_words": {
            "vocabulary": len(vocab),
            "train": len(train_words),
            "test": len(test_words),
            "dropped_by_tokenisation": n_dropped,
        },
        "lm_probe_mean_f1": statistics.mean(u["probe_f1"] for u in unstructured_letters)
        if unstructured_letters
        else None,
        "letters": unstructured_letters,
        "note": "absorption_rate is SAEBench's full-absorption rate over LM-probe true positives among test "
        f"words; letters with probe F1 < {cfg.min_probe_f1} or < {cfg.min_probe_true_positives} true "
        "positives are excluded from the means",
    }
    eval_config = {
        "model_name": ctx.model_name,
        "random_seed": ctx.seed,
        **asdict(cfg),
        "llm_dtype": "float32",
    }
    return section(ctx, EVAL_TYPE_ID, eval_config, metrics, details, unstructured)
