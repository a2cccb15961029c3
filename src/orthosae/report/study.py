"""The study's answer: each variant (an SAE config trained with one or more seeds) summarised by its mean
over seeds with a 95 % interval, differences to the baseline variant, and a verdict written from them.

Uncertainty of a variant's mean over n seeds (UNCERTAINTY_RULE):
  se² = s²/n + e²,  interval = mean ± t(df, 0.975)·se,
where s is the seed-to-seed standard deviation pooled over every variant trained with ≥ 2 seeds (df = the
pooled degrees of freedom; a variant with one seed borrows it) and e is the evaluation standard error of
the seed mean. Every SAE is scored on the same items with the same seeded bootstrap resamples, so resample
r of one SAE draws the same units as resample r of any other: e is the standard deviation over resamples of
the mean of the SAEs' resampled values (section["bootstrap_replicates"]), exact whatever the correlation
between seeds. A difference other − base is paired the same way:
  se² = s²/n_other + s²/n_base + e_Δ²,  e_Δ = sd over resamples of (mean reps_other − mean reps_base),
so the evaluation noise the two variants share cancels. The seeds' spread already contains some
evaluation noise, so adding e counts it twice: the interval errs wide.

Without stored replicates, or when two variants' were not drawn on the same items (bootstrap_config's
units, seed or resample count differ), the independent rule is used: e is the root mean square of the SAEs'
standard errors implied by their intervals (not divided by n: shared items do not average out), and a
difference adds the two se², which overstates its noise when the errors are positively correlated.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from orthosae.eval.results import section_replicates
from orthosae.eval.uncertainty import replicate_sd, standard_error
from orthosae.report.load import Experiment, finite
from orthosae.report.tables import Cell, Table, section_intervals, section_metrics

UNCERTAINTY_RULE = (
    "Each variant's value is its mean over seeds; its 95 % interval is mean ± t·se with se² = s²/n + e², "
    "s the seed-to-seed standard deviation pooled over the variants trained with ≥ 2 seeds (t from its "
    "degrees of freedom), n the variant's seeds and e the evaluation standard error of the seed mean: the "
    "standard deviation over the bootstrap resamples of the mean of its SAEs' resampled values (every SAE "
    "is scored on the same items with the same resamples). Differences are paired: se² = s²/n + s²/n_base "
    "+ e_Δ², e_Δ the standard deviation over the same resamples of the difference of the two resampled "
    "means, so the evaluation noise both share cancels. Where resampled values are missing or were not "
    "drawn on the same items, the independent rule is used instead (e the root mean square of the SAEs' "
    "standard errors from their intervals, not divided by n; a difference adds the two se²); each Δ says "
    "which rule it used."
)
SEED_TOKENS = 10_000_000  # the seed experiment's training tokens per SAE
CE_TOLERANCE = 0.01  # "keeps the CE-loss score": no worse than the baseline by more than this

# metric → (section, flattened key, label); absorption is lower-is-better, the others higher.
METRICS: dict[str, tuple[str, str, str]] = {
    "absorption": ("absorption", "mean.mean_absorption_fraction_score", "absorption fraction"),
    "explained_variance": ("core", "reconstruction_quality.explained_variance", "explained variance"),
    "ce_loss_score": ("core", "model_performance_preservation.ce_loss_score", "CE-loss score"),
    "l0": ("core", "sparsity.l0", "L0"),
}

# Two-sided 95 % Student t quantiles t(df, 0.975) for df = 1..30; beyond, a Cornish-Fisher expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df ≤ 0: the normal's)."""
    if df <= 0:
        return _Z975
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Point:
    """One SAE's value of one metric and its evaluation standard error (None: no interval), with its
    bootstrap replicates and the key saying which other SAEs' replicates they pair with (None: none)."""

    value: float
    se: float | None
    reps: torch.Tensor | None = field(default=None, compare=False, repr=False)
    pairing: str | None = None


PAIRED, INDEPENDENT = "paired", "independent"


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    n: int  # seeds
    q: float  # the t quantile used
    seed_var: float = 0.0  # s²/n, the seed part of se² (a difference: the sum of both)
    # The mean over seeds of the SAEs' replicates (None: not all have pairable ones), and their key.
    reps: torch.Tensor | None = field(default=None, compare=False, repr=False)
    pairing: str | None = None
    rule: str = INDEPENDENT  # how the evaluation noise entered: from paired replicates or from intervals

    @property
    def lo(self) -> float:
        return self.value - self.q * self.se

    @property
    def hi(self) -> float:
        return self.value + self.q * self.se


