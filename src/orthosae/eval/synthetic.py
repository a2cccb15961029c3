"""Ground-truth benchmark: TopK vs TopK+orthogonality SAEs on a toy superposition model with hierarchy.

The toy model (orthosae.synthetic) has n unit feature directions in d < n dimensions; the first parents
each have children that fire only when their parent fires — the pattern that makes an SAE absorb the
parent into its child latents (Chanin et al. 2024, "A is for Absorption"). Because the true features are
known, everything is measured exactly, on fresh samples the SAEs never saw:

- recovery: for each true direction, the largest cosine with any decoder row (mean; fraction ≥ 0.9).
- absorption, per parent p: let ℓ_p be the latent whose decoder row best matches d_p. Over test samples
  in which p fires together with at least one of its children, the fraction in which ℓ_p stays silent
  while some other firing latent carries the parent direction (decoder cosine with d_p ≥ `absorb_cos`).
  The mean over parents is `absorption_rate`. Controls: `parent_recall_alone` (ℓ_p fires when p fires
  with no child) and `child_parent_cos` (mean cosine of the best child latents' decoder rows with their
  parent's direction: the absorbed component Chanin et al. see in the decoder).
- L0 (latents > 0 per sample) and explained variance on the test samples.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from orthosae.errors import UserError
from orthosae.eval import metrics as M
from orthosae.synthetic import ToyModel, make_toy_model, max_cosines, sample_activations


@dataclass
class Config:
    n_features: int = 64
    """True features of the toy model."""
    d: int = 32
    """Dimension the features are superposed in."""
    n_parents: int = 8
    """Parent features (each with children that fire only with it)."""
    children_per_parent: int = 3
    """Children per parent."""
    p_active: float = 0.05
    """Firing probability of each root feature per sample."""
    p_child: float = 0.3
    """Firing probability of a child when its parent fires."""
    d_sae: int = 64
    """Latents of each SAE."""
    k: int = 4
    """TopK k (the same for every SAE)."""
    steps: int = 400
    """Optimizer steps per SAE."""
    batch_size: int = 256
    """Samples per step."""
    seeds: int = 3
    """Seeds per variant (toy model, data and SAE init all change with the seed)."""
    orth_lambdas: str = "0.001,0.1,1"
    """Comma-separated λ values of the TopK+orth variants (the default training λ is 1e-3)."""
    absorb_cos: float = 0.3
    """A firing latent carries the parent when its decoder row's cosine with the parent is at least this."""
    n_test: int = 20000
    """Fresh test samples per seed."""

    def validate(self) -> None:
        for name in ("n_features", "d", "d_sae", "k", "steps", "batch_size", "seeds", "n_test"):
            if getattr(self, name) <= 0:
                raise UserError(f"synthetic.{name} must be positive, got {getattr(self, name)}")
        if self.k > self.d_sae:
            raise UserError(f"synthetic.k={self.k} is larger than d_sae={self.d_sae}")
        self.lambdas()

    def lambdas(self) -> list[float]:
        try:
            values = [float(v) for v in self.orth_lambdas.split(",") if v.strip()]
        except ValueError:
            raise UserError(
                f"synthetic.orth_lambdas must be numbers separated by commas, got {self.orth_lambdas!r}"
            ) from None
        if any(v < 0 for v in values):
            raise UserError(f"synthetic.orth_lambdas must be ≥ 0, got {self.orth_lambdas!r}")
        return values


# ----------------------------------------------------------------- exact metrics


