"""Feature absorption on the first-letter task, SAEBench 0.6.0's method step for step (Chanin et al.,
"A is for Absorption").

LM part (independent of the SAE; done once per model, layer, seed and config and shared by every SAE of
an experiment through EvalContext.memo):
1. Words: every alphabetic vocabulary token (absorption_prompts), shuffled with the seed, cut to
   `max_words` when set, split 80/20 into train and test words.
2. Probe data: one ICL prompt per word, 10 examples drawn from the word's own split; resid_post of the
   SAE's block is read at `prompt_token_pos` (-6, the word's last token). Words starting with a digit,
   '<' or '>' are then dropped and the words passed through convert_tokens_to_string (SAEBench's
   probe-data loader; neither changes an alphabetic word of a byte-level BPE vocabulary).
3. LM probe: 26 one-vs-rest linear probes on the raw activations of the train words (absorption_probes:
   Adam, batch 64, 50 epochs, lr 1e-2 → 1e-5, weight decay 1e-4, positives weighted). A letter is
   usable when its probe's F1 on the test words (logit > 0) exceeds `min_GT_probe_f1` (0.6); fewer than
   `min_feats_for_eval` (20) usable letters and SAEBench evaluates nothing: the headline metrics are
   then null and `eval_result_unstructured.reason` says why.
4. Re-prompting: the test words the LM probe gets right for a letter (its true positives) are prompted
   again, with 10 examples drawn from the whole word list, and their activations read as before.
Per SAE (decoder norms folded into the encoder first, as SAEBench does for every SAE it loads):
5. Latent selection: a probe with an L1 penalty (0.01) on the latents of the train words (batch 4096
   with every word, 50 epochs, lr 1e-2 → 1e-5, weight decay 1e-6); per letter its k largest positive
   weights pick k latents, k = 1..`max_k_value`, and a k-sparse probe (sklearn LogisticRegression(C=1,
   class_weight="balanced") objective) on those latents is scored by test F1. The letter's split
   features are the latents of the largest k reached while F1 rises by more than `f1_jump_threshold`.
6. Absorption (absorption_calc): per re-prompted word, the absorption fraction and full absorption of
   SAEBench's FeatureAbsorptionCalculator, with the split features as the main latents; per usable
   letter their means, then the means over usable letters: mean_absorption_fraction_score (SAEBench
   0.6's headline), mean_full_absorption_score, mean_num_split_features (SAEBench reports len(split
   features) there), their std devs, and bootstrap 95 % intervals over the scored words (resampled within
   each letter; conditional on the probes and the split features).

Departures from SAEBench, all recorded in the result: `max_words` (a CPU budget; None = every word),
with the latent-selection probe's minibatch scaled by the share of words used so that it keeps
SAEBench's steps per epoch (set k_sparse_probe_batch_size to fix it); each prompt is read at its own
`prompt_token_pos` (SAEBench right-pads a batch and reads one index, which is off for a shorter prompt in
the batch; it refuses variable-length re-prompts); the k-sparse probes are solved to the optimum instead
of to sklearn's tolerance; the re-prompts are drawn once and shared by all SAEs (SAEBench draws them
again per SAE: same distribution, paired comparison here); the word list is in token-id order
(SAEBench's follows the tokenizer's vocab dict). A letter without train words gets no k-sparse probe
(SAEBench fails there); this only happens with a small max_words.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from orthosae.errors import UserError
from orthosae.eval import absorption_calc as calc
from orthosae.eval import uncertainty
from orthosae.eval.absorption_probes import fit_balanced_logistic, one_hot, train_ovr_probe
from orthosae.eval.absorption_prompts import (
    LETTERS,
    Prompt,
    alpha_tokens,
    encode_prompt,
    icl_prompt,
    keep_probe_word,
    letter_index,
    split_words,
    word_at,
)
from orthosae.eval.context import EvalContext
from orthosae.eval.fold import fold_record, folded
from orthosae.eval.probes import f1_score
from orthosae.eval.prompt_acts import acts_at_positions
from orthosae.eval.results import section

EVAL_TYPE_ID = "absorption_first_letter"
HEADLINES = ("mean_absorption_fraction_score", "mean_full_absorption_score")
MEAN_KEYS = (  # SAEBench 0.6's AbsorptionMeanMetrics
    *HEADLINES,
    "mean_num_split_features",
    "std_dev_absorption_fraction_score",
    "std_dev_full_absorption_score",
    "std_dev_num_split_features",
)
BOOTSTRAP_UNIT = "scored word (LM-probe true positive), resampled within its letter"
# SAEBench's fixed settings of the latent-selection probe and the LM probe's end learning rate.
SPARSE_PROBE_LR = 1e-2
SPARSE_PROBE_WEIGHT_DECAY = 1e-6
END_LR = 1e-5


@dataclass
class Config:
    f1_jump_threshold: float = 0.03
    """Test-F1 rise over k-1 above which the k-th latent of a k-sparse probe is a split feature."""
    max_k_value: int = 10
    """Largest k of the k-sparse probes on SAE latents."""
    prompt_template: str = "{word} has the first letter:"
    """Prompt whose `{word}` is the vocabulary token's text (leading space included)."""
    prompt_token_pos: int = -6
    """Position, from the prompt's end, where the LM activation is read (-6: the word's last token)."""
    num_icl_examples: int = 10
    """In-context examples before the word (SAEBench: 10)."""
    llm_batch_size: int = 16
    """Prompts per LM forward."""
    k_sparse_probe_l1_decay: float = 0.01
    """L1 weight of the latent-selection probe."""
    k_sparse_probe_batch_size: int | None = None
    """Minibatch of the latent-selection probe. None: SAEBench's 4096 times the share of the words used
    (4096 with every word), so that with max_words the probe still takes SAEBench's number of steps per
    epoch (with 4096 and a few thousand words it would take one step per epoch and stay untrained)."""
    k_sparse_probe_num_epochs: int = 50
    """Epochs of the latent-selection probe."""
    min_GT_probe_f1: float = 0.6
    """A letter is used when its LM probe's test F1 exceeds this (SAEBench's min_GT_probe_f1)."""
    min_feats_for_eval: int = 20
    """Fewer usable letters than this and no absorption is reported (SAEBench's min_feats_for_eval)."""
    max_words: int | None = None
    """Words used, a random subset of all alphabetic tokens taken before the 80/20 split; None: all of
    them (SAEBench). A CPU budget: fewer words make the LM probe weaker and the intervals wider."""
    train_test_fraction: float = 0.8
    """Share of the words that train the probes (SAEBench: 0.8)."""
    probe_batch_size: int = 64
    """Minibatch of the LM probe (SAEBench: 64)."""
    probe_num_epochs: int = 50
    """Epochs of the LM probe (SAEBench: 50)."""
    probe_lr: float = 1e-2
    """Initial learning rate of the LM probe, decayed exponentially to 1e-5 (SAEBench: 1e-2)."""
    probe_weight_decay: float = 1e-4
    """Adam weight decay of the LM probe (SAEBench: 1e-4)."""
    n_bootstrap: int = uncertainty.N_RESAMPLES
    """Bootstrap resamples for the 95 % intervals."""

    def validate(self) -> None:
        positive = (
            "max_k_value",
            "num_icl_examples",
            "llm_batch_size",
            "k_sparse_probe_num_epochs",
            "min_feats_for_eval",
            "probe_batch_size",
            "probe_num_epochs",
            "n_bootstrap",
        )
        if self.k_sparse_probe_batch_size is not None and self.k_sparse_probe_batch_size <= 0:
            raise UserError(
                f"absorption.k_sparse_probe_batch_size must be positive, got {self.k_sparse_probe_batch_size}"
            )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"absorption.{name} must be positive, got {getattr(self, name)}")
        if "{word}" not in self.prompt_template:
            raise UserError(f"absorption.prompt_template must contain {{word}}, got {self.prompt_template!r}")
        if not 0.0 < self.train_test_fraction < 1.0:
            raise UserError(
                f"absorption.train_test_fraction must be in (0, 1), got {self.train_test_fraction}"
            )
        if self.probe_lr <= 0:
            raise UserError(f"absorption.probe_lr must be positive, got {self.probe_lr}")
        need = self.min_words()
        if self.max_words is not None and self.max_words < need:
            raise UserError(
                f"absorption.max_words={self.max_words} leaves fewer test words than "
                f"num_icl_examples + 1 = {self.num_icl_examples + 1}: use at least {need}"
            )

    def min_words(self) -> int:
        """Fewest words whose train and test splits both exceed num_icl_examples."""
        n = self.num_icl_examples + 1
        while (
            min(int(n * self.train_test_fraction), n - int(n * self.train_test_fraction))
            <= self.num_icl_examples
        ):
            n += 1
        return n


