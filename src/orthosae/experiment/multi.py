"""Train several SAEs from ONE activation stream: each batch is read (or harvested) once and fed to every
trainer, as dictionary_learning's trainSAE does with a list of trainers."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from orthosae.config import save_toml
from orthosae.errors import UserError
from orthosae.sae.io import save_sae
from orthosae.train.config import TrainConfig
from orthosae.train.data import open_stream
from orthosae.train.loop import prepare_run_dir, run_cfg
from orthosae.train.metrics import MetricsLog, RunningMeans
from orthosae.train.tracking import Trackers
from orthosae.train.trainer import Trainer


def train_many(cfgs: dict[str, TrainConfig], *, progress: bool = True) -> dict[str, Path]:
    """Train every config on the same batches; returns {name: run dir}. Configs must share the stream."""
    first = next(iter(cfgs.values()))
    stream = open_stream(first)
    outs = {name: prepare_run_dir(Path(c.out), c.overwrite) for name, c in cfgs.items()}
    trainers = {name: Trainer(c, stream.d_in) for name, c in cfgs.items()}
    logs = {name: MetricsLog(outs[name] / "metrics.jsonl") for name in cfgs}
    means = {name: RunningMeans() for name in cfgs}
    trackers = {name: Trackers(c, outs[name]) for name, c in cfgs.items()}
    for name, c in cfgs.items():
        save_toml(c, outs[name] / "config.toml")
    busy = dict.fromkeys(cfgs, 0.0)  # seconds each trainer spent stepping, for its own tokens/s
    tokens = 0
    bar = tqdm(total=first.steps, disable=not progress, unit="step", desc=f"training {len(cfgs)} SAEs")
    try:
        for step in range(first.steps):
            x = next(iter(stream.batches), None)
            if x is None:
                break
            tokens += x.shape[0]
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                means[name].add(tr.step(x))
                busy[name] += time.perf_counter() - t0
                if (step + 1) % cfgs[name].log_every == 0 or step + 1 == first.steps:
                    trackers[name].log(_log(name, logs[name], means[name], tr, step + 1, tokens, busy[name]))
            bar.update(1)
    finally:
        bar.close()
        for log in logs.values():
            log.close()
        for t in trackers.values():
            t.close()
    for name, tr in trainers.items():
        save_sae(tr.trained_sae(), outs[name], run_cfg(cfgs[name], tr, stream.meta, tokens))
    return outs


def _log(
    name: str, log: MetricsLog, means: RunningMeans, tr: Trainer, step: int, tokens: int, busy: float
) -> dict[str, float]:
    row = means.pop()
    if row["loss"] != row["loss"] or abs(row["loss"]) == float("inf"):
        raise UserError(
            f"SAE '{name}': loss became {row['loss']} by step {step}; lower its lr or check the data"
        )
    row.update(step=step, tokens=tokens, lr=tr.lr(), tokens_per_s=tokens / max(busy, 1e-9))
    log.write(row)
    return row
