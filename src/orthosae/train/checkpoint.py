"""Resumable checkpoints: tensors in safetensors, everything else in JSON, both checksummed. No pickle.

A checkpoint is two files in RUN/checkpoints/: `step-XXXXXXXX.safetensors` (SAE, Adam moments, dead-feature
counters, EMA, L_orth_init, the metrics' partial sums) and `step-XXXXXXXX.json` (format version, loop step,
tokens, metrics.jsonl length, resolved config, scheduler and optimizer hyper-parameters, RNG states, data
position, the safetensors file's sha256 and the JSON body's own sha256). The tensors are written first and
the JSON last, each atomically, so a checkpoint exists only once both are whole; the last two are kept.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import random
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from orthosae.atomic import write_json, write_with
from orthosae.config import from_dict, to_dict
from orthosae.errors import UserError
from orthosae.sae.io import weights_file
from orthosae.train.config import TrainConfig
from orthosae.train.distributed import env_rank, world_size

CHECKPOINT_DIR = "checkpoints"
FORMAT, VERSION = "orthosae-checkpoint", 1
KEEP = 2  # the last checkpoint and the one before, so a crash while saving cannot lose both
_NAME = re.compile(r"^step-(\d{8,})\.json$")

# Options that may differ when a run is resumed. Everything else (data, architecture, optimiser, penalty,
# seed) must match the checkpoint. `steps` may grow: the schedule is then recomputed for the new total.
RESUMABLE = frozenset(
    {
        "steps",
        "progress",
        "tensorboard",
        "wandb_project",
        "log_every",
        "checkpoint_every",
        "max_skipped_batches",
        "device",
        "model_device_map",
        "dist_timeout",
        "cpu_allocator",
        "out",
        "overwrite",
    }
)


@dataclass
class Checkpoint:
    path: Path  # the JSON file
    step: int  # batches consumed by the loop (skipped ones included)
    tokens: int
    metrics_bytes: int
    config: dict[str, Any]
    data: dict[str, Any]
    rng: dict[str, Any]
    trainer: dict[str, Any]  # Trainer.state_dict() layout, tensors on CPU
    means: tuple[dict[str, torch.Tensor], int]
    world_size: int = 1  # processes that trained it (torchrun); resume needs the same number


# --- writing ----------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    tokens: int,
    metrics_bytes: int,
    config: TrainConfig,
    data: dict[str, Any],
    trainer_state: dict[str, Any],
    means: tuple[dict[str, torch.Tensor], int],
    world_size: int = 1,
) -> Path:
    """Write a checkpoint atomically, then drop all but the newest `KEEP`. Refuses non-finite state."""
    tensors: dict[str, torch.Tensor] = {}
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "tokens": tokens,
        "metrics_bytes": metrics_bytes,
        "world_size": world_size,
        "config": to_dict(config),
        "data": data,
        "rng": rng_state(),
        "trainer": _split(trainer_state, "trainer", tensors),
        "means": {"sums": _split(means[0], "means", tensors), "count": means[1]},
    }
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"'{name}' became NaN or inf by step {step}; no checkpoint written, the previous one is "
                "kept. Lower --lr or check the activations for outliers"
            )
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    blob = st_save(tensors, metadata={"format": FORMAT})
    stem = f"step-{step:08d}"
    body["tensors"] = {"file": f"{stem}.safetensors", "bytes": len(blob), "sha256": _sha(blob)}
    write_with(folder / f"{stem}.safetensors", lambda f: f.write(blob))
    write_json(folder / f"{stem}.json", {**body, "sha256": _body_sha(body)})  # the commit point
    _prune(folder)
    return folder / f"{stem}.json"


def _prune(folder: Path) -> None:
    keep = {p.stem for _, p in list_checkpoints(folder.parent)[:KEEP]}
    for p in folder.iterdir():
        stale_tmp = p.name.startswith(".step-") and p.name.endswith(".tmp")  # left by a killed save
        if stale_tmp or (p.name.startswith("step-") and p.name.split(".")[0] not in keep):
            p.unlink(missing_ok=True)


def remove_checkpoints(run_dir: Path) -> None:
    """After the final SAE is saved the run is complete; its checkpoints are no longer needed."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


def has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR).is_dir() and any((run_dir / CHECKPOINT_DIR).iterdir())


# --- reading ----------------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, JSON path) of every committed checkpoint, newest first."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def latest_body(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint's verified JSON (no tensors read): what `--resume` checks options against."""
    if not run_dir.exists():
        raise UserError(
            f"cannot resume: {run_dir} does not exist; give the --out directory of an earlier run"
        )
    if not run_dir.is_dir():
        raise UserError(f"cannot resume: {run_dir} is a file; give the run directory")
    found = list_checkpoints(run_dir)
    if not found:
        done = weights_file(run_dir).exists()
        why = "the run is complete (its SAE is saved)" if done else "it holds no checkpoint"
        raise UserError(
            f"cannot resume {run_dir}: {why}; checkpoints are written every --checkpoint-every steps and on "
            "Ctrl-C/SIGTERM"
        )
    return _read_body(found[0][1], found[1:])