# ----------------------------------------------------------------- LM part (SAE-independent)

ActsFn = Callable[[Sequence[Prompt], str], torch.Tensor]


@dataclass
class LMData:
    """What every SAE's absorption eval shares: words, LM activations, the LM probe, the re-prompts."""

    n_vocab: int
    n_selected: int
    train_words: list[str]
    test_words: list[str]
    train_labels: torch.Tensor  # (n_train,) letter index
    test_labels: torch.Tensor
    train_acts: torch.Tensor  # (n_train, d_model)
    test_acts: torch.Tensor
    n_dropped: int  # words dropped by SAEBench's probe-data filter
    probe_weight: torch.Tensor  # (26, d_model)
    probe_bias: torch.Tensor  # (26,)
    probe_f1: list[float]  # per letter, on the test words
    true_positives: dict[str, list[str]]  # per letter: the test words re-prompted for absorption
    usable: list[str]  # letters whose probe F1 passes min_GT_probe_f1 (and that have true positives)
    reprompt_acts: dict[str, torch.Tensor]  # per usable letter: (n_tp, d_model)
    example_prompt: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def prepare_lm(
    vocab: Sequence[str],
    acts_fn: ActsFn,
    cfg: Config,
    seed: int,
    convert: Callable[[str], str] = lambda w: w,
) -> LMData:
    """Steps 1-4 of the module doc. `acts_fn(prompts, desc)` → (N, d_model) LM activations at the read
    position; `convert` is SAEBench's convert_tokens_to_string pass over the probe-data words."""
    start = time.perf_counter()
    rng = random.Random(seed)
    train_vocab, test_vocab = split_words(vocab, rng, cfg.train_test_fraction, cfg.max_words)
    if len(test_vocab) <= cfg.num_icl_examples or len(train_vocab) <= cfg.num_icl_examples:
        raise UserError(
            f"absorption: {len(train_vocab)} train / {len(test_vocab)} test words cannot give "
            f"{cfg.num_icl_examples} in-context examples each: the tokenizer has too few alphabetic tokens "
            "or max_words is too small"
        )
    # SAEBench draws every train prompt, then every test prompt, each from its own split.
    prompts = {
        name: [icl_prompt(w, words, cfg.prompt_template, rng, cfg.num_icl_examples) for w in words]
        for name, words in (("train", train_vocab), ("test", test_vocab))
    }
    raw = {}
    for name, words in (("train", train_vocab), ("test", test_vocab)):
        labels = torch.tensor([letter_index(w) for w in words], dtype=torch.long)
        raw[name] = (words, labels, acts_fn(prompts[name], f"absorption {name} prompts"))

    # The LM probe sees every train word; the filter applies to the data the later steps load.
    weight, bias = train_ovr_probe(
        raw["train"][2],
        one_hot(raw["train"][1], len(LETTERS)),
        batch_size=cfg.probe_batch_size,
        num_epochs=cfg.probe_num_epochs,
        lr=cfg.probe_lr,
        end_lr=END_LR,
        weight_decay=cfg.probe_weight_decay,
        seed=seed,
    )
    splits = {}
    n_dropped = 0
    for name, (words, labels, acts) in raw.items():
        keep = [i for i, w in enumerate(words) if keep_probe_word(w)]
        n_dropped += len(words) - len(keep)
        splits[name] = ([convert(words[i]) for i in keep], labels[keep], acts[keep])
    (train_words, y_train, x_train), (test_words, y_test, x_test) = splits["train"], splits["test"]
    logits = F.linear(x_test.float(), weight, bias)
    probe_f1, tps = [], {}
    for i, letter in enumerate(LETTERS):
        truth, pred = y_test == i, logits[:, i] > 0
        probe_f1.append(f1_score(truth, pred))
        tps[letter] = [test_words[j] for j in torch.nonzero(truth & pred).flatten().tolist()]

    # Re-prompts for every letter in order (the draws match SAEBench's), the LM only for usable letters.
    reprompts = {
        c: [icl_prompt(w, vocab, cfg.prompt_template, rng, cfg.num_icl_examples) for w in tps[c]]
        for c in LETTERS
    }
    usable = [c for i, c in enumerate(LETTERS) if probe_f1[i] > cfg.min_GT_probe_f1 and tps[c]]
    flat = [p for c in usable for p in reprompts[c]]
    reprompt_acts: dict[str, torch.Tensor] = {}
    if flat:
        acts = acts_fn(flat, "absorption re-prompts")
        start_row = 0
        for c in usable:
            reprompt_acts[c] = acts[start_row : start_row + len(reprompts[c])]
            start_row += len(reprompts[c])
    return LMData(
        n_vocab=len(vocab),
        n_selected=len(train_vocab) + len(test_vocab),
        train_words=train_words,
        test_words=test_words,
        train_labels=y_train,
        test_labels=y_test,
        train_acts=x_train,
        test_acts=x_test,
        n_dropped=n_dropped,
        probe_weight=weight,
        probe_bias=bias,
        probe_f1=probe_f1,
        true_positives=tps,
        usable=usable,
        reprompt_acts=reprompt_acts,
        example_prompt=prompts["test"][0].text,
        seconds=time.perf_counter() - start,
    )


