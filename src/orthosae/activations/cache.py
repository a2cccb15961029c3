"""On-disk activation cache: shards of .npy arrays plus manifest.json, memory-mapped for reading.

Layout of a cache directory:
  manifest.json              model, revision, layer, context size, dtype, d_model, corpus, shard list + sha256
  shard_00000.acts.npy       (n, d_model) float32 or float16 activations of the kept tokens
  shard_00000.meta.npy       (n, 3) int32: token id, context index in the packed corpus, position
Shards hold whole contexts (only the very last one may be cut at the requested token count), so a build can
resume at the first context of the next shard. Each shard is recorded in the manifest (atomically) only after
both its files are written, so a half-written shard is simply redone.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orthosae.activations.harvest import Harvest, harvest, hook_name
from orthosae.atomic import write_json, write_with
from orthosae.data.pack import iter_contexts
from orthosae.data.texts import describe, iter_texts
from orthosae.errors import UserError
from orthosae.models.blocks import check_layer
from orthosae.models.loader import LoadedModel, load_model

MANIFEST = "manifest.json"
FORMAT = "orthosae-activations"
VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# Fields that must agree between a cache and a request to reuse or resume it.
_IDENTITY = (
    "model_id",
    "model_revision",
    "layer",
    "context_size",
    "dtype",
    "corpus",
    "exclude_special",
    "remove_high_norm",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _write_npy(path: Path, array: np.ndarray) -> None:
    write_with(path, lambda f: np.save(f, array, allow_pickle=False))


# ---------------------------------------------------------------- writing


def build_cache(
    out_dir: str | Path,
    *,
    model_name: str,
    layer: int,
    n_tokens: int,
    corpus: str = "bundled",
    context_size: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    shard_tokens: int = 1 << 16,
    text_field: str = "text",
    exclude_special: bool = True,
    remove_high_norm: float = 10.0,
    progress: bool = True,
    model: LoadedModel | None = None,
) -> Path:
    """Harvest `n_tokens` activations of block `layer` into `out_dir`, resuming an interrupted build.

    `batch_size` is in contexts per forward pass; `shard_tokens` is rounded down to whole contexts.
    Pass `model` to reuse an already loaded model (its id must match `model_name`'s).
    `remove_high_norm`: drop tokens above this multiple of the batch median norm (0 keeps all).
    """
    if dtype not in _NP_DTYPES:
        raise UserError(f"unknown cache dtype {dtype!r}: use float32 or float16")
    if n_tokens <= 0:
        raise UserError(f"the number of tokens to cache must be positive, got {n_tokens}")
    out = Path(out_dir)
    loaded = model or load_model(model_name)
    layer = check_layer(layer, loaded.n_layers)
    wanted = {
        "format": FORMAT,
        "version": VERSION,
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "family": loaded.family,
        "layer": layer,
        "hook_name": hook_name(layer),
        "context_size": context_size,
        "dtype": dtype,
        "d_model": loaded.d_model,
        "corpus": describe(corpus),
        "text_field": text_field,
        "exclude_special": exclude_special,
        "remove_high_norm": remove_high_norm,
        "prepend_bos": True,
        "contexts_per_shard": max(1, shard_tokens // context_size),
    }
    if next(iter_texts(corpus, field=text_field), None) is None:  # before any file is written
        raise UserError(f"corpus {corpus!r} holds no text; give a corpus with at least one document")
    manifest = _start_manifest(out, wanted, n_tokens)
    if manifest["complete"] and manifest["n_tokens"] >= n_tokens:
        return out
    done_tokens = sum(s["n_tokens"] for s in manifest["shards"])
    next_context = sum(s["n_contexts"] for s in manifest["shards"])
    per_shard = manifest["contexts_per_shard"]
    bar = _progress(progress, n_tokens, done_tokens, f"caching layer {layer}")
    batches = iter_contexts(
        iter_texts(corpus, field=text_field),
        loaded.tokenizer,
        context_size=context_size,
        batch_contexts=batch_size,
        skip_contexts=next_context,
        exclude_special=exclude_special,
    )
    pending: list[Harvest] = []
    upto = next_context  # contexts fully harvested so far (exclusive end)
    try:
        for piece in harvest(loaded, layer, batches, remove_high_norm):
            pending.append(piece)
            upto = piece.end_context
            bar.update(max(0, min(len(piece.token_ids), n_tokens - bar.n)))
            # Flush each shard once all its contexts are harvested, or once the token budget is met.
            while pending and (upto >= next_context + per_shard or _count(pending) >= n_tokens - done_tokens):
                shard, pending = _take(pending, min(next_context + per_shard, upto), n_tokens - done_tokens)
                manifest = _write_shard(out, manifest, shard, next_context)
                done_tokens += shard["n"]
                next_context = shard["end_context"]
                if done_tokens >= n_tokens:
                    break
            if done_tokens >= n_tokens:
                break
        else:
            # Corpus exhausted: what remains is whole contexts; keep them as a final shard.
            if pending:
                shard, _ = _take(pending, upto, n_tokens - done_tokens)
                manifest = _write_shard(out, manifest, shard, next_context)
                done_tokens += shard["n"]
            manifest["corpus_exhausted"] = True
        manifest["complete"] = True
        manifest["n_tokens"] = done_tokens
        _save_manifest(out, manifest, done_tokens)
    finally:
        bar.close()
    if done_tokens == 0:
        raise UserError(f"corpus {corpus!r} produced no tokens to cache")
    return out


def _start_manifest(out: Path, wanted: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    path = out / MANIFEST
    if path.is_file():
        manifest = _read_manifest(out)
        diffs = [
            f"{k}={manifest.get(k)!r} (requested {wanted[k]!r})"
            for k in _IDENTITY
            if manifest.get(k) != wanted[k]
        ]
        if diffs:
            raise UserError(
                f"{out} holds a different cache: {'; '.join(diffs)}; use another output dir or delete it"
            )
        shards = manifest["shards"]
        if shards and shards[-1].get("truncated") and n_tokens > manifest["n_tokens"]:
            shards.pop()  # the last shard was cut mid-context; redo it whole to extend the cache
            manifest["complete"] = False
        manifest["requested_tokens"] = n_tokens
        if manifest["n_tokens"] < n_tokens and not manifest.get("corpus_exhausted"):
            manifest["complete"] = False
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"{out} exists, is not empty and has no {MANIFEST}: choose an empty or new directory"
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create cache directory {out}: {e.strerror or e}") from None
        manifest = {**wanted, "requested_tokens": n_tokens, "n_tokens": 0, "complete": False, "shards": []}
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    _clean_strays(out, manifest)
    _save_manifest(out, manifest, manifest["n_tokens"])
    return manifest


def _clean_strays(out: Path, manifest: dict[str, Any]) -> None:
    # Temp files of an interrupted write, and shard files written but never recorded in the manifest.
    keep = {MANIFEST} | {s[k] for s in manifest["shards"] for k in ("acts", "meta")}
    for f in out.iterdir():
        if (
            f.is_file()
            and f.name not in keep
            and (f.name.startswith((".shard_", ".manifest")) or f.name.startswith("shard_"))
        ):
            f.unlink()


def _count(pending: list[Harvest]) -> int:
    return sum(len(p.token_ids) for p in pending)


def _take(pending: list[Harvest], end_context: int, budget: int) -> tuple[dict[str, Any], list[Harvest]]:
    """Split off the tokens of contexts < end_context (at most `budget` of them) from the pending pieces."""
    acts = torch.cat([p.acts for p in pending])
    tok = torch.cat([p.token_ids for p in pending])
    ctx = torch.cat([p.context_index for p in pending])
    pos = torch.cat([p.position for p in pending])
    in_shard = int((ctx < end_context).sum())
    n = min(in_shard, budget)
    truncated = n < in_shard
    if truncated:
        end_context = int(ctx[n - 1]) + 1  # cut by the token budget: the shard ends inside this context
    rest = Harvest(acts[n:], tok[n:], ctx[n:], pos[n:], pending[-1].end_context)
    shard = {
        "acts": acts[:n],
        "tok": tok[:n],
        "ctx": ctx[:n],
        "pos": pos[:n],
        "n": n,
        "end_context": end_context,
        "truncated": truncated,
    }
    return shard, ([rest] if len(rest.token_ids) else [])


def _write_shard(
    out: Path, manifest: dict[str, Any], shard: dict[str, Any], first_context: int
) -> dict[str, Any]:
    index = len(manifest["shards"])
    names = {"acts": f"shard_{index:05d}.acts.npy", "meta": f"shard_{index:05d}.meta.npy"}
    acts = shard["acts"].numpy().astype(_NP_DTYPES[manifest["dtype"]], copy=False)
    meta = np.stack(
        [shard["tok"].numpy(), shard["ctx"].numpy().astype(np.int32), shard["pos"].numpy()], axis=1
    )
    done = manifest["n_tokens"]
    try:
        _write_npy(out / names["acts"], acts)
        _write_npy(out / names["meta"], meta.astype(np.int32))
        entry = {
            **names,
            "n_tokens": shard["n"],
            "first_context": first_context,
            "n_contexts": shard["end_context"] - first_context,
            "truncated": shard["truncated"],
            "sha256": {k: sha256_file(out / v) for k, v in names.items()},
        }
        manifest["shards"].append(entry)
        manifest["n_tokens"] = done + shard["n"]
        _save_manifest(out, manifest, done)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            manifest["shards"] = [s for s in manifest["shards"] if s.get("acts") != names["acts"]]
            raise UserError(
                f"disk full while writing {out / names['acts']}: kept {done:,} tokens in "
                f"{index} complete shards; free space and rerun the same command to resume"
            ) from None
        raise
    return manifest


def _save_manifest(out: Path, manifest: dict[str, Any], kept_tokens: int) -> None:
    try:
        write_json(out / MANIFEST, manifest)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"disk full while writing {out / MANIFEST}: kept {kept_tokens:,} tokens; free space "
                "and rerun the same command to resume"
            ) from None
        raise


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        smoothing=0.1,
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise UserError(f"{path} is not an activation cache (no {MANIFEST}): build one with `orthosae cache`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{file} is unreadable or not valid JSON: delete the cache and rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{file} is not an orthosae activation-cache manifest")
    if manifest.get("version") != VERSION:
        raise UserError(
            f"{file} has cache format version {manifest.get('version')}, this orthosae reads {VERSION}"
        )
    return manifest


# ---------------------------------------------------------------- reading

_VERIFIED: set[tuple[str, str]] = set()  # (absolute path, sha256) of shard files checked in this process


@dataclass
class ActivationCache:
    """A read-only view of a cache directory; shards are memory-mapped and checksum-verified on first read."""

    path: Path
    manifest: dict[str, Any]
    verify: bool = True

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def hook_name(self) -> str:
        return str(self.manifest["hook_name"])

    @property
    def context_size(self) -> int:
        return int(self.manifest["context_size"])

    def shard_sizes(self) -> list[int]:
        return [int(s["n_tokens"]) for s in self.manifest["shards"]]

    def metadata(self) -> dict[str, Any]:
        """What an SAE's cfg.json should record about its training activations."""
        keys = (
            "model_id",
            "model_revision",
            "layer",
            "hook_name",
            "context_size",
            "corpus",
            "d_model",
            "dtype",
        )
        return {k: self.manifest[k] for k in keys} | {
            "activations": str(self.path),
            "n_tokens": self.n_tokens,
            "remove_high_norm": self.manifest.get("remove_high_norm", 0.0),
        }

    def _array(self, i: int, kind: str) -> np.ndarray:
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range (cache has {self.n_shards})")
        entry = self.manifest["shards"][i]
        file = self.path / entry[kind]
        if not file.is_file():
            raise UserError(f"cache file {file} is missing: rebuild the cache (rerun `orthosae cache`)")
        digest = entry["sha256"][kind]
        key = (str(file.resolve()), digest)
        if self.verify and key not in _VERIFIED:
            if sha256_file(file) != digest:
                raise UserError(
                    f"checksum mismatch in {file}: the file is corrupt or truncated; delete it and "
                    "rerun `orthosae cache` to rebuild it"
                )
            _VERIFIED.add(key)
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError:
            raise UserError(
                f"cache file {file} is not a valid .npy file: delete it and rerun `orthosae cache`"
            ) from None
        if array.shape[0] != entry["n_tokens"]:
            raise UserError(
                f"{file} holds {array.shape[0]} rows, the manifest says {entry['n_tokens']}: rebuild it"
            )
        return array

    def shard(self, i: int) -> np.ndarray:
        """Activations of shard i, (n, d_model), memory-mapped."""
        return self._array(i, "acts")

    def meta(self, i: int) -> np.ndarray:
        """(n, 3) int32 columns: token id, context index, position."""
        return self._array(i, "meta")

    def token_ids(self, i: int) -> np.ndarray:
        return self.meta(i)[:, 0]

    def context_index(self, i: int) -> np.ndarray:
        return self.meta(i)[:, 1]

    def positions(self, i: int) -> np.ndarray:
        return self.meta(i)[:, 2]

    def iter_shards(self, progress: bool = False) -> Iterator[np.ndarray]:
        """Every shard in order, with an optional progress bar (tokens/s, ETA)."""
        bar = _progress(progress, self.n_tokens, 0, "reading cache")
        try:
            for i in range(self.n_shards):
                array = self.shard(i)
                yield array
                bar.update(array.shape[0])
        finally:
            bar.close()

    def verify_all(self) -> None:
        for i in range(self.n_shards):
            self.shard(i)
            self.meta(i)

    def check_matches(
        self,
        *,
        model: str | None = None,
        layer: int | None = None,
        context_size: int | None = None,
        d_model: int | None = None,
    ) -> None:
        """Raise UserError when the cache was built for a different model, layer, context size or width."""
        wanted = {"model_id": model, "layer": layer, "context_size": context_size, "d_model": d_model}
        for key, value in wanted.items():
            if value is None:
                continue
            have = self.manifest.get(key)
            if key == "model_id" and isinstance(value, str):
                from orthosae.models.bundled import ALIASES, BUNDLED_NAME

                value = BUNDLED_NAME if value.lower() in ALIASES else value
                if Path(value).expanduser().is_dir():
                    value = str(Path(value).expanduser().resolve())
            if have != value:
                raise UserError(
                    f"activation cache {self.path} has {key}={have!r}, but {value!r} was requested: "
                    "use a matching cache or rebuild it"
                )


def open_cache(path: str | Path, *, verify: bool = True, allow_incomplete: bool = False) -> ActivationCache:
    """Open a cache directory; shards are verified against their sha256 the first time each is read."""
    path = Path(path)
    manifest = _read_manifest(path)
    if not manifest.get("complete") and not allow_incomplete:
        raise UserError(
            f"activation cache {path} is incomplete ({manifest.get('n_tokens', 0):,} of "
            f"{manifest.get('requested_tokens', 0):,} tokens): rerun the cache command to finish it"
        )
    if not manifest["shards"]:
        raise UserError(f"activation cache {path} has no shards: rebuild it")
    return ActivationCache(path, manifest, verify)
