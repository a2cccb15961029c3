"""Side-by-side comparison of two or more results JSONs: every numeric metric, with its difference to the
first (the baseline) and, where both values carry a 95 % interval (`<metric>_ci95`), whether that difference
is outside the noise. Where both sections stored bootstrap replicates drawn on the same items (every SAE of
an experiment), the verdict is paired: the percentile interval of the resample-by-resample differences
excludes 0 (uncertainty.paired_differs); otherwise the two intervals are taken as independent
(uncertainty.differs)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS, section_metrics, section_replicates
from orthosae.eval.uncertainty import CI_SUFFIX, Replicates, noise_verdict, paired

EVAL_FILE = "eval.json"
_SHORT = {v: k for k, v in SECTION_KEYS.items()}


@dataclass
class Row:
    metric: str  # "<eval>/<group>/<name>", e.g. "core/reconstruction_quality/explained_variance"
    values: list[float | None]
    diffs: list[float | None]  # values[i] − values[0]; None where either is missing
    cis: list[tuple[float, float] | None] | None = None  # each value's 95 % interval, where it has one
    outside_noise: list[bool | None] | None = None  # per value: does its Δ exclude 0? None: no intervals
    rules: list[str | None] | None = None  # per value: "paired" or "independent", the rule of its verdict


NOISE_RULE = (
    "Δ marked * is outside the noise, ~ inside it; no mark: a value without an interval. Where both SAEs "
    "stored bootstrap replicates drawn on the same items with the same resamples (the SAEs of one "
    "experiment), the rule is paired: the 95 % percentile interval of the resample-by-resample differences "
    "excludes 0. Otherwise it is independent: the 95 % interval of the difference, from the two values' "
    "bootstrap intervals taken as independent, excludes 0 (conservative when both SAEs were scored on the "
    "same items)."
)


def results_path(path: str | Path) -> Path:
    """A run directory's eval.json, or the JSON file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / EVAL_FILE
        if not p.is_file():
            raise UserError(f"{p.parent} has no {EVAL_FILE}: run `orthosae eval {p.parent}` first")
    elif not p.is_file():
        raise UserError(f"no results at {path}: give a run directory holding {EVAL_FILE} or a results JSON")
    return p


def load_results(path: str | Path) -> dict[str, Any]:
    p = results_path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not any(k in data for k in _SHORT):
        raise UserError(f"{p} holds no eval sections ({', '.join(SECTION_KEYS.values())})")
    return data


def _interval(v: Any) -> tuple[float, float] | None:
    if isinstance(v, list | tuple) and len(v) == 2 and all(_number(x) for x in v):
        return float(v[0]), float(v[1])
    return None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every numeric leaf of every section's metrics, keyed '<eval>/<path>'; lists and strings skipped."""
    return _flatten(results)[0]


def flatten_intervals(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The 95 % intervals: {'<eval>/<path of the metric>': (lo, hi)} from every `<metric>_ci95` leaf."""
    return _flatten(results)[1]


def _flatten(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    flat: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k.endswith(CI_SUFFIX):
                    if (ci := _interval(v)) is not None:
                        cis[f"{prefix}/{k.removesuffix(CI_SUFFIX)}"] = ci
                elif k != "formulas":
                    walk(f"{prefix}/{k}", v)
        elif isinstance(obj, int | float) and not isinstance(obj, bool):
            flat[prefix] = float(obj)

    for key, block in results.items():
        if key in _SHORT and isinstance(block, dict):
            walk(_SHORT[key], section_metrics(block))
            if isinstance(block.get("eval_wall_time_s"), int | float):
                flat[f"{_SHORT[key]}/eval_wall_time_s"] = float(block["eval_wall_time_s"])
    return flat, cis


def flatten_replicates(results: dict[str, Any]) -> dict[str, Replicates]:
    """Per eval, (pairing key, {'<eval>/<path of the metric>': replicates}) of its stored bootstrap
    replicates; an eval without them is left out."""
    out: dict[str, Replicates] = {}
    for key, block in results.items():
        if key in _SHORT and isinstance(block, dict):
            pairing, reps = section_replicates(block)
            if reps:
                short = _SHORT[key]
                out[short] = (pairing, {f"{short}/{k.replace('.', '/')}": v for k, v in reps.items()})
    return out


def _replicates_of(flat: dict[str, Replicates], metric: str) -> Replicates:
    return flat.get(metric.split("/", 1)[0], (None, {}))


def compare_rows(results: list[dict[str, Any]]) -> list[Row]:
    """One row per metric present in any of the results, in first-seen order."""
    both = [_flatten(r) for r in results]
    reps = [flatten_replicates(r) for r in results]
    flats = [f for f, _ in both]
    names = list(dict.fromkeys(k for f in flats for k in f))
    rows = []
    for name in names:
        values = [f.get(name) for f in flats]
        base = values[0]
        diffs = [None if v is None or base is None else v - base for v in values]
        cis = [c.get(name) for _, c in both]
        base_reps = _replicates_of(reps[0], name)
        verdicts = [
            None
            if v is None or base is None
            else noise_verdict(base, cis[0], v, ci, paired(base_reps, _replicates_of(r, name), name))
            for v, ci, r in zip(values, cis, reps, strict=True)
        ]
        has_ci = any(c is not None for c in cis)
        noise = [None if x is None else x[0] for x in verdicts] if has_ci else None
        rules = [None if x is None else x[1] for x in verdicts] if has_ci else None
        rows.append(Row(name, values, diffs, cis if has_ci else None, noise, rules))
    return rows


def _num(v: float | None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    text = f"{v:+.4g}" if signed else f"{v:.4g}"
    return text


def format_rows(rows: list[Row], labels: list[str]) -> str:
    """Plain-text table: metric, then per SAE its value and (after the first) the difference Δ."""
    header = ["metric", labels[0]]
    for label in labels[1:]:
        header += [label, "Δ"]
    table = [header]
    for row in rows:
        cis = row.cis or [None] * len(row.values)
        noise = row.outside_noise or [None] * len(row.values)
        cells = [row.metric, _value(row.values[0], cis[0])]
        for v, d, ci, out in zip(row.values[1:], row.diffs[1:], cis[1:], noise[1:], strict=True):
            mark = "" if out is None or d is None else (" *" if out else " ~")
            cells += [_value(v, ci), _num(d, signed=True) + mark]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.cis for r in rows):
        lines += ["", NOISE_RULE + _rules_used(rows)]
    return "\n".join(lines)


def _rules_used(rows: list[Row]) -> str:
    """How many marked differences each rule decided (the baseline's own column excluded)."""
    used = [u for r in rows for u in (r.rules or [])[1:] if u is not None]
    counts = ", ".join(f"{used.count(u)} {u}" for u in ("paired", "independent") if u in used)
    return f" Rules used here: {counts}." if counts else ""


def _value(v: float | None, ci: tuple[float, float] | None) -> str:
    return _num(v) if ci is None or v is None else f"{_num(v)} [{_num(ci[0])}, {_num(ci[1])}]"


def compare(paths: list[str | Path]) -> tuple[list[Row], list[str]]:
    if len(paths) < 2:
        raise UserError("--compare needs two or more run directories or results files")
    results = [load_results(p) for p in paths]
    labels = [_label(Path(p)) for p in paths]
    return compare_rows(results), labels


def _label(path: Path) -> str:
    return path.name if path.is_dir() else (path.parent.name or path.stem)