class PromptReader:
    """acts_fn for a real model: tokenise (BOS first), read resid_post of `layer` at `position` of each
    prompt (from its own end), and count prompts whose token there is not the word (a diagnostic)."""

    def __init__(self, ctx: EvalContext, position: int, batch_size: int) -> None:
        self.ctx, self.position, self.batch_size = ctx, position, batch_size
        self.n_prompts = self.n_off_position = self.n_tokens = 0

    def __call__(self, prompts: Sequence[Prompt], desc: str) -> torch.Tensor:
        loaded = self.ctx.model
        tok = loaded.tokenizer
        seqs = []
        for p in prompts:
            ids = encode_prompt(tok, p.text)
            end = len(ids) + self.position + 1 if self.position < 0 else self.position + 1
            if not 0 < end <= len(ids):
                raise UserError(
                    f"absorption.prompt_token_pos={self.position} is outside a {len(ids)}-token prompt"
                )
            self.n_off_position += not word_at(ids, self.position, tok, p.word)
            # Causal model: the activation at the read position depends only on the tokens up to it.
            seqs.append(ids[:end])
        self.n_prompts += len(seqs)
        self.n_tokens += sum(len(s) for s in seqs)
        # Under torchrun each rank runs its share of the prompts and every rank gets every row (eval.ranks).
        return acts_at_positions(
            loaded, self.ctx.layer, seqs, -1, self.batch_size, self.ctx.progress, self.ctx.ranks
        )


