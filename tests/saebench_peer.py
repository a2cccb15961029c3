"""Run SAEBench's own functions (sae-bench 0.6.0, the real package) on our inputs, in a separate venv.

The venv lives in `.venv-peers/saebench` (git-ignored) and is built on first use: torch==2.13.0 (the CPU
wheel), the pins of `tests/peers/saebench-requirements.txt`, then `sae-bench==0.6.0 --no-deps`. Its pins
never touch ours. `tests/peers/stubs` stands in for sae_lens / transformer_lens / datasets / transformers,
which SAEBench imports at module level but the functions we call do not use (see stubs/README.md).

Use from a test:

    out = run_saebench(SCRIPT, {"x": tensor, ...}, tmp_path)

SCRIPT is Python run in the peer venv. It finds the inputs as `inputs` (a dict of tensors / plain values,
loaded with torch.load) and sets `outputs` (a dict of the same kinds), which comes back to the test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "peers"
VENV = ROOT / ".venv-peers" / "saebench"
SAEBENCH = "sae-bench==0.6.0"
TORCH = "torch==2.13.0"


def _stamp() -> Path:
    pins = (PEERS / "saebench-requirements.txt").read_text() + SAEBENCH + TORCH
    return VENV / f".installed-{hashlib.sha256(pins.encode()).hexdigest()[:12]}"


def peer_python() -> Path:
    """The peer venv's python, building the venv first if it is missing or its pins changed."""
    python = VENV / "bin" / "python"
    stamp = _stamp()
    if python.exists() and stamp.exists():
        return python
    base = os.environ.get("ORTHOSAE_BASE_PYTHON") or getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first and exactly pinned (an open range pulls a multi-GB CUDA build), as for our own venv.
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-r", str(PEERS / "saebench-requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", SAEBENCH], check=True)
    stamp.touch()
    return python


# Python for a peer script that imports SAEBench's main.py modules: those import submodules of sae_lens
# (pretrained-SAE directories) that the stub packages lack, and the functions called never use them, so
# each becomes an empty module of placeholders; main.py's SAE-selection helper (sae_lens's pretrained SAEs)
# is used only by its CLI. Prepend it to the script given to run_saebench.
MAIN_PY_STUBS = """
import importlib.abc, importlib.machinery, sys, types

class _StubSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sae_lens", "transformer_lens") and "." in name:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = sys.modules["sae_lens"].__getattr__
        return module
    def exec_module(self, module):
        pass

sys.meta_path.append(_StubSubmodules())
_sel = types.ModuleType("sae_selection_utils")
_sel.get_saes_from_regex = None
sys.modules["sae_bench.sae_bench_utils.sae_selection_utils"] = _sel
"""

_PRELUDE = """
import sys, torch
sys.path.insert(0, {stubs!r})
inputs = torch.load({inp!r}, weights_only=False)
outputs = {{}}
"""
_EPILOGUE = """
torch.save(outputs, {out!r})
"""


def run_saebench(script: str, inputs: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
    """Run `script` in the peer venv with `inputs`; return its `outputs` (failures show its stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    inp, out = workdir / "peer_inputs.pt", workdir / "peer_outputs.pt"
    torch.save(inputs, inp)
    code = (
        _PRELUDE.format(stubs=str(PEERS / "stubs"), inp=str(inp))
        + textwrap.dedent(script)
        + _EPILOGUE.format(out=str(out))
    )
    path = workdir / "peer_script.py"
    path.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [str(peer_python()), str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"SAEBench peer script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=False)
