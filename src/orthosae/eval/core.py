"""Core eval (SAEBench `core`): reconstruction, sparsity, downstream loss with the SAE spliced in, feature
density, and the orthogonality statistics of co-active latents.

Data: packed contexts of the eval corpus, taken after the contexts the SAE was trained on (see
`HeldOut`). Every forward batch of `batch_size_prompts` contexts is one "batch" below. The first
`n_eval_reconstruction_batches` batches run the model three times (clean, SAE spliced in at block L, block L
zero-ablated) for CE and KL; the first `n_eval_sparsity_variance_batches` batches feed the reconstruction,
sparsity, density and orthogonality statistics (reusing the clean run's block-L output where a batch is in
both sets; otherwise a forward stopped at block L). Special tokens (BOS, EOS, pad) are excluded from every
average; with `exclude_special_tokens_from_reconstruction` they also keep their original hidden state
when the SAE is spliced in (SAEBench's convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from orthosae.activations.harvest import resid_post
from orthosae.data.pack import Contexts, iter_contexts
from orthosae.data.texts import describe, iter_texts
from orthosae.errors import UserError
from orthosae.eval import metrics as M
from orthosae.eval.context import EvalContext
from orthosae.eval.results import core_section
from orthosae.eval.splice import run_spliced
from orthosae.sae import SAE


@dataclass
class Config:
    dataset: str = "bundled"
    """Corpus of eval text: 'bundled', a .txt/.jsonl/.parquet file, or a dataset id."""
    context_size: int = 128
    """Tokens per eval context (BOS included)."""
    batch_size_prompts: int = 8
    """Contexts per forward batch."""
    n_eval_reconstruction_batches: int = 10
    """Batches on which CE loss and KL divergence are measured (three full forward passes each)."""
    n_eval_sparsity_variance_batches: int = 40
    """Batches for reconstruction, sparsity, feature density and orthogonality statistics."""
    compute_kl: bool = True
    """Measure KL divergence to the clean model with the SAE spliced in and with zero ablation."""
    compute_ce_loss: bool = True
    """Measure next-token cross-entropy clean, with the SAE spliced in and with zero ablation."""
    compute_orthogonality: bool = True
    """Decoder cos² statistics over latent pairs that fire on the same token."""
    exclude_special_tokens_from_reconstruction: bool = True
    """Leave BOS/EOS/pad positions unreconstructed when splicing (they are never averaged over anyway)."""
    skip_contexts: int = -1
    """Contexts to skip before the eval data; -1: skip those the SAE was trained on (from its cfg.json)."""
    density_bins_per_decade: int = 4
    """Resolution of the log10 feature-density histogram."""
    coactivation_max_latents: int = 64
    """Orthogonality statistics use each token's strongest latents up to this many (all of TopK's k when
    k is smaller; a ReLU SAE with a large L0 would otherwise cost O(L0²) per token)."""

    def validate(self) -> None:
        for name in (
            "context_size",
            "batch_size_prompts",
            "density_bins_per_decade",
            "coactivation_max_latents",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"core.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_eval_reconstruction_batches", "n_eval_sparsity_variance_batches"):
            if getattr(self, name) < 0:
                raise UserError(f"core.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.skip_contexts < -1:
            raise UserError(f"core.skip_contexts must be -1 (auto) or ≥ 0, got {self.skip_contexts}")


# ----------------------------------------------------------------- held-out data


def training_tokens(sae_cfg: dict[str, Any], dataset: str, context_size: int) -> tuple[int, str]:
    """Kept tokens of the eval corpus the SAE was trained on (0 if another corpus), and why."""
    src = sae_cfg.get("activations_source")
    if not isinstance(src, dict) or not isinstance(src.get("n_tokens"), int):
        return 0, "unknown training data (no activations_source.n_tokens in cfg.json): nothing skipped"
    if src.get("corpus") != describe(dataset):
        return 0, f"trained on corpus {src.get('corpus')!r}, evaluated on another: nothing skipped"
    if src.get("context_size") not in (None, context_size):
        # Different packing: contexts do not line up, so skip by tokens with a whole-context margin.
        n = int(src["n_tokens"]) + int(src["context_size"])
        return n, f"trained on {src['n_tokens']} tokens of this corpus (other context size; margin added)"
    return int(src["n_tokens"]), f"trained on the first {src['n_tokens']} kept tokens of this corpus"


class HeldOut:
    """Batches of contexts after the first `skip_tokens` kept tokens (or `skip_contexts` contexts).

    Training consumed contexts in corpus order: a cache keeps the kept (non-special) tokens of contexts
    0, 1, … until it holds n_tokens; a live stream takes ⌈n_tokens / (context_size − 1)⌉ contexts, never
    more than that. So the first context after the one where the running count of kept tokens reaches
    n_tokens is unseen by either. `first_context` holds that index once iteration has started.
    """

    def __init__(
        self,
        texts: Iterable[str],
        tokenizer: Any,
        *,
        context_size: int,
        batch: int,
        skip_tokens: int = 0,
        skip_contexts: int | None = None,
    ) -> None:
        self.texts, self.tokenizer = texts, tokenizer
        self.context_size, self.batch = context_size, batch
        self.skip_tokens, self.skip_contexts = skip_tokens, skip_contexts
        self.first_context: int | None = None

    def __iter__(self) -> Iterator[Contexts]:
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        first_of_pending = 0
        seen = 0
        started = self.skip_contexts is not None or self.skip_tokens <= 0
        if self.skip_contexts is not None:
            self.first_context = self.skip_contexts
        elif started:
            self.first_context = 0
        stream = iter_contexts(
            self.texts,
            self.tokenizer,
            context_size=self.context_size,
            batch_contexts=self.batch,
            skip_contexts=self.skip_contexts or 0,
        )
        for b in stream:
            for row in range(len(b.tokens)):
                if not started:
                    seen += int(b.mask[row].sum())
                    if seen >= self.skip_tokens:
                        started = True
                        self.first_context = b.first_index + row + 1
                    continue
                if not pending:
                    first_of_pending = b.first_index + row
                pending.append((b.tokens[row], b.mask[row]))
                if len(pending) == self.batch:
                    yield _stack(pending, first_of_pending)
                    pending = []
        if pending:
            yield _stack(pending, first_of_pending)


def _stack(rows: list[tuple[torch.Tensor, torch.Tensor]], first: int) -> Contexts:
    return Contexts(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), first)


# ----------------------------------------------------------------- SAE helpers


def encode_sparse(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̂, acts, idx): the reconstruction and the latents as (T, w) values and indices (0 = not firing)."""
    out = sae(x)
    if out.top_acts is not None and out.top_indices is not None:
        return out.x_hat, out.top_acts, out.top_indices
    latents = out.latents if out.latents is not None else sae.encode(x)
    acts, idx = M.sparse_latents(latents)
    return out.x_hat, acts, idx


