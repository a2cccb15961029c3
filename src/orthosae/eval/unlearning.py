"""Unlearning by clamping SAE features (SAEBench's `clamp_feature_activation`), on generic jsonl sets.

Inputs: forget and retain multiple-choice sets, jsonl lines {"question", "choices": [...], "answer": i},
and two plain-text corpora (jsonl {"text"}) of the forget and retain domains. Defaults: the offline set
built from the bundled corpora by `eval.unlearning_data.build_unlearning_set()` (KJV verse completion =
forget, modern-English sentence completion = retain; cloze items, 4 single-word choices, chance = 0.25).

1. Feature selection: each latent's firing frequency (fraction of non-BOS tokens with latent > 0) on the
   forget corpus and on the retain corpus. For a retain threshold t, latents with retain frequency ≥ t
   are ruled out and the rest ranked by forget frequency; the first n (n in n_features_list) are chosen
   (SAEBench's get_top_features).
2. Intervention: at block L's output h, z = encode(h); for the chosen latents, where z_f > 0 it is set to
   −multiplier. The model continues from h + decode(z_edit) − decode(z) = h + Σ_f (z_edit_f − z_f)·W_dec[f]:
   only the edit's difference is added, so the SAE's reconstruction error (and everything the SAE leaves
   out) is kept, as SAEBench does with its error term. The BOS position is never edited.
3. Scoring: one forward per question. "cloze": the question is followed by each choice, compared by the
   log-prob of the choice's first token (items whose choices share a first token are dropped and
   counted); "letter": choices listed as A/B/C/D and the letters' log-probs compared.
4. Score: as SAEBench, only questions the unedited model answers correctly are kept (so baseline accuracy
   is 1 on them). Per intervention: forget accuracy if retain accuracy ≥ retain_accuracy_min (0.99) else
   1; unlearning_score = 1 − the minimum over interventions.

How meaningful this is at 135M parameters: the unedited model's accuracy on both sets is reported in the
JSON (eval_result_unstructured.baseline); with few correct questions the score moves in steps of
1/n_correct. A question where no chosen latent fires is provably unchanged, so it is not re-run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from orthosae.eval.context import EvalContext
from orthosae.eval.prompt_acts import forward_batches, pad_id_of, pad_right
from orthosae.eval.results import section
from orthosae.eval.unlearning_data import build_unlearning_set, default_dir, read_jsonl
from orthosae.models.blocks import find_blocks
from orthosae.models.loader import LoadedModel

EVAL_TYPE_ID = "unlearning"
LETTERS = "ABCDEFGHIJ"


@dataclass
class Config:
    forget_path: str | None = None
    """Forget multiple-choice jsonl; default data/unlearning/forget.jsonl (built if missing)."""
    retain_path: str | None = None
    """Retain multiple-choice jsonl; default data/unlearning/retain.jsonl."""
    forget_corpus_path: str | None = None
    """Forget-domain text (jsonl 'text') for firing frequencies; default: forget_corpus.jsonl there"""
    retain_corpus_path: str | None = None
    """Retain-domain text for firing frequencies; default data/unlearning/retain_corpus.jsonl."""
    intervention_method: str = "clamp_feature_activation"
    """Only SAEBench's clamp is implemented: active chosen latents are set to −multiplier."""
    retain_thresholds: list[float] = field(default_factory=lambda: [0.001, 0.01])
    """Latents firing on at least this fraction of retain tokens are never chosen."""
    n_features_list: list[int] = field(default_factory=lambda: [10, 20])
    """Numbers of latents clamped."""
    multipliers: list[float] = field(default_factory=lambda: [25, 50, 100, 200])
    """Clamp values (the latent is set to −multiplier where it fires)."""
    dataset_size: int = 300
    """Corpus texts per domain used for firing frequencies."""
    seq_len: int = 128
    """Tokens per corpus text (BOS included)."""
    n_questions: int = 100
    """Questions used per set (the first n of the file)."""
    scoring: str = "cloze"
    """'cloze' (first-token log-prob of each choice after the question) or 'letter' (A/B/C/D)."""
    retain_accuracy_min: float = 0.99
    """An intervention counts only if retain accuracy (on baseline-correct questions) stays at least this."""
    llm_batch_size: int = 8
    """Sequences per LM forward."""


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
    z = sae.encode(flat.to(sae.W_dec.dtype))
    idx = torch.as_tensor(list(features), dtype=torch.long)
    dz = clamp_latents(z, features, multiplier)[:, idx] - z[:, idx]
    delta = (dz @ sae.W_dec[idx]).reshape(h.shape).to(h.dtype)
    if skip_first:
        delta[:, 0] = 0
    return h + delta


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


