"""Unlearning by clamping SAE features (SAEBench's `clamp_feature_activation`), on generic jsonl sets.

Inputs: forget and retain multiple-choice sets, jsonl lines {"question", "choices": [...], "answer": i}
(optional "subject", "mcq_question"), and two plain-text corpora (jsonl {"text"}) of the forget and
retain domains. Defaults: the offline set built from the bundled corpora by
`eval.unlearning_data.build_unlearning_set()` (KJV verse completion = forget, modern-English sentence
completion = retain; cloze items, 4 single-word choices, chance = 0.25). SAEBench's own sets (WMDP-bio vs
four MMLU subjects) are the same format; its retain accuracy pools the subjects, so concatenate them.

0. The SAE's decoder norms are folded into its encoder first (eval.fold, as SAEBench), so the clamp value
   −multiplier means the same decoder-direction length for every latent. (Which latents fire, and so the
   feature selection, is unchanged by folding a ReLU SAE; the clamp strength is what changes.)
1. Questions, by `protocol` (eval.unlearning_prompts), and the questions kept:
   - "cloze" (offline default, for models too small for multiple choice): the question text, each choice
     scored by the logit of its first token; a question is kept if the unedited model answers it
     correctly.
   - "saebench_mcq" (SAEBench's protocol, for instruct models): the multiple-choice prompt in the chat
     template ending "Answer: (", letters scored; a question is kept only if the unedited model answers it
     correctly under every ordering of its choices (24 for 4), then asked in its own order.
2. Feature selection: each latent's firing frequency (fraction of tokens with latent > 0, BOS/EOS/pad not
   counted) on `dataset_size` packed sequences of `seq_len` tokens of each corpus. For a retain threshold
   t, latents with retain frequency ≥ t are ruled out and the rest ranked by forget frequency; the first n
   (n in n_features_list) are chosen (SAEBench's get_top_features).
3. Intervention: at block L's output h, z = encode(h); for the chosen latents, where z_f > 0 it is set to
   −multiplier. The model continues from h + Σ_f (z_edit_f − z_f)·W_dec[f]: only the edit's difference is
   added, so the SAE's reconstruction error is kept, as SAEBench does with its error term. Position 0 (BOS)
   is never edited.
4. Score (SAEBench): per intervention of the grid retain_thresholds × n_features_list × multipliers (16 by
   default), forget accuracy if retain accuracy ≥ retain_accuracy_min (0.99) else 1, both over the kept
   questions; unlearning_score = 1 − the minimum over the grid. `unlearning_score_ci95`: percentile
   bootstrap over questions (forget and retain questions resampled independently; every intervention's
   accuracies, the gate and the minimum recomputed in each resample). The minimum is selected on the same
   questions it is scored on (as SAEBench), so the score is optimistic; the interval includes the
   selection's variability, not its bias.

Work that does not depend on the SAE (the unedited answers, the ordering filter, block L's output on every
kept question, the corpora's tokens and, when small, their activations) is done once per model, layer and
config across an experiment's SAEs (EvalContext.memo). Interventions run only the blocks after L from the
cached block-L output (eval.unlearning_forward, checked against the full forward), only on questions where a
chosen latent fires (elsewhere the edit is zero and the answer is the baseline's), and stop scoring retain
questions once the gate is certain to fail in the full sample and every resample (the forget questions are
then not run at all); none of these shortcuts changes a number.

Under torchrun (`ctx.ranks`) the LM forwards are split as in the other evals (eval.ranks): one process's
forward batches, batch j on rank j mod W, where j counts on across the calls of one phase (a question set's
baseline and orderings; one SAE's whole intervention grid) so that short loops do not all start on rank 0.
Answers are filled by the rank that ran them, zeros elsewhere, and summed over ranks; the kept questions'
block-L outputs are put back the same way, so every rank holds one process's answers and outputs and takes
the same decisions. The corpora's batches stay on the rank that ran them: firing counts are summed over
ranks (integers, exact). Interventions run in rounds of W batches, one per rank; after each round the
answers are summed and the retain early stop is asked batch by batch in one process's order, so it stops
after the same batch (a round's later batches are then discarded). Every number equals one process's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from orthosae.activations.harvest import resid_post
from orthosae.errors import UserError
from orthosae.eval import uncertainty
from orthosae.eval.context import EvalContext
from orthosae.eval.fold import fold_record, folded
from orthosae.eval.prompt_acts import forward_batches
from orthosae.eval.ranks import Deal, check_same_inputs, owns, sum_rows_
from orthosae.eval.results import section
from orthosae.eval.unlearning_data import DEFAULT_QUESTIONS, build_unlearning_set, default_dir, read_jsonl
from orthosae.eval.unlearning_forward import answer, answer_from_hidden, gathered, upper_matches
from orthosae.eval.unlearning_prompts import (
    MAX_MCQ_CHOICES,
    chat_wrap,
    encode_cloze,
    letter_tokens,
    mcq_item,
    mcq_prompt,
    pack_corpus,
    tokenize_prompt,
)
from orthosae.eval.unlearning_score import (
    bootstrap_scores,
    gate_fails_everywhere,
    orderings,
    permute,
    score_from_tables,
    select_features,
    unlearning_score,
)
from orthosae.models.blocks import find_blocks
from orthosae.models.loader import LoadedModel
from orthosae.models.placement import input_device
from orthosae.train.distributed import Ranks, all_reduce_max_

__all__ = [
    "Config",
    "clamp_hook",
    "clamp_latents",
    "edited_residual",
    "evaluate",
    "select_features",
    "unlearning_score",
]

EVAL_TYPE_ID = "unlearning"
Protocol = Literal["cloze", "saebench_mcq"]
# Sizes left unset (None) take the protocol's: SAEBench's for its protocol; for the offline cloze set,
# sized for a 2-core CPU (SmolLM2-135M runs ≈ 120 tokens/s through all blocks on one core): the corpora
# (16k tokens a domain, 1/64 of SAEBench's) take a few minutes once per experiment, and 200 questions a
# set about 5 minutes per SAE for the 16 interventions. More questions barely narrow the interval (the
# retain gate, not the question count, dominates it: see the report of the unlearning rework).
PROTOCOL_DEFAULTS: dict[str, dict[str, int | None]] = {
    "saebench_mcq": {"dataset_size": 1024, "seq_len": 1024, "n_questions": None},
    "cloze": {"dataset_size": 128, "seq_len": 128, "n_questions": 200},
}
PROTOCOLS = {
    "cloze": "offline cloze: question text then each choice's first-token logit; kept if answered "
    "correctly once",
    "saebench_mcq": "SAEBench's MCQ: chat-template prompt ending 'Answer: (', letters A/B/C/D; kept if "
    "answered correctly under every ordering of the choices, then asked in the original order",
}
MAX_CACHED_BYTES = 1 << 31  # block-L outputs kept per question set / corpus activations kept, at most


@dataclass
class Config:
    protocol: Protocol = "cloze"
    """'cloze' (offline default: first-token scoring of cloze items, for models too small for multiple
    choice) or 'saebench_mcq' (SAEBench's chat-template multiple choice with the 24-ordering filter)."""
    forget_path: str | None = None
    """Forget multiple-choice jsonl; default data/unlearning/forget.jsonl (built if missing)."""
    retain_path: str | None = None
    """Retain multiple-choice jsonl (several subjects pooled in one file); default: retain.jsonl there."""
    forget_corpus_path: str | None = None
    """Forget-domain text (jsonl 'text') for firing frequencies; default: forget_corpus.jsonl there"""
    retain_corpus_path: str | None = None
    """Retain-domain text for firing frequencies; default data/unlearning/retain_corpus.jsonl."""
    forget_subject: str | None = None
    """saebench_mcq: the subject in 'The following are multiple choice questions … about {subject}.';
    default: each item's 'subject', else the file name (underscores as spaces)."""
    retain_subject: str | None = None
    """saebench_mcq: the retain set's subject; default as for forget_subject."""
    intervention_method: str = "clamp_feature_activation"
    """Only SAEBench's clamp is implemented: active chosen latents are set to −multiplier."""
    retain_thresholds: list[float] = field(default_factory=lambda: [0.001, 0.01])
    """Latents firing on at least this fraction of retain tokens are never chosen (SAEBench's values)."""
    n_features_list: list[int] = field(default_factory=lambda: [10, 20])
    """Numbers of latents clamped (SAEBench's values)."""
    multipliers: list[float] = field(default_factory=lambda: [25, 50, 100, 200])
    """Clamp values: the latent is set to −multiplier where it fires (SAEBench's values; 16 interventions)."""
    dataset_size: int | None = None
    """Packed corpus sequences per domain for firing frequencies; default: 1024 for saebench_mcq
    (SAEBench), 128 for cloze (sized for a CPU)."""
    seq_len: int | None = None
    """Tokens per packed corpus sequence (BOS included); default: 1024 for saebench_mcq, 128 for cloze."""
    n_questions: int | None = None
    """Questions used per set (the first n of the file); default: all for saebench_mcq, 200 for cloze.
    A file with fewer is refused (the offline set is built larger when needed)."""
    retain_accuracy_min: float = 0.99
    """An intervention counts only if retain accuracy (on the kept questions) stays at least this."""
    llm_batch_size: int = 8
    """Sequences per LM forward."""
    fold_decoder_norms: bool = True
    """Fold decoder norms into the encoder first (SAEBench does); off only to measure what folding changes."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the questions for unlearning_score_ci95 (0: no interval)."""

    def validate(self) -> None:
        if self.protocol not in PROTOCOL_DEFAULTS:
            raise UserError(f"unlearning.protocol must be 'cloze' or 'saebench_mcq', got {self.protocol!r}")
        if self.intervention_method != "clamp_feature_activation":
            raise UserError(
                f"unlearning.intervention_method {self.intervention_method!r} is not implemented: "
                "use 'clamp_feature_activation'"
            )
        for name in ("retain_thresholds", "n_features_list", "multipliers"):
            if not getattr(self, name):
                raise UserError(f"unlearning.{name} is empty: give at least one value")
        if any(n <= 0 for n in self.n_features_list):
            raise UserError(
                f"unlearning.n_features_list must hold positive counts, got {self.n_features_list}"
            )
        for name in ("dataset_size", "n_questions", "llm_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"unlearning.{name} must be positive, got {value}")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"unlearning.seq_len must be at least 2, got {self.seq_len}")
        if not 0 < self.retain_accuracy_min <= 1:
            raise UserError(
                f"unlearning.retain_accuracy_min must be in (0, 1], got {self.retain_accuracy_min}"
            )
        if self.n_bootstrap < 0:
            raise UserError(f"unlearning.n_bootstrap must be ≥ 0, got {self.n_bootstrap}")


def resolved(cfg: Config) -> Config:
    """`cfg` with the sizes left unset filled in from its protocol's defaults (n_questions may stay None:
    all questions)."""
    cfg.validate()
    defaults = PROTOCOL_DEFAULTS[cfg.protocol]
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


# ---------------------------------------------------------------- the intervention (pure + hook)


def clamp_latents(z: torch.Tensor, features: Sequence[int], multiplier: float) -> torch.Tensor:
    """z with each chosen latent set to −multiplier where it is active (> 0); other entries unchanged."""
    out = z.clone()
    idx = torch.as_tensor(list(features), dtype=torch.long)
    sub = out[..., idx]
    out[..., idx] = torch.where(sub > 0, torch.full_like(sub, -float(multiplier)), sub)
    return out


def edited_residual(
    h: torch.Tensor, sae: Any, features: Sequence[int], multiplier: float, skip_first: bool = True
) -> torch.Tensor:
    """h + decode(z_edit) − decode(z) for h (B, T, d); position 0 (BOS) untouched when `skip_first`."""
    flat = h.reshape(-1, h.shape[-1])
    z = sae.encode(flat.to(sae.W_dec.device, sae.W_dec.dtype))
    idx = torch.as_tensor(list(features), dtype=torch.long, device=z.device)
    dz = clamp_latents(z, features, multiplier)[:, idx] - z[:, idx]
    delta = (dz @ sae.W_dec[idx]).reshape(h.shape).to(h.dtype)
    if skip_first:
        delta[:, 0] = 0
    return h + delta.to(h.device)


@contextmanager
def clamp_hook(
    model: torch.nn.Module, layer: int, sae: Any, features: Sequence[int], multiplier: float
) -> Iterator[None]:
    """While active, block `layer`'s output is replaced by `edited_residual` of it."""

    def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
        if isinstance(output, tuple | list):
            return (edited_residual(output[0], sae, features, multiplier), *output[1:])
        assert isinstance(output, torch.Tensor)
        return edited_residual(output, sae, features, multiplier)

    handle = find_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- SAE-independent preparation


@dataclass
class QuestionSet:
    """The kept questions of one set, ready for interventions."""

    seqs: list[list[int]]  # prompt ids (original choice order)
    cands: list[list[list[int]]]  # per choice, its candidate answer tokens
    answers: torch.Tensor  # (n,) long
    hidden: list[torch.Tensor] | None  # block-L output per kept prompt (T_i, d), None when too big
    upper_ok: bool  # running only the blocks after L reproduces the full forward
    stats: dict[str, Any]  # baseline accuracy etc., for the JSON
    seconds: float = 0.0


def _fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _subject(cfg_subject: str | None, path: Path) -> str:
    return cfg_subject if cfg_subject is not None else path.stem.replace("_", " ")


def _read_questions(path: Path, n: int | None, name: str) -> list[dict]:
    items = read_jsonl(path)
    if n is not None and len(items) < n:
        raise UserError(
            f"the {name} set {path} has {len(items)} questions but unlearning.n_questions = {n}: "
            "lower n_questions (or leave it unset to use them all) or give a larger set"
        )
    for i, item in enumerate(items[:n]):
        if not {"question", "choices", "answer"} <= set(item):
            raise UserError(f"{path} line {i + 1}: a question needs 'question', 'choices' and 'answer'")
        if not isinstance(item["answer"], int) or not 0 <= item["answer"] < len(item["choices"]):
            raise UserError(f"{path} line {i + 1}: 'answer' must index 'choices', got {item['answer']!r}")
    return items[:n]


def prepare_questions(
    loaded: LoadedModel,
    layer: int,
    cfg: Config,
    path: Path,
    subject: str | None,
    name: str,
    ranks: Ranks | None = None,
) -> QuestionSet:
    """The unedited model's answers, the filter, and block L's output on the kept questions. With `ranks`,
    each rank runs its share of the forward batches and every rank returns the whole set."""
    start = time.perf_counter()
    tok = loaded.tokenizer
    items = _read_questions(path, cfg.n_questions, name)
    bs = cfg.llm_batch_size
    deal = Deal(ranks)
    if cfg.protocol == "cloze":
        seqs, cands, answers, used = encode_cloze(tok, items)
        check_same_inputs(seqs, ranks, f"unlearning {name} questions")
        ans = torch.tensor(answers, dtype=torch.long)
        capture = _fits(seqs, loaded.d_model)
        preds, hidden = answer(loaded, layer, seqs, cands, bs, capture=capture, deal=deal)
        correct = preds == ans
        keep = correct.nonzero().flatten().tolist()
        stats: dict[str, Any] = {
            "accuracy": float(correct.double().mean()) if seqs else None,
            "n_correct": len(keep),
            "prompt_example": items[used[0]]["question"] if used else None,
        }
        n_choices = [len(c) for c in cands]
    else:
        wrap = chat_wrap(tok, loaded.model_id)
        parsed = [mcq_item(it, _subject(subject, path)) for it in items]
        used = [i for i, p in enumerate(parsed) if 2 <= len(p[1]) <= MAX_MCQ_CHOICES]
        n_choices = [len(parsed[i][1]) for i in used]
        letters = letter_tokens(tok, max(n_choices, default=2))
        seqs = [tokenize_prompt(tok, mcq_prompt(p[0], p[1], p[3], wrap)) for p in (parsed[i] for i in used)]
        check_same_inputs(seqs, ranks, f"unlearning {name} questions")
        cands = [letters[:n] for n in n_choices]
        ans = torch.tensor([parsed[i][2] for i in used], dtype=torch.long)
        capture = _fits(seqs, loaded.d_model)
        preds, hidden = answer(loaded, layer, seqs, cands, bs, capture=capture, deal=deal)
        alive = preds == ans
        identity_correct = int(alive.sum())
        # Further orderings only for questions still alive: one wrong ordering rules a question out.
        perms = {n: orderings(n) for n in set(n_choices)}
        n_orderings = max((len(p) for p in perms.values()), default=1)
        for r in range(1, n_orderings):
            todo = [j for j in alive.nonzero().flatten().tolist() if r < len(perms[n_choices[j]])]
            if not todo:
                break
            prompts, targets = [], []
            for j in todo:
                question, choices, answer_i, subj = parsed[used[j]]
                permuted, target = permute(choices, answer_i, perms[n_choices[j]][r])
                prompts.append(tokenize_prompt(tok, mcq_prompt(question, permuted, subj, wrap)))
                targets.append(target)
            got, _ = answer(loaded, layer, prompts, [cands[j] for j in todo], bs, deal=deal)
            alive[todo] = got == torch.tensor(targets, dtype=torch.long)
        keep = alive.nonzero().flatten().tolist()
        first = parsed[used[0]] if used else None
        stats = {
            "accuracy": identity_correct / len(seqs) if seqs else None,
            "n_correct_original_order": identity_correct,
            "n_correct": len(keep),
            "n_orderings": n_orderings,
            "prompt_example": mcq_prompt(first[0], first[1], first[3], wrap) if first else None,
        }
    kept_hidden = None
    if hidden is not None:
        lengths = [len(seqs[i]) for i in keep]
        kept_hidden = gathered([hidden[i] for i in keep], lengths, loaded.d_model, ranks)
    upper_ok = False
    if kept_hidden:
        try:
            upper_ok, _ = upper_matches(loaded, layer, [seqs[i] for i in keep], kept_hidden)
        except Exception:  # a model family whose blocks cannot be given their output: full forwards
            upper_ok = False
        upper_ok = _on_every_rank(upper_ok, ranks)
    stats = {
        "n_items": len(items),
        "n_usable": len(seqs),
        "chance": sum(1 / n for n in n_choices) / len(n_choices) if n_choices else None,
        **stats,
        "kept_ids": [used[i] for i in keep],
    }
    return QuestionSet(
        [seqs[i] for i in keep],
        [cands[i] for i in keep],
        ans[keep] if keep else torch.zeros(0, dtype=torch.long),
        kept_hidden,
        upper_ok,
        stats,
        time.perf_counter() - start,
    )


def _fits(seqs: Sequence[Sequence[int]], d_model: int) -> bool:
    return sum(len(s) for s in seqs) * d_model * 4 <= MAX_CACHED_BYTES


def _on_every_rank(ok: bool, ranks: Ranks | None) -> bool:
    """`ok` on every rank (one process: `ok`), so that all ranks take the same path."""
    if ranks is None:
        return ok
    failed = all_reduce_max_(torch.tensor([0 if ok else 1]), ranks, "agreeing on the unlearning shortcut")
    return not bool(failed.item())


@dataclass
class Corpus:
    ids: torch.Tensor  # (rows, seq_len)
    counted: torch.Tensor  # (rows, seq_len) bool: not BOS/EOS/pad
    acts: torch.Tensor | None  # (rows, seq_len, d) block-L output when small enough to keep (see ranks)
    seconds: float = 0.0
    batch_size: int = 0  # the forward batch `acts` was run in (with `ranks`)
    ranks: Ranks | None = None  # under torchrun: each rank runs its batches (`acts` holds only those)


def own_starts(n_rows: int, batch_size: int, ranks: Ranks | None) -> list[int]:
    """The first row of each corpus batch this rank runs (batch j on rank j mod W)."""
    return [s for j, s in enumerate(range(0, n_rows, batch_size)) if owns(j, ranks)]


def prepare_corpus(
    loaded: LoadedModel, layer: int, cfg: Config, path: Path, seed: int, ranks: Ranks | None = None
) -> Corpus:
    """The packed corpus, and block L's output on it when small enough to keep (with `ranks`: on this
    rank's batches only; the firing counts are summed over ranks, so the rows never travel)."""
    start = time.perf_counter()
    texts = [str(r["text"]) for r in read_jsonl(path)]
    assert cfg.dataset_size is not None and cfg.seq_len is not None
    ids, counted = pack_corpus(loaded.tokenizer, texts, cfg.dataset_size, cfg.seq_len, seed)
    if len(ids) == 0:
        raise UserError(f"{path} holds fewer than {cfg.seq_len} tokens of text: lower unlearning.seq_len")
    check_same_inputs(ids.tolist(), ranks, f"unlearning corpus {path.name}")
    acts = None
    bs = cfg.llm_batch_size
    if ids.numel() * loaded.d_model * 4 <= MAX_CACHED_BYTES:  # one process's rule, so every rank agrees
        parts = [a for a, _ in _corpus_batches(loaded, layer, ids, counted, bs, ranks)]
        acts = torch.cat(parts) if parts else torch.zeros(0, ids.shape[1], loaded.d_model)
    return Corpus(ids, counted, acts, time.perf_counter() - start, bs, ranks)


def _corpus_batches(
    loaded: LoadedModel,
    layer: int,
    ids: torch.Tensor,
    counted: torch.Tensor,
    batch_size: int,
    ranks: Ranks | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    device = input_device(loaded.model)
    for start in own_starts(len(ids), batch_size, ranks):
        rows = ids[start : start + batch_size]
        yield (
            resid_post(loaded.model, rows.to(device), layer).float().cpu(),
            counted[start : start + batch_size],
        )


def _kept_batches(corpus: Corpus, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The kept activations in `batch_size` rows with their counted masks: every row in one process;
    under torchrun `acts` holds this rank's corpus batches only, end to end, so its chunks are those
    batches (the same rows one process encodes at once)."""
    assert corpus.acts is not None
    if corpus.ranks is None:
        counted = corpus.counted
    else:
        assert batch_size == corpus.batch_size, "encode in the batches the corpus was split in"
        starts = own_starts(len(corpus.ids), batch_size, corpus.ranks)
        counted = torch.cat([corpus.counted[s : s + batch_size] for s in starts] or [corpus.counted[:0]])
    for s in range(0, len(corpus.acts), batch_size):
        yield corpus.acts[s : s + batch_size], counted[s : s + batch_size]


# ---------------------------------------------------------------- SAE-dependent parts


@torch.no_grad()
def firing_frequency(
    loaded: LoadedModel, layer: int, sae: Any, corpus: Corpus, batch_size: int
) -> torch.Tensor:
    """Fraction of counted corpus tokens on which each latent is > 0, (d_sae,). Under torchrun (the
    corpus's `ranks`) each rank counts on its own batches and the counts are summed (integers in float64:
    exact)."""
    ranks = corpus.ranks
    counts = torch.zeros(sae.W_dec.shape[0] + 1, dtype=torch.float64)  # the last: tokens counted
    if corpus.acts is not None:
        batches = _kept_batches(corpus, batch_size)
    else:
        batches = _corpus_batches(loaded, layer, corpus.ids, corpus.counted, batch_size, ranks)
    device = sae.W_dec.device
    for acts, keep in batches:
        z = sae.encode(acts[keep].to(device, sae.W_dec.dtype))
        counts[:-1] += (z > 0).sum(dim=0).double().cpu()
        counts[-1] += int(keep.sum())
    sum_rows_(counts, ranks, "summing unlearning firing counts")
    return (counts[:-1] / max(int(counts[-1]), 1)).float()


@torch.no_grad()
def active_latents(
    loaded: LoadedModel, layer: int, sae: Any, qs: QuestionSet, batch_size: int, ranks: Ranks | None = None
) -> torch.Tensor:
    """(n, d_sae) bool: does each latent fire on any position after the first of each kept prompt. With
    `ranks`, each rank encodes its share (question i on rank i mod W from the kept outputs, else its forward
    batches) and the rows are summed over ranks."""
    out = torch.zeros(len(qs.seqs), sae.W_dec.shape[0], dtype=torch.uint8)  # summed as 0/1, then bool
    device = sae.W_dec.device
    if qs.hidden is not None:
        for i, h in enumerate(qs.hidden):
            if owns(i, ranks):
                out[i] = (sae.encode(h[1:].to(device, sae.W_dec.dtype)) > 0).any(dim=0).cpu()
    else:
        for idx, acts, mask in forward_batches(loaded, layer, qs.seqs, batch_size, ranks=ranks):
            keep = mask.clone()
            keep[:, 0] = False
            for row, i in enumerate(idx):
                z = sae.encode(acts[row][keep[row]].to(device, sae.W_dec.dtype))
                out[i] = (z > 0).any(dim=0).cpu()
    return sum_rows_(out, ranks, "gathering the latents active on unlearning questions").bool()


def _edited_answers(
    loaded: LoadedModel,
    layer: int,
    qs: QuestionSet,
    batch: list[int],
    batch_size: int,
    edit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The answers to the questions `batch` (one forward batch) under `edit`."""
    cands = [qs.cands[i] for i in batch]
    if qs.upper_ok and qs.hidden is not None:
        seqs, hidden = [qs.seqs[i] for i in batch], [qs.hidden[i] for i in batch]
        return answer_from_hidden(loaded, layer, seqs, hidden, cands, batch_size, edit)
    return answer(loaded, layer, [qs.seqs[i] for i in batch], cands, batch_size, edit=edit)[0]


def _wrong_answers(
    loaded: LoadedModel,
    layer: int,
    qs: QuestionSet,
    todo: list[int],
    batch_size: int,
    edit: Callable[[torch.Tensor], torch.Tensor],
    stop: Callable[[torch.Tensor], bool] | None = None,
    deal: Deal | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(wrong (n,) bool, known (n,) bool, questions run) under `edit` for the questions `todo`: the others
    keep their baseline answer, which is right. `stop(wrong so far)` is asked after each batch; once it
    says yes, the questions not yet run are left unknown (and counted right in `wrong`).

    With `deal`, the batches run in rounds of one per rank; each round's answers are summed over ranks,
    then taken batch by batch, with `stop` asked after each as in one process (so a round's batches after
    the stop are discarded and every rank returns one process's result)."""
    deal = deal if deal is not None else Deal()
    wrong = torch.zeros(len(qs.seqs), dtype=torch.bool)
    known = torch.ones(len(qs.seqs), dtype=torch.bool)
    known[todo] = False
    order = sorted(todo, key=lambda i: len(qs.seqs[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    run = 0
    for first in range(0, len(batches), deal.width):
        rnd = batches[first : first + deal.width]
        preds = torch.zeros(len(qs.seqs), dtype=torch.long)
        for batch in rnd:
            if deal.take():
                preds[batch] = _edited_answers(loaded, layer, qs, batch, batch_size, edit)
        sum_rows_(preds, deal.ranks, "gathering the unlearning answers")
        for batch in rnd:
            wrong[batch] = preds[batch] != qs.answers[batch]
            known[batch] = True
            run += len(batch)
            if stop is not None and run < len(order) and stop(wrong):
                return wrong, known, run
    return wrong, known, run


def _answers_string(wrong: torch.Tensor, known: torch.Tensor) -> str:
    """Per kept question: '1' right, '0' wrong, '?' not run (for paired comparisons across SAEs)."""
    marks = zip(wrong.tolist(), known.tolist(), strict=True)
    return "".join("?" if not k else ("0" if w else "1") for w, k in marks)


# ---------------------------------------------------------------- the eval


def _paths(cfg: Config) -> dict[str, Path]:
    given = {
        "forget": cfg.forget_path,
        "retain": cfg.retain_path,
        "forget_corpus": cfg.forget_corpus_path,
        "retain_corpus": cfg.retain_corpus_path,
    }
    if any(v is None for v in given.values()):
        # The offline set, built with at least as many questions as asked for.
        build_unlearning_set(default_dir(), n_questions=max(DEFAULT_QUESTIONS, cfg.n_questions or 0))
    paths = {k: Path(v) if v is not None else default_dir() / f"{k}.jsonl" for k, v in given.items()}
    for key, path in paths.items():
        if not path.is_file():
            raise UserError(f"unlearning.{key}_path: no such file {path}")
    return paths


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = resolved(cfg)
    torch.manual_seed(ctx.seed)
    loaded, layer = ctx.model, ctx.layer
    sae = folded(ctx.sae) if cfg.fold_decoder_norms else ctx.sae
    paths = _paths(cfg)
    shared_now = 0.0

    def memo(key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        nonlocal shared_now
        computed = []

        def timed() -> Any:
            computed.append(True)
            return compute()

        value = ctx.memo((EVAL_TYPE_ID, *key), timed)
        if computed:
            shared_now += value.seconds
        return value

    subjects = {"forget": cfg.forget_subject, "retain": cfg.retain_subject}
    sets: dict[str, QuestionSet] = {}
    corpora: dict[str, Corpus] = {}
    for name in ("forget", "retain"):
        path = paths[name]
        key = (
            "questions",
            cfg.protocol,
            _fingerprint(path),
            cfg.n_questions,
            subjects[name],
            cfg.llm_batch_size,
        )
        sets[name] = memo(
            key,
            lambda path=path, name=name: prepare_questions(
                loaded, layer, cfg, path, subjects[name], name, ctx.ranks
            ),
        )
    for name in ("forget", "retain"):
        path = paths[f"{name}_corpus"]
        key = ("corpus", _fingerprint(path), cfg.dataset_size, cfg.seq_len, cfg.llm_batch_size)
        corpora[name] = memo(
            key, lambda path=path: prepare_corpus(loaded, layer, cfg, path, ctx.seed, ctx.ranks)
        )

    bs, ranks = cfg.llm_batch_size, ctx.ranks
    freq = {n: firing_frequency(loaded, layer, sae, corpora[n], bs) for n in corpora}
    active = {n: active_latents(loaded, layer, sae, sets[n], bs, ranks) for n in sets}
    forget, retain = sets["forget"], sets["retain"]
    nf, nr = len(forget.seqs), len(retain.seqs)
    gate = cfg.retain_accuracy_min
    w_forget = uncertainty.resample_counts(nf, cfg.n_bootstrap, ctx.seed)
    w_retain = uncertainty.resample_counts(nr, cfg.n_bootstrap, ctx.seed + 1)

    grid = [(t, n, m) for t in cfg.retain_thresholds for n in cfg.n_features_list for m in cfg.multipliers]
    rows: list[dict[str, Any]] = []
    tables_f: list[torch.Tensor] = []
    tables_r: list[torch.Tensor] = []
    done: dict[tuple[tuple[int, ...], float], tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = {}
    runnable = nf > 0 and nr > 0
    deal = Deal(ranks)  # the grid's batches, dealt in turn: most interventions run only a batch or two
    for t, n, m in tqdm(grid, disable=not ctx.progress or not runnable, desc="unlearning", leave=False):
        feats = select_features(freq["forget"], freq["retain"], t, n)
        row: dict[str, Any] = {"retain_threshold": t, "n_features": n, "multiplier": m, "features": feats}
        key = (tuple(feats), float(m))
        if not runnable:
            rows.append({**row, "forget_accuracy": None, "retain_accuracy": None})
            continue
        if key in done:  # too few eligible latents: another setting chose the same ones; same answers
            prev, f_ok, r_ok = done[key]
            rows.append({**prev, **row})
            tables_f.append(f_ok)
            tables_r.append(r_ok)
            continue

        def edit(h: torch.Tensor, feats: list[int] = feats, m: float = m) -> torch.Tensor:
            return edited_residual(h, sae, feats, m)

        def touched(name: str, feats: list[int] = feats) -> list[int]:
            return active[name][:, feats].any(dim=1).nonzero().flatten().tolist() if feats else []

        r_todo = touched("retain")
        r_wrong, r_known, r_run = _wrong_answers(
            loaded,
            layer,
            retain,
            r_todo,
            cfg.llm_batch_size,
            edit,
            lambda wrong: gate_fails_everywhere(wrong, w_retain, gate),
            deal,
        )
        stopped = not bool(r_known.all())
        r_acc = int((~r_wrong).sum()) / nr  # correct count / n, as SAEBench and the table route compute it
        row.update(
            retain_accuracy=None if stopped else r_acc,
            retain_rerun=r_run,
            retain_touched=len(r_todo),
        )
        if stopped:
            row["retain_accuracy_at_most"] = r_acc
        if gate_fails_everywhere(r_wrong, w_retain, gate):
            # Effect 1 in the full sample and every resample: the forget answers cannot matter.
            f_wrong, f_known = torch.zeros(nf, dtype=torch.bool), torch.zeros(nf, dtype=torch.bool)
            row.update(forget_accuracy=None, forget_rerun=0, forget_skipped="retain gate fails everywhere")
        else:
            f_todo = touched("forget")
            f_wrong, f_known, f_run = _wrong_answers(loaded, layer, forget, f_todo, bs, edit, deal=deal)
            row.update(
                forget_accuracy=int((~f_wrong).sum()) / nf, forget_rerun=f_run, forget_touched=len(f_todo)
            )
        row.update(
            forget_correct=_answers_string(f_wrong, f_known), retain_correct=_answers_string(r_wrong, r_known)
        )
        rows.append(row)
        tables_f.append(~f_wrong)
        tables_r.append(~r_wrong)
        done[key] = (row, ~f_wrong, ~r_wrong)

    score, ci, best = None, None, None
    if runnable and tables_f:
        table_f, table_r = torch.stack(tables_f), torch.stack(tables_r)
        score = score_from_tables(table_f, table_r, gate)
        if cfg.n_bootstrap > 0 and nf >= 2:
            samples = bootstrap_scores(table_f, table_r, gate, w_forget, w_retain)
            ci = uncertainty.as_list(uncertainty.percentile_interval(samples))
        passed = [
            i for i, r in enumerate(rows) if r["retain_accuracy"] is not None and r["retain_accuracy"] >= gate
        ]
        if passed:
            best = min(passed, key=lambda i: rows[i]["forget_accuracy"])

    total = time.perf_counter() - start
    upper = forget.upper_ok and retain.upper_ok
    unstructured = {
        "protocol": cfg.protocol,
        "protocol_description": PROTOCOLS[cfg.protocol],
        "baseline": {"forget": forget.stats, "retain": retain.stats},
        "interventions": rows,
        "best_intervention": best,
        "frequency_corpus": {
            n: {
                "n_seqs": len(c.ids),
                "seq_len": int(c.ids.shape[1]),
                "n_tokens_counted": int(c.counted.sum()),
            }
            for n, c in corpora.items()
        },
        "note": (
            f"unlearning_score under the {cfg.protocol!r} protocol. Accuracies are over the kept questions "
            f"(forget {nf}, retain {nr}), which the unedited model answers correctly (baseline accuracy 1). "
            "The minimum over interventions is selected on the same questions it is scored on (as in "
            "SAEBench), so the score is optimistically biased; unlearning_score_ci95 resamples forget and "
            "retain questions independently and re-takes the minimum in each resample (the selection's "
            "variability, not its bias). forget_accuracy is None where the retain gate fails in the full "
            "sample and in every resample (the forget questions were not run: the effect is 1 there); "
            "retain_accuracy is None where scoring stopped once that was certain (retain_accuracy_at_most). "
            "forget_correct / retain_correct: per kept question (kept_ids order) 1 right, 0 wrong, ? not run."
        ),
        "upper_layers_only": upper,
        "timing_s": {
            "shared_computed_now": round(shared_now, 3),
            "shared_cost": round(sum(x.seconds for x in (*sets.values(), *corpora.values())), 3),
            "shared_cost_parts": {
                **{f"{n}_questions": round(q.seconds, 3) for n, q in sets.items()},
                **{f"{n}_corpus": round(c.seconds, 3) for n, c in corpora.items()},
            },
            "per_sae": round(total - shared_now, 3),
        },
    }
    eval_config = {
        "random_seed": ctx.seed,
        **asdict(cfg),
        "dataset_names": [paths["forget"].stem, paths["retain"].stem],
        "model_name": ctx.model_name,
        "llm_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        # SAEBench's "correct": right under every ordering; the cloze protocol asks each question once.
        "target_metric": "correct" if cfg.protocol == "saebench_mcq" else "correct (asked once)",
        **fold_record(ctx.sae),
        "decoder_norms_folded": bool(fold_record(ctx.sae)["decoder_norms_folded"]) and cfg.fold_decoder_norms,
        "bootstrap_config": {
            **uncertainty.bootstrap_config(
                "question (kept forget questions; retain questions resampled independently)",
                nf,
                cfg.n_bootstrap,
                ctx.seed,
            ),
            "n_units_retain": nr,
            "retain_seed": ctx.seed + 1,
            "selection": "min over the intervention grid re-taken in each resample, on the same questions",
        },
    }
    metrics = {"unlearning": {"unlearning_score": score, uncertainty.ci_key("unlearning_score"): ci}}
    return section(ctx, EVAL_TYPE_ID, eval_config, metrics, [], unstructured)
