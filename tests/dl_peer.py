"""Run dictionary_learning's own code (dictionary-learning 0.1.0, the real package) on our inputs, in a
separate venv.

The venv lives in `.venv-peers/dictionary_learning` (see peer_venv.py): torch==2.13.0, einops, then
`dictionary-learning==0.1.0 --no-deps` (the version benchmarks/step.py compares against). The package's
__init__ and utils.py import nnsight, tqdm, datasets and zstandard at module level, which loading and
running a dictionary never uses: the script prelude puts placeholder modules in their place (any attribute
is a class that raises when used, as tests/peers/stubs does for SAEBench), so `utils.load_dictionary` and
every dictionary class are imported from the real package, unchanged.

    out = run_dl(SCRIPT, {"x": tensor, ...}, tmp_path)

SCRIPT is Python run in the peer venv. It finds the inputs as `inputs` (a dict loaded with torch.load) and
sets `outputs` (a dict of the same kinds), which comes back to the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peer_venv import Peer

STUBS = Path(__file__).resolve().parent / "peers" / "stubs"
DICTIONARY_LEARNING = "dictionary-learning==0.1.0"
EINOPS = "einops==0.8.1"
PEER = Peer(
    "dictionary_learning",
    installs=((EINOPS,), ("--no-deps", DICTIONARY_LEARNING)),
    pins=f"{EINOPS}\n{DICTIONARY_LEARNING}",
    paths=(str(STUBS),),  # `datasets` comes from the stub packages
)

# Placeholders for the modules dictionary_learning imports but never uses to load or run a dictionary.
# Each gets a spec without an origin: torch._dynamo looks tqdm up with find_spec, which needs one.
PRELUDE = """
import importlib.machinery, types
from _placeholder import make_getattr

for _name in ("nnsight", "tqdm", "zstandard"):
    _module = types.ModuleType(_name)
    _module.__spec__ = importlib.machinery.ModuleSpec(_name, None)
    _module.__getattr__ = make_getattr(_name)
    sys.modules[_name] = _module
"""


def peer_python() -> Path:
    """The peer venv's python, building the venv first if it is missing or its pins changed."""
    return PEER.python()


def run_dl(script: str, inputs: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
    """Run PRELUDE + `script` in the peer venv with `inputs`; return its `outputs` (failures show stderr)."""
    return PEER.run(PRELUDE + script, inputs, workdir, timeout)
