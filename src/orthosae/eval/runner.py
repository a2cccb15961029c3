"""Run a list of evals on one SAE and assemble the results JSON.

Each eval is the module `orthosae.eval.<name>` with a `Config` dataclass and `evaluate(ctx, cfg)`. Settings
come from the Config defaults, overridden by an optional TOML file with one table per eval:

    [core]
    n_eval_reconstruction_batches = 20
    [absorption]
    ...
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import re
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, get_args, get_origin

from orthosae.atomic import write_text
from orthosae.config import from_dict, read_toml
from orthosae.errors import UserError
from orthosae.eval.context import EvalContext
from orthosae.eval.results import SECTION_KEYS

EVALS: tuple[str, ...] = tuple(SECTION_KEYS)
T = TypeVar("T")


def parse_evals(text: str) -> list[str]:
    """'core,absorption' → ['core', 'absorption']; unknown names are refused with the closest one."""
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--evals is empty: give one or more of {', '.join(EVALS)}")
    for name in names:
        if name not in EVALS:
            hint = difflib.get_close_matches(name, EVALS, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise UserError(f"unknown eval '{name}': choose from {', '.join(EVALS)}{extra}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def eval_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"orthosae.eval.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"orthosae.eval.{name}":
            raise UserError(f"eval {name} is not available in this version of orthosae") from None
        raise


def _is_sequence(tp: Any) -> bool:
    base = tp
    if get_origin(tp) in (typing.Union, __import__("types").UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        base = args[0] if len(args) == 1 else tp
    return get_origin(base) in (list, tuple) or base in (list, tuple)


def build_config(cls: type[T], table: dict[str, Any], source: str) -> T:
    """`cls` from a TOML table: unknown keys and wrong types refused by orthosae.config.from_dict.

    from_dict knows scalar fields only; list/tuple fields (e.g. k values) are checked here to be arrays
    and set afterwards, converted to the field's container type.
    """
    if not isinstance(table, dict):
        raise UserError(f"{source} must be a table of settings, found {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    seqs = {
        k: v
        for k, v in table.items()
        if k.replace("-", "_") in hints and _is_sequence(hints[k.replace("-", "_")])
    }
    scalars = {k: v for k, v in table.items() if k not in seqs}
    cfg = from_dict(cls, scalars, source=source)
    updates: dict[str, Any] = {}
    for key, value in seqs.items():
        name = key.replace("-", "_")
        if not isinstance(value, list):
            raise UserError(f"{source}: '{key}' must be an array, e.g. [1, 2, 5], got {value!r}")
        current = getattr(cfg, name)
        updates[name] = tuple(value) if isinstance(current, tuple) else list(value)
    if updates:
        cfg = dataclasses.replace(cfg, **updates)  # type: ignore[type-var]
        if callable(validate := getattr(cfg, "validate", None)):
            validate()
    return cfg


def read_eval_toml(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """{eval name: table}; top-level keys that are not a known eval's table are refused."""
    if path is None:
        return {}
    data = read_toml(path)
    known = (*EVALS, "synthetic")
    for key, value in data.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            extra = (
                f"; did you mean [{hint[0]}]?"
                if hint
                else f"; tables are {', '.join(f'[{k}]' for k in known)}"
            )
            raise UserError(f"{path}: unknown table '{key}'{extra}")
        if not isinstance(value, dict):
            raise UserError(f"{path}: '{key}' must be a table ([{key}]), not a single value")
    return data


def eval_config(name: str, tables: dict[str, dict[str, Any]], source: str = "eval config") -> Any:
    module = eval_module(name)
    return build_config(module.Config, tables.get(name, {}), f"{source} [{name}]")


def run_evals(
    ctx: EvalContext,
    names: list[str],
    tables: dict[str, dict[str, Any]] | None = None,
    *,
    source: str = "eval config",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `names` in order; returns {SECTION_KEYS[name]: section}. Configs are all built (and checked)
    before the first eval starts, so a typo in the TOML fails in a second, not after an hour."""
    tables = tables or {}
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    configs = {name: eval_config(name, tables, source) for name in names}
    results: dict[str, Any] = {}
    for i, name in enumerate(names, 1):
        log(f"[{i}/{len(names)}] {name} …")
        start = time.perf_counter()
        block = eval_module(name).evaluate(ctx, configs[name])
        wall = time.perf_counter() - start
        block["eval_wall_time_s"] = round(wall, 3)
        results[SECTION_KEYS[name]] = block
        log(f"[{i}/{len(names)}] {name} done in {wall:.1f} s")
    return results


# An indented JSON array of numbers (or nulls). A raw newline after "[" is layout, never string content
# (json.dumps escapes newlines in strings), so only real arrays match.
_NUMBER = r"(?:-?(?:\d[\d.eE+-]*|Infinity)|NaN|null)"
_NUMBER_ARRAY = re.compile(rf"\[\n\s+({_NUMBER}(?:,\n\s+{_NUMBER})*)\n\s*\]")


def results_text(results: dict[str, Any]) -> str:
    """eval.json's text: indented JSON with every array of numbers on one line (a section's bootstrap
    replicates are thousands of numbers: one per line would make the file long to read and to scroll)."""
    text = json.dumps(results, indent=2)
    return _NUMBER_ARRAY.sub(lambda m: "[" + re.sub(r",\n\s+", ", ", m.group(1)) + "]", text) + "\n"


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, results_text(results))
    return path
