"""The training loop: batches in, one optimizer step each, metrics out, SAE saved at the end."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from orthosae.config import save_toml, to_dict
from orthosae.errors import UserError
from orthosae.sae.io import WEIGHTS_NAME, save_sae
from orthosae.train.config import TrainConfig
from orthosae.train.data import open_stream
from orthosae.train.metrics import MetricsLog, RunningMeans
from orthosae.train.trainer import Trainer


def train(cfg: TrainConfig) -> Path:
    """Train one SAE as `cfg` says and write the run directory. Returns its path."""
    torch.manual_seed(cfg.seed)
    stream = open_stream(cfg)
    out = prepare_run_dir(Path(cfg.out), cfg.overwrite)
    save_toml(cfg, out / "config.toml")
    trainer = Trainer(cfg, stream.d_in)
    log, means = MetricsLog(out / "metrics.jsonl"), RunningMeans()
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0
    try:
        for step in range(cfg.steps):
            x = next(stream.batches, None)
            if x is None:  # a finite stream (live harvest) ran dry before the planned steps
                print(f"orthosae: data ran out after {step} steps; saving the SAE as it is", file=sys.stderr)
                break
            means.add(trainer.step(x))
            tokens += x.shape[0]
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = means.pop()
                if not math.isfinite(row["loss"]):
                    raise UserError(
                        f"loss became {row['loss']} by step {step + 1}; nothing was saved. "
                        "Lower --lr or check the activations for outliers"
                    )
                elapsed = time.perf_counter() - start
                row.update(step=step + 1, tokens=tokens, lr=trainer.lr(), tokens_per_s=tokens / elapsed)
                log.write(row)
                bar.set_postfix(
                    loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", tok_s=f"{tokens / elapsed:.0f}"
                )
    finally:
        bar.close()
        log.close()
    save_sae(trainer.sae, out, run_cfg(cfg, trainer, stream.meta, tokens))
    return out


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run")
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise UserError(f"{out} already holds a trained SAE; choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run directory {out}: {e.strerror or e}") from None
    return out


def run_cfg(cfg: TrainConfig, trainer: Trainer, meta: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Everything beyond the architecture that cfg.json records about how the SAE was made."""
    orth = None
    if cfg.orth:
        orth = {
            "lambda": cfg.orth_lambda,
            "threshold_ratio": cfg.orth_threshold_ratio,
            "coactivation": cfg.orth_coactivation,
            "weight": cfg.orth_weight,
            "method": cfg.orth_method,
            "ema_decay": cfg.orth_ema_decay,
            "L_orth_init": float(trainer.l_orth_init),
        }
    return {
        "model_name": meta.get("model_name"),
        "hook_name": meta.get("hook_name"),
        "hook_layer": meta.get("hook_layer"),
        "activations_source": meta.get("activations_source"),
        "orthogonality": orth,
        "training": {
            **to_dict(cfg),
            "lr_resolved": cfg.resolved_lr(),
            "tokens_seen": tokens,
            "steps_completed": trainer.step_idx,
        },
    }
