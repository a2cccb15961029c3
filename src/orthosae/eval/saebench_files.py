"""SAEBench 0.6.0's own result files, built from our combined results (what eval.json holds).

SAEBench writes one JSON per eval and SAE, `eval_results/<eval dir>/<sae_release>_<sae_id>_eval_results.json`
('/' in the name replaced by '_'), each a dump of its `<Eval>EvalOutput` dataclass: eval_type_id,
eval_config, eval_id, datetime_epoch_millis, eval_result_metrics, eval_result_details,
sae_bench_commit_hash, sae_lens_id, sae_lens_release_id, sae_lens_version, sae_cfg_dict,
eval_result_unstructured. Its readers (sae_bench_utils/graphing_utils.py: get_eval_results,
get_core_results) pick the metric group by the eval name in the path and join evals by file name, so every
eval of one SAE must carry the same `<sae_release>_<sae_id>`.

The tables below restate SAEBench 0.6.0's field names and types (evals/*/eval_output.py, eval_config.py);
tests/test_saebench_files.py checks them against its classes. Values that SAEBench's types would refuse are
left out and said so in eval_result_unstructured["saebench_file_notes"].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from orthosae.atomic import write_json
from orthosae.errors import UserError
from orthosae.eval.results import SECTION_KEYS

# sae_bench_utils' get_sae_bench_version() gives this when no SAEBench checkout ran the eval.
COMMIT_HASH_UNKNOWN = "Unknown"
NOTES_KEY = "saebench_file_notes"
PLACEHOLDER = (
    -1
)  # SAEBench's core writes a metric it could not compute as -1 (replace_nans_with_negative_one)

# Field types of SAEBench's eval configs: "int?" allows null; "list[int]" a list of ints.
_CORE_CONFIG = {
    "model_name": "str",
    "llm_dtype": "str",
    "batch_size_prompts": "int",
    "n_eval_reconstruction_batches": "int",
    "n_eval_sparsity_variance_batches": "int",
    "dataset": "str",
    "context_size": "int",
    "compute_kl": "bool",
    "compute_ce_loss": "bool",
    "compute_l2_norms": "bool",
    "compute_sparsity_metrics": "bool",
    "compute_variance_metrics": "bool",
    "compute_featurewise_density_statistics": "bool",
    "compute_featurewise_weight_based_metrics": "bool",
    "exclude_special_tokens_from_reconstruction": "bool",
    "verbose": "bool",
}
_ABSORPTION_CONFIG = {
    "model_name": "str",
    "random_seed": "int",
    "f1_jump_threshold": "float",
    "max_k_value": "int",
    "prompt_template": "str",
    "prompt_token_pos": "int",
    "llm_batch_size": "int",
    "llm_dtype": "str",
    "k_sparse_probe_l1_decay": "float",
    "k_sparse_probe_batch_size": "int",
    "k_sparse_probe_num_epochs": "int",
    "min_GT_probe_f1": "float",
    "min_feats_for_eval": "int",
    "eval_k_sparse_probe_batch_size": "int",
    "precalc_k_sparse_probe_sae_acts": "bool",
}
_SPARSE_PROBING_CONFIG = {
    "random_seed": "int",
    "dataset_names": "list[str]",
    "probe_train_set_size": "int",
    "probe_test_set_size": "int",
    "context_length": "int",
    "sae_batch_size": "int",
    "llm_batch_size": "int?",
    "llm_dtype": "str",
    "model_name": "str",
    "k_values": "list[int]",
    "lower_vram_usage": "bool",
}
_UNLEARNING_CONFIG = {
    "random_seed": "int",
    "dataset_names": "list[str]",
    "intervention_method": "str",
    "retain_thresholds": "list[float]",
    "n_features_list": "list[int]",
    "multipliers": "list[int]",
    "dataset_size": "int",
    "seq_len": "int",
    "n_batch_loss_added": "int",
    "target_metric": "str",
    "save_metrics": "bool",
    "model_name": "str",
    "llm_batch_size": "int",
    "llm_dtype": "str",
}

_TOP_K = (1, 2, 5, 10, 20, 50, 100)


def _req(*names: str) -> dict[str, bool]:
    return dict.fromkeys(names, True)


def _probing_fields(prefix: str, required_full: bool) -> dict[str, bool]:
    return {f"{prefix}_test_accuracy": required_full} | {
        f"{prefix}_top_{k}_test_accuracy": False for k in _TOP_K
    }


# eval_result_metrics: group → {metric: required}, in SAEBench's order.
_CORE_METRICS = {
    "model_behavior_preservation": _req("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": _req(
        "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"
    ),
    "reconstruction_quality": _req("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": _req("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": _req("l0", "l1"),
    "token_stats": _req("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": _req(
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    ),
}
_ABSORPTION_METRICS = {
    "mean": _req(
        "mean_absorption_fraction_score",
        "mean_full_absorption_score",
        "mean_num_split_features",
        "std_dev_absorption_fraction_score",
        "std_dev_full_absorption_score",
        "std_dev_num_split_features",
    )
}
_SPARSE_PROBING_METRICS = {"llm": _probing_fields("llm", True), "sae": _probing_fields("sae", False)}
_UNLEARNING_METRICS = {"unlearning": {"unlearning_score": True}}

# eval_result_details: one row's fields → required.
_ABSORPTION_DETAIL = _req(
    "first_letter",
    "mean_absorption_fraction",
    "full_absorption_rate",
    "num_full_absorption",
    "num_probe_true_positives",
    "num_split_features",
)
_SPARSE_PROBING_DETAIL = {"dataset_name": True} | _probing_fields("llm", True) | _probing_fields("sae", False)


class Spec(NamedTuple):
    """One SAEBench eval: where its file goes, its ids, and its schema."""

    directory: str  # under eval_results/, as SAEBench's main.py --output_folder defaults name it
    eval_type_id: str
    config: dict[str, str]
    metrics: dict[str, dict[str, bool]]
    detail: dict[str, bool] | None  # None: SAEBench writes no detail rows we could fill


SPECS: dict[str, Spec] = {
    "core": Spec("core", "core", _CORE_CONFIG, _CORE_METRICS, None),
    "absorption": Spec(
        "absorption", "absorption_first_letter", _ABSORPTION_CONFIG, _ABSORPTION_METRICS, _ABSORPTION_DETAIL
    ),
    "sparse_probing": Spec(
        "sparse_probing",
        "sparse_probing",
        _SPARSE_PROBING_CONFIG,
        _SPARSE_PROBING_METRICS,
        _SPARSE_PROBING_DETAIL,
    ),
    "unlearning": Spec("unlearning", "unlearning", _UNLEARNING_CONFIG, _UNLEARNING_METRICS, None),
}

# Where our core groups differ from SAEBench's: its group name → ours, and its metric → ours.
_CORE_GROUP_SOURCE = {"misc_metrics": "misc"}
# Our explained_variance is 1 - SSE / total variance; SAEBench 0.6's headline formula is ours under this name.
_CORE_METRIC_SOURCE = {"explained_variance": "explained_variance_saebench"}
CI = "_ci95"


# ----------------------------------------------------------------- naming


def sae_release(results: dict[str, Any]) -> str:
    """'<model>_layer_<L>_sae', SAEBench's release name for a custom SAE (as eval.json's core sae_set)."""
    cfg = _sae_cfg(results)
    return f"{cfg['model_name']}_layer_{cfg['hook_layer']}_sae"


def file_name(release: str, sae_id: str) -> str:
    """SAEBench's get_results_filepath name: '/' would make a subdirectory, so it becomes '_'."""
    return f"{release}_{sae_id}_eval_results.json".replace("/", "_")


