"""Per-step statistics: accumulate on device without syncing, read them every `log_every` steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

import torch


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


class MetricsLog:
    """metrics.jsonl: one JSON object per logging step, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self.file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