def lm_data(ctx: EvalContext, cfg: Config) -> LMData:
    tok = ctx.model.tokenizer
    vocab = alpha_tokens(tok)
    reader = PromptReader(ctx, cfg.prompt_token_pos, cfg.llm_batch_size)
    data = prepare_lm(vocab, reader, cfg, ctx.seed, convert=lambda w: tok.convert_tokens_to_string([w]))
    data.diagnostics = {
        "prompts_run": reader.n_prompts,
        "prompt_tokens_run": reader.n_tokens,
        "prompts_whose_read_token_is_not_the_word": reader.n_off_position,
    }
    return data


# ----------------------------------------------------------------- per SAE


Encoder = Callable[[torch.Tensor], torch.Tensor]
SAEBENCH_SPARSE_BATCH = 4096


def sparse_probe_batch(cfg: Config, lm: LMData) -> int:
    """The latent-selection probe's minibatch (see Config.k_sparse_probe_batch_size)."""
    if cfg.k_sparse_probe_batch_size is not None:
        return cfg.k_sparse_probe_batch_size
    return max(1, round(SAEBENCH_SPARSE_BATCH * lm.n_selected / lm.n_vocab))


@dataclass
class SAEScores:
    split_feats: dict[str, list[int]]
    sparse_f1_by_k: dict[str, list[float]]
    sparse_feats_by_k: dict[str, list[list[int]]]
    l1_weight: torch.Tensor  # the latent-selection probe, (letters present, d_sae)
    word_fraction: dict[str, torch.Tensor]  # per usable letter, per re-prompted word
    word_full: dict[str, torch.Tensor]
    seconds: float = 0.0


