"""Load any SAE directory orthosae can evaluate: its own run directories, SAELens's, dictionary_learning's.

    sae, cfg = load_any("runs/topk")          # orthosae (or a pre-0.2 run directory)
    sae, cfg = load_any("saelens_dir")        # SAELens: cfg.json + sae_weights.safetensors
    sae, cfg = load_any("dl_dir")             # dictionary_learning: ae.pt + config.json

`cfg` always holds our keys (arch, d_in, d_sae, k where used, model_name and hook_layer when the source
says, `format`), so the evaluations need not know where an SAE came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orthosae.errors import UserError
from orthosae.interop.saelens import CFG_NAME, WEIGHTS_NAME, fold_foreign_options, foreign_hyperparams
from orthosae.sae.base import SAE
from orthosae.sae.io import (
    LEGACY_WEIGHTS_NAME,
    build_from_cfg,
    check_tensors,
    load_sae,
    read_cfg,
    read_tensors,
)

FORMATS = ("orthosae", "saelens", "dictionary_learning")


def detect(path: str | Path) -> str:
    """Which library wrote the SAE directory at `path` (one of FORMATS); one-line error otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no SAE at {path}: the path does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "orthosae"
        raise UserError(f"{path} is a file; give the SAE's directory")
    if (path / "ae.pt").is_file() and (path / "config.json").is_file():
        return "dictionary_learning"
    has_weights = (path / WEIGHTS_NAME).is_file() or (path / LEGACY_WEIGHTS_NAME).is_file()
    if has_weights and (path / CFG_NAME).is_file():
        return "orthosae" if "arch" in read_cfg(path / CFG_NAME) else "saelens"
    raise UserError(
        f"{path} holds no SAE orthosae can read: expected cfg.json with {WEIGHTS_NAME} (orthosae, SAELens) "
        "or ae.pt with config.json (dictionary_learning)"
    )


def load_any(path: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """(sae, cfg) from a directory in any of FORMATS."""
    fmt = detect(path)
    if fmt == "dictionary_learning":
        from orthosae.interop.dictionary_learning import read_dictionary_learning

        sae, cfg = read_dictionary_learning(path, device=device)
        return sae, {**cfg, "format": fmt}
    if fmt == "saelens":
        return load_saelens(path, device=device)
    sae, cfg = load_sae(path, device=device)
    return sae, {**cfg, "format": fmt}


def load_saelens(path: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """An SAE directory SAELens wrote (`save_model` / `save_inference_model`), as one of our modules."""
    path = Path(path)
    cfg_path, weights = path / CFG_NAME, path / WEIGHTS_NAME
    raw = read_cfg(cfg_path)
    ours = foreign_hyperparams(raw, str(cfg_path))
    sae = build_from_cfg(ours, cfg_path, device)
    tensors = read_tensors(weights)
    # SAELens keeps scaling_factor all ones after folding; any other value needs its runtime scaling.
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not bool((scale == 1).all()):
        raise UserError(
            f"{weights}: a scaling_factor other than 1 is not supported; fold it in SAELens first"
        )
    fold_foreign_options(sae, raw, tensors)
    check_tensors(sae, tensors, weights, ours.get("dtype"))
    sae.load_saved_(tensors, {})
    return sae.to(device).eval(), {**raw, **ours}


def read_info(path: str | Path) -> dict[str, Any]:
    """model_name / hook_layer (where recorded) of an SAE directory, without reading its weights."""
    fmt = detect(path)
    path = Path(path)
    if fmt == "dictionary_learning":
        trainer = read_cfg(path / "config.json").get("trainer")
        trainer = trainer if isinstance(trainer, dict) else {}
        found = {"model_name": trainer.get("lm_name"), "hook_layer": trainer.get("layer")}
        return {k: v for k, v in found.items() if v is not None}
    cfg = read_cfg((path if path.is_dir() else path.parent) / CFG_NAME)
    if fmt == "saelens":
        return foreign_hyperparams(cfg, str(path / CFG_NAME))
    return cfg