def pooled_spread(groups: list[list[float]]) -> tuple[float, int]:
    """(pooled standard deviation, degrees of freedom) over the groups with ≥ 2 values; (0, 0) if none."""
    ss = sum(sum((v - statistics.fmean(g)) ** 2 for v in g) for g in groups if len(g) >= 2)
    df = sum(len(g) - 1 for g in groups if len(g) >= 2)
    return (math.sqrt(ss / df), df) if df else (0.0, 0)


def seed_mean_replicates(points: list[Point]) -> tuple[torch.Tensor, str] | None:
    """(mean over the SAEs of their replicate vectors, pairing key) when every SAE has replicates drawn on
    the same items; a resample non-finite for any SAE stays non-finite in the mean (and is dropped later)."""
    keys = {p.pairing for p in points}
    reps = [p.reps for p in points if p.reps is not None]
    if len(reps) != len(points) or len(keys) != 1 or None in keys or len({r.shape for r in reps}) != 1:
        return None
    return torch.stack(reps).mean(dim=0), str(next(iter(keys)))


def estimate(points: list[Point], spread: float, df: int) -> Estimate:
    """A variant's mean over its seeds with the standard error of UNCERTAINTY_RULE."""
    if not points:
        raise ValueError("a variant needs at least one value")
    n = len(points)
    value = statistics.fmean(p.value for p in points)
    seed_var = spread**2 / n
    shared = seed_mean_replicates(points)
    e = replicate_sd(shared[0]) if shared else None
    if shared is not None and e is not None:
        return Estimate(value, math.sqrt(seed_var + e * e), n, t975(df), seed_var, *shared, rule=PAIRED)
    errs = [p.se for p in points if p.se is not None]
    e2 = statistics.fmean(e * e for e in errs) if errs else 0.0
    return Estimate(value, math.sqrt(seed_var + e2), n, t975(df), seed_var)


def paired_se(base: Estimate, other: Estimate) -> float | None:
    """e_Δ: sd over resamples of other's replicate mean − base's; None when they do not pair."""
    a, b = base.reps, other.reps
    if a is None or b is None or base.pairing is None or base.pairing != other.pairing or a.shape != b.shape:
        return None
    return replicate_sd(b - a)


def difference(base: Estimate, other: Estimate) -> Estimate:
    """other − base: paired where both carry replicates of the same resamples (the seed parts add, the
    evaluation part is the spread of the resampled difference); else the standard errors add in quadrature."""
    value, q = other.value - base.value, max(base.q, other.q)
    seed_var = base.seed_var + other.seed_var
    e = paired_se(base, other)
    if e is None:
        return Estimate(value, math.hypot(base.se, other.se), 1, q, seed_var)
    return Estimate(value, math.sqrt(seed_var + e * e), 1, q, seed_var, rule=PAIRED)


def excludes_zero(d: Estimate) -> bool:
    return d.lo > 0 or d.hi < 0


# ----------------------------------------------------------------- reading an experiment


@dataclass
class Variant:
    name: str
    saes: list[str]
    arch: str | None
    orth_lambda: float | None  # None: no co-activation penalty
    tokens: int | None  # training tokens per SAE
    points: dict[str, list[Point]]  # metric → one point per SAE that has it

    def n_seeds_text(self) -> str:
        return f"{len(self.saes)} seed{'s' if len(self.saes) != 1 else ''}"


@dataclass
class Study:
    baseline: str
    variants: dict[str, Variant]
    estimates: dict[str, dict[str, Estimate]]  # variant → metric → estimate
    spread: dict[str, tuple[float, int]]  # metric → pooled seed sd, df

    def diff(self, variant: str, metric: str) -> Estimate | None:
        a = self.estimates.get(self.baseline, {}).get(metric)
        b = self.estimates.get(variant, {}).get(metric)
        return difference(a, b) if a and b else None


def groups_of(exp: Experiment) -> dict[str, list[str]]:
    """variant → SAE names, from experiment.toml's [groups]; SAEs not listed are variants of their own."""
    raw = exp.config.get("groups")
    groups: dict[str, list[str]] = {}
    if isinstance(raw, dict):
        for name, members in raw.items():
            if isinstance(members, list):
                present = [m for m in members if isinstance(m, str) and m in exp.saes]
                if present:
                    groups[str(name)] = present
    listed = {m for ms in groups.values() for m in ms}
    groups.update({n: [n] for n in exp.saes if n not in listed})
    return groups


def sae_point(exp: Experiment, sae: str, metric: str) -> Point | None:
    section, key, _ = METRICS[metric]
    block = exp.saes[sae].sections.get(section)
    value = finite((section_metrics(block) or {}).get(key))
    if value is None:
        return None
    ci = section_intervals(block).get(key)
    pairing, reps = section_replicates(block)
    rep = reps.get(key)
    return Point(value, standard_error(ci) if ci else None, rep, pairing if rep is not None else None)


