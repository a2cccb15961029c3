"""A peer library's real package in its own virtualenv, and a way to run a script there on our inputs.

Each peer (SAEBench, SAELens, dictionary_learning) lives in `.venv-peers/<name>` (git-ignored), built on
first use and rebuilt when its pins change: torch==2.13.0 first (the CPU wheel; an open range pulls a
multi-GB CUDA build), then the peer's own install steps. Its pins never touch ours.

    out = peer.run(SCRIPT, {"x": tensor, ...}, tmp_path)

SCRIPT is Python run in the peer venv. It finds the inputs as `inputs` (a dict loaded with torch.load) and
sets `outputs` (a dict of the same kinds), which comes back to the caller.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

_PRELUDE = """
import sys, torch
sys.path[:0] = {paths!r}
inputs = torch.load({inp!r}, weights_only=False)
outputs = {{}}
"""
_EPILOGUE = """
torch.save(outputs, {out!r})
"""


@dataclass(frozen=True)
class Peer:
    name: str
    installs: tuple[tuple[str, ...], ...]  # pip install argument lists, run in order after torch
    pins: str  # every pinned version installed (e.g. a requirements file + the package): a change rebuilds
    paths: tuple[str, ...] = ()  # put first on the peer's sys.path (stub packages)

    @property
    def venv(self) -> Path:
        return ROOT / ".venv-peers" / self.name

    def _stamp(self) -> Path:
        key = self.pins + TORCH  # pins must name every installed version
        return self.venv / f".installed-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def python(self) -> Path:
        """The venv's python, building the venv first if it is missing or its pins changed."""
        python, stamp = self.venv / "bin" / "python", self._stamp()
        if python.exists() and stamp.exists():
            return python
        base = os.environ.get("ORTHOSAE_BASE_PYTHON") or getattr(sys, "_base_executable", None) or "python3"
        subprocess.run([base, "-m", "venv", "--clear", str(self.venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH], check=True)
        for args in self.installs:
            subprocess.run([*pip, *args], check=True)
        stamp.touch()
        return python

    def run(self, script: str, inputs: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
        """Run `script` in the venv with `inputs`; return its `outputs` (a failure shows its stderr)."""
        workdir.mkdir(parents=True, exist_ok=True)
        inp, out = workdir / "peer_inputs.pt", workdir / "peer_outputs.pt"
        torch.save(inputs, inp)
        code = (
            _PRELUDE.format(paths=list(self.paths), inp=str(inp))
            + textwrap.dedent(script)
            + _EPILOGUE.format(out=str(out))
        )
        path = workdir / "peer_script.py"
        path.write_text(code)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(
            [str(self.python()), str(path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=workdir,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{self.name} peer script failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return torch.load(out, weights_only=False)
