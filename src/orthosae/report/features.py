"""Feature-browser data: one streaming pass over a bounded sample of the activation cache per experiment.

For every SAE it accumulates, in memory bounded by the SAE width (not the sample size):
- how often each latent fires, and a histogram of its activations (log-spaced bins);
- each latent's top-N activations with their (shard, row) position in the cache;
- the decoder cos² of every pair of latents active in the same token (histogram + the highest pairs).
Then it picks features to show (most frequent, random alive ones, the highest-cos² co-active pairs),
re-encodes a window of tokens around each top example to get per-token activations, decodes the tokens
with the model's tokenizer, and computes the top promoted logits W_dec[f] @ W_Uᵀ.

The result is a JSON-ready dict saved as runs/<name>/features.json, so rebuilding the report is fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orthosae.activations.cache import ActivationCache, open_cache
from orthosae.atomic import write_json
from orthosae.errors import UserError
from orthosae.models.loader import LoadedModel, load_model
from orthosae.report.load import Experiment, load_experiment, read_json
from orthosae.sae import SAE, TopKSAE, load_sae
from orthosae.sae.io import weights_file

FEATURES_FILE = "features.json"
FORMAT_VERSION = 1
_LOG_LO, _LOG_HI = -3.0, 3.0  # activation histogram range, log10 units (values outside land in end bins)
_COS2_BINS = 60
_COS2_LOG_LO = -6.0  # cos² histogram on log-spaced bins from 1e-6 to 1 (random pairs sit near 1/d_in)
_RELU_CAP = 64  # a ReLU SAE's latents per token considered for examples and pairs (its L0 is unbounded)


@dataclass
class FeatureOptions:
    max_tokens: int = 200_000
    """Tokens of the cache to scan (spread over all shards, contiguous within each)."""
    batch_tokens: int = 4096
    n_frequent: int = 5
    n_random: int = 5
    n_pairs: int = 3
    n_examples: int = 8
    window: int = 8
    n_logits: int = 10
    hist_bins: int = 36
    seed: int = 0


class _Stats:
    """Running per-latent statistics for one SAE."""

    def __init__(self, sae: SAE, opts: FeatureOptions):
        n, N = sae.d_sae, opts.n_examples
        self.sae, self.opts = sae, opts
        self.count = np.zeros(n, np.int64)
        self.hist = np.zeros((n, opts.hist_bins), np.int64)
        self.top_val = np.full((n, N), -np.inf, np.float32)
        self.top_shard = np.zeros((n, N), np.int32)
        self.top_row = np.zeros((n, N), np.int64)
        self.cos2_counts = np.zeros(_COS2_BINS, np.int64)
        self.cos2_sum, self.cos2_n, self.cos2_max, self.cos2_above = 0.0, 0, 0.0, 0
        self.pairs: dict[tuple[int, int], float] = {}
        w = sae.W_dec.detach().float()
        self.unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update(self, x: torch.Tensor, shard: int, rows: np.ndarray) -> None:
        sae = self.sae
        pre = sae.pre_acts(x)
        if isinstance(sae, TopKSAE):
            acts, idx = pre.topk(sae.k, dim=-1)
            self.count += np.bincount(idx[acts > 0].numpy(), minlength=sae.d_sae)
        else:
            self.count += (pre > 0).sum(0).numpy()
            acts, idx = pre.topk(min(_RELU_CAP, sae.d_sae), dim=-1)
        active = acts > 0
        self._hist_and_top(acts, idx, active, shard, rows)
        self._coactive(idx, active)

    def _hist_and_top(
        self, acts: torch.Tensor, idx: torch.Tensor, active: torch.Tensor, shard: int, rows: np.ndarray
    ) -> None:
        feat = idx[active].numpy()
        val = acts[active].numpy().astype(np.float32)
        tok = np.broadcast_to(rows[:, None], idx.shape)[active.numpy()]
        bins = self.opts.hist_bins
        b = np.clip(((np.log10(val) - _LOG_LO) / (_LOG_HI - _LOG_LO) * bins).astype(np.int64), 0, bins - 1)
        np.add.at(self.hist.reshape(-1), feat * bins + b, 1)
        # Only entries that beat a latent's current N-th best can enter its top list.
        keep = val > self.top_val[feat, -1]
        if not keep.any():
            return
        feat, val, tok = feat[keep], val[keep], tok[keep]
        N = self.opts.n_examples
        old_f = np.repeat(np.arange(len(self.top_val)), N)
        all_f = np.concatenate([old_f, feat])
        all_v = np.concatenate([self.top_val.reshape(-1), val])
        all_s = np.concatenate([self.top_shard.reshape(-1), np.full(len(feat), shard, np.int32)])
        all_r = np.concatenate([self.top_row.reshape(-1), tok.astype(np.int64)])
        order = np.lexsort((-all_v, all_f))
        f_sorted = all_f[order]
        starts = np.searchsorted(f_sorted, f_sorted, side="left")
        rank = np.arange(len(order)) - starts
        sel = rank < N
        o, f, r = order[sel], f_sorted[sel], rank[sel]
        self.top_val[f, r] = all_v[o]
        self.top_shard[f, r] = all_s[o]
        self.top_row[f, r] = all_r[o]

    def _coactive(self, idx: torch.Tensor, active: torch.Tensor, chunk: int = 512) -> None:
        k = idx.shape[1]
        lower = torch.ones(k, k, dtype=torch.bool).tril(-1)
        for start in range(0, idx.shape[0], chunk):
            ci, ca = idx[start : start + chunk], active[start : start + chunk]
            g = self.unit[ci]  # (b, k, d): the decoder directions of each token's active latents
            cos2 = (g @ g.transpose(1, 2)).square_()
            valid = ca[:, :, None] & ca[:, None, :] & lower
            values = cos2[valid]
            if values.numel() == 0:
                continue
            pos = (values.clamp_min(1e-30).log10() - _COS2_LOG_LO) / -_COS2_LOG_LO * _COS2_BINS
            bins = pos.floor().long().clamp_(0, _COS2_BINS - 1)
            self.cos2_counts += torch.bincount(bins, minlength=_COS2_BINS).numpy()
            self.cos2_sum += float(values.double().sum())
            self.cos2_n += values.numel()
            self.cos2_above += int((values > 0.1).sum())
            self.cos2_max = max(self.cos2_max, float(values.max()))
            self._track_pairs(ci, cos2.masked_fill(~valid, -1.0))

    def _track_pairs(self, ci: torch.Tensor, cos2: torch.Tensor, keep: int = 64) -> None:
        flat = cos2.reshape(-1)
        top_v, top_i = flat.topk(min(keep, flat.numel()))
        k = ci.shape[1]
        for v, i in zip(top_v.tolist(), top_i.tolist(), strict=True):
            if v < 0:
                break
            t, p, q = i // (k * k), (i // k) % k, i % k
            a, b = sorted((int(ci[t, p]), int(ci[t, q])))
            self.pairs[(a, b)] = v
        if len(self.pairs) > 4 * keep:
            best = sorted(self.pairs.items(), key=lambda kv: -kv[1])[:keep]
            self.pairs = dict(best)


def sample_plan(cache: ActivationCache, max_tokens: int) -> list[tuple[int, int]]:
    """(shard, rows to read from its start): `max_tokens` spread over shards in proportion to their size."""
    sizes = np.array(cache.shard_sizes(), dtype=np.int64)
    frac = min(1.0, max_tokens / max(int(sizes.sum()), 1))
    ends = np.floor(np.cumsum(sizes) * frac).astype(np.int64)  # exact total: no rounding drift
    takes = np.diff(ends, prepend=0)
    return [(i, int(t)) for i, t in enumerate(takes) if t > 0]


def fingerprint(exp: Experiment, cache: ActivationCache, opts: FeatureOptions) -> dict[str, Any]:
    """What features.json depends on; a mismatch means it must be recomputed."""
    saes = {}
    for name, run in exp.saes.items():
        w = weights_file(run.path)
        if w.is_file():
            st = w.stat()
            saes[name] = [st.st_size, st.st_mtime_ns]
    return {
        "cache": str(cache.path.resolve()),
        "cache_tokens": cache.n_tokens,
        "options": asdict(opts),
        "saes": saes,
    }


def compute_features(
    exp_dir: str | Path,
    *,
    options: FeatureOptions | None = None,
    model: LoadedModel | None = None,
    cache: ActivationCache | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute the feature-browser data of every SAE in `exp_dir` (see the module doc). Does not write it."""
    opts = options or FeatureOptions()
    exp = load_experiment(exp_dir)
    if cache is None:
        cache_path = exp.cache_path()
        if cache_path is None:
            raise UserError(
                f"{exp.path}: no activation cache found (experiment.toml `cache`, a `cache` link, or the "
                "SAEs' cfg.json `activations`); the feature browser needs one"
            )
        cache = open_cache(cache_path)
    # Taken before reading any weights: an SAE that appears or changes meanwhile triggers a recompute.
    stamp = fingerprint(exp, cache, opts)
    saes: dict[str, tuple[SAE, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for name, run in exp.saes.items():
        if not run.has_weights:
            skipped[name] = "no weights file"
            continue
        sae, cfg = load_sae(run.path)
        if sae.d_in != cache.d_model:
            skipped[name] = f"d_in {sae.d_in} ≠ cache d_model {cache.d_model}"
            continue
        saes[name] = (sae.float(), cfg)
    if not saes:
        raise UserError(f"{exp.path}: no SAE matches the activation cache {cache.path}: {skipped}")
    loaded = model or load_model(str(cache.manifest.get("model_id")))
    stats = {name: _Stats(sae, opts) for name, (sae, _) in saes.items()}
    n_seen = _stream(cache, stats, opts, progress)
    decoder = _TokenDecoder(loaded.tokenizer)
    unembed = loaded.model.get_output_embeddings()  # pyright: ignore[reportCallIssue]  (a transformers model)
    w_u = unembed.weight.detach().float()
    out_saes = {}
    for name, st in stats.items():
        out_saes[name] = _summarise(name, st, n_seen, cache, decoder, w_u, opts)
    return {
        "format": "orthosae-features",
        "version": FORMAT_VERSION,
        "model": loaded.model_id,
        "cache": str(cache.path),
        "layer": cache.layer,
        "n_tokens": n_seen,
        "fingerprint": stamp,
        "skipped": skipped,
        "saes": out_saes,
    }


def _stream(cache: ActivationCache, stats: dict[str, _Stats], opts: FeatureOptions, progress: bool) -> int:
    from tqdm.auto import tqdm

    plan = sample_plan(cache, opts.max_tokens)
    seen = 0
    with tqdm(total=sum(n for _, n in plan), unit="tok", desc="feature browser", disable=not progress) as bar:
        for shard, n_rows in plan:
            acts = cache.shard(shard)
            for start in range(0, n_rows, opts.batch_tokens):
                stop = min(n_rows, start + opts.batch_tokens)
                x = torch.from_numpy(np.array(acts[start:stop], dtype=np.float32))
                rows = np.arange(start, stop)
                for st in stats.values():
                    st.update(x, shard, rows)
                seen += stop - start
                bar.update(stop - start)
    return seen


class _TokenDecoder:
    """Token id → display string, memoised (each id decoded alone, so leading spaces are kept)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.memo: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        todo = sorted({i for i in ids if i not in self.memo})
        if todo:
            for i, text in zip(todo, self.tokenizer.batch_decode([[i] for i in todo]), strict=True):
                self.memo[i] = text
        return [self.memo[i] for i in ids]


def _r(v: float) -> float:
    return float(f"{v:.5g}")


def _select(st: _Stats, opts: FeatureOptions, rng: np.random.Generator) -> dict[int, list[str]]:
    """feature id → reasons it is shown."""
    chosen: dict[int, list[str]] = {}
    order = np.argsort(-st.count, kind="stable")
    for f in order[: opts.n_frequent]:
        if st.count[f] > 0:
            chosen.setdefault(int(f), []).append("most frequent")
    alive = np.flatnonzero(st.count > 0)
    alive = alive[~np.isin(alive, list(chosen))]
    if len(alive):
        for f in rng.choice(alive, size=min(opts.n_random, len(alive)), replace=False):
            chosen.setdefault(int(f), []).append("random alive")
    for a, b in _top_pairs(st, opts.n_pairs):
        cos2 = st.pairs[(a, b)]
        chosen.setdefault(a, []).append(f"co-active pair with {b} (cos² {cos2:.3f})")
        chosen.setdefault(b, []).append(f"co-active pair with {a} (cos² {cos2:.3f})")
    return chosen


def _top_pairs(st: _Stats, n: int) -> list[tuple[int, int]]:
    return [p for p, _ in sorted(st.pairs.items(), key=lambda kv: -kv[1])[:n]]


@torch.no_grad()
def _summarise(
    name: str,
    st: _Stats,
    n_seen: int,
    cache: ActivationCache,
    decode: _TokenDecoder,
    w_u: torch.Tensor,
    opts: FeatureOptions,
) -> dict[str, Any]:
    rng = np.random.default_rng(opts.seed)
    chosen = _select(st, opts, rng)
    edges = 10 ** np.linspace(_LOG_LO, _LOG_HI, opts.hist_bins + 1)
    features = []
    for f, reasons in chosen.items():
        counts = st.hist[f]
        nz = np.flatnonzero(counts)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        logits = st.sae.W_dec[f].float() @ w_u.T
        top = logits.topk(min(opts.n_logits, logits.numel()))
        features.append(
            {
                "id": f,
                "reasons": reasons,
                "freq": _r(st.count[f] / max(n_seen, 1)),
                "max_act": _r(float(st.top_val[f, 0])) if np.isfinite(st.top_val[f, 0]) else 0.0,
                "hist": {
                    "edges": [_r(e) for e in edges[lo : hi + 1]],
                    "counts": counts[lo:hi].tolist(),
                },
                "logits": [
                    {"token": t, "value": _r(v)}
                    for t, v in zip(decode(top.indices.tolist()), top.values.tolist(), strict=True)
                ],
                "examples": _examples(st, f, cache, decode, opts),
            }
        )
    mean = st.cos2_sum / st.cos2_n if st.cos2_n else 0.0
    return {
        "d_sae": st.sae.d_sae,
        "arch": st.sae.arch,
        "latent_cap": None if isinstance(st.sae, TopKSAE) else min(_RELU_CAP, st.sae.d_sae),
        "frac_alive": _r(float((st.count > 0).mean())),
        "coactive_cos2": {
            "edges": [_r(e) for e in np.logspace(_COS2_LOG_LO, 0, _COS2_BINS + 1)],
            "counts": st.cos2_counts.tolist(),
            "n_pairs": st.cos2_n,
            "mean": _r(mean),
            "max": _r(st.cos2_max),
            "frac_above_0.1": _r(st.cos2_above / max(st.cos2_n, 1)),
        },
        "top_pairs": [{"a": a, "b": b, "cos2": _r(st.pairs[(a, b)])} for a, b in _top_pairs(st, 10)],
        "features": features,
    }


def _examples(
    st: _Stats, f: int, cache: ActivationCache, decode: _TokenDecoder, opts: FeatureOptions
) -> list[dict[str, Any]]:
    """Top contexts of latent f: a token window around each max-activating token, with f's activation."""
    out = []
    w = opts.window
    for j in range(opts.n_examples):
        val = float(st.top_val[f, j])
        if not np.isfinite(val):
            break
        shard, row = int(st.top_shard[f, j]), int(st.top_row[f, j])
        meta = cache.meta(shard)
        lo, hi = max(0, row - w), min(len(meta), row + w + 1)
        ctx = meta[lo:hi, 1]
        same = np.flatnonzero(ctx == meta[row, 1])  # rows of the same context only
        a, b = lo + int(same[0]), lo + int(same[-1]) + 1
        x = torch.from_numpy(np.array(cache.shard(shard)[a:b], dtype=np.float32))
        acts = st.sae.encode(x)[:, f].clamp_min(0)
        ids = [int(t) for t in meta[a:b, 0]]
        out.append(
            {
                "act": _r(val),
                "context": int(meta[row, 1]),
                "position": int(meta[row, 2]),
                "center": row - a,
                "tokens": decode(ids),
                "acts": [_r(v) for v in acts.tolist()],
            }
        )
    return out


def features_path(exp_dir: str | Path) -> Path:
    return Path(exp_dir) / FEATURES_FILE


def save_features(exp_dir: str | Path, data: dict[str, Any]) -> Path:
    path = features_path(exp_dir)
    write_json(path, data)
    return path


def load_features(exp_dir: str | Path) -> dict[str, Any] | None:
    """features.json, or None if absent; malformed → UserError."""
    data = read_json(features_path(exp_dir))
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != "orthosae-features":
        raise UserError(f"{features_path(exp_dir)} is not an orthosae features file; delete it and rerun")
    return data


def ensure_features(
    exp_dir: str | Path,
    *,
    options: FeatureOptions | None = None,
    recompute: bool = False,
    model: LoadedModel | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any] | None, str]:
    """features.json if it is up to date, else compute and save it. Returns (data or None, status line)."""
    opts = options or FeatureOptions()
    existing = load_features(exp_dir)
    exp = load_experiment(exp_dir)
    cache_path = exp.cache_path()
    if cache_path is None:
        if existing is not None:
            return existing, "feature browser: reused features.json (its activation cache is not available)"
        return None, "feature browser not computed: no activation cache found for this experiment"
    cache = open_cache(cache_path)
    if (
        existing is not None
        and not recompute
        and existing.get("fingerprint") == fingerprint(exp, cache, opts)
    ):
        return existing, "feature browser: reused features.json"
    data = compute_features(exp_dir, options=opts, model=model, cache=cache, progress=progress)
    save_features(exp_dir, data)
    return data, f"feature browser: computed over {data['n_tokens']:,} cached tokens"
