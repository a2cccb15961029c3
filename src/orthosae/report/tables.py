"""The report's tables as plain data (rows of cells), rendered by markdown.py and html.py.

Core metrics get a "preserved?" verdict against the baseline SAE. The rule (stated in the report) is
PRESERVED_RULE: a metric is preserved when it is no worse than the baseline by more than
max(1 % of |baseline|, the metric's absolute tolerance); "worse" depends on the metric's direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from orthosae.eval.compare import NOISE_RULE
from orthosae.eval.results import SECTION_KEYS, section_replicates
from orthosae.eval.uncertainty import CI_SUFFIX, noise_verdict, paired
from orthosae.report.load import Experiment, finite, order_saes

REL_TOL = 0.01
PRESERVED_RULE = (
    "A core metric is preserved (✓) when it is no worse than the baseline by more than max(1 % of "
    "|baseline|, an absolute tolerance: 0.01 for scores in [0, 1], 0 otherwise). Higher is better for "
    "explained variance, cosine similarity, KL/CE scores and alive fraction; lower is better for MSE, "
    "KL/CE with the SAE and dead fraction; for the l2 ratio and relative reconstruction bias, closer to 1 "
    "is better; L0 must stay within 1 %. Other rows (references such as CE without the SAE) get no verdict."
)

Direction = Literal["higher", "lower", "toward1", "equal"]
# metric name → (direction, absolute tolerance). Only core metrics listed here get a verdict.
CORE_RULES: dict[str, tuple[Direction, float]] = {
    "explained_variance": ("higher", 0.01),
    "explained_variance_legacy": ("higher", 0.01),
    "cossim": ("higher", 0.01),
    "kl_div_score": ("higher", 0.01),
    "ce_loss_score": ("higher", 0.01),
    "frac_alive": ("higher", 0.01),
    "mse": ("lower", 0.0),
    "kl_div_with_sae": ("lower", 0.0),
    "ce_loss_with_sae": ("lower", 0.0),
    "frac_dead": ("lower", 0.01),
    "l2_ratio": ("toward1", 0.01),
    "relative_reconstruction_bias": ("toward1", 0.01),
    "l0": ("equal", 0.0),
}
SECTION_TITLES = {
    "core": "core",
    "absorption": "absorption",
    "sparse_probing": "sparse probing",
    "unlearning": "unlearning",
}

CellClass = Literal["", "ok", "bad", "na", "num", "head"]


@dataclass
class Cell:
    text: str
    cls: CellClass = ""


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    note: str = ""
    group_rows: set[int] = field(default_factory=set)  # indices of rows that are section headings


def fmt(v: Any) -> str:
    """Compact number formatting: 4 significant digits, integers as integers."""
    f = finite(v)
    if f is None:
        return "—" if v is None else str(v)
    if isinstance(v, int) or (f.is_integer() and abs(f) >= 1000):
        return f"{int(f):,}"
    if f != 0 and (abs(f) < 1e-3 or abs(f) >= 1e5):
        return f"{f:.3e}"
    return f"{f:.4g}"


def fmt_delta(value: float, base: float) -> str:
    d = value - base
    rel = f" ({d / abs(base):+.1%})" if base != 0 else ""
    return f"{d:+.4g}{rel}"


def preserved(metric: str, value: float, base: float) -> bool | None:
    """The verdict for a core metric, or None when the metric has no rule."""
    rule = CORE_RULES.get(metric)
    if rule is None:
        return None
    direction, abs_tol = rule
    tol = max(REL_TOL * abs(base), abs_tol)
    if direction == "higher":
        return value >= base - tol
    if direction == "lower":
        return value <= base + tol
    if direction == "toward1":
        return abs(value - 1) <= abs(base - 1) + tol
    return abs(value - base) <= tol


def section_metrics(block: dict[str, Any] | None) -> dict[str, Any] | None:
    """Flatten a section's metrics to {"group.metric": value}; core uses "metrics", others
    "eval_result_metrics" (either is accepted for both). Intervals (`<metric>_ci95`) are read by
    `section_intervals`, not listed here."""
    if block is None:
        return None
    raw = block.get("eval_result_metrics")
    if not isinstance(raw, dict):
        raw = block.get("metrics")
    if not isinstance(raw, dict):
        return {}
    flat: dict[str, Any] = {}

    def walk(prefix: str, values: Any) -> None:
        for name, v in values.items():
            if isinstance(v, dict):
                if name != "formulas":  # nested groups (core's all_tokens block) flatten to a.b.c
                    walk(f"{prefix}{name}.", v)
            elif not isinstance(v, list):
                flat[f"{prefix}{name}"] = v

    walk("", raw)
    return flat


def section_intervals(block: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    """{"group.metric": (lo, hi)} from the section's `<metric>_ci95` entries."""
    raw = (block or {}).get("eval_result_metrics")
    if not isinstance(raw, dict):
        raw = (block or {}).get("metrics")
    out: dict[str, tuple[float, float]] = {}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for name, v in values.items():
            if isinstance(v, dict):
                walk(f"{prefix}{name}.", v)
            elif name.endswith(CI_SUFFIX) and isinstance(v, list) and len(v) == 2:
                lo, hi = finite(v[0]), finite(v[1])
                if lo is not None and hi is not None:
                    out[f"{prefix}{name.removesuffix(CI_SUFFIX)}"] = (lo, hi)

    walk("", raw or {})
    return out