@dataclass
class _LossSums:
    ce_clean: float = 0.0
    ce_sae: float = 0.0
    ce_abl: float = 0.0
    n_ce: int = 0
    kl_sae: float = 0.0
    kl_abl: float = 0.0
    n_kl: int = 0


def _accumulate_losses(s: _LossSums, out: Any, tokens: torch.Tensor, keep: torch.Tensor, cfg: Config) -> None:
    if cfg.compute_ce_loss:
        m = keep[:, :-1]  # CE at position t predicts token t+1; skip positions holding a special token
        s.ce_clean += float(M.ce_per_position(out.clean, tokens)[m].double().sum())
        s.ce_sae += float(M.ce_per_position(out.spliced, tokens)[m].double().sum())
        s.ce_abl += float(M.ce_per_position(out.ablated, tokens)[m].double().sum())
        s.n_ce += int(m.sum())
    if cfg.compute_kl:
        s.kl_sae += float(M.kl_per_position(out.clean, out.spliced)[keep].double().sum())
        s.kl_abl += float(M.kl_per_position(out.clean, out.ablated)[keep].double().sum())
        s.n_kl += int(keep.sum())


def _loss_metrics(s: _LossSums) -> tuple[dict[str, float], dict[str, float]]:
    behaviour: dict[str, float] = {}
    performance: dict[str, float] = {}
    if s.n_kl:
        kl_sae, kl_abl = s.kl_sae / s.n_kl, s.kl_abl / s.n_kl
        behaviour = {
            "kl_div_score": M.score(kl_abl, kl_sae),
            "kl_div_with_ablation": kl_abl,
            "kl_div_with_sae": kl_sae,
        }
    if s.n_ce:
        clean, sae, abl = s.ce_clean / s.n_ce, s.ce_sae / s.n_ce, s.ce_abl / s.n_ce
        performance = {
            "ce_loss_score": M.score(abl, sae, clean),
            "ce_loss_with_ablation": abl,
            "ce_loss_with_sae": sae,
            "ce_loss_without_sae": clean,
        }
    return behaviour, performance


# ----------------------------------------------------------------- the eval