def _sae_cfg(results: dict[str, Any]) -> dict[str, Any]:
    for key in SECTION_KEYS.values():
        block = results.get(key)
        if isinstance(block, dict) and isinstance(cfg := block.get("sae_cfg_dict"), dict):
            if cfg.get("model_name") is None or cfg.get("hook_layer") is None:
                raise UserError(
                    f"'{key}' has no sae_cfg_dict.model_name/hook_layer: not an orthosae eval.json"
                )
            return cfg
    raise UserError("the results hold no evaluation with an sae_cfg_dict: not an orthosae eval.json")


# ----------------------------------------------------------------- values against SAEBench's types


def _fits(value: Any, kind: str) -> bool:
    """Whether pydantic (lax mode) would accept `value` for a field of this kind; errs on the strict side."""
    if kind.endswith("?"):
        return value is None or _fits(value, kind[:-1])
    if kind.startswith("list["):
        return isinstance(value, list) and all(_fits(v, kind[5:-1]) for v in value)
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "float":
        return isinstance(value, int | float)
    return kind == "str" and isinstance(value, str)


def _config(ours: dict[str, Any], types: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """Our eval config, less the values SAEBench's field of the same name would refuse (its default would
    then be read, so each is noted)."""
    out = {}
    for key, value in ours.items():
        if key in types and not _fits(value, types[key]):
            notes.append(f"eval_config.{key}={value!r} left out: SAEBench's field is {types[key]}")
            continue
        out[key] = value
    return out


def _group(
    ours: dict[str, Any],
    fields: dict[str, bool],
    sources: dict[str, str],
    where: str,
    notes: list[str],
    fill: bool,
) -> dict[str, Any] | None:
    """SAEBench's metrics of one group (in its order, each with our `_ci95` interval when there is one), then
    our other flat keys. A required metric we lack is -1 with `fill` (core), else the group is None."""
    out: dict[str, Any] = {}
    used = set()
    for name, required in fields.items():
        src = sources.get(name, name)
        used |= {src, src + CI}
        value = ours.get(src)
        if value is None and required:
            if not fill:
                return None
            notes.append(f"{where}.{name} not computed: {PLACEHOLDER}, SAEBench's placeholder")
            value = PLACEHOLDER
        out[name] = value
        if src + CI in ours:
            out[name + CI] = ours[src + CI]
    for key, value in ours.items():  # extras SAEBench ignores; nested dicts (formulas) stay in eval.json
        if key not in used and key not in out and not isinstance(value, dict):
            out[key] = value
    return out


def _details(rows: Any, fields: dict[str, bool] | None, notes: list[str]) -> list[dict[str, Any]]:
    if fields is None or not isinstance(rows, list):
        return []
    kept = [
        r
        for r in rows
        if isinstance(r, dict) and all(r.get(f) is not None for f, req in fields.items() if req)
    ]
    if len(kept) < len(rows):
        notes.append(
            f"{len(rows) - len(kept)} eval_result_details rows left out: a value SAEBench requires is null"
        )
    return kept


# ----------------------------------------------------------------- one file


def _core_groups(metrics: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    # SAEBench's core reconstructs every non-special token: our metrics.all_tokens, when it was computed.
    every = metrics.get("all_tokens")
    source = every if isinstance(every, dict) else metrics
    notes.append(
        "metrics over every non-special token, each reconstructed (SAEBench's convention): eval.json's "
        "metrics.all_tokens"
        if source is every
        else "metrics over the SAE's training token set (eval.json's metrics; no metrics.all_tokens)"
    )
    notes.append(
        "reconstruction_quality.explained_variance is SAEBench 0.6's formula "
        "(eval.json: explained_variance_saebench)"
    )
    out = {}
    for group, fields in _CORE_METRICS.items():
        ours = source.get(_CORE_GROUP_SOURCE.get(group, group)) or {}
        out[group] = _group(_dict(ours, group), fields, _CORE_METRIC_SOURCE, group, notes, fill=True)
    return out


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(
            f"{where} must be a JSON object, found {type(value).__name__}: not an orthosae eval.json"
        )
    return value


def saebench_file(name: str, block: dict[str, Any], release: str, sae_id: str) -> dict[str, Any] | None:
    """One eval's SAEBench file from its eval.json section; None where SAEBench would write none (its
    headline metric is null: too few letters passed absorption's gate, no unlearning intervention scored)."""
    spec = SPECS[name]
    where = SECTION_KEYS[name]
    block = _dict(block, where)
    notes: list[str] = []
    if name == "core":
        metrics = _core_groups(_dict(block.get("metrics"), f"{where}.metrics"), notes)
        config = block.get("eval_cfg")
    else:
        ours = _dict(block.get("eval_result_metrics"), f"{where}.eval_result_metrics")
        groups = {
            g: _group(_dict(ours.get(g) or {}, f"{where}.{g}"), f, {}, g, notes, fill=False)
            for g, f in spec.metrics.items()
        }
        if any(v is None for v in groups.values()):
            return None
        metrics = groups
        config = block.get("eval_config")
    for key in ("eval_id", "datetime_epoch_millis"):
        if key not in block:
            raise UserError(f"'{where}' has no {key}: not an orthosae eval.json")
    unstructured = block.get("eval_result_unstructured")
    if name == "core":
        unstructured = {}  # SAEBench's core writes {}
    elif not isinstance(unstructured, dict):
        unstructured = {} if unstructured is None else {"orthosae": unstructured}
    out = {
        "eval_type_id": spec.eval_type_id,
        "eval_config": _config(_dict(config, f"{where} eval config"), spec.config, notes),
        "eval_id": block["eval_id"],
        "datetime_epoch_millis": block["datetime_epoch_millis"],
        "eval_result_metrics": metrics,
        "eval_result_details": _details(block.get("eval_result_details"), spec.detail, notes),
        "sae_bench_commit_hash": COMMIT_HASH_UNKNOWN,
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": None,  # not a SAELens SAE
        "sae_cfg_dict": block.get("sae_cfg_dict"),
        "eval_result_unstructured": unstructured | ({NOTES_KEY: notes} if notes else {}),
    }
    # Ours, at the end; SAEBench's dataclasses ignore keys they do not declare.
    return out | {k: block[k] for k in ("orthosae_version", "eval_wall_time_s") if k in block}


def saebench_files(results: dict[str, Any], sae_id: str) -> dict[str, dict[str, Any] | None]:
    """{'<eval dir>/<file name>': file content} for every eval in `results` (eval.json's dict), in SAEBench
    0.6.0's layout under its eval_results/ directory. A None content means SAEBench would write no file for
    that eval (its headline is null), so a stale one there should go."""
    if not isinstance(results, dict):
        raise UserError(f"results must be a JSON object (eval.json), found {type(results).__name__}")
    if not sae_id.strip():
        raise UserError("the SAE id is empty: give the run directory's name")
    release = sae_release(results)
    name = file_name(release, sae_id)
    return {
        f"{SPECS[ev].directory}/{name}": saebench_file(ev, results[key], release, sae_id)
        for ev, key in SECTION_KEYS.items()
        if key in results
    }


def write_saebench_files(
    results: dict[str, Any], directory: str | os.PathLike[str], sae_id: str
) -> list[Path]:
    """Write `saebench_files(results, sae_id)` under `directory` (SAEBench's eval_results/), each file
    atomically; remove this SAE's file of an eval whose headline is now null. Returns the written paths."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"{directory} is a file: give a directory for SAEBench's result files")
    written = []
    for rel, content in saebench_files(results, sae_id).items():
        path = Path(directory) / rel
        if content is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, content)
        written.append(path)
    return written
