"""What every evaluation needs: the SAE, its cfg, and (loaded lazily, once) the language model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthosae.errors import UserError
from orthosae.models.loader import LoadedModel, load_model
from orthosae.sae import SAE
from orthosae.train.distributed import Ranks


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
        )

    def memo(self, key: tuple[Any, ...], compute: Any) -> Any:
        """`compute()` once per key across every context sharing `shared` (keys must include everything
        the value depends on besides the SAE: eval name, layer, model, config fields, seed)."""
        full = (self.model_name, self.layer, self.seed, *key)
        if full not in self.shared:
            self.shared[full] = compute()
        return self.shared[full]

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.model_name, device=self.device, device_map=self.model_device_map)
        return self._model