def _encode(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 2048
) -> torch.Tensor:
    with torch.no_grad():
        parts = [encode(x[i : i + batch]).float() for i in range(0, len(x), batch)]
    return torch.cat(parts) if parts else torch.zeros(0)


def score_sae(
    lm: LMData,
    encode: Encoder,
    W_dec: torch.Tensor,
    cfg: Config,
    seed: int,
) -> SAEScores:
    """Steps 5-6 of the module doc for one SAE."""
    start = time.perf_counter()
    z_train = _encode(encode, lm.train_acts)
    z_test = _encode(encode, lm.test_acts)
    # SAEBench's latent-selection labels: one column per letter up to the last one present.
    l1_weight, _ = train_ovr_probe(
        z_train,
        one_hot(lm.train_labels),
        batch_size=sparse_probe_batch(cfg, lm),
        num_epochs=cfg.k_sparse_probe_num_epochs,
        lr=SPARSE_PROBE_LR,
        end_lr=END_LR,
        weight_decay=SPARSE_PROBE_WEIGHT_DECAY,
        l1=cfg.k_sparse_probe_l1_decay,
        seed=seed,
    )
    present = sorted(set(lm.train_labels.tolist()))
    f1_by_k: dict[str, list[float]] = {LETTERS[i]: [] for i in present}
    feats_by_k: dict[str, list[list[int]]] = {LETTERS[i]: [] for i in present}
    idx = torch.tensor(present, dtype=torch.long)
    y_train = lm.train_labels.unsqueeze(0) == idx.unsqueeze(1)  # (P, n_train)
    for k in range(1, min(cfg.max_k_value, z_train.shape[1]) + 1):
        feats = l1_weight[idx].topk(k, dim=1).indices  # (P, k): largest positive weights first
        x = z_train[:, feats].permute(1, 0, 2)  # (P, n_train, k)
        coef, intercept = fit_balanced_logistic(x, y_train)
        scores = torch.einsum("npk,pk->np", z_test[:, feats].double(), coef) + intercept
        for j, i in enumerate(present):
            letter = LETTERS[i]
            f1_by_k[letter].append(f1_score(lm.test_labels == i, scores[:, j] > 0))
            feats_by_k[letter].append(feats[j].tolist())
    split = {c: calc.split_features(f1_by_k[c], feats_by_k[c], cfg.f1_jump_threshold) for c in f1_by_k}

    fractions, fulls = {}, {}
    for c, acts in lm.reprompt_acts.items():
        if c not in split:
            continue
        i = LETTERS.index(c)
        latents = _encode(encode, acts)
        cos = calc.probe_cosines(lm.probe_weight[i], W_dec)
        fractions[c], fulls[c] = calc.word_scores(acts, latents, lm.probe_weight[i], cos, split[c])
    return SAEScores(split, f1_by_k, feats_by_k, l1_weight, fractions, fulls, time.perf_counter() - start)


# ----------------------------------------------------------------- results


def _kept(lm: LMData, scores: SAEScores) -> list[str]:
    """The letters scored: usable, with words re-prompted for this SAE."""
    return [c for c in lm.usable if c in scores.word_fraction]


