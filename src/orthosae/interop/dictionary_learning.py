"""dictionary_learning 0.1.0's on-disk layout, written and read: `ae.pt` (a state dict) + `config.json`.

dictionary_learning's training.py saves `{name: tensor.cpu()}` of the module's state dict with torch.save and
`{"trainer": trainer.config, "buffer": buffer.config}` as JSON; `utils.load_dictionary(dir, device)` picks
the class from trainer.dict_class and calls its `from_pretrained` (with trainer.k for the k-sparse ones).

How each of our architectures maps (n = d_sae = dict_size, d = d_in = activation_dim; ᵀ: transposed):

    ours        dictionary_learning       ae.pt
    relu        AutoEncoder               encoder.weight (n, d) = W_encᵀ   encoder.bias (n) = b_enc
                                          decoder.weight (d, n) = W_decᵀ   bias (d) = b_dec
    topk        AutoEncoderTopK           encoder.weight (n, d) = W_encᵀ   encoder.bias (n) = b_enc
                                          decoder.weight (d, n) = W_decᵀ   b_dec (d) = b_dec
                                          k () int32, threshold () = threshold
    batchtopk   BatchTopKSAE              as AutoEncoderTopK
    matryoshka  MatryoshkaBatchTopKSAE    W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d): ours as they are
                                          k () int32, threshold (), group_sizes (groups,) int64
    jumprelu    JumpReluAutoEncoder       W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d), threshold (n)

The nn.Linear classes keep weights as (out, in): the encoder's is our W_enc's own (n, d) memory block, the
decoder's is W_dec transposed. Every class but JumpReluAutoEncoder subtracts its decoder bias (`bias` or
`b_dec`) from the input before encoding and adds it after decoding, as ours do; JumpReluAutoEncoder's
apply_b_dec_to_input is False (an attribute, not saved) and our jumprelu does not centre either. Floating
tensors keep the SAE's dtype (load_state_dict casts them into dictionary_learning's float32 modules); a read
SAE takes the dtype of the file's encoder weight.

Where the two sides could compute different things:
- TopK: both use the threshold only for encode(use_threshold=True); −1 means "not tracked" on both sides.
- BatchTopK / Matryoshka: dictionary_learning's default encode keeps every activation above the threshold,
  so with −1 (not tracked) it keeps every positive one, where ours falls back to the batch top-k rule.
  Exporting such an SAE is refused; reading one gives ours with that fallback, which is
  dictionary_learning's encode(use_threshold=False).
- AutoEncoder: ours leave decoder norms free (the April-update rule) and ae.pt holds them as they are.
  `load_dictionary` (AutoEncoder.from_pretrained's default normalize_decoder=True) rescales every decoder
  column to unit norm and its encoder row and bias by the same norm: x̂ is unchanged, the latents become
  ours × ‖W_dec row‖. `from_pretrained(path, normalize_decoder=False)` gives ours exactly; reading keeps
  the file's weights as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orthosae.atomic import write_json, write_with
from orthosae.errors import UserError
from orthosae.sae.archs import ARCHS
from orthosae.sae.base import SAE
from orthosae.sae.batchtopk import BatchTopKSAE
from orthosae.sae.io import dtype_name, read_cfg
from orthosae.sae.jumprelu import JumpReLUSAE
from orthosae.sae.matryoshka import MatryoshkaSAE, parse_fractions
from orthosae.sae.topk import TopKSAE

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"
DL_VERSION = "0.1.0"  # the release whose layout this follows (tests/test_interop_dictionary_learning.py)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_\w+$")

# our weight name → (dictionary_learning's name, stored transposed)
Names = dict[str, tuple[str, bool]]


def _linear_names(bias: str) -> Names:
    return {
        "W_enc": ("encoder.weight", True),
        "b_enc": ("encoder.bias", False),
        "W_dec": ("decoder.weight", True),
        "b_dec": (bias, False),
    }


_PARAM_NAMES: Names = {name: (name, False) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

# The config.json trainer keys each trainer writes, in its order (its `config` property).
_COMMON_TAIL = ("device", "layer", "lm_name", "wandb_name", "submodule_name")
_TOPK_HEAD = ("trainer_class", "dict_class", "lr", "steps", "auxk_alpha", "warmup_steps", "decay_start")
_TOPK_KEYS = (
    *_TOPK_HEAD,
    "threshold_beta",
    "threshold_start_step",
    "seed",
    "activation_dim",
    "dict_size",
    "k",
)
_BATCH_KEYS = (
    *_TOPK_HEAD, "threshold_beta", "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size",
)  # fmt: skip


@dataclass(frozen=True)
class DLClass:
    """One dictionary_learning dictionary class and what of ours it holds."""

    name: str  # trainer.dict_class
    trainer: str  # the trainer_class that trains our arch's rule
    arch: str
    weights: Names
    extras: tuple[str, ...]  # buffers beyond the four weights
    keys: tuple[str, ...]  # the trainer block's keys
    wandb_name: str  # the trainer's default


CLASSES: dict[str, DLClass] = {
    c.name: c
    for c in (
        DLClass(
            "AutoEncoder", "StandardTrainerAprilUpdate", "relu", _linear_names("bias"), (),
            ("dict_class", "trainer_class", "activation_dim", "dict_size", "lr", "l1_penalty", "warmup_steps",
             "sparsity_warmup_steps", "steps", "decay_start", "seed", *_COMMON_TAIL),
            "StandardTrainerAprilUpdate",
        ),
        DLClass(
            "AutoEncoderTopK", "TopKTrainer", "topk", _linear_names("b_dec"), ("k", "threshold"),
            (*_TOPK_KEYS, *_COMMON_TAIL), "AutoEncoderTopK",
        ),
        DLClass(
            "BatchTopKSAE", "BatchTopKTrainer", "batchtopk", _linear_names("b_dec"), ("k", "threshold"),
            (*_BATCH_KEYS, "k", *_COMMON_TAIL), "BatchTopKSAE",
        ),
        DLClass(
            "MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", "matryoshka", _PARAM_NAMES,
            ("k", "threshold", "group_sizes"),
            (*_BATCH_KEYS, "group_fractions", "group_weights", "group_sizes", "k", *_COMMON_TAIL),
            "BatchTopKSAE",
        ),
        DLClass(
            "JumpReluAutoEncoder", "JumpReluTrainer", "jumprelu", _PARAM_NAMES, ("threshold",),
            ("trainer_class", "dict_class", "lr", "steps", "seed", "activation_dim", "dict_size",
             *_COMMON_TAIL, "bandwidth", "sparsity_penalty", "sparsity_warmup_steps", "target_l0"),
            "JumpRelu",
        ),
    )
}  # fmt: skip
BY_ARCH = {c.arch: c for c in CLASSES.values()}


# ---------------------------------------------------------------------------------------------- writing


def to_dictionary_learning(sae: SAE, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(ae.pt's state dict, config.json's content) of the dictionary_learning class computing what `sae` does.

    `meta` holds what we know about the SAE, every key optional: model_name / lm_name, hook_layer / layer,
    hook_name / submodule_name, activations_source, and training settings (our cfg.json's `training`
    block or the same keys at the top level: lr, steps, seed, …). A `dictionary_learning` key (the
    config.json `read_dictionary_learning` returned) supplies the trainer settings it recorded."""
    cls = _class_of(sae)
    _check_threshold(sae, cls)
    tensors = state_dict(sae, cls)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"refusing to export: SAE tensor '{name}' contains NaN or inf")
    return tensors, config(sae, cls, meta)


