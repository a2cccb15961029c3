"""The results JSON: SAEBench's layout (the seed's key schema), one section per evaluation."""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from orthosae.eval import uncertainty
from orthosae.eval.context import EvalContext

# Top-level keys of the combined results file, as in the seed's result dictionaries.
SECTION_KEYS = {
    "core": "core evaluation results",
    "absorption": "absorption evaluation results",
    "sparse_probing": "sparse probing evaluation results",
    "unlearning": "unlearning evaluation results",
}


def sae_cfg_dict(ctx: EvalContext) -> dict[str, Any]:
    """The `sae_cfg_dict` block SAEBench attaches to every section."""
    cfg = ctx.sae_cfg
    return {
        "model_name": ctx.model_name,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "hook_layer": ctx.layer,
        "hook_name": f"blocks.{ctx.layer}.hook_resid_post",
        "architecture": cfg.get("architecture"),
        "apply_b_dec_to_input": ctx.sae.apply_b_dec_to_input,
        "activation_fn_str": "topk" if ctx.sae.arch == "topk" else "relu",
        "k": cfg.get("k"),
        "normalize_activations": cfg.get("normalize_activations", "none"),
        "dtype": cfg.get("dtype"),
        "orthogonality": cfg.get("orthogonality"),
    }


def section(
    ctx: EvalContext,
    eval_type_id: str,
    eval_config: dict[str, Any],
    metrics: dict[str, Any],
    details: list[dict[str, Any]] | None = None,
    unstructured: Any = None,
) -> dict[str, Any]:
    """One evaluation's result block with SAEBench's envelope keys."""
    from orthosae import __version__

    return {
        "eval_type_id": eval_type_id,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details or [],
        "orthosae_version": __version__,
        "sae_cfg_dict": sae_cfg_dict(ctx),
        "eval_result_unstructured": unstructured,
    }


# The synthetic ground-truth benchmark needs no SAE run, so it is not one of the per-SAE sections above.
SYNTHETIC_KEY = "synthetic evaluation results"


def sae_names(ctx: EvalContext) -> tuple[str, str]:
    """(sae_set, sae_id) as SAEBench names them: '<model>_layer_<L>_sae' and the run directory's name."""
    sae_id = ctx.run_dir.name if ctx.run_dir is not None else "custom_sae"
    return f"{ctx.model_name}_layer_{ctx.layer}_sae", sae_id


def core_section(ctx: EvalContext, eval_cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The core eval's block: SAEBench's core layout (unique_id, sae_set, sae_id, eval_cfg, metrics), as in
    the seed, plus our envelope extras."""
    from orthosae import __version__

    sae_set, sae_id = sae_names(ctx)
    return {
        "unique_id": f"{sae_set}_{sae_id}",
        "sae_set": sae_set,
        "sae_id": sae_id,
        "eval_cfg": eval_cfg,
        "metrics": metrics,
        "eval_type_id": "core",
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "orthosae_version": __version__,
        "sae_cfg_dict": sae_cfg_dict(ctx),
    }


def section_metrics(section_block: dict[str, Any]) -> dict[str, Any]:
    """The metrics of any section, whichever layout it has (core's 'metrics' or 'eval_result_metrics')."""
    found = section_block.get("metrics", section_block.get("eval_result_metrics"))
    return found if isinstance(found, dict) else {}


def section_replicates(section_block: dict[str, Any] | None) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(pairing key, {"<group>.<metric>": resampled values (R,)}) of a section's stored bootstrap
    replicates; (None, {}) when it has none or its bootstrap_config does not say which items they are of.
    Two sections' vectors of a metric pair resample by resample exactly when their keys are equal."""
    block = section_block if isinstance(section_block, dict) else {}
    config = block.get("eval_cfg", block.get("eval_config"))
    key = uncertainty.pairing(config.get("bootstrap_config") if isinstance(config, dict) else None)
    raw = block.get(uncertainty.REPLICATES_KEY)
    if key is None or not isinstance(raw, dict):
        return None, {}
    reps = {k: t for k, v in raw.items() if (t := uncertainty.replicates_tensor(v)) is not None}
    return key, reps
