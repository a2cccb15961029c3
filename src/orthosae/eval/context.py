"""What every evaluation needs: the SAE, its cfg, and (loaded lazily, once) the language model."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from orthosae.atomic import write_with
from orthosae.errors import UserError
from orthosae.models.loader import LoadedModel, load_model
from orthosae.sae import SAE
from orthosae.train.distributed import Ranks

T = TypeVar("T")


@functools.cache
def eval_code_sha() -> str:
    """The eval package's source: a changed formula invalidates results computed with the old one."""
    root = Path(__file__).resolve().parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.glob("*.py")))).hexdigest()[:16]


def store_file(
    store: Path, key: tuple[Any, ...], model_name: str, layer: int, seed: int, device: str
) -> Path:
    """The file `memo_on_disk` keeps `key`'s value in: named by the eval (key[0]) and a hash of everything
    the value depends on besides the SAE, the eval code included."""
    full = repr((model_name, layer, seed, device, eval_code_sha(), *key))
    return store / f"{key[0]}-{hashlib.sha256(full.encode()).hexdigest()[:16]}.pt"


@dataclass
class EvalContext:
    sae: SAE
    sae_cfg: dict[str, Any]
    model_name: str
    layer: int
    run_dir: Path | None = None
    device: str = "cpu"
    seed: int = 42
    progress: bool = True
    _model: LoadedModel | None = field(default=None, repr=False)
    shared: dict[Any, Any] = field(default_factory=dict, repr=False)
    """SAE-independent results (LM activations, LM probes, baseline answers) keyed by what they depend on:
    one dict handed to every SAE's context in an experiment, so that work is done once per model/layer."""
    ranks: Ranks | None = field(default=None, repr=False)
    """Under torchrun: this process's rank; the evals then split their LM forwards (eval.ranks)."""
    model_device_map: str | dict[str, Any] | None = None
    """Spread the model over several devices (orthosae.models.placement); the SAE stays on `device`."""
    store: Path | None = None
    """Where `memo_on_disk` keeps SAE-independent results for later processes (None: in memory only)."""

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        model_name: str | None = None,
        layer: int | None = None,
        device: str = "cpu",
        seed: int = 42,
        progress: bool = True,
        model: LoadedModel | None = None,
        shared: dict[Any, Any] | None = None,
        ranks: Ranks | None = None,
        model_device_map: str | dict[str, Any] | None = None,
        store: Path | None = None,
    ) -> EvalContext:
        """Load the SAE in `run_dir` (ours, SAELens's or dictionary_learning's); the model and layer default
        to the ones its config records."""
        from orthosae.interop.load import load_any

        sae, cfg = load_any(run_dir, device=device)
        name = model_name or cfg.get("model_name")
        hook_layer = layer if layer is not None else cfg.get("hook_layer")
        if name is None or hook_layer is None:
            raise UserError(
                f"{run_dir}: its config records no model/layer (trained from a plain array, or a hook other "
                "than the residual stream?); pass --model and --layer"
            )
        return cls(
            sae,
            cfg,
            str(name),
            int(hook_layer),
            Path(run_dir),
            device,
            seed,
            progress,
            model,
            shared if shared is not None else {},
            ranks,
            model_device_map,
            store,
        )

    def memo(self, key: tuple[Any, ...], compute: Any) -> Any:
        """`compute()` once per key across every context sharing `shared` (keys must include everything
        the value depends on besides the SAE: eval name, layer, model, config fields, seed)."""
        full = (self.model_name, self.layer, self.seed, *key)
        if full not in self.shared:
            self.shared[full] = compute()
        return self.shared[full]

    def memo_on_disk(
        self,
        key: tuple[Any, ...],
        compute: Callable[[], T],
        to_state: Callable[[T], dict[str, Any]],
        from_state: Callable[[dict[str, Any]], T],
    ) -> T:
        """`memo`, and with a `store` also kept on disk, so a later process (a re-run that adds an SAE,
        another experiment on the same model and layer) loads the value instead of recomputing it. The file
        is named by a hash of the key, the device and the eval code; an unreadable one is recomputed."""

        def load_or_compute() -> T:
            assert self.store is not None
            path = store_file(self.store, key, self.model_name, self.layer, self.seed, self.device)
            if path.exists():
                try:
                    return from_state(torch.load(path, weights_only=True))
                except Exception:  # truncated or from another version: recompute and replace it
                    pass
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with(path, lambda f: torch.save(to_state(value), f))
            return value

        return self.memo(key, compute if self.store is None else load_or_compute)

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.model_name, device=self.device, device_map=self.model_device_map)
        return self._model