def write_dictionary_learning(sae: SAE, meta: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ae.pt (torch.save of the tensors alone) and config.json into `out_dir`, each atomically."""
    tensors, cfg = to_dictionary_learning(sae, meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / WEIGHTS_NAME, lambda f: torch.save(tensors, f))
    write_json(out / CONFIG_NAME, cfg)  # last: a directory with both files is complete
    return [out / WEIGHTS_NAME, out / CONFIG_NAME]


def _class_of(sae: SAE) -> DLClass:
    cls = BY_ARCH.get(sae.arch)
    if cls is None:
        raise UserError(
            f"no dictionary_learning class for a {sae.arch!r} SAE; export one of {sorted(BY_ARCH)}"
        )
    return cls


def _check_threshold(sae: SAE, cls: DLClass) -> None:
    """A BatchTopK-style SAE without a tracked threshold would be a dense ReLU SAE in dictionary_learning."""
    if isinstance(sae, BatchTopKSAE) and float(sae.threshold) < 0:
        raise UserError(
            f"this {sae.arch} SAE has no inference threshold yet (it is tracked after threshold_start_step), "
            f"and dictionary_learning's {cls.name} would then keep every positive latent; train it for longer"
        )


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own contiguous storage: torch.save writes a view's whole storage."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def state_dict(sae: SAE, cls: DLClass) -> dict[str, torch.Tensor]:
    """`cls`'s state dict for `sae`'s weights: the names, shapes and dtypes its load_state_dict wants."""
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in cls.weights.items():
        t = getattr(sae, ours)
        out[theirs] = _plain(t.T if transposed else t)
    if isinstance(sae, TopKSAE | BatchTopKSAE):
        out["k"] = torch.tensor(sae.k, dtype=torch.int32)
        out["threshold"] = _plain(sae.threshold)
    if isinstance(sae, MatryoshkaSAE):
        out["group_sizes"] = torch.tensor(sae.group_sizes, dtype=torch.int64)
    if isinstance(sae, JumpReLUSAE):
        out["threshold"] = _plain(sae.threshold)
    return out


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    return isinstance(value, list) and all(_jsonable(v) for v in value)


def _lookup(meta: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` found in meta's `training` block or at its top level (JSON values only)."""
    training = meta.get("training")
    scopes = [training, meta] if isinstance(training, dict) else [meta]
    for key in keys:
        for scope in scopes:
            value = scope.get(key)
            if value is not None and _jsonable(value):
                return value
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _schedule(meta: dict[str, Any]) -> dict[str, Any]:
    """Our lr schedule in dictionary_learning's terms: warm-up steps, decay_start a step, not a fraction."""
    steps = _int(_lookup(meta, "steps"))
    warmup = _int(_lookup(meta, "warmup_steps"))
    if warmup is None and steps is not None:
        warmup = min(1000, steps // 10)  # TrainConfig.resolved_warmup
    fraction = _number(_lookup(meta, "decay_start"))
    decay = None
    if fraction is not None and steps is not None and fraction < 1:
        decay = int(fraction * steps)
    start = _int(_lookup(meta, "threshold_start_step"))
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "decay_start": decay,
        "threshold_start_step": start if start is not None else warmup,
    }


def _arch_settings(sae: SAE, meta: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings that depend on the architecture, from our training keys where present."""
    steps = _int(_lookup(meta, "steps"))
    k_aux = _int(_lookup(meta, "k_aux"))
    out: dict[str, Any] = {
        "auxk_alpha": _lookup(meta, "auxk_alpha"),
        "threshold_beta": _lookup(meta, "threshold_beta"),
        "top_k_aux": k_aux if k_aux is not None else max(1, sae.d_in // 2),  # our Trainer's default
        "l1_penalty": _lookup(meta, "l1"),
    }
    if isinstance(sae, JumpReLUSAE):
        warm = _int(_lookup(meta, "sparsity_warmup_steps"))
        if warm is None and steps is not None:
            warm = min(2000, steps // 5)  # TrainConfig.resolved_sparsity_warmup
        target = _number(_lookup(meta, "target_l0"))
        k = _int(_lookup(meta, "k"))
        out |= {
            "bandwidth": _lookup(meta, "jumprelu_bandwidth"),
            "sparsity_penalty": _lookup(meta, "jumprelu_sparsity"),
            "sparsity_warmup_steps": warm,
            "target_l0": target if target is not None else (float(k) if k is not None else None),
        }
    if isinstance(sae, MatryoshkaSAE):
        out |= _groups(sae, meta)
    return out


def _groups(sae: MatryoshkaSAE, meta: dict[str, Any]) -> dict[str, Any]:
    n_groups = len(sae.group_sizes)
    fractions = _parsed(_lookup(meta, "matryoshka_fractions"))
    weights = _parsed(_lookup(meta, "matryoshka_weights"))
    if weights is None and isinstance(meta.get("training"), dict):
        weights = [1.0 / n_groups] * n_groups  # both libraries' default
    return {
        "group_fractions": fractions if fractions is not None else [s / sae.d_sae for s in sae.group_sizes],
        "group_weights": weights,
    }


def _parsed(text: Any) -> list[float] | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_fractions(text)
    except (ValueError, ZeroDivisionError):
        return None


def _first(meta: dict[str, Any], *keys: str) -> Any:
    return next((meta[k] for k in keys if meta.get(k) is not None), None)


def _site(meta: dict[str, Any]) -> dict[str, Any]:
    """Model, layer and hook: dictionary_learning's lm_name / layer / submodule_name."""
    layer = _int(_first(meta, "layer", "hook_layer"))
    lm_name = _first(meta, "lm_name", "model_name")
    hook = _first(meta, "submodule_name", "hook_name")
    return {
        "layer": layer,
        "lm_name": lm_name if isinstance(lm_name, str) else None,
        "submodule_name": hook if isinstance(hook, str) else None,
    }


def _recorded(meta: dict[str, Any], cls: DLClass) -> dict[str, Any]:
    """The config.json a dictionary_learning directory came with, when it was read as this same class."""
    raw = meta.get("dictionary_learning")
    if not isinstance(raw, dict):
        return {}
    trainer = raw.get("trainer")
    return raw if isinstance(trainer, dict) and trainer.get("dict_class") == cls.name else {}


def structural(sae: SAE, cls: DLClass) -> dict[str, Any]:
    """The trainer keys the weights fix (never taken from meta)."""
    out: dict[str, Any] = {"dict_class": cls.name, "activation_dim": sae.d_in, "dict_size": sae.d_sae}
    if isinstance(sae, TopKSAE | BatchTopKSAE):
        out["k"] = sae.k
    if isinstance(sae, MatryoshkaSAE):
        out["group_sizes"] = list(sae.group_sizes)
    return out


def trainer_block(sae: SAE, cls: DLClass, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json's `trainer`: every key cls's trainer writes, null where unknown.

    Precedence: what the weights fix, then what a dictionary_learning config.json recorded, then what our
    training settings say."""
    derived = {
        "trainer_class": cls.trainer,
        "lr": _lookup(meta, "lr_resolved", "lr"),
        "seed": _int(_lookup(meta, "seed")),
        "device": _lookup(meta, "device"),
        "wandb_name": cls.wandb_name,
        **_schedule(meta),
        **_arch_settings(sae, meta),
        **_site(meta),
    }
    recorded = _recorded(meta, cls).get("trainer", {})
    values = {**derived, **{k: v for k, v in recorded.items() if v is not None}, **structural(sae, cls)}
    block = {key: values.get(key) for key in cls.keys}
    return block | {k: v for k, v in recorded.items() if k not in block}


def _io(hook: Any) -> str | None:
    if not isinstance(hook, str):
        return None
    if "resid_post" in hook:
        return "out"
    return "in" if "resid_pre" in hook else None


def buffer_block(sae: SAE, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json's `buffer` (ActivationBuffer.config's keys), null where unknown."""
    source = meta.get("activations_source")
    source = source if isinstance(source, dict) else {}
    return {
        "d_submodule": sae.d_in,
        "io": _io(_first(meta, "hook_name", "submodule_name")),
        "n_ctxs": None,
        "ctx_len": _int(source.get("context_size")),
        "refresh_batch_size": None,
        "out_batch_size": _int(_lookup(meta, "batch_size")),
        "device": _lookup(meta, "device"),
    }


def config(sae: SAE, cls: DLClass, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json as dictionary_learning's training.py writes it."""
    recorded = _recorded(meta, cls).get("buffer")
    buffer = recorded if isinstance(recorded, dict) else buffer_block(sae, meta)
    return {"trainer": trainer_block(sae, cls, meta), "buffer": buffer}


# ---------------------------------------------------------------------------------------------- reading


def is_dictionary_learning_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding dictionary_learning's two files."""
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()


def read_dictionary_learning(path: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """(our SAE computing what the dictionary_learning dictionary at `path` computes, a cfg of our keys).

    cfg holds arch, d_in, d_sae, dtype, k and group_sizes where used, model_name (trainer.lm_name),
    hook_layer (trainer.layer) and submodule_name when recorded, hook_name when submodule_name is a
    TransformerLens hook name, dict_class, and the whole config.json under `dictionary_learning`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no dictionary_learning directory at {path}; give the directory holding ae.pt")
    raw = read_cfg(path / CONFIG_NAME)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise UserError(
            f"{path / CONFIG_NAME} has no 'trainer' object; it was not written by dictionary_learning"
        )
    cls = dl_class(trainer.get("dict_class"), path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    tensors = read_state_dict(weights)
    hp = check_state_dict(tensors, cls, trainer, weights)
    dtype = tensors[cls.weights["W_enc"][0]].dtype
    sae = ARCHS[cls.arch].from_hyperparams(hp, {"dtype": dtype, "device": "cpu"})
    load_into(sae, tensors, cls)
    return sae.to(device).eval(), {
        **hp,
        "dtype": dtype_name(dtype),
        **_info(trainer, cls),
        "dictionary_learning": raw,
    }


def dl_class(name: Any, where: Path) -> DLClass:
    cls = CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(
            f"{where}: dictionary_learning class {name!r} is not supported; orthosae reads "
            f"{', '.join(CLASSES)}"
        )
    return cls


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """ae.pt's tensors, loaded with weights_only (no code runs), with one-line errors."""
    if not weights.is_file():
        raise UserError(f"missing {weights}; a dictionary_learning directory needs ae.pt next to config.json")
    try:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's failures vary by what is wrong with the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{weights} is not a readable state dict ({first}); re-save it") from None
    ok = isinstance(loaded, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    )
    if not ok:
        raise UserError(f"{weights} must hold a state dict (names → tensors), found {type(loaded).__name__}")
    return loaded


def _expected_shapes(cls: DLClass, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    ours = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes = {
        theirs: tuple(reversed(ours[name])) if transposed else ours[name]
        for name, (theirs, transposed) in cls.weights.items()
    }
    extras = {"k": (), "threshold": (d_sae,) if cls.arch == "jumprelu" else ()}
    return shapes | {name: extras[name] for name in cls.extras if name in extras}


def _dims(tensors: dict[str, torch.Tensor], cls: DLClass, weights: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the encoder weight."""
    name, transposed = cls.weights["W_enc"]
    t = tensors[name]
    if t.dim() != 2:
        raise UserError(f"{weights}: '{name}' must be 2-D, found shape {tuple(t.shape)}")
    rows, cols = t.shape
    return (cols, rows) if transposed else (rows, cols)


def check_state_dict(
    tensors: dict[str, torch.Tensor], cls: DLClass, trainer: dict[str, Any], weights: Path
) -> dict[str, Any]:
    """Names, shapes, dtypes and values as `cls` needs; returns our hyperparameters (d_in, d_sae, k, …)."""
    expected = {theirs for theirs, _ in cls.weights.values()} | set(cls.extras)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserError(f"{weights}: not a {cls.name} state dict (missing {missing}, unexpected {extra})")
    d_in, d_sae = _dims(tensors, cls, weights)
    for name, shape in _expected_shapes(cls, d_in, d_sae).items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{weights}: '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
    _check_values(tensors, cls, weights)
    _check_config_dims(trainer, d_in, d_sae, weights)
    hp: dict[str, Any] = {"arch": cls.arch, "d_in": d_in, "d_sae": d_sae}
    if "k" in cls.extras:
        hp["k"] = _k(tensors["k"], trainer, d_sae, weights)
    if "group_sizes" in cls.extras:
        hp["group_sizes"] = _group_sizes(tensors["group_sizes"], d_sae, weights)
    return hp


def _check_values(tensors: dict[str, torch.Tensor], cls: DLClass, weights: Path) -> None:
    dtype = tensors[cls.weights["W_enc"][0]].dtype
    if dtype not in _FLOATS:
        raise UserError(f"{weights}: unsupported weight dtype {dtype_name(dtype)}; expected a float type")
    for name, t in tensors.items():
        if name in ("k", "group_sizes"):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise UserError(f"{weights}: '{name}' must be an integer tensor, found {dtype_name(t.dtype)}")
            continue
        if t.dtype not in _FLOATS:
            raise UserError(f"{weights}: '{name}' must be a float tensor, found {dtype_name(t.dtype)}")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{weights}: '{name}' contains NaN or inf; the file is unusable")


def _check_config_dims(trainer: dict[str, Any], d_in: int, d_sae: int, weights: Path) -> None:
    for key, actual in (("activation_dim", d_in), ("dict_size", d_sae)):
        said = trainer.get(key)
        if said is not None and said != actual:
            raise UserError(f"{weights}: config.json says {key}={said!r} but the tensors have {actual}")


def _k(t: torch.Tensor, trainer: dict[str, Any], d_sae: int, weights: Path) -> int:
    k = int(t.item())
    said = trainer.get("k")
    if said is not None and said != k:  # dictionary_learning's from_pretrained refuses this too
        raise UserError(f"{weights}: config.json says k={said!r} but the 'k' tensor holds {k}")
    if not 0 < k <= d_sae:
        raise UserError(f"{weights}: k={k} must be between 1 and dict_size={d_sae}")
    return k


def _group_sizes(t: torch.Tensor, d_sae: int, weights: Path) -> list[int]:
    sizes = [int(s) for s in t.reshape(-1).tolist()] if t.dim() == 1 else []
    if not sizes or any(s <= 0 for s in sizes) or sum(sizes) != d_sae:
        raise UserError(
            f"{weights}: 'group_sizes' must be positive and sum to dict_size={d_sae}, got {t.tolist()}"
        )
    return sizes


@torch.no_grad()
def load_into(sae: SAE, tensors: dict[str, torch.Tensor], cls: DLClass) -> None:
    """Copy a checked state dict of `cls` into `sae` (built with the matching arch and sizes)."""
    for ours, (theirs, transposed) in cls.weights.items():
        t = tensors[theirs]
        getattr(sae, ours).copy_(t.T if transposed else t)
    if isinstance(sae, TopKSAE | BatchTopKSAE | JumpReLUSAE):
        sae.threshold.copy_(tensors["threshold"])


def _info(trainer: dict[str, Any], cls: DLClass) -> dict[str, Any]:
    """Model, layer and hook in our cfg keys, from what the trainer block records."""
    out: dict[str, Any] = {"dict_class": cls.name}
    if isinstance(trainer.get("trainer_class"), str):
        out["trainer_class"] = trainer["trainer_class"]
    if isinstance(trainer.get("lm_name"), str):
        out["model_name"] = trainer["lm_name"]
    layer = _int(trainer.get("layer"))
    if layer is not None:
        out["hook_layer"] = layer
    hook = trainer.get("submodule_name")
    if isinstance(hook, str):
        out["submodule_name"] = hook
        if _TL_HOOK.match(hook):
            out["hook_name"] = hook
    return out
