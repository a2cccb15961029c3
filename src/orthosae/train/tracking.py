"""Scalar sinks next to metrics.jsonl: TensorBoard event files (on by default) and Weights & Biases (opt-in).

metrics.jsonl stays the record a run is resumed and reported from; these are views of the same rows.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from orthosae.atomic import write_text
from orthosae.config import to_dict
from orthosae.errors import UserError
from orthosae.train.config import TrainConfig

TB_DIR = "tensorboard"
WANDB_ID = "wandb-run-id"  # kept in the run dir so that --resume continues the same W&B run

# TensorBoard groups scalars by the part of the tag before the slash.
_GROUPS = {
    "loss": "loss",
    "recon": "loss",
    "auxk": "loss",
    "auxk_weighted": "loss",
    "l1": "loss",
    "l1_weighted": "loss",
    "orth": "loss",
    "orth_scaled": "loss",
    "l0": "sparsity",
    "dead_frac": "sparsity",
}


def tag(name: str) -> str:
    return f"{_GROUPS.get(name, 'train')}/{name}"


class Trackers:
    """Writes each metrics row to the enabled sinks. `resume_step` is the step of the checkpoint a run
    continues from: TensorBoard then drops events written after it, as metrics.jsonl is truncated."""

    def __init__(self, cfg: TrainConfig, out: Path, resume_step: int | None = None):
        self.tb: Any = None
        self.wandb: Any = None
        if cfg.tensorboard:
            self.tb = _summary_writer(out / TB_DIR, None if resume_step is None else resume_step + 1)
        if cfg.wandb_project:
            self.wandb = _wandb_run(cfg, out, resumed=resume_step is not None)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        scalars = {n: float(v) for n, v in row.items() if n != "step" and isinstance(v, int | float)}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(tag(name), value, step)
        if self.wandb is not None:
            self.wandb.log({tag(n): v for n, v in scalars.items()}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _summary_writer(logdir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard, or pass "
            "--no-tensorboard"
        ) from None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _wandb_run(cfg: TrainConfig, out: Path, resumed: bool) -> Any:
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            f"--wandb-project {cfg.wandb_project} needs the wandb package: pip install wandb (and wandb "
            "login), or drop --wandb-project"
        ) from None
    id_file = out / WANDB_ID
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(8)
    write_text(id_file, run_id + "\n")
    return wandb.init(
        project=cfg.wandb_project,
        name=out.name,
        id=run_id,
        resume="allow",
        dir=str(out),
        config=to_dict(cfg),
    )