def best_latents(directions: torch.Tensor, w_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true direction: the index of the decoder row with the largest cosine, and that cosine."""
    cos = _unit(directions) @ _unit(w_dec).T
    best = cos.max(dim=1)
    return best.indices, best.values


def _unit(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def absorption(
    toy: ToyModel, codes: torch.Tensor, latents: torch.Tensor, w_dec: torch.Tensor, absorb_cos: float
) -> dict[str, Any]:
    """Absorption of children into parents, per parent and averaged (definition in the module doc)."""
    best, _ = best_latents(toy.directions, w_dec)
    cos_all = _unit(toy.directions) @ _unit(w_dec).T  # (n_true, d_sae)
    fires = latents > 0
    true_on = codes > 0
    per_parent = []
    for p in sorted({int(q) for q in toy.parent[toy.parent >= 0]}):
        children = (toy.parent == p).nonzero().flatten()
        with_child = true_on[:, p] & true_on[:, children].any(dim=1)
        alone = true_on[:, p] & ~true_on[:, children].any(dim=1)
        lp = int(best[p])
        carriers = (cos_all[p] >= absorb_cos).clone()
        carriers[lp] = False  # another latent carrying the parent direction
        absorbed = ~fires[:, lp] & (fires & carriers).any(dim=1)
        n_with = int(with_child.sum())
        per_parent.append(
            {
                "parent": p,
                "n_with_child": n_with,
                "absorption_rate": float(absorbed[with_child].float().mean()) if n_with else None,
                "parent_recall_with_child": float(fires[with_child, lp].float().mean()) if n_with else None,
                "parent_recall_alone": float(fires[alone, lp].float().mean()) if bool(alone.any()) else None,
                "child_parent_cos": float(cos_all[p, best[children]].mean()),
            }
        )

    def mean(key: str) -> float | None:
        values = [r[key] for r in per_parent if r[key] is not None]
        return sum(values) / len(values) if values else None

    return {
        "absorption_rate": mean("absorption_rate"),
        "parent_recall_with_child": mean("parent_recall_with_child"),
        "parent_recall_alone": mean("parent_recall_alone"),
        "child_parent_cos": mean("child_parent_cos"),
        "per_parent": per_parent,
    }


def measure(
    sae: Any, toy: ToyModel, x: torch.Tensor, codes: torch.Tensor, absorb_cos: float
) -> dict[str, Any]:
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    rec = max_cosines(toy.directions, sae.W_dec.detach())
    ab = absorption(toy, codes, latents, sae.W_dec, absorb_cos)
    # Decoder cos² of co-firing latent pairs, the quantity the penalty pushes down.
    coact = M.CoactivationStats(sae.W_dec.detach())
    coact.update(*M.sparse_latents(latents))
    return {
        "recovery_mean_max_cos": float(rec.mean()),
        "frac_recovered_0.9": float((rec >= 0.9).float().mean()),
        "parent_recovery": float(rec[toy.parent[toy.parent >= 0].unique()].mean())
        if bool((toy.parent >= 0).any())
        else None,
        "absorption_rate": ab["absorption_rate"],
        "parent_recall_with_child": ab["parent_recall_with_child"],
        "parent_recall_alone": ab["parent_recall_alone"],
        "child_parent_cos": ab["child_parent_cos"],
        "l0": float((latents > 0).sum(-1).float().mean()),
        "explained_variance": M.explained_variance(x, x_hat),
        "coact_weighted_mean_cos2": coact.result()["coact_weighted_mean_cos2"],
    }


# ----------------------------------------------------------------- training and the benchmark


def train_sae(toy: ToyModel, cfg: Config, seed: int, orth_lambda: float | None) -> Any:
    """A TopK SAE (TopK+orth when orth_lambda is not None) trained by the project's Trainer on fresh toy
    samples; one batch per step."""
    from orthosae.train.config import TrainConfig
    from orthosae.train.trainer import Trainer

    tc = TrainConfig(
        activations="synthetic",
        d_sae=cfg.d_sae,
        k=cfg.k,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        orth=orth_lambda is not None,
        orth_lambda=orth_lambda or 0.0,
        seed=seed,
        dead_tokens=max(1, cfg.steps * cfg.batch_size // 20),  # revive via AuxK within the short run
        progress=False,
    )
    tc.validate()
    x, _ = sample_activations(toy, cfg.steps * cfg.batch_size, seed=seed)
    trainer = Trainer(tc, toy.directions.shape[1])
    for batch in x.split(cfg.batch_size):
        trainer.step(batch)
    return trainer.sae.eval()


def variants(cfg: Config) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [("topk", None)]
    return out + [(f"topk+orth λ={lam:g}", lam) for lam in cfg.lambdas()]


@contextmanager
def _one_thread() -> Iterator[None]:
    # The toy matrices are tiny: extra threads only add synchronisation, and on a busy machine a
    # multi-threaded step spins for orders of magnitude longer than the work (measured: 700 s vs 5 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: Config) -> dict[str, Any]:
    """Train every variant on every seed; returns per-run metrics and mean ± std per variant."""
    cfg.validate()
    with _one_thread():
        return _run(cfg)


def _run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in range(cfg.seeds):
        toy = make_toy_model(
            cfg.n_features,
            cfg.d,
            p_active=cfg.p_active,
            n_parents=cfg.n_parents,
            children_per_parent=cfg.children_per_parent,
            p_child=cfg.p_child,
            seed=seed,
        )
        x_test, codes_test = sample_activations(toy, cfg.n_test, seed=10_000 + seed)
        for name, lam in variants(cfg):
            sae = train_sae(toy, cfg, seed, lam)
            runs.append(
                {"variant": name, "orth_lambda": lam, "seed": seed}
                | measure(sae, toy, x_test, codes_test, cfg.absorb_cos)
            )
    return {
        "eval_type_id": "synthetic_absorption",
        "eval_config": asdict(cfg),
        "summary": summarize(runs),
        "runs": runs,
        "definitions": __doc__,
        "eval_wall_time_s": round(time.perf_counter() - start, 3),
    }


SUMMARY_METRICS = (
    "recovery_mean_max_cos",
    "frac_recovered_0.9",
    "absorption_rate",
    "parent_recall_with_child",
    "parent_recall_alone",
    "child_parent_cos",
    "coact_weighted_mean_cos2",
    "l0",
    "explained_variance",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{variant: {metric: {mean, std, min, max}}} over seeds."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == name]
        out[name] = {}
        for key in SUMMARY_METRICS:
            values = [r[key] for r in rows if r.get(key) is not None]
            out[name][key] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
            }
    return out


def format_table(result: dict[str, Any]) -> str:
    """Variants as columns, metrics as rows: 'mean ± std' over seeds."""
    summary = result["summary"]
    names = list(summary)
    header = ["metric", *names]
    rows = [header]
    for key in SUMMARY_METRICS:
        cells = [key]
        for name in names:
            s = summary[name][key]
            cells.append("n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seeds = result["eval_config"]["seeds"]
    lines.append(f"(mean ± std over {seeds} seeds; {result['eval_wall_time_s']:.1f} s)")
    return "\n".join(lines)