def fmt_interval(v: Any, ci: tuple[float, float] | None) -> str:
    """A value with its 95 % interval, "0.72 [0.71, 0.73]"."""
    return fmt(v) if ci is None or finite(v) is None else f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def metrics_table(exp: Experiment, baseline: str) -> Table:
    """Rows: every metric of every section; columns: each SAE's value, and Δ to the baseline per other SAE."""
    names = order_saes(list(exp.saes), baseline)
    others = [n for n in names if n != baseline]
    has_base = baseline in exp.saes
    header = ["metric", *[f"{n} (baseline)" if n == baseline else n for n in names]]
    if has_base:
        header += [f"Δ {n} vs {baseline}" for n in others]
    rules = f"{PRESERVED_RULE} Values in brackets are bootstrap 95 % intervals. {NOISE_RULE}"
    table = Table("Evaluation metrics", header, [], note=rules)
    if not has_base:
        table.note = f"Baseline SAE '{baseline}' not found: no differences or verdicts. " + rules
    for short in SECTION_KEYS:
        per_sae = {n: section_metrics(exp.saes[n].sections.get(short)) for n in names}
        per_ci = {n: section_intervals(exp.saes[n].sections.get(short)) for n in names}
        per_reps = {n: section_replicates(exp.saes[n].sections.get(short)) for n in names}
        table.group_rows.add(len(table.rows))
        table.rows.append([Cell(SECTION_TITLES[short], "head")] + [Cell("") for _ in header[1:]])
        keys: list[str] = []
        for flat in per_sae.values():
            keys += [k for k in (flat or {}) if k not in keys]
        if not keys:
            table.rows.append([Cell("(all metrics)")] + [Cell("not run", "na") for _ in header[1:]])
            continue
        for key in keys:
            row = [Cell(key)]
            for n in names:
                flat = per_sae[n]
                text = fmt_interval(flat.get(key), per_ci[n].get(key)) if flat is not None else ""
                row.append(Cell("not run", "na") if flat is None else Cell(text, "num"))
            if has_base:
                row += [
                    _delta_cell(
                        short,
                        key,
                        per_sae[n],
                        per_sae[baseline],
                        per_ci[n].get(key),
                        per_ci[baseline].get(key),
                        paired(per_reps[baseline], per_reps[n], key),
                    )
                    for n in others
                ]
            table.rows.append(row)
    return table


