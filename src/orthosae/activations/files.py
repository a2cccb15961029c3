"""Activations from a single array file: .npy (memory-mapped) or .safetensors, shape (N, d)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
            arr: np.ndarray | torch.Tensor = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(
                f"{path} is not a readable .npy array ({e}); re-export it with numpy.save"
            ) from None
        kind = arr.dtype.kind
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
    n = arr.shape[0]
    gen = torch.Generator().manual_seed(seed)
    pending: list[torch.Tensor] = []
    have = 0
    while True:
        for chunk in torch.randperm(n, generator=gen).split(batch_size):
            pending.append(chunk)
            have += len(chunk)
            if have < batch_size:
                continue  # batch larger than what is left of this epoch: carry into the next
            idx = torch.cat(pending)
            pending, have = [idx[batch_size:]], have - batch_size
            rows = np.sort(idx[:batch_size].numpy())  # sorted reads are kinder to a memory map
            order = torch.from_numpy(np.argsort(np.argsort(idx[:batch_size].numpy())))
            batch = torch.as_tensor(np.asarray(arr[rows]), dtype=torch.float32)[order]
            yield batch.to(device)
