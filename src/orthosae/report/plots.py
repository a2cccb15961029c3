"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no GUI backend).

Each function returns a Figure, or None when there is nothing to draw (the report then says "not run").
`to_png` renders one to PNG bytes, which go both to figures/*.png and, base64-encoded, into the HTML.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.figure import Figure

from orthosae.report.load import Experiment, finite, order_saes

# Loss terms and statistics drawn from metrics.jsonl, in panel order.
CURVE_KEYS = ("loss", "recon", "auxk", "l1", "orth", "orth_scaled", "l0", "dead_frac")
STAT_KEYS = ("l0", "dead_frac")  # statistics, drawn even when zero (a dead fraction of 0 is news)
PROBE_KS = (1, 2, 5, 10, 20, 50, 100)
_DPI = 110


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _styles(names: list[str]) -> dict[str, str]:
    # Nearly identical SAEs (early in training) would hide each other's lines with one style.
    styles = ["-", "--", ":", "-."]
    return {n: styles[i % len(styles)] for i, n in enumerate(names)}


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def training_curves(exp: Experiment, baseline: str) -> Figure | None:
    """Small multiples: one panel per loss term / statistic, one line per SAE, against the step."""
    names = [n for n in order_saes(list(exp.saes), baseline) if exp.saes[n].metrics]
    if not names:
        return None

    def series(n: str, key: str) -> list[tuple[float, float]]:
        pts = [(r.get("step"), finite(r.get(key))) for r in exp.saes[n].metrics]
        pts = [(float(s), v) for s, v in pts if isinstance(s, int | float) and v is not None]
        # A loss term that is 0 throughout does not apply to this SAE (l1 for TopK, orth without --orth).
        return pts if key in STAT_KEYS or any(v != 0 for _, v in pts) else []

    panels = {k: {n: pts for n in names if (pts := series(n, k))} for k in CURVE_KEYS}
    panels = {k: lines for k, lines in panels.items() if lines}
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colors, styles = _colors(names), _styles(names)
    for ax, (key, lines) in zip(axes.flat, panels.items(), strict=False):
        for n, pts in lines.items():
            ax.plot(*zip(*pts, strict=True), label=n, color=colors[n], ls=styles[n], lw=1.3)
        if key not in STAT_KEYS and all(v > 0 for pts in lines.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(
        list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles), fontsize=8
    )
    return fig


def absorption_by_letter(exp: Experiment, baseline: str) -> Figure | None:
    """Grouped bars: absorption fraction per first letter (SAEBench 0.6's headline), one bar per SAE.
    Results written before it existed give their full-absorption `absorption_rate` instead."""
    data: dict[str, dict[str, float]] = {}
    for n in order_saes(list(exp.saes), baseline):
        block = exp.saes[n].sections.get("absorption")
        details = block.get("eval_result_details") if block else None
        rates = {
            str(d.get("first_letter")): finite(d.get("mean_absorption_fraction", d.get("absorption_rate")))
            for d in details or []
            if isinstance(d, dict)
        }
        rates = {k: v for k, v in rates.items() if v is not None}
        if rates:
            data[n] = rates  # type: ignore[assignment]
    if not data:
        return None
    letters = sorted({letter for rates in data.values() for letter in rates})
    fig = Figure(figsize=(max(6.0, 0.38 * len(letters) * max(1, len(data)) / 1.5), 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(data)
    colors = _colors(list(data))
    for i, (n, rates) in enumerate(data.items()):
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(letters))]
        ax.bar(xs, [rates.get(c, math.nan) for c in letters], width, label=n, color=colors[n])
    ax.set_xticks(range(len(letters)), letters)
    ax.set_ylabel("absorption fraction")
    ax.set_xlabel("first letter")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _probe_curve(metrics: dict[str, Any], prefix: str) -> list[tuple[int, float]]:
    group = metrics.get(prefix)
    if not isinstance(group, dict):
        return []
    pts = [(k, finite(group.get(f"{prefix}_top_{k}_test_accuracy"))) for k in PROBE_KS]
    return [(k, v) for k, v in pts if v is not None]


def probing_vs_k(exp: Experiment, baseline: str) -> Figure | None:
    """Sparse-probing test accuracy against k: one line per SAE and the LLM's (raw activations) line."""
    curves: dict[str, list[tuple[int, float]]] = {}
    llm: list[tuple[int, float]] = []
    for n in order_saes(list(exp.saes), baseline):
        block = exp.saes[n].sections.get("sparse_probing")
        metrics = block.get("eval_result_metrics") if block else None
        if not isinstance(metrics, dict):
            continue
        if pts := _probe_curve(metrics, "sae"):
            curves[n] = pts
        if not llm:
            llm = _probe_curve(metrics, "llm")  # the same LM for every SAE: draw it once
    if not curves and not llm:
        return None
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    colors = _colors(list(curves))
    for n, pts in curves.items():
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"SAE {n}", color=colors[n])
    if llm:
        ax.plot(*zip(*llm, strict=True), marker="s", ms=3, ls="--", color="black", label="LLM")
    ax.set_xscale("log")
    ax.set_xlabel("k (features / dimensions in the probe)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def coactive_cos2(features: dict[str, Any] | None, baseline: str) -> Figure | None:
    """Histogram (log counts) of decoder cos² over co-active latent pairs, one outline per SAE."""
    if not features:
        return None
    saes = features.get("saes") or {}
    names = order_saes([n for n, s in saes.items() if s.get("coactive_cos2")], baseline)
    if not names:
        return None
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    colors, styles = _colors(names), _styles(names)
    for n in names:
        h = saes[n]["coactive_cos2"]
        edges, counts = h["edges"], h["counts"]
        if sum(counts) == 0:
            continue
        label = f"{n} (mean {h.get('mean', 0):.3g}, max {h.get('max', 0):.3g})"
        ax.stairs(counts, edges, label=label, color=colors[n], lw=1.4, ls=styles[n])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cos² of decoder rows, pairs active in the same token (first bin: ≤ 1e-6)")
    ax.set_ylabel("pair-token count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def pareto(study: Any, synthetic: dict[str, Any] | None) -> Figure | None:
    """Absorption fraction against EV and against CE-loss score, one small point per SAE (its own eval
    interval) and one large point per variant (mean over seeds, study interval); beside them, the toy-model
    benchmark's exact absorption against λ."""
    variants = [v for v in study.variants.values() if v.points["absorption"]]
    if not variants:
        return None
    panels = [("explained_variance", "explained variance"), ("ce_loss_score", "CE-loss score")]
    syn = _synthetic_curve(synthetic)
    fig = Figure(figsize=(4.2 * (len(panels) + bool(syn)), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels) + bool(syn), squeeze=False)[0]
    colors = _colors([v.name for v in variants])
    for ax, (metric, label) in zip(axes, panels, strict=False):
        for v in variants:
            est = study.estimates[v.name]
            pairs = list(zip(v.points[metric], v.points["absorption"], strict=False))
            for px, py in pairs:
                ax.errorbar(
                    px.value, py.value, xerr=_err(px.se), yerr=_err(py.se),
                    fmt="o", ms=3, alpha=0.45, color=colors[v.name], lw=0.8,
                )  # fmt: skip
            if metric in est and "absorption" in est:
                ex, ey = est[metric], est["absorption"]
                ax.errorbar(
                    ex.value, ey.value, xerr=ex.q * ex.se, yerr=ey.q * ey.se,
                    fmt="D", ms=7, color=colors[v.name], lw=1.6, capsize=3, label=_variant_label(v),
                )  # fmt: skip
        ax.set_xlabel(f"{label} (higher is better)")
        ax.set_ylabel("absorption fraction (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if syn:
        ax = axes[-1]
        base, curve = syn
        xs = [x for x, _, _ in curve]
        ax.errorbar(xs, [m for _, m, _ in curve], yerr=[s for _, _, s in curve], fmt="o-", capsize=3,
                    label="TopK + orth")  # fmt: skip
        if base is not None:
            ax.axhspan(base[0] - base[1], base[0] + base[1], color="grey", alpha=0.25)
            ax.axhline(base[0], color="grey", ls="--", label="TopK (no penalty)")
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_ylabel("exact absorption rate (toy model)")
        ax.set_title("toy model with known features (mean ± sd over seeds)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _err(se: float | None) -> float | None:
    return None if se is None else 1.959964 * se


def _variant_label(v: Any) -> str:
    lam = f", λ={v.orth_lambda:g}" if v.orth_lambda is not None else ""
    return f"{v.name} ({v.arch}{lam}, {len(v.saes)} seed{'s' if len(v.saes) > 1 else ''})"


def _synthetic_curve(
    synthetic: dict[str, Any] | None,
) -> tuple[tuple[float, float] | None, list[tuple[float, float, float]]] | None:
    """((baseline mean, sd) or None, [(λ, mean, sd)]) of the toy benchmark's absorption rate."""
    summary = (synthetic or {}).get("summary")
    runs = (synthetic or {}).get("runs")
    if not isinstance(summary, dict) or not isinstance(runs, list):
        return None
    lam_of = {r.get("variant"): r.get("orth_lambda") for r in runs if isinstance(r, dict)}
    base, curve = None, []
    for name, stats in summary.items():
        rate = stats.get("absorption_rate") if isinstance(stats, dict) else None
        mean, sd = finite((rate or {}).get("mean")), finite((rate or {}).get("std"))
        if mean is None:
            continue
        lam = finite(lam_of.get(name))
        if lam is None:
            base = (mean, sd or 0.0)
        elif lam > 0:
            curve.append((lam, mean, sd or 0.0))
    return (base, sorted(curve)) if curve else None
