"""The architecture registry: name → SAE class, training rule, and how to build either."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from orthosae.sae.base import SAE
from orthosae.sae.batchtopk import BatchTopKRule, BatchTopKSAE
from orthosae.sae.jumprelu import JumpReLURule, JumpReLUSAE
from orthosae.sae.matryoshka import MatryoshkaRule, MatryoshkaSAE, group_sizes, parse_fractions
from orthosae.sae.relu import ReLURule, ReLUSAE
from orthosae.sae.rule import Rule
from orthosae.sae.topk import TopKRule, TopKSAE

if TYPE_CHECKING:
    from orthosae.train.config import TrainConfig


@dataclass(frozen=True)
class Arch:
    sae: type[SAE]
    rule: type[Rule]
    uses_k: bool  # the SAE is built with k (cfg.json holds it)
    from_hyperparams: Callable[[dict[str, Any], dict[str, Any]], SAE]  # (cfg.json, dtype/device) → SAE


def _with_k(cls: type[SAE]) -> Callable[[dict[str, Any], dict[str, Any]], SAE]:
    return lambda hp, kw: cls(hp["d_in"], hp["d_sae"], hp["k"], **kw)  # type: ignore[call-arg]


ARCHS: dict[str, Arch] = {
    "topk": Arch(TopKSAE, TopKRule, True, _with_k(TopKSAE)),
    "relu": Arch(ReLUSAE, ReLURule, False, lambda hp, kw: ReLUSAE(hp["d_in"], hp["d_sae"], **kw)),
    "batchtopk": Arch(BatchTopKSAE, BatchTopKRule, True, _with_k(BatchTopKSAE)),
    "matryoshka": Arch(
        MatryoshkaSAE,
        MatryoshkaRule,
        True,
        lambda hp, kw: MatryoshkaSAE(hp["d_in"], hp["d_sae"], hp["k"], hp["group_sizes"], **kw),
    ),
    "jumprelu": Arch(
        JumpReLUSAE, JumpReLURule, False, lambda hp, kw: JumpReLUSAE(hp["d_in"], hp["d_sae"], **kw)
    ),
}


def build_sae(cfg: TrainConfig, d_in: int) -> SAE:
    """A freshly initialised SAE of cfg.arch (initialisation seeded by --init-seed, else --seed)."""
    gen = torch.Generator().manual_seed(cfg.resolved_init_seed())
    kw: dict[str, Any] = {"generator": gen, "device": cfg.device}
    if cfg.arch == "matryoshka":
        sizes = group_sizes(cfg.d_sae, parse_fractions(cfg.matryoshka_fractions))
        return MatryoshkaSAE(d_in, cfg.d_sae, cfg.k, sizes, **kw)
    arch = ARCHS[cfg.arch]
    if arch.uses_k:
        return arch.sae(d_in, cfg.d_sae, cfg.k, **kw)  # type: ignore[call-arg]
    return arch.sae(d_in, cfg.d_sae, **kw)  # type: ignore[call-arg]
