"""Run SAEBench's own functions (sae-bench 0.6.0, the real package) on our inputs, in a separate venv.

The venv lives in `.venv-peers/saebench` (see peer_venv.py): torch==2.13.0, the pins of
`tests/peers/saebench-requirements.txt`, then `sae-bench==0.6.0 --no-deps`. `tests/peers/stubs` stands in
for sae_lens / transformer_lens / datasets / transformers, which SAEBench imports at module level but the
functions we call do not use (see stubs/README.md).

Use from a test:

    out = run_saebench(SCRIPT, {"x": tensor, ...}, tmp_path)

SCRIPT is Python run in the peer venv. It finds the inputs as `inputs` (a dict of tensors / plain values,
loaded with torch.load) and sets `outputs` (a dict of the same kinds), which comes back to the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peer_venv import Peer

PEERS = Path(__file__).resolve().parent / "peers"
SAEBENCH = "sae-bench==0.6.0"
REQUIREMENTS = PEERS / "saebench-requirements.txt"
PEER = Peer(
    "saebench",
    installs=(("-r", str(REQUIREMENTS)), ("--no-deps", SAEBENCH)),
    pins=REQUIREMENTS.read_text() + SAEBENCH,
    paths=(str(PEERS / "stubs"),),
)
VENV = PEER.venv


def peer_python() -> Path:
    """The peer venv's python, building the venv first if it is missing or its pins changed."""
    return PEER.python()


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


def run_saebench(script: str, inputs: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
    """Run `script` in the peer venv with `inputs`; return its `outputs` (failures show its stderr)."""
    return PEER.run(script, inputs, workdir, timeout)
