"""Core eval (SAEBench `core`): reconstruction, sparsity, downstream loss with the SAE spliced in, feature
density, and the orthogonality statistics of co-active latents, each headline number with a bootstrap 95 %
interval (`<metric>_ci95`).

Data: packed contexts of the eval corpus, taken after the contexts the SAE was trained on (see
`HeldOut`). Every forward batch of `batch_size_prompts` contexts is one "batch" below. The first
`n_eval_reconstruction_batches` batches run the model clean, with the SAE spliced in at block L and with
block L zero-ablated, for CE and KL; the first `n_eval_sparsity_variance_batches` batches feed the
reconstruction, sparsity, density and orthogonality statistics (reusing the clean run's block-L output where
a batch is in both sets; otherwise a forward stopped at block L).

Token sets. The headline metrics use the tokens the SAE was trained on: not special (BOS, EOS, pad), and
not above `remove_high_norm` × the median norm of the non-special tokens of their forward batch, the rule
training's harvest applies to each of its forward batches of contexts (8 by default, as
`batch_size_prompts`). The factor is the SAE's own, from its cfg.json. In the spliced forward an excluded
token keeps its original hidden state and CE/KL average over the kept positions. `metrics.all_tokens`
repeats every group on all non-special tokens, each reconstructed in the splice (one more spliced forward,
on just the contexts holding an excluded token). Special tokens are never averaged over; with
`exclude_special_tokens_from_reconstruction` off they are reconstructed in both splices (SAEBench's option).

Intervals: percentile bootstrap over eval contexts (see `core_stats`); the resampled values of the headline
metrics are kept in section["bootstrap_replicates"] for paired comparisons between SAEs.

Under torchrun (`ctx.ranks`), forward batch i runs on rank i mod W (eval.ranks); the ranks then exchange
what their batches left behind and every rank holds what one process collects (per-context sums and
excluded positions in batch order, counts summed, co-active pairs combined), so the metrics and their
intervals are one process's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orthosae.activations.harvest import high_norm_kept, resid_post
from orthosae.data.pack import Contexts, iter_contexts
from orthosae.data.texts import describe, iter_texts
from orthosae.errors import UserError
from orthosae.eval import core_stats as S
from orthosae.eval import metrics as M
from orthosae.eval import uncertainty as U
from orthosae.eval.context import EvalContext
from orthosae.eval.ranks import gather_objects, n_owned, owns
from orthosae.eval.results import core_section
from orthosae.eval.splice import Splicer, clean_run
from orthosae.models.placement import input_device
from orthosae.sae import SAE
from orthosae.train.distributed import Ranks, all_reduce_max_

DEFAULT_HIGH_NORM = 10.0  # training's default (`orthosae train/cache --remove-high-norm`)


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
    remove_high_norm: float = -1.0
    """Leave out of the headline metrics (and unreconstructed in the splice) tokens whose norm exceeds this
    multiple of their forward batch's median, as training did; -1: the SAE's factor from its cfg.json
    (10 when it records none), 0: keep every non-special token."""
    all_tokens: bool = True
    """Also report every metric on all non-special tokens (metrics.all_tokens), all reconstructed in the
    splice: one more spliced forward per reconstruction batch, on the contexts holding an excluded token."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the eval contexts for the 95 % intervals (0: no intervals)."""
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
        if not (self.remove_high_norm == -1 or self.remove_high_norm >= 0):
            raise UserError(f"core.remove_high_norm must be -1 (auto) or ≥ 0, got {self.remove_high_norm}")
        if self.n_bootstrap < 0:
            raise UserError(f"core.n_bootstrap must be ≥ 0, got {self.n_bootstrap}")


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


