"""Per-step statistics: accumulate on device without syncing, read them every `log_every` steps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

import torch

from orthosae.errors import UserError


class RunningMeans:
    """Sums of the scalar tensors a trainer step returns; `.pop()` reads and resets them (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def pop(self) -> dict[str, float]:
        names = list(self.sums)
        values = torch.stack([self.sums[n].float() for n in names]).div(self.count).tolist() if names else []
        self.sums, self.count = {}, 0
        return dict(zip(names, values, strict=True))

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """The partial sums since the last log line, so a resumed run logs the same means."""
        return {n: t.clone() for n, t in self.sums.items()}, self.count

    def load(self, sums: dict[str, torch.Tensor], count: int) -> None:
        self.sums, self.count = {n: t.clone() for n, t in sums.items()}, count


class MetricsLog:
    """metrics.jsonl: one JSON object per logging step, flushed as written.

    An append-only log rather than an atomic rewrite per line: a checkpoint records its length after an
    fsync (`sync()`), and a resumed run truncates it back to that length (`resume_at`), so lines written
    after the checkpoint, or torn by a crash, are dropped and never duplicated.
    """

    def __init__(self, path: Path, resume_at: int | None = None):
        self.path = path
        if resume_at is None:
            self.file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            return
        size = path.stat().st_size if path.is_file() else -1
        if size < resume_at:
            raise UserError(
                f"{path} holds {max(size, 0)} bytes but the checkpoint recorded {resume_at}; it was "
                "truncated or removed, so the run cannot be resumed with its metrics: start a new run"
            )
        with open(path, "r+b") as f:
            f.truncate(resume_at)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def sync(self) -> int:
        """Flush and fsync; returns the file length, which a checkpoint records."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
