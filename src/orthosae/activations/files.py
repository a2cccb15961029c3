"""Activations from a single array file: .npy (memory-mapped) or .safetensors, shape (N, d)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from orthosae.errors import UserError

_SCAN_ROWS = 65_536  # rows per chunk of the finiteness scan, to bound memory on large mmaps


def load_array(path: str | Path) -> np.ndarray | torch.Tensor:
    """Open an (N, d) float array, validating shape, dtype and finiteness. Errors name the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"activations file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory but holds no activation cache manifest")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            npy: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(
                f"{path} is not a readable .npy array ({e}); re-export it with numpy.save"
            ) from None
        kind = npy.dtype.kind
        arr: np.ndarray | torch.Tensor = npy
    elif suffix == ".safetensors":
        arr = _load_safetensors(path)
        kind = "f" if arr.dtype.is_floating_point else "i"
    else:
        raise UserError(
            f"{path}: unsupported activations format '{suffix}'; use .npy, .safetensors or a cache dir"
        )
    if arr.ndim != 2:
        raise UserError(f"{path}: activations must have shape (N, d), found shape {tuple(arr.shape)}")
    if kind != "f":
        raise UserError(f"{path}: activations must be floating point, found dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{path}: activations array is empty, shape {tuple(arr.shape)}")
    _check_finite(arr, path)
    return arr


def _load_safetensors(path: Path) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1 and "activations" not in keys:
                raise UserError(
                    f"{path}: expected one tensor (or one named 'activations'), found {len(keys)}: {keys[:5]}"
                )
            return f.get_tensor("activations" if "activations" in keys else keys[0])
    except SafetensorError as e:
        raise UserError(f"{path} is corrupt or not a safetensors file ({e})") from None


def _check_finite(arr: np.ndarray | torch.Tensor, path: Path) -> None:
    for start in range(0, arr.shape[0], _SCAN_ROWS):
        part = arr[start : start + _SCAN_ROWS]
        chunk = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))
        bad = ~torch.isfinite(chunk)
        if bad.any():
            row, col = (int(v) for v in bad.nonzero()[0])
            raise UserError(
                f"{path}: non-finite activation {chunk[row, col].item()} at row {start + row}, column {col}; "
                "clean or re-harvest the activations"
            )


def iter_array_batches(
    arr: np.ndarray | torch.Tensor, batch_size: int, seed: int, device: str = "cpu"
) -> Iterator[torch.Tensor]:
    """Endless float32 batches, a fresh seeded permutation per epoch (without replacement inside one)."""
    return ArrayBatches(arr, batch_size, seed, device)


class ArrayBatches(Iterator[torch.Tensor]):
    """Endless float32 batches from an (N, d) array: batch j is rows [jB, (j+1)B) of perm_0 ‖ perm_1 ‖ …,
    one seeded permutation per epoch, so a batch may span two epochs.

    With `part=(rank, world)` it yields only rows [rank·B/world, (rank+1)·B/world) of each of those
    batches (B = batch_size, the global batch) and reads nothing else: the ranks of a data-parallel run
    split every batch into disjoint equal slices. The position, and so `state()`, is the global one.

    `state()` is a small JSON-able dict (the generator state at the start of the current epoch and the
    offset into it); pass it back as `state=` to continue with exactly the next batch.
    """

    def __init__(
        self,
        arr: np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int,
        device: str = "cpu",
        state: dict[str, Any] | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        self.arr, self.batch_size, self.seed, self.device = arr, batch_size, seed, device
        rank, world = part
        self.rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.n = int(arr.shape[0])
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.offset, self.batches = -1, self.n, 0  # no epoch drawn yet
        self._epoch_gen_state = self.gen.get_state()
        self.perm: torch.Tensor | None = None
        if state is not None:
            self._restore(state)

    def state(self) -> dict[str, Any]:
        return {
            "kind": "array",
            "seed": self.seed,
            "n_rows": self.n,
            "d": int(self.arr.shape[1]),
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "offset": self.offset,
            "batches": self.batches,
            "generator": base64.b64encode(self._epoch_gen_state.numpy().tobytes()).decode("ascii"),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        mine = {"kind": "array", "seed": self.seed, "n_rows": self.n, "d": int(self.arr.shape[1])}
        mine["batch_size"] = self.batch_size
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(
                    f"the activations differ from the checkpointed run: {key} is {value!r} now, "
                    f"{state.get(key)!r} in the checkpoint; resume with the same data"
                )
        try:
            epoch, offset, batches = int(state["epoch"]), int(state["offset"]), int(state["batches"])
            raw = np.frombuffer(base64.b64decode(state["generator"], validate=True), dtype=np.uint8)
            if epoch < -1 or not 0 <= offset <= self.n or batches < 0:
                raise ValueError(f"position out of range: epoch {epoch}, offset {offset}")
            self.gen.set_state(torch.from_numpy(raw.copy()))
        except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as e:
            raise UserError(f"checkpoint data position is invalid ({e}); the checkpoint is damaged") from None
        self._epoch_gen_state = self.gen.get_state()
        self.epoch, self.offset, self.batches = epoch, offset, batches
        if epoch >= 0:  # redraw the current epoch's permutation from its saved generator state
            self.perm = torch.randperm(self.n, generator=self.gen)

    def __next__(self) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            if self.perm is None or self.offset >= self.n:
                self._epoch_gen_state = self.gen.get_state()
                self.perm, self.offset, self.epoch = (
                    torch.randperm(self.n, generator=self.gen),
                    0,
                    self.epoch + 1,
                )
            part = self.perm[self.offset : self.offset + need]
            parts.append(part)
            self.offset += len(part)
            need -= len(part)
        idx = (parts[0] if len(parts) == 1 else torch.cat(parts))[self.rows].numpy()
        self.batches += 1
        rows = np.sort(idx)  # sorted reads are kinder to a memory map
        order = torch.from_numpy(np.argsort(np.argsort(idx)))
        batch = torch.as_tensor(np.asarray(self.arr[rows]), dtype=torch.float32)[order]
        return batch.to(self.device)
