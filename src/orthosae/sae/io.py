"""Strict save/load: a run directory in SAELens 6's layout (sae_weights.safetensors + cfg.json).

SAELens's `SAE.load_from_disk(run_dir)` loads it as is (see orthosae.interop.saelens); our own keys sit at
cfg.json's top level, which SAELens ignores. A file whose tensors, shapes, dtype or architecture disagree
with its cfg.json is refused with a one-line `UserError`; nothing is ever loaded silently as something
else. Run directories of orthosae < 0.2 (`sae.safetensors`, thresholds as tensors) still load.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from orthosae import __version__
from orthosae.atomic import write_json, write_with
from orthosae.errors import UserError
from orthosae.interop.saelens import CFG_NAME, WEIGHTS_NAME, saelens_cfg
from orthosae.sae.archs import ARCHS
from orthosae.sae.base import SAE

LEGACY_WEIGHTS_NAME = "sae.safetensors"  # orthosae < 0.2
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_file(run_dir: str | Path) -> Path:
    """The weights file of a run directory: the current name, else the pre-0.2 one if only that exists."""
    run_dir = Path(run_dir)
    current, legacy = run_dir / WEIGHTS_NAME, run_dir / LEGACY_WEIGHTS_NAME
    return legacy if legacy.is_file() and not current.is_file() else current


def sae_cfg(sae: SAE, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json contents: SAELens's config and metadata, then our keys (which SAELens ignores)."""
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    return {
        **saelens_cfg(sae, extra),
        "orthosae_version": __version__,
        **sae.hyperparams(),
        **sae.state_cfg(),
        **extra,
    }


def save_sae(sae: SAE, directory: str | Path, extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write `sae_weights.safetensors` and `cfg.json` into `directory` atomically (weights first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.saved_tensors().items()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise UserError(f"refusing to save: SAE tensor '{name}' contains NaN or inf")
    blob = st_save(tensors, metadata={"format": "pt"})
    write_with(directory / WEIGHTS_NAME, lambda f: f.write(blob))
    # The checksum lets a load tell a flipped bit from a legitimately different SAE.
    cfg = {**sae_cfg(sae, extra_cfg), "weights_sha256": hashlib.sha256(blob).hexdigest()}
    write_json(directory / CFG_NAME, cfg)
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():  # retraining into a pre-0.2 run directory: one weights file, not two
        legacy.unlink()
    return directory


def read_cfg(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"missing {path.name} next to the weights: {path}; an SAE needs both files")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it from the run that wrote it") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(cfg).__name__}")
    return cfg


def _positive_int(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{path}: '{key}' must be a positive integer, found {value!r}")
    return value


def build_from_cfg(cfg: dict[str, Any], path: Path, device: str = "cpu") -> SAE:
    """An SAE module with the architecture cfg.json describes (weights still zero)."""
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise UserError(f"{path}: 'arch' must be one of {sorted(ARCHS)}, found {arch!r}")
    d_in, d_sae = _positive_int(cfg, "d_in", path), _positive_int(cfg, "d_sae", path)
    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")))
    if dtype is None:
        raise UserError(f"{path}: unsupported dtype {cfg.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    hp: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae}
    if ARCHS[arch].uses_k:
        hp["k"] = k = _positive_int(cfg, "k", path)
        if k > d_sae:
            raise UserError(f"{path}: k={k} is larger than d_sae={d_sae}")
    if arch == "matryoshka":
        sizes = cfg.get("group_sizes")
        ok = isinstance(sizes, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
        if not ok or not sizes or any(s <= 0 for s in sizes) or sum(sizes) != d_sae:
            raise UserError(f"{path}: 'group_sizes' must be positive ints summing to d_sae, got {sizes!r}")
        hp["group_sizes"] = sizes
    return ARCHS[arch].from_hyperparams(hp, {"dtype": dtype, "device": device})


def _check_sha256(weights: Path, expected: object) -> None:
    """Verify the checksum save_sae recorded; files from other tools carry none and are not checked."""
    if expected is None:
        return
    try:
        actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"cannot read {weights}: {e.strerror or e}") from None
    if actual != expected:
        raise UserError(
            f"{weights} does not match the sha256 in cfg.json: the file is corrupt; re-save or re-train it"
        )


def read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, with one-line errors for unreadable files."""
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as e:
        raise UserError(f"{weights} is corrupt or truncated ({e}); re-save or re-train it") from None
    except OSError as e:
        raise UserError(f"cannot read {weights}: {e.strerror or e}") from None


def check_tensors(sae: SAE, tensors: dict[str, torch.Tensor], weights: Path, dtype_label: object) -> None:
    """The file's tensors are exactly the ones `sae` saves: names, shapes, dtype, all finite."""
    expected = sae.saved_tensors()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise UserError(
            f"{weights}: tensors do not match a {sae.arch} SAE (missing {missing}, unexpected {extra})"
        )
    for name, param in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise UserError(
                f"{weights}: '{name}' has shape {tuple(t.shape)} but cfg.json implies {tuple(param.shape)}"
            )
        if t.dtype != param.dtype:
            raise UserError(f"{weights}: '{name}' is {dtype_name(t.dtype)} but cfg.json says {dtype_label}")
        if not torch.isfinite(t).all():
            raise UserError(f"{weights}: '{name}' contains NaN or inf; the file is unusable")


def _from_legacy(sae: SAE, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """Pre-0.2 files kept TopK's and BatchTopK's scalar thresholds as tensors: move them where they live
    now (TopK: cfg.json; BatchTopK/Matryoshka: one per latent, as SAELens's JumpReLU)."""
    thr = tensors.get("threshold")
    if thr is None or thr.dim() != 0:
        return
    if sae.arch == "topk":
        cfg["inference_threshold"] = float(tensors.pop("threshold"))
    elif sae.arch in ("batchtopk", "matryoshka"):
        tensors["threshold"] = thr.expand(sae.d_sae)


def load_sae(path: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Load an SAE from an orthosae run directory (or its weights file). Returns (sae, cfg).

    Directories other tools wrote (SAELens, dictionary_learning) load through orthosae.interop.load_any."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no SAE at {path}: the path does not exist")
    weights = weights_file(path) if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"no {WEIGHTS_NAME} in {path}; point at a run directory written by orthosae train")
    cfg_path = weights.parent / CFG_NAME
    cfg = read_cfg(cfg_path)
    sae = build_from_cfg(cfg, cfg_path, device)
    found = cfg.get("architecture", sae.saelens_arch)
    legacy = weights.name == LEGACY_WEIGHTS_NAME  # pre-0.2 names: batchtopk, matryoshka_batchtopk
    if found != sae.saelens_arch and not legacy:
        raise UserError(
            f"{cfg_path}: 'arch' {sae.arch} is saved as SAELens's '{sae.saelens_arch}', but 'architecture' "
            f"says '{found}'; the file was edited or mixed up with another SAE's"
        )
    _check_sha256(weights, cfg.get("weights_sha256"))
    tensors = read_tensors(weights)
    if legacy:
        _from_legacy(sae, tensors, cfg)
    check_tensors(sae, tensors, weights, cfg.get("dtype"))
    sae.load_saved_(tensors, cfg)
    orth = cfg.get("orthogonality")
    if isinstance(orth, dict) and orth.get("L_orth_init") is not None:
        value = orth["L_orth_init"]
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{cfg_path}: orthogonality.L_orth_init must be a finite number, found {value!r}")
    return sae.eval(), cfg
