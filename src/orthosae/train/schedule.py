"""Learning-rate schedule: linear warm-up, constant, then linear decay to zero."""

from __future__ import annotations

from collections.abc import Callable


def lr_multiplier(total_steps: int, warmup_steps: int, decay_start: float) -> Callable[[int], float]:
    """Multiplier of the base lr at `step` (0-based), for torch's LambdaLR.

    `decay_start` is the fraction of training after which the lr falls linearly to 0 at `total_steps`;
    1.0 means no decay.
    """
    decay_step = int(decay_start * total_steps)

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step >= decay_step and decay_step < total_steps:
            return max(0.0, (total_steps - step) / (total_steps - decay_step))
        return 1.0

    return fn
