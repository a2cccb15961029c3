"""SAELens 6's on-disk layout: `sae_weights.safetensors` plus a cfg.json that `SAE.load_from_disk` reads.

Our run directories are written in this layout, so SAELens loads them with no converter. cfg.json holds
SAELens's config fields (d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture, the class's own fields such as k) and its `metadata` block (model,
hook, context size, BOS and special-token handling, dataset). SAELens drops top-level keys its config
class does not define, which is where our own keys live (arch, orthogonality, training, …).

Reading goes the other way: a directory SAELens wrote becomes one of our SAE modules computing the same
function. SAELens options we do not implement are folded into the weights where that is exact
(apply_b_dec_to_input=False, rescale_acts_by_decoder_norm) and refused otherwise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from orthosae import __version__
from orthosae.errors import UserError

if TYPE_CHECKING:  # orthosae.sae.io imports this module
    from orthosae.sae.base import SAE

# The SAELens release whose layout this module writes and was checked against (tests/test_interop_saelens).
# SAELens reads a cfg.json without a version ≥ 6 through its pre-6.0 path, which misreads our files.
SAELENS_LAYOUT_VERSION = "6.54.12"
WEIGHTS_NAME = "sae_weights.safetensors"
CFG_NAME = "cfg.json"

# SAELens 6's inference architectures we can compute (its training-only names are saved by SAELens as
# one of these), and the arch of ours each becomes. BatchTopK and Matryoshka become jumprelu.
READABLE = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre)$")


def saelens_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """SAELens's `metadata` block from our flat cfg keys (model_name, hook_name, activations_source, …).

    Unknown values are left out rather than written as null: SAELens's metadata answers None for any
    missing key, and a null where it expects a string is what breaks its loaders."""
    source = info.get("activations_source") if isinstance(info.get("activations_source"), dict) else {}
    assert isinstance(source, dict)
    training = info.get("training") if isinstance(info.get("training"), dict) else {}
    assert isinstance(training, dict)
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "orthosae_version": __version__,
        "model_name": info.get("model_name"),
        "model_class_name": "HookedTransformer",
        "hook_name": info.get("hook_name"),
        "hook_layer": info.get("hook_layer"),
        "context_size": source.get("context_size"),
        # Every context starts with BOS (pack.py), whose activations are never trained on.
        "prepend_bos": source.get("prepend_bos", True) if source else None,
        "exclude_special_tokens": source.get("exclude_special", True) if source else None,
        "dataset_path": _dataset(source),
        # Documents are joined with EOS between them (pack.py).
        "sequence_separator_token": "eos" if source else None,
        "disable_concat_sequences": False if source else None,
        "model_from_pretrained_kwargs": {},
        "training_tokens": training.get("tokens_seen"),
    }
    keep = {"sae_lens_training_version"}  # SAELens itself writes null here for SAEs it did not train
    return {k: v for k, v in meta.items() if v is not None or k in keep}


def _dataset(source: dict[str, Any]) -> str | None:
    corpus = source.get("corpus")
    if isinstance(corpus, dict):
        name = corpus.get("name") or corpus.get("path") or corpus.get("source")
        return str(name) if name is not None else None
    return str(corpus) if corpus is not None else None


def saelens_cfg(sae: SAE, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json SAELens 6 writes for the inference class that computes what `sae` computes."""
    return {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": sae.saelens_arch,
        **sae.saelens_fields(),
        "metadata": saelens_metadata(info or {}),
    }


def layer_of_hook(hook_name: object) -> int | None:
    """The decoder block whose output a TransformerLens residual hook reads: resid_post L → L, and
    resid_pre L → L − 1 (the same tensor); None for any other hook."""
    m = _HOOK.match(str(hook_name)) if isinstance(hook_name, str) else None
    if m is None:
        return None
    layer = int(m.group(1))
    return layer if m.group(2) == "resid_post" else (layer - 1 if layer > 0 else None)


def foreign_hyperparams(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our cfg keys (arch, d_in, d_sae, k, dtype, model_name, hook_layer) for a cfg.json SAELens wrote."""
    arch = cfg.get("architecture")
    if arch is None and cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        arch = "topk"  # the pre-6.0 layout names TopK only through its activation function
    arch = arch or "standard"
    if arch not in READABLE:
        raise UserError(
            f"{where}: SAELens architecture '{arch}' is not supported; orthosae evaluates "
            f"{', '.join(sorted(READABLE))} SAEs"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise UserError(
            f"{where}: normalize_activations='{norm}' rescales inputs at run time, which orthosae does not; "
            "fold the scaling into the weights in SAELens first (fold_activation_norm_scaling_factor)"
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise UserError(
            f"{where}: reshape_activations='{cfg['reshape_activations']}' (hook_z) is not supported"
        )
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    hook = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    out: dict[str, Any] = {
        "arch": READABLE[arch],
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "dtype": cfg.get("dtype", "float32"),
        "model_name": meta.get("model_name", cfg.get("model_name")),
        "hook_name": hook,
        "hook_layer": layer_of_hook(hook),
        "format": "saelens",
    }
    if arch == "topk":
        out["k"] = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    return {k: v for k, v in out.items() if v is not None}


@torch.no_grad()
def fold_foreign_options(sae: SAE, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Make `tensors` (SAELens names) compute SAELens's function under our fixed conventions, in place.

    - Input centring: ours is fixed per class (JumpReLU: off; the others: on). Where SAELens's flag
      differs, (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc) moves it into b_enc.
    - rescale_acts_by_decoder_norm (TopK): scaling pre-activations by ‖W_dec_i‖ and decoding with unit
      rows equals scaling encoder row i by ‖W_dec_i‖ and decoder row i by 1/‖W_dec_i‖."""
    w_enc, b_dec = tensors["W_enc"].double(), tensors["b_dec"].double()
    shift = b_dec @ w_enc
    wants = bool(cfg.get("apply_b_dec_to_input", True))
    b_enc = tensors["b_enc"].double()
    if wants and not sae.apply_b_dec_to_input:
        b_enc = b_enc - shift
    elif sae.apply_b_dec_to_input and not wants:
        b_enc = b_enc + shift
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].double().norm(dim=1)
        tensors["W_enc"] = (w_enc * norms).to(tensors["W_enc"].dtype)
        b_enc = b_enc * norms
        tensors["W_dec"] = (tensors["W_dec"].double() / norms.clamp_min(1e-12)[:, None]).to(
            tensors["W_dec"].dtype
        )
        if "threshold" in tensors:  # not a TopK field; kept consistent all the same
            tensors["threshold"] = (tensors["threshold"].double() * norms).to(tensors["threshold"].dtype)
    tensors["b_enc"] = b_enc.to(tensors["b_enc"].dtype)
