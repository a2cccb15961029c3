"""`orthosae export`: write an SAE in another library's exact layout.

Our run directories already load in SAELens; `--to saelens` writes a copy holding only SAELens's own keys,
and `--to dictionary_learning` writes its ae.pt + config.json. The source may be any directory load_any
reads, so this also converts SAELens ↔ dictionary_learning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save

from orthosae.atomic import write_json, write_with
from orthosae.errors import UserError
from orthosae.interop.load import load_any
from orthosae.interop.saelens import CFG_NAME, WEIGHTS_NAME, saelens_cfg
from orthosae.sae.base import SAE

TARGETS = ("saelens", "dictionary_learning")


def export(source: str | Path, to: str, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Convert the SAE at `source` into `out` in the `to` layout; returns the files written."""
    if to not in TARGETS:
        raise UserError(f"unknown export format '{to}': choose {' or '.join(TARGETS)}")
    sae, cfg = load_any(source)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a directory to export into")
    if out.resolve() == Path(source).resolve():
        raise UserError("the export directory is the source directory; give another one")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose another directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if to == "saelens":
        return write_saelens(sae, cfg, out)
    from orthosae.interop.dictionary_learning import write_dictionary_learning

    write_dictionary_learning(sae, cfg, out)
    return [out / "ae.pt", out / "config.json"]


def _check_threshold(sae: SAE, to: str) -> None:
    thr = getattr(sae, "threshold", None)
    if sae.arch in ("batchtopk", "matryoshka") and thr is not None and float(thr) < 0:
        raise UserError(
            f"this {sae.arch} SAE has no inference threshold yet (it is tracked after the lr warm-up), so "
            f"{to}'s JumpReLU form would not compute what it computes; train it for longer"
        )


def write_saelens(sae: SAE, info: dict[str, Any], out: Path) -> list[Path]:
    """SAELens's two files and nothing of ours: what `SAE.save_model` writes for the matching class."""
    _check_threshold(sae, "SAELens")
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.saved_tensors().items()}
    blob = st_save(tensors, metadata={"format": "pt"})
    write_with(out / WEIGHTS_NAME, lambda f: f.write(blob))
    write_json(out / CFG_NAME, saelens_cfg(sae, info))
    return [out / WEIGHTS_NAME, out / CFG_NAME]