# ---------------------------------------------------------------- feature selection


@torch.no_grad()
def firing_frequency(
    loaded: LoadedModel, layer: int, sae: Any, seqs: Sequence[Sequence[int]], batch_size: int, progress: bool
) -> torch.Tensor:
    """Fraction of non-BOS tokens on which each latent is > 0, (d_sae,); streamed over batches."""
    counts = torch.zeros(sae.W_dec.shape[0])
    total = 0
    for _, acts, mask in forward_batches(loaded, layer, seqs, batch_size, progress, "firing frequency"):
        keep = mask.clone()
        keep[:, 0] = False
        counts += (sae.encode(acts[keep]) > 0).float().sum(dim=0)
        total += int(keep.sum())
    return counts / max(total, 1)


def select_features(
    forget_freq: torch.Tensor, retain_freq: torch.Tensor, retain_threshold: float, n: int
) -> list[int]:
    """The n latents firing most often on forget text among those with retain frequency < threshold
    (latents that never fire on forget text are never chosen; ties break towards the lower index)."""
    score = torch.where(retain_freq >= retain_threshold, torch.zeros_like(forget_freq), forget_freq)
    order = torch.sort(score, descending=True, stable=True).indices
    return [int(i) for i in order[: min(n, int((score > 0).sum()))]]


# ---------------------------------------------------------------- multiple choice


