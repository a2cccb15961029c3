"""Shared pieces of benchmarks/saebench_real.py: the SAE as SAEBench's functions see it, the peer-script
preamble, and the comparison rows.

SAEBench's functions are handed a stand-in SAE object (`SAE_STANDIN`, Python run in the peer venv): the
folded weights of our SAE and its encoder formula (ReLU((x − b_dec)·W_enc + b_enc), TopK keeping the k
largest). That formula is our SAE's definition, not SAEBench code; `encode_check` compares the stand-in's
latents with our SAE's on real activations, so a slip there would show.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:  # tests/saebench_peer.py: the peer venv and run_saebench
    sys.path.insert(0, str(ROOT / "tests"))

from orthosae.eval.fold import folded  # noqa: E402
from orthosae.sae import SAE  # noqa: E402
from saebench_peer import MAIN_PY_STUBS  # noqa: E402

# Python for the peer venv: the stubs SAEBench's main.py modules need (saebench_peer.MAIN_PY_STUBS), then
# the stand-in SAE built from `inputs["saes"][name]`.
PEER_PRELUDE = (
    MAIN_PY_STUBS
    + r"""
torch.set_num_threads(1)

class _Cfg:
    pass

class StandInSAE:
    # Our SAE as SAEBench's functions use one: encode, decode, W_dec, b_dec, dtype, device, cfg.d_sae.
    def __init__(self, w):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
        self.k = w["k"]
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.cfg = _Cfg()
        self.cfg.d_sae = self.W_dec.shape[0]
    def encode(self, x):
        pre = torch.relu((x.to(self.dtype) - self.b_dec) @ self.W_enc + self.b_enc)
        if self.k is None:
            return pre
        values, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values)
    def decode(self, z):
        return z @ self.W_dec + self.b_dec

SAES = {name: StandInSAE(w) for name, w in inputs["saes"].items()}
outputs["encode_check"] = {name: SAES[name].encode(inputs["encode_probe"]) for name in SAES}
"""
)


def sae_weights(sae: SAE) -> dict[str, Any]:
    """The folded SAE (as our evals use it: eval.fold) as plain tensors for the peer's StandInSAE."""
    f = folded(sae)
    return {
        "W_enc": f.W_enc.detach().float().contiguous().clone(),
        "b_enc": f.b_enc.detach().float().clone(),
        "W_dec": f.W_dec.detach().float().clone(),
        "b_dec": f.b_dec.detach().float().clone(),
        "k": int(f.k) if getattr(f, "arch", "") == "topk" else None,
    }


def encode_check(
    saes: dict[str, SAE], probe: torch.Tensor, theirs: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Max |ours − stand-in| latent over `probe` rows (real activations), per SAE."""
    out = {}
    with torch.no_grad():
        for name, sae in saes.items():
            ours = folded(sae).encode(probe).float()
            out[name] = float((ours - theirs[name]).abs().max())
    return out


@dataclass
class Row:
    metric: str
    ours: float | None
    theirs: float | None
    ci: list[float] | None = None
    note: str = ""

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.theirs is None:
            return None
        return self.ours - self.theirs

    @property
    def inside(self) -> bool | None:
        """Is SAEBench's value inside our 95 % interval?"""
        if self.ci is None or self.theirs is None or any(v is None for v in self.ci):
            return None
        return self.ci[0] <= self.theirs <= self.ci[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "ours": self.ours,
            "saebench": self.theirs,
            "difference": self.diff,
            "ours_ci95": self.ci,
            "saebench_inside_ours_ci95": self.inside,
            "note": self.note,
        }


def _fmt(v: float | None, width: int = 9) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—".rjust(width)
    return f"{v:{width}.4f}"


def format_table(title: str, rows: list[Row]) -> str:
    width = max([len(r.metric) for r in rows] + [6])
    head = f"{'metric':<{width}}  {'ours':>9}  {'SAEBench':>9}  {'diff':>9}  {'our 95% CI':>19}  in CI"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        ci = "—".rjust(19) if r.ci is None else f"[{_fmt(r.ci[0], 8)}, {_fmt(r.ci[1], 8)}]"
        inside = {None: "", True: "yes", False: "NO"}[r.inside]
        line = f"{r.metric:<{width}}  {_fmt(r.ours)}  {_fmt(r.theirs)}  {_fmt(r.diff)}  {ci}  {inside:>5}"
        if r.note:
            line += f"  {r.note}"
        lines.append(line)
    return "\n".join(lines)