def high_norm_rule(sae_cfg: dict[str, Any], given: float = -1.0) -> tuple[float, str]:
    """The high-norm factor the SAE was trained with (0: none), and where that comes from."""
    if given >= 0:
        return float(given), f"core.remove_high_norm={given:g} given"
    src = sae_cfg.get("activations_source")
    if isinstance(src, dict) and _is_number(src.get("remove_high_norm")):
        f = float(src["remove_high_norm"])
        return f, f"the SAE's training rule (cfg.json activations_source.remove_high_norm = {f:g})"
    train = sae_cfg.get("training")
    # Streamed training applied training.remove_high_norm; for a plain array it says nothing of the data.
    if (
        isinstance(train, dict)
        and train.get("activations") is None
        and _is_number(train.get("remove_high_norm"))
    ):
        f = float(train["remove_high_norm"])
        return f, f"the SAE's training rule (cfg.json training.remove_high_norm = {f:g}, streamed)"
    return DEFAULT_HIGH_NORM, f"default {DEFAULT_HIGH_NORM:g}: the SAE's cfg.json records no high-norm rule"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


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
class TokenMasks:
    """The token sets of one forward batch, (B, T) bool each."""

    nonspecial: torch.Tensor  # every token but BOS/EOS/pad: the all-tokens set
    kept: torch.Tensor  # the training set: non-special and not high-norm
    splice_kept: torch.Tensor  # positions reconstructed in the default splice
    splice_all: torch.Tensor  # positions reconstructed in the all-tokens splice

    @property
    def excluded(self) -> torch.Tensor:
        return self.nonspecial & ~self.kept


def token_masks(
    hidden: torch.Tensor, nonspecial: torch.Tensor, factor: float, splice_special: bool
) -> TokenMasks:
    """The trained-on tokens of a forward batch by training's rule (`harvest`'s high_norm_kept: the median is
    over this batch's non-special tokens), and the positions each splice reconstructs."""
    kept = high_norm_kept(hidden, nonspecial, factor)
    special = ~nonspecial if splice_special else torch.zeros_like(nonspecial)
    return TokenMasks(nonspecial, kept, kept | special, nonspecial | special)


def position_losses(
    logits: torch.Tensor, clean: torch.Tensor, tokens: torch.Tensor, cfg: Config
) -> dict[str, torch.Tensor]:
    """Per-position CE (B, T−1) and KL to the clean model (B, T) of one run's logits."""
    out = {}
    if cfg.compute_ce_loss:
        out["ce"] = M.ce_per_position(logits, tokens).double()
    if cfg.compute_kl:
        out["kl"] = M.kl_per_position(clean, logits).double()
    return out


def loss_sums(
    clean: dict[str, torch.Tensor],
    sae: dict[str, torch.Tensor],
    abl: dict[str, torch.Tensor],
    keep: torch.Tensor,
) -> S.Sums:
    """Per-context sums of the losses over the positions of `keep` (B, T): CE at position t predicts token
    t+1 and counts when token t is kept; KL counts at kept positions."""
    out: S.Sums = {}
    k = keep.double()
    if "ce" in sae:
        m = k[:, :-1]
        out |= {"ce_clean": (clean["ce"] * m).sum(1), "ce_sae": (sae["ce"] * m).sum(1)}
        out |= {"ce_abl": (abl["ce"] * m).sum(1), "n_ce": m.sum(1)}
    if "kl" in sae:
        out |= {"kl_sae": (sae["kl"] * k).sum(1), "kl_abl": (abl["kl"] * k).sum(1), "n_kl": k.sum(1)}
    return {key: v.cpu() for key, v in out.items()}


# ----------------------------------------------------------------- accumulation over batches


@dataclass
class _Collected:
    """Everything the batches leave behind: per-context sums, feature counts, co-activations, counts."""

    recon: dict[str, S.ContextSums]  # "kept", "excluded": reconstruction/sparsity/orthogonality sums
    legacy_all: S.ContextSums  # legacy EV of the all-tokens set (its own batch means)
    losses: dict[str, S.ContextSums]  # "kept", "all"
    feats: dict[str, M.FeatureStats]
    coact: dict[str, M.CoactivationStats] | None
    n_special: int = 0
    n_excluded_reconstruction: int = 0
    contexts_with_excluded: int = 0
    positions: list[tuple[int, list[int]]] = field(default_factory=list)  # (batch, excluded positions)
    norm_over_median: list[float] = field(default_factory=list)
    all_tokens_forward_s: float = 0.0
    all_tokens_contexts: int = 0