def encode_items(
    tokenizer: Any, items: Sequence[dict], scoring: str, seq_len: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(prompt ids, choice token ids, answers) of the usable items (distinct choice tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    seqs, choice_ids, answers = [], [], []
    for item in items:
        choices = list(item["choices"])
        if scoring == "letter":
            listing = "".join(f"\n{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices))
            text = f"{item['question']}{listing}\nAnswer:"
            # The letter's own token: ' A' is one token in BPE vocabularies, the last byte in byte-level ones.
            cands = [
                tokenizer(" " + LETTERS[i], add_special_tokens=False)["input_ids"][-1]
                for i in range(len(choices))
            ]
        elif scoring == "cloze":
            text = item["question"]
            cands = [tokenizer(str(c), add_special_tokens=False)["input_ids"][0] for c in choices]
        else:
            raise ValueError(f"unknown scoring {scoring!r}: use 'cloze' or 'letter'")
        if len(set(cands)) != len(cands):
            continue
        ids = head + tokenizer(text, add_special_tokens=False)["input_ids"]
        seqs.append(ids[-seq_len:] if len(ids) > seq_len else ids)
        choice_ids.append(cands)
        answers.append(int(item["answer"]))
    return seqs, choice_ids, answers


@torch.no_grad()
def predict(
    loaded: LoadedModel, seqs: Sequence[Sequence[int]], choice_ids: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """Index of the choice with the highest next-token log-prob at each prompt's end, (N,)."""
    pad = pad_id_of(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    preds = torch.zeros(len(seqs), dtype=torch.long)
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[start : start + batch_size], pad)
        logits = loaded.model(
            input_ids=ids.to(device), attention_mask=mask.long().to(device), use_cache=False
        ).logits
        last = logits[torch.arange(len(ids)), mask.sum(dim=1) - 1].float().cpu()
        for row in range(len(ids)):
            cands = torch.as_tensor(list(choice_ids[start + row]))
            preds[start + row] = int(last[row, cands].argmax())
    return preds


@torch.no_grad()
def active_latents(
    loaded: LoadedModel, layer: int, sae: Any, seqs: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """(N, d_sae) bool: does each latent fire on any non-BOS token of each prompt."""
    out = torch.zeros(len(seqs), sae.W_dec.shape[0], dtype=torch.bool)
    for idx, acts, mask in forward_batches(loaded, layer, seqs, batch_size):
        keep = mask.clone()
        keep[:, 0] = False
        for row, i in enumerate(idx):
            out[i] = (sae.encode(acts[row][keep[row]]) > 0).any(dim=0)
    return out


# ---------------------------------------------------------------- the eval


def unlearning_score(results: Sequence[dict], retain_min: float) -> float | None:
    """1 − min over interventions of (forget accuracy if retain accuracy ≥ retain_min else 1)."""
    effects = [r["forget_accuracy"] if r["retain_accuracy"] >= retain_min else 1.0 for r in results]
    return 1.0 - min(effects) if effects else None


def _paths(cfg: Config) -> dict[str, Path]:
    given = {
        "forget": cfg.forget_path,
        "retain": cfg.retain_path,
        "forget_corpus": cfg.forget_corpus_path,
        "retain_corpus": cfg.retain_corpus_path,
    }
    if any(v is None for v in given.values()):
        build_unlearning_set(default_dir())
    return {k: Path(v) if v is not None else default_dir() / f"{k}.jsonl" for k, v in given.items()}


def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    torch.manual_seed(ctx.seed)
    loaded, sae, layer = ctx.model, ctx.sae, ctx.layer
    tok = loaded.tokenizer
    paths = _paths(cfg)
    bos = getattr(tok, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []

    def corpus(path: Path) -> list[list[int]]:
        texts = [r["text"] for r in read_jsonl(path)][: cfg.dataset_size]
        return [
            head + tok(t, add_special_tokens=False)["input_ids"][: cfg.seq_len - len(head)] for t in texts
        ]

    with torch.no_grad():
        freq = {
            name: firing_frequency(
                loaded, layer, sae, corpus(paths[f"{name}_corpus"]), cfg.llm_batch_size, ctx.progress
            )
            for name in ("forget", "retain")
        }
    sets, baseline = {}, {}
    for name in ("forget", "retain"):
        items = read_jsonl(paths[name])[: cfg.n_questions]
        seqs, cands, answers = encode_items(tok, items, cfg.scoring, cfg.seq_len)
        correct = predict(loaded, seqs, cands, cfg.llm_batch_size) == torch.tensor(answers, dtype=torch.long)
        keep = correct.nonzero().flatten().tolist()
        n_choices = [len(c) for c in cands]
        baseline[name] = {
            "n_items": len(items),
            "n_usable": len(seqs),
            "accuracy": float(correct.float().mean()) if len(seqs) else None,
            "chance": sum(1 / n for n in n_choices) / len(n_choices) if n_choices else None,
            "n_correct": len(keep),
        }
        kept = [seqs[i] for i in keep]
        sets[name] = (
            kept,
            [cands[i] for i in keep],
            torch.tensor([answers[i] for i in keep], dtype=torch.long),
            active_latents(loaded, layer, sae, kept, cfg.llm_batch_size),
        )

    runs = [(t, n, m) for t in cfg.retain_thresholds for n in cfg.n_features_list for m in cfg.multipliers]
    results = []
    done: dict[tuple[tuple[int, ...], float], dict[str, Any]] = {}
    for t, n, m in tqdm(runs, disable=not ctx.progress, desc="unlearning interventions", leave=False):
        feats = select_features(freq["forget"], freq["retain"], t, n)
        row: dict[str, Any] = {"retain_threshold": t, "n_features": n, "multiplier": m, "features": feats}
        key = (tuple(feats), float(m))
        if key in done:  # too few eligible latents: another setting chose the same ones; same answers
            results.append({**done[key], **row})
            continue
        for name, (seqs, cands, answers, active) in sets.items():
            if not seqs:
                row[f"{name}_accuracy"] = 1.0
                continue
            touched = active[:, feats].any(dim=1).nonzero().flatten().tolist() if feats else []
            correct = torch.ones(len(seqs), dtype=torch.bool)  # untouched questions keep the baseline answer
            if touched:
                with clamp_hook(loaded.model, layer, sae, feats, m):
                    pred = predict(
                        loaded, [seqs[i] for i in touched], [cands[i] for i in touched], cfg.llm_batch_size
                    )
                correct[touched] = pred == answers[touched]
            row[f"{name}_accuracy"] = float(correct.float().mean())
            row[f"{name}_rerun"] = len(touched)
        results.append(row)
        done[key] = row

    score = unlearning_score(results, cfg.retain_accuracy_min)
    forget_base = baseline["forget"]
    unstructured = {
        "baseline": baseline,
        "interventions": results,
        "note": (
            "accuracies are over the questions the unedited model answers correctly; baseline accuracy vs "
            f"chance: forget {forget_base['accuracy']} vs {forget_base['chance']}, retain "
            f"{baseline['retain']['accuracy']} vs {baseline['retain']['chance']}. With few correct questions "
            "the score is coarse; near-chance baselines make it meaningless."
        ),
    }
    eval_config = {
        "random_seed": ctx.seed,
        **asdict(cfg),
        "model_name": ctx.model_name,
        "llm_dtype": "float32",
        "target_metric": "correct",
    }
    return section(
        ctx, EVAL_TYPE_ID, eval_config, {"unlearning": {"unlearning_score": score}}, [], unstructured
    )