def _describe(exp: Experiment, saes: list[str]) -> tuple[str | None, float | None, int | None]:
    cfg = exp.saes[saes[0]].cfg or {}
    orth = cfg.get("orthogonality")
    coactive = isinstance(orth, dict) and orth.get("kind", "coactive") == "coactive"  # OrtSAE's has no λ
    lam = finite(orth.get("lambda")) if coactive and isinstance(orth, dict) else None
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    tokens = finite((training or {}).get("tokens_seen"))
    return cfg.get("arch"), lam, None if tokens is None else int(tokens)


def build_study(exp: Experiment, baseline: str) -> Study:
    variants: dict[str, Variant] = {}
    for name, saes in groups_of(exp).items():
        arch, lam, tokens = _describe(exp, saes)
        points = {m: [p for s in saes if (p := sae_point(exp, s, m)) is not None] for m in METRICS}
        variants[name] = Variant(name, saes, arch, lam, tokens, points)
    base = next((v for v, m in variants.items() if baseline in m.saes), baseline)
    spread = {m: pooled_spread([[p.value for p in v.points[m]] for v in variants.values()]) for m in METRICS}
    estimates = {
        name: {m: estimate(v.points[m], *spread[m]) for m in METRICS if v.points[m]}
        for name, v in variants.items()
    }
    return Study(base, variants, estimates, spread)


# ----------------------------------------------------------------- the verdict


def _iv(e: Estimate, digits: int = 3) -> str:
    return f"{e.value:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def _d(e: Estimate, digits: int = 3, noise: bool = False) -> str:
    """A difference with its interval and, in brackets, the rule its noise came from (and, with `noise`,
    whether it is inside the noise)."""
    notes = e.rule + (", inside the noise" if noise and not excludes_zero(e) else "")
    return f"{e.value:+.{digits}f} [{e.lo:+.{digits}f}, {e.hi:+.{digits}f}] ({notes})"


def _cost(d: Estimate) -> str:
    """A CE-loss score difference as a cost (its negative), in _d's form."""
    return _d(Estimate(-d.value, d.se, d.n, d.q, d.seed_var, rule=d.rule), noise=True)


def _label(v: Variant) -> str:
    return f"λ = {v.orth_lambda:g}" if v.orth_lambda is not None else f"'{v.name}'"


def verdict(study: Study) -> list[str]:
    """Paragraphs answering "does the penalty lower absorption, at what cost?", written from the numbers."""
    base = study.variants.get(study.baseline)
    base_est = study.estimates.get(study.baseline, {})
    if base is None:
        return [f"No verdict: the baseline '{study.baseline}' is not among the SAEs."]
    out = [_setup(study, base)]
    if "absorption" not in base_est:
        return [*out, f"No verdict: the baseline '{study.baseline}' has no absorption result."]
    penalised = sorted(
        (v for v in study.variants.values() if v.orth_lambda is not None and v.arch == base.arch),
        key=lambda v: v.orth_lambda or 0.0,
    )
    if not penalised:
        out.append("No SAE with the co-activation penalty has results, so the question is not tested here.")
        return out
    lines, winners = [], []
    a0 = base_est["absorption"]
    for v in penalised:
        d_abs, d_ce = study.diff(v.name, "absorption"), study.diff(v.name, "ce_loss_score")
        d_ev = study.diff(v.name, "explained_variance")
        if d_abs is None:
            lines.append(f"{_label(v)}: no absorption result.")
            continue
        est = study.estimates[v.name]["absorption"]
        effect = "lowers" if d_abs.hi < 0 else "raises" if d_abs.lo > 0 else "does not measurably change"
        costs = []
        if d_ce is not None:
            costs.append(f"CE-loss score Δ {_d(d_ce, noise=True)}")
        if d_ev is not None:
            costs.append(f"EV Δ {_d(d_ev, noise=True)}")
        lines.append(
            f"{_label(v)} ({v.n_seeds_text()}) {effect} absorption: {_iv(a0)} → {_iv(est)}, "
            f"Δ {_d(d_abs)}" + (f"; {', '.join(costs)}" if costs else "")
        )
        if d_abs.hi < 0 and (d_ce is None or d_ce.value >= -CE_TOLERANCE):
            winners.append((est.value, v, d_abs, d_ce))
    if winners:
        _, v, d_abs, d_ce = min(winners, key=lambda w: w[0])
        cost = f" at a CE-loss score cost of {_cost(d_ce)}" if d_ce else ""
        head = (
            f"**Verdict:** {_label(v)} lowers the absorption fraction from {_iv(a0)} to "
            f"{_iv(study.estimates[v.name]['absorption'])} (Δ {_d(d_abs)}){cost}, the largest reduction "
            f"among the λ that keep the CE-loss score within {CE_TOLERANCE} of the baseline."
        )
    else:
        head = (
            "**Verdict:** no measurable effect on absorption at any λ that keeps the CE-loss score within "
            f"{CE_TOLERANCE} of the baseline."
        )
    out.append(head)
    out.append(
        "Per λ, against the baseline (values: mean over seeds [95 % interval]):\n\n"
        + "\n".join(f"- {line}" for line in lines)
    )
    others = [v for v in study.variants.values() if v.name != base.name and v not in penalised]
    out += [line for v in others if (line := _reference(study, base, v))]
    return out