def _sparsity_batch(
    col: _Collected, sae: SAE, hidden: torch.Tensor, masks: TokenMasks, cfg: Config, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode forward batch `batch`'s tokens, add the statistics of both token sets; returns the positions
    encoded and their x̂ (for the splice)."""
    encoded = masks.splice_all
    x = hidden[encoded].float()
    x_hat, acts, idx = encode_sparse(sae, x)
    context = encoded.nonzero()[:, 0]
    B = len(hidden)
    for name, where in (("kept", masks.kept), ("excluded", masks.excluded)):
        sel = where[encoded]
        values = S.recon_token_values(x[sel], x_hat[sel], acts[sel])
        if name == "kept":  # legacy EV: per-token ratio against this set's batch mean
            values["legacy"] = S.legacy_token_values(x[sel], x_hat[sel])
        col.feats[name].update(acts[sel], idx[sel])
        if col.coact is not None:  # sparse_latents sorts by activation, so this keeps the strongest
            cap = cfg.coactivation_max_latents
            per = col.coact[name].update(acts[sel][:, :cap], idx[sel][:, :cap]).to(x.device)
            values |= {f"coact_{k}": per[:, j] for j, k in enumerate(("s", "c", "ps", "p"))}
        col.recon[name].add(S.by_context(values, context[sel], B), batch)
    sel = masks.nonspecial[encoded]
    legacy = {"legacy": S.legacy_token_values(x[sel], x_hat[sel])}
    col.legacy_all.add(S.by_context(legacy, context[sel], B), batch)

    excluded = masks.excluded
    col.n_special += int((~masks.nonspecial).sum())
    col.contexts_with_excluded += int(excluded.any(1).sum())
    if bool(excluded.any()):
        col.positions.append((batch, excluded.nonzero()[:, 1].tolist()))
        norms = hidden.float().norm(dim=-1)
        col.norm_over_median += (norms[excluded] / norms[masks.nonspecial].median()).tolist()
    return encoded, x_hat


LOGITS_MEMO_BYTES = 2 << 30  # clean logits of every reconstruction batch are kept for the next SAE up to this


def _lm_batch(
    splicer: Splicer, tokens: torch.Tensor, recon: bool, n_recon: int, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None]:
    """What a batch needs from the model alone: block-L output, and for reconstruction batches the
    per-position losses of the clean and zero-ablated runs and the clean logits (None when keeping
    n_recon batches of them would exceed LOGITS_MEMO_BYTES; the caller then recomputes them)."""
    model, layer = splicer.model, splicer.layer
    if not recon:
        return resid_post(model, tokens, layer), None, None
    hidden, clean_logits = clean_run(model, layer, tokens)
    splicer.calibrate(tokens, hidden, clean_logits)
    clean = {"ce": M.ce_per_position(clean_logits, tokens).double()} if cfg.compute_ce_loss else {}
    abl = position_losses(splicer.ablated(tokens, hidden), clean_logits, tokens, cfg)
    keep = clean_logits.numel() * clean_logits.element_size() * n_recon <= LOGITS_MEMO_BYTES
    return hidden, clean_logits if keep else None, (clean, abl)


def _loss_batch(
    col: _Collected,
    splicer: Splicer,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    clean_logits: torch.Tensor,
    lm_losses: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
    replacement: torch.Tensor,
    masks: TokenMasks,
    cfg: Config,
    batch: int,
) -> None:
    """CE/KL sums of both token sets of forward batch `batch`; logits are reduced to per-position losses
    one run at a time."""
    assert lm_losses is not None
    clean, abl = lm_losses
    spliced = splicer.spliced(tokens, hidden, replacement, masks.splice_kept)
    sae = position_losses(spliced, clean_logits, tokens, cfg)
    del spliced
    col.losses["kept"].add(loss_sums(clean, sae, abl, masks.kept), batch)
    col.n_excluded_reconstruction += int(masks.excluded.sum())
    if not cfg.all_tokens:
        return
    # The two splices differ only in contexts holding an excluded token: rerun just those rows (rows of a
    # batch never interact).
    rows = masks.excluded.any(1).nonzero()[:, 0]
    sae_all = {k: v.clone() for k, v in sae.items()}
    if len(rows):
        start = time.perf_counter()
        sub = splicer.spliced(tokens[rows], hidden[rows], replacement[rows], masks.splice_all[rows])
        for k, v in position_losses(sub, clean_logits[rows], tokens[rows], cfg).items():
            sae_all[k][rows] = v
        if tokens.is_cuda:
            torch.cuda.synchronize(tokens.device)
        col.all_tokens_forward_s += time.perf_counter() - start
        col.all_tokens_contexts += len(rows)
    col.losses["all"].add(loss_sums(clean, sae_all, abl, masks.nonspecial), batch)


_COACT_SUMS = ("sum_s", "sum_c", "sum_prod_s", "sum_prod")


def _gathered(col: _Collected, ranks: Ranks) -> _Collected:
    """Every rank's statistics combined, on every rank, into what one process collects over all batches:
    per-context sums and excluded positions in batch order, counts and firing counts summed, co-active
    pairs OR-ed, their cos² sums added (in rank order: these few scalars may differ from one process's
    batch-order sums in the last bits) and their maximum taken."""
    coact = col.coact
    if coact is not None:
        for c in coact.values():
            if c.seen is not None:  # n × n: reduced in place rather than sent whole from every rank
                c.seen = all_reduce_max_(c.seen.to(torch.uint8), ranks, "combining co-active pairs").bool()
    fields = (*_COACT_SUMS, "max_s")
    totals = {k: [getattr(c, a) for a in fields] for k, c in coact.items()} if coact else None
    parts: list[tuple[_Collected, Any]] = gather_objects(
        (dataclasses.replace(col, coact=None), totals), ranks, "gathering the core eval's statistics"
    )
    cols = [p for p, _ in parts]
    if coact is not None:
        for k, c in coact.items():
            sums = [t[k] for _, t in parts]
            for j, attr in enumerate(_COACT_SUMS):
                setattr(c, attr, sum(s[j] for s in sums))
            c.max_s = max(s[-1] for s in sums)
    return _Collected(
        recon={k: S.in_batch_order([c.recon[k] for c in cols]) for k in col.recon},
        legacy_all=S.in_batch_order([c.legacy_all for c in cols]),
        losses={k: S.in_batch_order([c.losses[k] for c in cols]) for k in col.losses},
        feats={k: functools.reduce(M.FeatureStats.merged, [c.feats[k] for c in cols]) for k in col.feats},
        coact=coact,
        n_special=sum(c.n_special for c in cols),
        n_excluded_reconstruction=sum(c.n_excluded_reconstruction for c in cols),
        contexts_with_excluded=sum(c.contexts_with_excluded for c in cols),
        positions=[e for c in cols for e in c.positions],
        norm_over_median=[r for c in cols for r in c.norm_over_median],
        all_tokens_forward_s=sum(c.all_tokens_forward_s for c in cols),
        all_tokens_contexts=sum(c.all_tokens_contexts for c in cols),
    )


# ----------------------------------------------------------------- results


def _with_ci(point: dict[str, float], ci: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name in point:
            out[name] = point[name]
            out[U.ci_key(name)] = ci.get(name)
    return out


_RQ = (
    "explained_variance",
    "explained_variance_legacy",
    "mse",
    "cossim",
    "explained_variance_saebench",
    "mse_per_element",
)
_SHRINK = ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
_KL = ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")
_CE = ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae")
# Headline metrics whose resampled values are stored (section["bootstrap_replicates"]) for paired
# comparisons between SAEs; a few, since each is n_bootstrap numbers in every eval.json.
_REPLICATED = {
    "explained_variance": "reconstruction_quality",
    "mse": "reconstruction_quality",
    "l0": "sparsity",
    "ce_loss_score": "model_performance_preservation",
    "kl_div_score": "model_behavior_preservation",
}


def _replicates(reps: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor]:
    """{"<prefix><group>.<metric>": resampled values} of the stored headline metrics among `reps`."""
    return {f"{prefix}{g}.{k}": reps[k] for k, g in _REPLICATED.items() if reps and k in reps}


def _groups(
    recon: S.Sums | None,
    losses: S.Sums | None,
    feats: M.FeatureStats,
    coact: M.CoactivationStats | None,
    cfg: Config,
    seed: int,
    formulas: bool,
    prefix: str = "",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metric groups of one token set, each number with its interval, and the resampled values of
    the headline metrics (keyed `<prefix><group>.<metric>`)."""
    nb = cfg.n_bootstrap
    rq: dict[str, float] = S.point(S.recon_metrics, recon) if recon else {}
    rq_reps = S.resampled(S.recon_metrics, recon, nb, seed) if recon else None
    rq_ci = S.intervals_of(S.recon_metrics, recon, rq_reps) if recon else {}
    lm: dict[str, float] = S.point(S.loss_metrics, losses) if losses else {}
    lm_reps = S.resampled(S.loss_metrics, losses, nb, seed) if losses else None
    lm_ci = S.intervals_of(S.loss_metrics, losses, lm_reps) if losses else {}
    fs = feats.result(cfg.density_bins_per_decade)
    out: dict[str, Any] = {
        "model_behavior_preservation": _with_ci(lm, lm_ci, _KL),
        "model_performance_preservation": _with_ci(lm, lm_ci, _CE),
        "reconstruction_quality": _with_ci(rq, rq_ci, _RQ),
        "shrinkage": _with_ci(rq, rq_ci, _SHRINK),
        "sparsity": _with_ci(rq, rq_ci, ("l0", "l1")),
        "misc": {
            k: fs[k]
            for k in (
                "frac_alive",
                "frac_dead",
                "freq_over_1_percent",
                "freq_over_10_percent",
                "feature_density_histogram",
            )
        },
    }
    if formulas:
        out["reconstruction_quality"]["formulas"] = {k: M.FORMULAS[k] for k in _RQ if k in rq}
        out["shrinkage"]["formulas"] = {k: M.FORMULAS[k] for k in _SHRINK}
        out["sparsity"]["formulas"] = {"l0": M.FORMULAS["l0"], "l1": M.FORMULAS["l1"]}
    if coact is not None:
        orth: dict[str, Any] = coact.result()
        if recon and "coact_s" in recon:
            ci = S.intervals(S.orth_metrics, recon, nb, seed)
            for k in ci:  # intervals of the weighted means; the distinct-pair mean and max have none
                orth[U.ci_key(k)] = ci[k]
        out["orthogonality"] = orth | ({"formulas": M.COACT_FORMULAS} if formulas else {})
    return out, _replicates(rq_reps, prefix) | _replicates(lm_reps, prefix)


def _n_positions(losses: S.ContextSums) -> int:
    """Positions the KL (else the CE) averaged over."""
    parts = losses.parts.get("n_kl", losses.parts.get("n_ce", []))
    return int(sum(float(p.sum()) for p in parts))


def _token_stats(col: _Collected, kept: S.Sums | None, excluded: S.Sums | None) -> dict[str, Any]:
    n_kept_recon = _n_positions(col.losses["kept"])
    n_kept = int(kept["n"].sum()) if kept else 0
    n_excl = int(excluded["n"].sum()) if excluded else 0
    shares = S.excluded_shares(kept, excluded) if kept and excluded else {}
    ratios = sorted(col.norm_over_median)
    positions = Counter(p for _, batch in sorted(col.positions, key=lambda e: e[0]) for p in batch)
    return {
        "total_tokens_eval_reconstruction": n_kept_recon,
        "total_tokens_eval_sparsity_variance": n_kept,
        "n_contexts_eval_reconstruction": col.losses["kept"].n_contexts,
        "n_contexts_eval_sparsity_variance": kept["n"].numel() if kept else 0,
        "n_special_tokens": col.n_special,
        "n_excluded_high_norm": n_excl,
        "frac_excluded_high_norm": shares.get("frac_tokens"),
        "excluded_share_of_squared_error": shares.get("frac_squared_error"),
        "excluded_share_of_ev_denominator": shares.get("frac_ev_denominator"),
        "n_contexts_with_excluded": col.contexts_with_excluded,
        "n_excluded_high_norm_reconstruction": col.n_excluded_reconstruction,
        # Lists, so the compare table (numbers only) leaves them out.
        "excluded_norm_over_batch_median": [ratios[0], ratios[-1]] if ratios else None,
        "excluded_positions": [[p, c] for p, c in positions.most_common(10)],
    }


# ----------------------------------------------------------------- the eval


@torch.no_grad()
def evaluate(ctx: EvalContext, cfg: Config) -> dict[str, Any]:
    cfg.validate()
    t_start = time.perf_counter()
    loaded = ctx.model
    sae = ctx.sae
    if loaded.d_model != sae.d_in:
        raise UserError(
            f"the SAE expects d_in={sae.d_in} but {ctx.model_name} has d_model={loaded.d_model}: "
            "wrong --model?"
        )
    if not -loaded.n_layers <= ctx.layer < loaded.n_layers:
        raise UserError(f"layer {ctx.layer} is out of range: {ctx.model_name} has {loaded.n_layers} layers")
    # Token ids go where the input embedding runs; block L's output comes back there, and the SAE joins it.
    device = input_device(loaded.model)
    sae = sae.to(device)
    factor, factor_why = high_norm_rule(ctx.sae_cfg, cfg.remove_high_norm)

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

    col = _Collected(
        recon={"kept": S.ContextSums(), "excluded": S.ContextSums()},
        legacy_all=S.ContextSums(),
        losses={"kept": S.ContextSums(), "all": S.ContextSums()},
        feats={k: M.FeatureStats(sae.d_sae) for k in ("kept", "excluded")},
        coact={k: M.CoactivationStats(sae.W_dec) for k in ("kept", "excluded")}
        if cfg.compute_orthogonality
        else None,
    )
    # One per model and layer, shared by every SAE: it is calibrated on the first reconstruction batch.
    splicer = ctx.memo(("splicer", id(loaded.model)), lambda: Splicer(loaded.model, ctx.layer))
    n_done = 0
    bar = _progress(ctx.progress, n_owned(n_batches, ctx.ranks))
    batches = iter(data)
    try:
        for i in range(n_batches):
            batch = next(batches, None)
            if batch is None:
                break
            n_done = i + 1
            if not owns(i, ctx.ranks):  # another rank's batch (every rank reads the text to count them)
                continue
            tokens = batch.tokens.to(device)
            # The SAE-independent forwards (clean, zero-ablated) are shared by every SAE of an experiment.
            recon = i < n_recon
            key = ("core", cfg.dataset, cfg.context_size, cfg.batch_size_prompts, skip_tokens,
                   cfg.skip_contexts, cfg.compute_kl, cfg.compute_ce_loss, i, recon)  # fmt: skip
            hidden, clean_logits, lm_losses = ctx.memo(
                key,
                lambda tokens=tokens, recon=recon: _lm_batch(splicer, tokens, recon, n_recon, cfg),
            )
            if recon and clean_logits is None:  # too large to keep for the next SAE: recompute
                clean_logits = clean_run(loaded.model, ctx.layer, tokens)[1]
            splice_special = not cfg.exclude_special_tokens_from_reconstruction
            masks = token_masks(hidden, batch.mask.to(device), factor, splice_special)
            if i < n_sparse:
                encoded, x_hat = _sparsity_batch(col, sae, hidden, masks, cfg, i)
            else:
                encoded = masks.splice_all
                x_hat = sae.reconstruct(hidden[encoded].float())
            if clean_logits is not None:
                replacement = hidden.clone()
                replacement[encoded] = x_hat.to(hidden.dtype)
                _loss_batch(col, splicer, tokens, hidden, clean_logits, lm_losses, replacement, masks, cfg, i)
                del replacement
            bar.update(1)
    finally:
        bar.close()
    if n_done == 0:
        raise UserError(
            f"no held-out text left in corpus {cfg.dataset!r} after skipping the SAE's training tokens "
            f"({why}); evaluate on another corpus (core.dataset) or set core.skip_contexts"
        )
    if ctx.ranks is not None:
        col = _gathered(col, ctx.ranks)

    t_boot = time.perf_counter()
    kept = col.recon["kept"].stacked() or None
    excluded = col.recon["excluded"].stacked() or None
    loss_kept = col.losses["kept"].stacked() or None
    coact_kept = col.coact["kept"] if col.coact else None
    metrics, reps = _groups(kept, loss_kept, col.feats["kept"], coact_kept, cfg, ctx.seed, formulas=True)
    metrics["token_stats"] = _token_stats(col, kept, excluded)
    if cfg.all_tokens:
        every = S.add_sums(kept, excluded) | col.legacy_all.stacked() if kept and excluded else None
        coact_all = col.coact["kept"].merged(col.coact["excluded"]) if col.coact else None
        every_groups, every_reps = _groups(
            every,
            col.losses["all"].stacked() or None,
            col.feats["kept"].merged(col.feats["excluded"]),
            coact_all,
            cfg,
            ctx.seed,
            formulas=False,
            prefix="all_tokens.",
        )
        reps |= every_reps
        metrics["all_tokens"] = every_groups | {
            "token_stats": {
                "total_tokens_eval_reconstruction": _n_positions(col.losses["all"]),
                "total_tokens_eval_sparsity_variance": int(every["n"].sum()) if every else 0,
            }
        }
    metrics = _finite(metrics)
    t_end = time.perf_counter()
    eval_cfg = {
        "model_name": ctx.model_name,
        "llm_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        **asdict(cfg),
        "layer": ctx.layer,
        "heldout_first_context": data.first_context,
        "heldout_rule": why,
        "batches_run": n_done,
        "token_set": (
            "non-special tokens whose norm is at most remove_high_norm_resolved × the median norm of the "
            "non-special tokens of their forward batch (batch_size_prompts contexts), the SAE's training "
            "rule; excluded tokens keep their hidden state in the splice and CE/KL average over kept "
            "positions. metrics.all_tokens: every non-special token, all reconstructed in the splice"
            if factor > 0
            else "every non-special token (no high-norm rule)"
        ),
        "remove_high_norm_resolved": factor,
        # True: the spliced and ablated runs started from block L's output (checked to reproduce the
        # clean logits on the first batch); False: from the tokens.
        "splice_from_block_output": splicer.from_block_output,
        "remove_high_norm_source": factor_why,
        "bootstrap_config": U.bootstrap_config(
            "eval context (tokens within a context are correlated, so resampling tokens would understate "
            "the noise); reconstruction/sparsity/orthogonality over the sparsity-variance contexts, CE/KL "
            "over the reconstruction contexts; explained_variance_legacy holds each token's batch mean "
            "fixed",
            metrics["token_stats"]["n_contexts_eval_sparsity_variance"],
            cfg.n_bootstrap,
            ctx.seed,
        )
        | {
            "n_units_reconstruction": metrics["token_stats"]["n_contexts_eval_reconstruction"],
            # Which contexts were resampled: equal for two SAEs means their replicates pair.
            "items": {
                "dataset": cfg.dataset,
                "context_size": cfg.context_size,
                "heldout_first_context": data.first_context,
            },
        },
        "timing_s": {
            "total": round(t_end - t_start, 3),
            "all_tokens_extra_forwards": round(col.all_tokens_forward_s, 3),
            "all_tokens_extra_contexts": col.all_tokens_contexts,
            "metrics_and_bootstrap": round(t_end - t_boot, 3),
        },
    }
    block = core_section(ctx, eval_cfg, metrics)
    block[U.REPLICATES_KEY] = {k: U.replicates_json(v) for k, v in reps.items()}
    return block


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