@torch.no_grad()
def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    cfg.validate()
    loaded = ctx.model
    sae = ctx.sae
    if loaded.d_model != sae.d_in:
        raise UserError(
            f"the SAE expects d_in={sae.d_in} but {ctx.model_name} has d_model={loaded.d_model}: "
            "wrong --model?"
        )
    if not -loaded.n_layers <= ctx.layer < loaded.n_layers:
        raise UserError(f"layer {ctx.layer} is out of range: {ctx.model_name} has {loaded.n_layers} layers")
    device = next(loaded.model.parameters()).device
    sae = sae.to(device)

    if cfg.skip_contexts >= 0:
        skip_tokens, why = 0, f"skip_contexts={cfg.skip_contexts} given"
    else:
        skip_tokens, why = training_tokens(ctx.sae_cfg, cfg.dataset, cfg.context_size)
    data = HeldOut(
        iter_texts(cfg.dataset),
        loaded.tokenizer,
        context_size=cfg.context_size,
        batch=cfg.batch_size_prompts,
        skip_tokens=skip_tokens,
        skip_contexts=cfg.skip_contexts if cfg.skip_contexts >= 0 else None,
    )
    n_recon = cfg.n_eval_reconstruction_batches if (cfg.compute_kl or cfg.compute_ce_loss) else 0
    n_sparse = cfg.n_eval_sparsity_variance_batches
    n_batches = max(n_recon, n_sparse)

    recon = M.ReconStats()
    feats = M.FeatureStats(sae.d_sae)
    coact = M.CoactivationStats(sae.W_dec) if cfg.compute_orthogonality else None
    losses = _LossSums()
    n_done = 0
    bar = _progress(ctx.progress, n_batches)
    batches = iter(data)
    try:
        for i in range(n_batches):
            batch = next(batches, None)
            if batch is None:
                break
            tokens, keep = batch.tokens.to(device), batch.mask.to(device)
            splice_mask = keep if cfg.exclude_special_tokens_from_reconstruction else torch.ones_like(keep)
            hidden = None
            if i < n_recon:
                out = run_spliced(loaded.model, ctx.layer, tokens, splice_mask, sae.reconstruct)
                _accumulate_losses(losses, out, tokens, keep, cfg)
                hidden = out.hidden
                del out
            elif i < n_sparse:
                hidden = resid_post(loaded.model, tokens, ctx.layer)
            if i < n_sparse:
                assert hidden is not None
                x = hidden[keep].float()
                x_hat, acts, idx = encode_sparse(sae, x)
                recon.update(x, x_hat)
                feats.update(acts, idx)
                if coact is not None:  # sparse_latents sorts by activation, so this keeps the strongest
                    cap = cfg.coactivation_max_latents
                    coact.update(acts[:, :cap], idx[:, :cap])
            n_done = i + 1
            bar.update(1)
    finally:
        bar.close()
    if n_done == 0:
        raise UserError(
            f"no held-out text left in corpus {cfg.dataset!r} after skipping the SAE's training tokens "
            f"({why}); evaluate on another corpus (core.dataset) or set core.skip_contexts"
        )

    behaviour, performance = _loss_metrics(losses)
    rq = recon.result()
    fs = feats.result(cfg.density_bins_per_decade)
    reconstruction_quality = {
        "explained_variance": rq.get("explained_variance"),
        "explained_variance_legacy": rq.get("explained_variance_legacy"),
        "mse": rq.get("mse"),
        "cossim": rq.get("cossim"),
        "explained_variance_saebench": rq.get("explained_variance_saebench"),
        "mse_per_element": rq.get("mse_per_element"),
        "formulas": {k: M.FORMULAS[k] for k in rq if k in M.FORMULAS},
    }
    metrics: dict[str, Any] = {
        "model_behavior_preservation": behaviour,
        "model_performance_preservation": performance,
        "reconstruction_quality": reconstruction_quality,
        "shrinkage": {
            k: rq.get(k) for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
        }
        | {
            "formulas": {
                k: M.FORMULAS[k]
                for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
            }
        },
        "sparsity": {
            "l0": fs["l0"],
            "l1": fs["l1"],
            "formulas": {"l0": M.FORMULAS["l0"], "l1": M.FORMULAS["l1"]},
        },
        "token_stats": {
            "total_tokens_eval_reconstruction": losses.n_kl or losses.n_ce,
            "total_tokens_eval_sparsity_variance": recon.n,
        },
        "misc": {
            "frac_alive": fs["frac_alive"],
            "frac_dead": fs["frac_dead"],
            "freq_over_1_percent": fs["freq_over_1_percent"],
            "freq_over_10_percent": fs["freq_over_10_percent"],
            "feature_density_histogram": fs["feature_density_histogram"],
        },
    }
    if coact is not None:
        metrics["orthogonality"] = coact.result() | {"formulas": M.COACT_FORMULAS}
    metrics = _finite(metrics)
    eval_cfg = {
        "model_name": ctx.model_name,
        "llm_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        **asdict(cfg),
        "layer": ctx.layer,
        "heldout_first_context": data.first_context,
        "heldout_rule": why,
        "batches_run": n_done,
    }
    return core_section(ctx, eval_cfg, metrics)


def _finite(obj: Any) -> Any:
    """NaN/inf → None: JSON has no NaN, and a missing value must not look like a number."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _progress(enabled: bool, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="core eval", unit="batch", disable=not enabled, leave=False)
