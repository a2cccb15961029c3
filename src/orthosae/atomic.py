"""Atomic file writes: temp file in the same directory, fsync, rename. A crash leaves the old file intact."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_MODE = 0o666 & ~_umask()  # what open() would have given a new file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _DEFAULT_MODE)  # mkstemp's 0600 would make every output private
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_with(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> None:
    """Atomically write `path` by calling `writer` on an open binary file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer(_fault_injected(f, Path(path)) if FAULT_ENV in os.environ else f)


# Fault injection for crash tests: ORTHOSAE_FAULT_AFTER_BYTES=N makes the process die (os._exit, no
# cleanup, like kill -9) after writing N bytes of the first atomic write whose path contains
# ORTHOSAE_FAULT_PATH (any path when unset). Never set outside tests.
FAULT_ENV, FAULT_PATH_ENV, FAULT_EXIT_CODE = "ORTHOSAE_FAULT_AFTER_BYTES", "ORTHOSAE_FAULT_PATH", 86


class _DieAfter:
    def __init__(self, f: IO[bytes], budget: int):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        if len(data) < self.budget:
            self.budget -= len(data)
            return self.f.write(data)
        self.f.write(bytes(data)[: self.budget])
        self.f.flush()
        os.fsync(self.f.fileno())
        os._exit(FAULT_EXIT_CODE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _fault_injected(f: IO[bytes], path: Path) -> Any:
    if os.environ.get(FAULT_PATH_ENV, "") not in str(path):
        return f
    return _DieAfter(f, int(os.environ[FAULT_ENV]))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_with(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