def _delta_cell(
    section: str,
    key: str,
    flat: dict[str, Any] | None,
    base_flat: dict[str, Any] | None,
    ci: tuple[float, float] | None = None,
    base_ci: tuple[float, float] | None = None,
    reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Cell:
    """Δ to the baseline, its noise mark (NOISE_RULE: paired from `reps` = (baseline's, this SAE's
    replicates) when they pair, else from the two intervals) and the preserved verdict."""
    if flat is None or base_flat is None:
        return Cell("not run", "na")
    value, base = finite(flat.get(key)), finite(base_flat.get(key))
    if value is None or base is None:
        return Cell("—", "na")
    text = fmt_delta(value, base)
    if ci is not None and base_ci is not None and (noise := noise_verdict(base, base_ci, value, ci, reps)):
        text += " *" if noise[0] else " ~"
    verdict = preserved(key.rsplit(".", 1)[-1], value, base) if section == "core" else None
    if verdict is None:
        return Cell(text, "num")
    return Cell(f"{text} {'✓' if verdict else '✗'}", "ok" if verdict else "bad")


def speed_table(exp: Experiment, baseline: str = "topk") -> Table:
    """speed.json rows with the ratio to the baseline's seconds per step."""
    speed = exp.speed
    header = ["implementation", "seconds / step", f"ratio to {baseline}"]
    if not speed or not isinstance(speed.get("rows"), list) or not speed["rows"]:
        return Table("Training speed", header, [[Cell("not run", "na")] * 3], note="No speed.json.")
    rows_in = [r for r in speed["rows"] if isinstance(r, dict)]
    base = next((finite(r.get("seconds_per_step")) for r in rows_in if r.get("name") == baseline), None)
    rows: list[list[Cell]] = []
    for r in rows_in:
        sps = finite(r.get("seconds_per_step"))
        ratio = finite(r.get("ratio_to_baseline"))
        if ratio is None and sps is not None and base:
            ratio = sps / base
        rows.append(
            [
                Cell(str(r.get("name", "?"))),
                Cell(fmt(sps), "num"),
                Cell("—" if ratio is None else f"{ratio:.2f}×", "num"),
            ]
        )
    shape = speed.get("shape") or {}
    shape_text = ", ".join(f"{k}={v}" for k, v in shape.items()) if isinstance(shape, dict) else str(shape)
    note = f"Machine: {speed.get('machine', 'unknown')}. Shape: {shape_text or 'unknown'}."
    return Table("Training speed", header, rows, note=note)


def training_table(exp: Experiment, baseline: str) -> Table:
    """Last metrics.jsonl row per SAE: the state training ended in."""
    keys = ["step", "tokens", "loss", "recon", "auxk", "l1", "orth", "l0", "dead_frac"]
    header = ["SAE", *keys]
    rows: list[list[Cell]] = []
    for n in order_saes(list(exp.saes), baseline):
        m = exp.saes[n].metrics
        if not m:
            rows.append([Cell(n)] + [Cell("not run", "na") for _ in keys])
            continue
        last = m[-1]
        rows.append([Cell(n)] + [Cell(fmt(last.get(k)), "num") for k in keys])
    return Table("Training (last logged step)", header, rows)


def sae_table(exp: Experiment, baseline: str) -> Table:
    """What each SAE is: architecture, width, k, penalty settings."""
    header = ["SAE", "arch", "d_in", "d_sae", "k", "model", "layer", "orthogonality"]
    rows: list[list[Cell]] = []
    for n in order_saes(list(exp.saes), baseline):
        cfg = exp.saes[n].cfg or {}
        orth = cfg.get("orthogonality")
        orth_text = (
            ", ".join(f"{k}={fmt(v) if finite(v) is not None else v}" for k, v in orth.items())
            if isinstance(orth, dict)
            else "off"
        )
        values = [cfg.get(k) for k in ("arch", "d_in", "d_sae", "k", "model_name", "hook_layer")]
        rows.append([Cell(n)] + [Cell("—" if v is None else str(v)) for v in values] + [Cell(orth_text)])
    return Table("SAEs", header, rows)
