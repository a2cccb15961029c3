"""Experiment and sweep files: top-level settings, a [train] table shared by every SAE, one [saes.NAME]
table per SAE (TrainConfig overrides), and optionally a [sweep] grid that expands into more SAEs.

A [saes.NAME] table may set `seeds = N`: the variant is trained N times from one activation stream, with
initialisation seeds seed, seed+1, …, as NAME, NAME-seed2, …, NAME-seedN. The variant → SAE names map is
kept as `groups`, so the report can give each variant's seed-to-seed spread."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthosae.config import from_dict, read_toml
from orthosae.errors import UserError
from orthosae.train.config import TrainConfig

_TABLES = ("train", "saes", "sweep", "eval")
# Fields the experiment sets for every SAE; a [train] or [saes.*] table may not override them.
_OWNED = ("activations", "model", "layer", "tokens", "corpus", "context_size", "out", "overwrite")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Experiment name; the default output directory is runs/NAME."""
    out: str | None = None
    """Output directory (default runs/NAME): saes/, speed.json, results.json, report.md/html."""
    model: str = "smollm2-135m"
    """Language model: 'smollm2-135m' (bundled, offline), a hub id, or a local directory."""
    layer: int = 15
    """Decoder block whose output (resid_post) the SAEs reconstruct, 0-based."""
    tokens: int = 300_000
    """Activations to harvest into the cache that every SAE trains from (accepts 2M, 500k)."""
    corpus: str = "bundled"
    """Text to harvest from: 'bundled', a .txt/.jsonl/.parquet file, or a dataset id."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    cache: str | None = None
    """Activation cache directory (default cache/MODEL-lLAYER-TOKENS); reused across runs when it matches."""
    remove_high_norm: float = 10.0
    """Drop tokens whose norm exceeds this multiple of the batch median when caching; 0 keeps all."""
    evals: str = "core,absorption,sparse_probing,unlearning"
    """Comma-separated evaluations to run on every SAE ('' for none)."""
    baseline: str = "topk"
    """Name of the SAE the report compares the others against."""
    report_feature_tokens: int = 200_000
    """Cache tokens the report's feature browser scans (its cost grows with this × the number of SAEs)."""
    synthetic: bool = True
    """Also run the toy-model benchmark (seconds) at the experiment's λ values: exact absorption vs λ."""
    speed_steps: int = 3
    """Timed optimizer steps per variant in the speed comparison (0 skips it)."""
    seed: int = 42
    """Seed of the data order and of every SAE's initialisation."""
    progress: bool = True
    """Show progress bars."""

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def cache_dir(self) -> Path:
        if self.cache:
            return Path(self.cache)
        model = Path(self.model).name.replace("/", "_")
        return Path("cache") / f"{model}-l{self.layer}-{self.tokens}"

    def eval_names(self) -> list[str]:
        return [e.strip() for e in self.evals.split(",") if e.strip()]

    def validate(self) -> None:
        for name in ("tokens", "context_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"experiment: '{name}' must be positive, got {getattr(self, name)}")
        if self.layer < 0:
            raise UserError(f"experiment: 'layer' must be ≥ 0, got {self.layer}")
        if self.speed_steps < 0:
            raise UserError(f"experiment: 'speed_steps' must be ≥ 0, got {self.speed_steps}")


@dataclass
class Experiment:
    cfg: ExperimentConfig
    saes: dict[str, TrainConfig]
    path: Path | None = None
    eval_tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # [eval.core] etc.: eval settings
    groups: dict[str, list[str]] = field(default_factory=dict)  # variant → its SAEs (one per seed)


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    data = read_toml(path)
    return build_experiment(data, source=str(path), overrides=overrides, path=Path(path))


def build_experiment(
    data: dict[str, Any], *, source: str, overrides: dict[str, Any] | None = None, path: Path | None = None
) -> Experiment:
    """Resolve an experiment mapping (as read from TOML) into per-SAE TrainConfigs."""
    top = {k: v for k, v in data.items() if k not in _TABLES}
    cfg = from_dict(ExperimentConfig, {**top, **(overrides or {})}, source=source)
    shared = _table(data, "train", source)
    named = {name: _table(data["saes"], name, f"{source} [saes]") for name in _table(data, "saes", source)}
    named.update(_expand_sweep(_table(data, "sweep", source), source))
    if not named:
        raise UserError(f"{source}: no SAEs to train; add [saes.NAME] tables or a [sweep] grid")
    named, groups = _expand_seeds(named, cfg.seed, source)
    saes = {}
    for name, table in named.items():
        for key in (*shared, *table):
            if key in _OWNED:
                raise UserError(f"{source}: '{key}' is set by the experiment itself; remove it from [{name}]")
        merged = {
            **shared,
            **table,
            "activations": str(cfg.cache_dir()),
            "out": str(cfg.out_dir() / "saes" / name),
        }
        merged.setdefault("seed", cfg.seed)
        merged.setdefault("progress", False)
        saes[name] = from_dict(TrainConfig, merged, source=f"{source} [saes.{name}]")
    _check_one_stream(saes, source)
    evals = _table(data, "eval", source)
    for name, table in evals.items():
        if not isinstance(table, dict):
            raise UserError(f"{source}: [eval.{name}] must be a table of that evaluation's settings")
    return Experiment(cfg, saes, path, evals, groups)


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{source}: '{key}' must be a table, found {type(value).__name__}")
    return value


def _expand_seeds(
    named: dict[str, dict[str, Any]], seed: int, source: str
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """`seeds = N` in a table → N tables differing only in init_seed; returns them and variant → names."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for name, table in named.items():
        n = table.get("seeds", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{source} [saes.{name}]: 'seeds' must be a whole number ≥ 1, got {n!r}")
        if n > 1 and "init_seed" in table:
            raise UserError(f"{source} [saes.{name}]: set 'seeds' or 'init_seed', not both")
        rest = {k: v for k, v in table.items() if k != "seeds"}
        base = rest.get("init_seed", rest.get("seed", seed))
        groups[name] = [name] + [f"{name}-seed{i + 1}" for i in range(1, n)]
        for i, member in enumerate(groups[name]):
            if member in out or (i and member in named):
                raise UserError(f"{source}: SAE name '{member}' is used twice; rename [saes.{member}]")
            out[member] = rest if n == 1 else {**rest, "init_seed": base + i}
    return out, groups


def _expand_sweep(grid: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """{field: [values]} → one SAE per combination, named 'field=value+…' (a valid directory name)."""
    if not grid:
        return {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{source} [sweep]: '{key}' must be a non-empty list of values")
    keys = list(grid)
    out = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        out["+".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True))] = dict(
            zip(keys, combo, strict=True)
        )
    return out


def _check_one_stream(saes: dict[str, TrainConfig], source: str) -> None:
    """Every SAE consumes the same batches, so batch size, step count and data seed must agree."""
    for key in ("batch_size", "steps", "seed", "device"):
        values = {getattr(c, key) for c in saes.values()}
        if len(values) > 1:
            raise UserError(
                f"{source}: all SAEs share one activation stream, so '{key}' must agree (found {values})"
            )
