"""What an evaluation's result depends on, as one fingerprint per eval, so a re-run redoes only the evals
whose inputs changed: the SAE's weights, the eval's settings, the model/layer/seed, and the eval code."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from orthosae.atomic import write_json
from orthosae.eval.context import eval_code_sha
from orthosae.eval.results import SECTION_KEYS

INPUTS_NAME = "eval.inputs.json"  # next to eval.json: {eval name: fingerprint}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprints(config_by_eval: dict[str, Any], weights: Path, context: dict[str, Any]) -> dict[str, str]:
    """{eval name: fingerprint} from each eval's Config dataclass, the weights file and `context`."""
    base = {"weights": file_sha(weights), "code": eval_code_sha(), **context}
    return {
        name: _sha(
            json.dumps(
                {**base, "eval": name, "config": dataclasses.asdict(cfg)}, sort_keys=True, default=str
            ).encode()
        )
        for name, cfg in config_by_eval.items()
    }


def reusable(run_dir: Path, wanted: dict[str, str]) -> dict[str, Any]:
    """{section key: block} of eval.json whose recorded fingerprint equals the wanted one."""
    try:
        recorded = json.loads((run_dir / INPUTS_NAME).read_text())
        results = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or not isinstance(results, dict):
        return {}
    return {
        SECTION_KEYS[name]: results[SECTION_KEYS[name]]
        for name, fp in wanted.items()
        if recorded.get(name) == fp and isinstance(results.get(SECTION_KEYS[name]), dict)
    }


def record(run_dir: Path, fps: dict[str, str]) -> None:
    write_json(run_dir / INPUTS_NAME, fps)