def _read_body(path: Path, older: list[tuple[int, Path]]) -> dict[str, Any]:
    fallback = f"; delete {path.stem}.* to resume from step {older[0][0]}" if older else ""
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable or not JSON ({e}){fallback}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise UserError(f"{path} is not an orthosae checkpoint{fallback}")
    if body.get("version") != VERSION:
        raise UserError(
            f"{path} has checkpoint format version {body.get('version')!r}; this orthosae reads version "
            f"{VERSION}: resume with the orthosae that wrote it"
        )
    claimed = body.pop("sha256", None)
    if claimed != _body_sha(body):
        raise UserError(f"checksum mismatch in {path}: the checkpoint is corrupt{fallback}")
    body["_fallback"] = fallback
    return body


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest checkpoint, verified against its checksums. Errors name the damaged file."""
    body = latest_body(run_dir)
    json_path = list_checkpoints(run_dir)[0][1]
    fallback = body.pop("_fallback")
    try:
        file = json_path.parent / str(body["tensors"]["file"])
        blob = file.read_bytes()
    except (KeyError, TypeError, OSError) as e:
        raise UserError(f"the tensors of checkpoint {json_path} are missing ({e}){fallback}") from None
    if _sha(blob) != body["tensors"].get("sha256"):
        raise UserError(f"checksum mismatch in {file}: the file is corrupt or truncated{fallback}")
    try:
        tensors = st_load(blob)
        means = body["means"]
        return Checkpoint(
            path=json_path,
            step=_nonneg(body["step"]),
            tokens=_nonneg(body["tokens"]),
            metrics_bytes=_nonneg(body["metrics_bytes"]),
            config=dict(body["config"]),
            data=dict(body["data"]),
            rng=dict(body["rng"]),
            trainer=_join(body["trainer"], tensors),
            means=(_join(means["sums"], tensors), _nonneg(means["count"])),
            world_size=_nonneg(body.get("world_size", 1)),
        )
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {json_path} is damaged ({e!r}){fallback}") from None


def _nonneg(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, found {value!r}")
    return value


def resumed_config(run_dir: Path, given: dict[str, Any], source: str) -> TrainConfig:
    """The checkpoint's config with the `given` options on top; refuses a change outside RESUMABLE."""
    body = latest_body(run_dir)
    stored = body["config"]
    if not isinstance(stored, dict):
        raise UserError(f"checkpoint in {run_dir} holds no config{body['_fallback']}")
    given = {k.replace("-", "_"): v for k, v in given.items()}
    base = from_dict(TrainConfig, stored, source=f"{run_dir} checkpoint")
    cfg = from_dict(TrainConfig, {**stored, **given, "out": str(run_dir)}, source=source)
    for name, old in to_dict(base).items():
        new = getattr(cfg, name)
        if name not in RESUMABLE and new != old:
            raise UserError(
                f"cannot resume {run_dir} with {name} = {new!r}: the run used {old!r}; only "
                f"{', '.join(sorted(RESUMABLE - {'out', 'overwrite'}))} may change (start a new run instead)"
            )
    world, saved_world = world_size(), body.get("world_size", 1)
    if world != saved_world:
        raise UserError(
            f"cannot resume {run_dir} with {world} process(es): it was trained with {saved_world}; resume "
            f"with the same world size (torchrun --nnodes × --nproc_per_node = {saved_world})"
        )
    if cfg.steps < body["step"]:
        raise UserError(f"--steps {cfg.steps} is below the checkpoint's step {body['step']}; give more steps")
    if cfg.steps != base.steps:  # keep the schedule's fixed points where the run started them
        pin = {
            "warmup_steps": base.resolved_warmup(),
            "threshold_start_step": base.resolved_threshold_start(),
        }
        if base.model is not None and base.tokens is None:
            pin["tokens"] = int(base.steps * base.batch_size * 1.05) + base.context_size
        cfg = dataclasses.replace(cfg, **{k: v for k, v in pin.items() if getattr(base, k) is None})
    return cfg


# --- RNG states -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global generator, JSON-encoded (torch's byte state as base64)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(mt), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(_unb64(state["torch"]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as e:
        raise UserError(f"the checkpoint's RNG state is damaged ({e}); start a new run") from None


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8).copy())


# --- nested state ⇄ (JSON, tensors) -----------------------------------------------------------------


def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of a nested state dict; its tensors go into `tensors` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):  # keys may be ints (optimizer state), so keep them typed
        return {"__items__": [[k, _split(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {key}")  # a programming error


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        raise ValueError(f"unexpected object with keys {sorted(obj)[:4]}")
    return obj


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _body_sha(body: dict[str, Any]) -> str:
    return _sha(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


# --- stopping on a signal ---------------------------------------------------------------------------


class Stopped(Exception):
    """Training stopped on request after saving a checkpoint; `exit_code` follows the 128+signal rule."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnSignal:
    """First SIGINT/SIGTERM: set `signum` so the loop finishes the step and checkpoints. Second: abort."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt  # second signal: abort now (atomic writes keep the last checkpoint)
        self.signum = signum
        if env_rank() == 0:  # under torchrun every rank gets the signal; one message is enough
            print(
                f"\northosae: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                "(press Ctrl-C again to abort)",
                file=sys.stderr,
            )