def _reference(study: Study, base: Variant, v: Variant) -> str | None:
    """One sentence on a variant that is not a λ of the penalty (another architecture or penalty)."""
    est, base_est = study.estimates.get(v.name, {}), study.estimates[base.name]
    if "absorption" not in est:
        return None
    d_abs, d_ce = study.diff(v.name, "absorption"), study.diff(v.name, "ce_loss_score")
    l0, l0_base = est.get("l0"), base_est.get("l0")
    text = f"For reference, '{v.name}' ({v.arch}{f', L0 {l0.value:.0f}' if l0 else ''}) reads absorption "
    text += _iv(est["absorption"]) + (f" (Δ {_d(d_abs)})" if d_abs else "")
    if "ce_loss_score" in est:
        text += f", CE-loss score {_iv(est['ce_loss_score'])}" + (f" (Δ {_d(d_ce)})" if d_ce else "")
    if l0 and l0_base and abs(l0.value - l0_base.value) > 0.05 * l0_base.value:
        text += f"; at L0 {l0.value:.0f} against the baseline's {l0_base.value:.0f} it is not like for like"
    return text + "."


def _setup(study: Study, base: Variant) -> str:
    tokens = base.tokens
    seeds = ", ".join(f"{v.name} {len(v.saes)}" for v in study.variants.values())
    spread = study.spread["absorption"]
    text = f"Seeds per variant: {seeds}."
    if tokens:
        text = (
            f"Each SAE trained on {tokens:,} tokens ({tokens / SEED_TOKENS:.1%} of the seed experiment's "
            f"10M). " + text
        )
    if spread[1]:
        text += (
            f" Seed-to-seed standard deviation of the absorption fraction: {spread[0]:.3f} ({spread[1]} df)."
        )
    return text + " " + UNCERTAINTY_RULE


def late_recon_change(exp: Experiment, saes: list[str]) -> float | None:
    """Relative change of the reconstruction loss over the last quarter of training, averaged over the
    variant's SAEs: near 0 when the curve has flattened (the lr decay also lowers it at the end)."""
    changes = []
    for name in saes:
        rows = [r for r in exp.saes[name].metrics if finite(r.get("recon")) and finite(r.get("step"))]
        if len(rows) < 4:
            continue
        last = float(rows[-1]["step"])
        window = [r for r in rows if float(r["step"]) >= 0.75 * last]
        first, end = float(window[0]["recon"]), float(window[-1]["recon"])
        if first > 0 and len(window) >= 2:
            changes.append(end / first - 1)
    return statistics.fmean(changes) if changes else None


def pareto_table(exp: Experiment, study: Study) -> Table:
    header = ["variant", "arch", "λ", "seeds", *[METRICS[m][2] for m in METRICS], "recon Δ, last 25 %"]
    rows: list[list[Cell]] = []
    for v in study.variants.values():
        est = study.estimates.get(v.name, {})
        cells = [
            Cell(v.name),
            Cell(v.arch or "—"),
            Cell("—" if v.orth_lambda is None else f"{v.orth_lambda:g}"),
        ]
        cells.append(Cell(str(len(v.saes)), "num"))
        for m in METRICS:
            e = est.get(m)
            digits = 1 if m == "l0" else 3
            cells.append(Cell("not run", "na") if e is None else Cell(_iv(e, digits), "num"))
        late = late_recon_change(exp, v.saes)
        cells.append(Cell("—" if late is None else f"{late:+.1%}", "num"))
        rows.append(cells)
    note = (
        f"Mean over seeds [95 % interval]. {UNCERTAINTY_RULE} Absorption is SAEBench's mean absorption "
        "fraction (lower is better); EV and CE-loss score are core's, on the training token set. The last "
        "column is the change of the reconstruction loss over the last quarter of training (the training "
        "curves are in the Training section)."
    )
    return Table("Study: absorption against reconstruction, per variant", header, rows, note=note)
