"""Read an experiment directory (runs/<name>/) into plain Python data; every piece is optional.

A missing file or section becomes None (the report says "not run"); a file that exists but is not valid
JSON/TOML is a one-line UserError, because silently skipping it would hide a broken run.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS
from orthosae.sae.io import weights_file

SAES_DIR = "saes"


@dataclass
class SAERun:
    """One trained SAE of the experiment and what its run directory holds."""

    name: str
    path: Path
    cfg: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    sections: dict[str, dict[str, Any] | None]  # short section name ("core", …) → result block or None

    @property
    def has_weights(self) -> bool:
        return weights_file(self.path).is_file()

    @property
    def is_orth(self) -> bool:
        return isinstance(self.cfg, dict) and isinstance(self.cfg.get("orthogonality"), dict)


@dataclass
class Experiment:
    path: Path
    config: dict[str, Any]
    saes: dict[str, SAERun]
    speed: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    synthetic: dict[str, Any] | None = None  # the toy-model benchmark at the experiment's λ values

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def cache_path(self) -> Path | None:
        """The activation cache used: experiment.toml's `cache`, a `cache` entry, or an SAE's cfg.json."""
        candidates: list[Any] = [self.config.get("cache"), self.path / "cache"]
        for run in self.saes.values():
            if run.cfg:
                candidates.append(run.cfg.get("activations"))
                training = run.cfg.get("training")
                if isinstance(training, dict):
                    candidates.append(training.get("activations"))
        for c in candidates:
            if not c:
                continue
            # A relative path may be relative to where the runner ran (the repo root) or to this directory.
            for p in (Path(c), self.path / c):
                if (p / "manifest.json").is_file():
                    return p
        return None


def read_json(path: Path) -> Any:
    """Parse a JSON file or raise a one-line UserError naming it. Missing → None."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it and rerun") from None


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path} is not valid TOML ({e}); fix or delete it and rerun") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a run killed mid-write) is dropped, anything else is an error."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} line {i + 1} is not valid JSON ({e}); fix or delete it") from None
        if isinstance(row, dict):
            rows.append({k: _num(v) for k, v in row.items()})
    return rows


def _num(v: Any) -> Any:
    # MetricsLog writes non-finite floats as strings ("nan", "inf").
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return v


def split_sections(blob: Any, where: Path) -> dict[str, dict[str, Any] | None]:
    """{"core": block|None, …} from an eval.json-style dict keyed by the seed's section names."""
    if blob is None:
        return dict.fromkeys(SECTION_KEYS)
    if not isinstance(blob, dict):
        raise UserError(f"{where} must hold a JSON object keyed by evaluation, found {type(blob).__name__}")
    out: dict[str, dict[str, Any] | None] = {}
    for short, key in SECTION_KEYS.items():
        block = blob.get(key, blob.get(short))
        out[short] = block if isinstance(block, dict) else None
    return out


def load_experiment(exp_dir: str | Path) -> Experiment:
    path = Path(exp_dir)
    if not path.is_dir():
        raise UserError(f"experiment directory not found: {path}")
    config = _read_toml(path / "experiment.toml")
    combined = read_json(path / "results.json")
    if combined is not None and not isinstance(combined, dict):
        raise UserError(f"{path / 'results.json'} must hold a JSON object keyed by SAE name")
    speed = read_json(path / "speed.json")
    if speed is not None and not isinstance(speed, dict):
        raise UserError(f"{path / 'speed.json'} must hold a JSON object")
    saes: dict[str, SAERun] = {}
    sae_root = path / SAES_DIR
    names = sorted(p.name for p in sae_root.iterdir() if p.is_dir()) if sae_root.is_dir() else []
    names += sorted(n for n in (combined or {}) if n not in names)
    for name in names:
        run_dir = sae_root / name
        cfg = read_json(run_dir / "cfg.json")
        evals = read_json(run_dir / "eval.json")
        where = run_dir / "eval.json"
        if evals is None and combined is not None:
            evals, where = combined.get(name), path / "results.json"
        saes[name] = SAERun(
            name=name,
            path=run_dir,
            cfg=cfg if isinstance(cfg, dict) else None,
            metrics=read_metrics(run_dir / "metrics.jsonl"),
            sections=split_sections(evals, where),
        )
    if not saes:
        raise UserError(f"{path} holds no SAEs (expected {SAES_DIR}/<name>/ or results.json)")
    synthetic = read_json(path / "synthetic.json")
    if synthetic is not None and not isinstance(synthetic, dict):
        raise UserError(f"{path / 'synthetic.json'} must hold a JSON object")
    return Experiment(path=path, config=config, saes=saes, speed=speed, synthetic=synthetic)


def order_saes(names: list[str], baseline: str) -> list[str]:
    """Baseline first, then the rest in their order."""
    return ([baseline] if baseline in names else []) + [n for n in names if n != baseline]


def finite(v: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None
