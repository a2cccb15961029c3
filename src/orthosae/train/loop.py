"""The training loop: batches in, one optimizer step each, metrics out, checkpoints, SAE saved at the end."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from orthosae.config import save_toml, to_dict
from orthosae.errors import UserError
from orthosae.sae.io import save_sae, weights_file
from orthosae.train.checkpoint import (
    Checkpoint,
    StopOnSignal,
    Stopped,
    has_checkpoints,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from orthosae.train.config import TrainConfig
from orthosae.train.data import open_stream
from orthosae.train.distributed import NoLog, Ranks, any_rank, average_means_, on_main, pop_means
from orthosae.train.metrics import MetricsLog, RunningMeans
from orthosae.train.tracking import Trackers
from orthosae.train.trainer import Trainer


def train(cfg: TrainConfig, resume: bool = False, ranks: Ranks | None = None) -> Path:
    """Train one SAE as `cfg` says and write the run directory (with `resume`, continue the last
    checkpoint in cfg.out). Returns its path. Raises `Stopped` after checkpointing on SIGINT/SIGTERM.

    With `ranks` (torchrun), this process trains on its slice of every global batch; rank 0 alone writes
    the run directory, and every step ends with the same SAE on all ranks."""
    if cfg.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be ≥ 0, got {cfg.checkpoint_every}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt = load_checkpoint(out) if resume else None
    main, world = ranks is None or ranks.is_main, 1 if ranks is None else ranks.world
    stream = open_stream(cfg, ckpt.data if ckpt else None, (0, 1) if ranks is None else (ranks.rank, world))
    if not resume:
        on_main(ranks, lambda: prepare_run_dir(out, cfg.overwrite), "preparing the run directory")
    trainer, means = Trainer(cfg, stream.d_in, ranks), RunningMeans()
    first, tokens = restore(ckpt, trainer, means) if ckpt else (0, 0)
    log = on_main(ranks, lambda: open_log(out, cfg, ckpt), "opening metrics.jsonl") or NoLog()
    resume_step = first if ckpt else None
    trackers = on_main(ranks, lambda: Trackers(cfg, out, resume_step), "opening the trackers") or NoLog()
    bar = tqdm(
        initial=first, total=cfg.steps, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True
    )
    start, tokens_at_start = time.perf_counter(), tokens

    try:
        with StopOnSignal() as stop:
            for step in range(first, cfg.steps):
                x = next(stream.batches, None)
                if x is None:  # a finite stream (live harvest) ran dry before the planned steps
                    print(
                        f"orthosae: data ran out after {step} steps; saving the SAE as it is", file=sys.stderr
                    )
                    break
                means.add(trainer.step(x))
                tokens += x.shape[0] * world
                bar.update(1)
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    rate = (tokens - tokens_at_start) / (time.perf_counter() - start)
                    row = pop_means(means, ranks)
                    trackers.log(
                        write_row(log, bar, row, trainer, step=step + 1, tokens=tokens, tokens_per_s=rate)
                    )
                periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
                # Ranks receive a signal at different steps: they agree on one, so all stop at the same step.
                stopping = stop.signum is not None
                if ranks is not None:
                    stopping = any_rank(stopping, ranks, "agreeing when to stop")
                if stopping or (periodic and step + 1 < cfg.steps):
                    trackers.flush()
                    average_means_(means, ranks)
                    on_main(ranks, lambda step=step + 1, tokens=tokens: save_checkpoint(
                        out, step=step, tokens=tokens, metrics_bytes=log.sync(), config=replayable(cfg),
                        data=stream.state(), trainer_state=trainer.state_dict(), means=means.state(),
                        world_size=world,
                    ), "saving a checkpoint")  # fmt: skip
                if stopping:
                    signum = stop.signum or signal.SIGTERM
                    raise Stopped(stopped_message(out, step + 1, cfg.steps), 128 + signum)
            bar.close()
            log.close()
            on_main(
                ranks,
                lambda: finish(out, trainer, run_cfg(cfg, trainer, stream.meta, tokens)),
                "saving the SAE",
            )
    finally:
        bar.close()
        log.close()
        trackers.close()
    return out


def open_log(out: Path, cfg: TrainConfig, ckpt: Checkpoint | None) -> MetricsLog:
    log = MetricsLog(out / "metrics.jsonl", ckpt.metrics_bytes if ckpt else None)  # truncates on resume
    save_toml(replayable(cfg), out / "config.toml")
    return log


def finish(out: Path, trainer: Trainer, saved_cfg: dict[str, Any]) -> None:
    save_sae(trainer.trained_sae(), out, saved_cfg)
    remove_checkpoints(out)  # the run is complete


def restore(ckpt: Checkpoint, trainer: Trainer, means: RunningMeans) -> tuple[int, int]:
    """Load a checkpoint into a fresh trainer; returns (loop step, tokens seen)."""
    try:
        trainer.load_state_dict(ckpt.trainer)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {ckpt.path} does not fit this SAE ({first}); start a new run") from None
    means.load(*ckpt.means)
    set_rng_state(ckpt.rng)
    return ckpt.step, ckpt.tokens


def write_row(
    log: MetricsLog | NoLog, bar: Any, row: dict[str, float], trainer: Trainer, **extra: Any
) -> dict[str, float]:
    if not math.isfinite(row["loss"]):
        raise UserError(
            f"loss became {row['loss']} by step {extra['step']}; the SAE was not saved (earlier checkpoints "
            "are kept). Lower --lr or check the activations for outliers"
        )
    row.update(
        step=extra["step"], tokens=extra["tokens"], lr=trainer.lr(), tokens_per_s=extra["tokens_per_s"]
    )
    log.write(row)
    bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", tok_s=f"{row['tokens_per_s']:.0f}")
    return row


def stopped_message(out: Path, step: int, steps: int) -> str:
    return (
        f"orthosae: stopped at step {step} of {steps}; checkpoint saved in {out}/checkpoints; "
        f"continue with: orthosae train --resume {out}"
    )


def replayable(cfg: TrainConfig) -> TrainConfig:
    """The config as config.toml and checkpoints record it (no `overwrite`: replay must not clobber)."""
    return dataclasses.replace(cfg, overwrite=False)


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run")
    if weights_file(out).exists() and not overwrite:
        raise UserError(f"{out} already holds a trained SAE; choose another --out or pass --overwrite")
    if has_checkpoints(out) and not overwrite:
        raise UserError(
            f"{out} holds checkpoints of an unfinished run: continue it with --resume {out}, or pass "
            "--overwrite to start over"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run directory {out}: {e.strerror or e}") from None
    remove_checkpoints(out)  # only reached with --overwrite when some exist
    return out


def run_cfg(cfg: TrainConfig, trainer: Trainer, meta: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Everything beyond the architecture that cfg.json records about how the SAE was made."""
    orth: dict[str, Any] | None = None
    if cfg.penalty_kind() == "ortsae":
        orth = {
            "kind": "ortsae",
            "weight": cfg.ortsae_weight,
            "exponent": cfg.ortsae_exponent,
            "chunks": cfg.resolved_ortsae_chunks(),
            "vectors": cfg.orth_weight,
        }
    elif cfg.penalty_kind() == "coactive":
        orth = {
            "kind": "coactive",
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
            **to_dict(replayable(cfg)),
            "lr_resolved": cfg.resolved_lr(),
            "norm_factor": trainer.norm_factor,  # inputs were divided by it in training (1: not normalised)
            "tokens_seen": tokens,
            "steps_completed": trainer.step_idx,
        },
    }
