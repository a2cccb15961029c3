"""Side-by-side comparison of two or more results JSONs: every numeric metric, with its difference to the
first (the baseline)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS, section_metrics

EVAL_FILE = "eval.json"
_SHORT = {v: k for k, v in SECTION_KEYS.items()}


@dataclass
class Row:
    metric: str  # "<eval>/<group>/<name>", e.g. "core/reconstruction_quality/explained_variance"
    values: list[float | None]
    diffs: list[float | None]  # values[i] − values[0]; None where either is missing


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


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every numeric leaf of every section's metrics, keyed '<eval>/<path>'; lists and strings skipped."""
    flat: dict[str, float] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k != "formulas":
                    walk(f"{prefix}/{k}", v)
        elif isinstance(obj, int | float) and not isinstance(obj, bool):
            flat[prefix] = float(obj)

    for key, block in results.items():
        if key in _SHORT and isinstance(block, dict):
            walk(_SHORT[key], section_metrics(block))
            if isinstance(block.get("eval_wall_time_s"), int | float):
                flat[f"{_SHORT[key]}/eval_wall_time_s"] = float(block["eval_wall_time_s"])
    return flat


def compare_rows(results: list[dict[str, Any]]) -> list[Row]:
    """One row per metric present in any of the results, in first-seen order."""
    flats = [flatten_metrics(r) for r in results]
    names = list(dict.fromkeys(k for f in flats for k in f))
    rows = []
    for name in names:
        values = [f.get(name) for f in flats]
        base = values[0]
        diffs = [None if v is None or base is None else v - base for v in values]
        rows.append(Row(name, values, diffs))
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
        cells = [row.metric, _num(row.values[0])]
        for v, d in zip(row.values[1:], row.diffs[1:], strict=True):
            cells += [_num(v), _num(d, signed=True)]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(paths: list[str | Path]) -> tuple[list[Row], list[str]]:
    if len(paths) < 2:
        raise UserError("--compare needs two or more run directories or results files")
    results = [load_results(p) for p in paths]
    labels = [_label(Path(p)) for p in paths]
    return compare_rows(results), labels


def _label(path: Path) -> str:
    return path.name if path.is_dir() else (path.parent.name or path.stem)