def _word_values(scores: SAEScores, kept: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per kept letter, its words' (absorption fraction, full absorption), the HEADLINES' word values."""
    return [(scores.word_fraction[c], scores.word_full[c].double()) for c in kept]


def headline_replicates(lm: LMData, scores: SAEScores, cfg: Config, seed: int) -> torch.Tensor | None:
    """The HEADLINES' resampled values (len(HEADLINES), n_bootstrap): the vectors their intervals are
    taken from and the section's bootstrap_replicates; None when no headline is reported or there are no
    resamples."""
    kept = _kept(lm, scores)
    if len(kept) < cfg.min_feats_for_eval:
        return None
    return calc.letter_mean_replicates(_word_values(scores, kept), n_resamples=cfg.n_bootstrap, seed=seed)


def replicates_record(reps: torch.Tensor | None) -> dict[str, list[float | None]]:
    """{"mean.<headline>": its resampled values}, as eval.json stores them; empty without resamples."""
    if reps is None:
        return {}
    return {f"mean.{k}": uncertainty.replicates_json(r) for k, r in zip(HEADLINES, reps, strict=True)}


def resampled_items(lm: LMData, scores: SAEScores) -> dict[str, Any]:
    """Which words were resampled: letter by letter in resampling order (letter i draws with seed + i),
    with their count and a hash of the words. Equal for two SAEs means their replicates pair."""
    kept = _kept(lm, scores)
    words = json.dumps([[c, lm.true_positives[c]] for c in kept], ensure_ascii=False)
    return {
        "letters": [[c, int(scores.word_fraction[c].numel())] for c in kept],
        "words_sha256": hashlib.sha256(words.encode()).hexdigest()[:16],
    }


def summarize(
    lm: LMData, scores: SAEScores, cfg: Config, seed: int, reps: torch.Tensor | None = None
) -> tuple[dict, list[dict], dict]:
    """(eval_result_metrics, eval_result_details, eval_result_unstructured). `reps`: the headlines'
    resampled values when the caller already has them (`headline_replicates`); computed here otherwise."""
    kept = _kept(lm, scores)
    rows = [
        calc.letter_row(c, scores.word_fraction[c], scores.word_full[c], scores.split_feats[c]) for c in kept
    ]
    n_words = sum(r["num_probe_true_positives"] for r in rows)
    mean: dict[str, Any]
    reason = None
    if len(kept) < cfg.min_feats_for_eval:
        reason = (
            f"only {len(kept)} letters have an LM probe with test F1 > {cfg.min_GT_probe_f1} (need "
            f"{cfg.min_feats_for_eval}, SAEBench's min_feats_for_eval): the model does not represent "
            "enough first letters linearly at this layer"
            + ("" if cfg.max_words is None else f", or max_words={cfg.max_words} is too few words")
            + "; SAEBench reports nothing in this case"
        )
        mean = {k: None for k in MEAN_KEYS}
        mean.update({uncertainty.ci_key(k): None for k in HEADLINES})
        details: list[dict] = []
    else:
        mean = calc.headline(rows)
        reps = headline_replicates(lm, scores, cfg, seed) if reps is None else reps
        intervals = calc.replicate_intervals(reps, len(HEADLINES))
        for key, interval in zip(HEADLINES, intervals, strict=True):
            mean[uncertainty.ci_key(key)] = interval
        details = rows

    letters = []
    for i, c in enumerate(LETTERS):
        entry: dict[str, Any] = {
            "first_letter": c,
            "probe_f1": lm.probe_f1[i],
            "num_train_words": int((lm.train_labels == i).sum()),
            "num_test_words": int((lm.test_labels == i).sum()),
            "num_probe_true_positives": len(lm.true_positives[c]),
            "used": c in kept,
            "split_feats": scores.split_feats.get(c),
            "sparse_sae_f1_by_k": scores.sparse_f1_by_k.get(c),
        }
        if c in kept and reason is not None:
            # The gate failed: SAEBench stops here; the letter's numbers are kept for inspection only.
            entry["detail"] = calc.letter_row(
                c, scores.word_fraction[c], scores.word_full[c], scores.split_feats[c]
            )
        letters.append(entry)
    departures = [
        "each prompt is read at its own prompt_token_pos (SAEBench reads one index of a right-padded batch)",
        "k-sparse probes are solved to the optimum of sklearn's objective (sklearn stops at gradient 1e-4)",
        "re-prompts are drawn once and shared by all SAEs (SAEBench draws them again per SAE)",
        "words in token-id order before the seeded shuffle (SAEBench: the tokenizer's vocab dict order)",
    ]
    if cfg.max_words is not None:
        departures.insert(
            0,
            f"max_words={cfg.max_words}: {lm.n_selected} of {lm.n_vocab} alphabetic tokens used "
            "(SAEBench uses every one)",
        )
    batch = sparse_probe_batch(cfg, lm)
    if batch != SAEBENCH_SPARSE_BATCH:
        departures.append(
            f"latent-selection probe minibatch {batch} (SAEBench: {SAEBENCH_SPARSE_BATCH})"
            + (", scaled with the share of words used" if cfg.k_sparse_probe_batch_size is None else "")
        )
    missing = [c for c in LETTERS if c not in scores.split_feats]
    if missing:
        departures.append(
            "letters without train words get no k-sparse probe (SAEBench fails): " + "".join(missing)
        )
    unstructured = {
        "reason": reason,
        "num_letters_kept": len(kept),
        "letters_kept": "".join(kept),
        "num_words_scored": n_words if reason is None else 0,
        "num_words": {
            "alphabetic_tokens": lm.n_vocab,
            "used": lm.n_selected,
            "train": len(lm.train_words),
            "test": len(lm.test_words),
            "dropped_by_probe_data_filter": lm.n_dropped,
        },
        "lm_probe_mean_f1": statistics.mean(lm.probe_f1),
        "letters": letters,
        "departures_from_saebench": departures,
        "example_prompt": lm.example_prompt,
        "lm_diagnostics": lm.diagnostics,
        "seconds": {"lm_part": round(lm.seconds, 2), "sae_part": round(scores.seconds, 2)},
    }
    return {"mean": mean}, details, unstructured


def lm_key(cfg: Config) -> tuple[Any, ...]:
    """Every setting the LM side depends on (besides model, layer and seed)."""
    return (
        "absorption",
        cfg.prompt_template,
        cfg.prompt_token_pos,
        cfg.num_icl_examples,
        cfg.max_words,
        cfg.train_test_fraction,
        cfg.probe_batch_size,
        cfg.probe_num_epochs,
        cfg.probe_lr,
        cfg.probe_weight_decay,
        cfg.min_GT_probe_f1,
    )


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    cfg.validate()
    key = lm_key(cfg)
    fresh: list[bool] = []

    def compute() -> LMData:
        fresh.append(True)
        return lm_data(ctx, cfg)

    # The LM side (≈ 7 min on 2 CPU cores at 4000 words) is kept on disk where the caller gives a store.
    lm = ctx.memo_on_disk(key, compute, lambda d: dict(vars(d)), lambda state: LMData(**state))
    sae = folded(ctx.sae)
    W_dec = sae.W_dec.detach().float().cpu()
    device = sae.W_dec.device

    def encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x.to(device)).float().cpu()

    scores = score_sae(lm, encode, W_dec, cfg, ctx.seed)
    reps = headline_replicates(lm, scores, cfg, ctx.seed)
    metrics, details, unstructured = summarize(lm, scores, cfg, ctx.seed, reps)
    unstructured["seconds"]["lm_part_reused"] = not fresh
    n_units = unstructured["num_words_scored"]
    eval_config = {
        "model_name": ctx.model_name,
        "random_seed": ctx.seed,
        **asdict(cfg),
        "llm_dtype": "float32",
        "k_sparse_probe_batch_size": sparse_probe_batch(cfg, lm),  # the one used
        # The latents of the train words are computed once (SAEBench's option; the same numbers).
        "precalc_k_sparse_probe_sae_acts": True,
        "bootstrap_config": uncertainty.bootstrap_config(BOOTSTRAP_UNIT, n_units, cfg.n_bootstrap, ctx.seed)
        | {"items": resampled_items(lm, scores)},
        **fold_record(ctx.sae),
    }
    block = section(ctx, EVAL_TYPE_ID, eval_config, metrics, details, unstructured)
    block[uncertainty.REPLICATES_KEY] = replicates_record(reps)
    return block
