"""On-disk activation cache: shards of .npy arrays plus manifest.json, memory-mapped for reading.

Layout of a cache directory:
  manifest.json              model, revision, layer, context size, dtype, d_model, corpus, shard list + sha256
  shard_00000.acts.npy       (n, d_model) float32 or float16 activations of the kept tokens
  shard_00000.meta.npy       (n, 3) int32: token id, context index in the packed corpus, position
Shard c holds chunk c of the packed corpus, contexts [c·P, (c+1)·P) with P = contexts_per_shard, whole
(only the last shard may be cut at the requested token count, or be short where the corpus ends). Each forward
batch is a slice of one chunk, so a chunk's activations do not depend on which process harvested it.

Under torchrun (`ranks`), every rank harvests its own chunks into its own shards: each round hands the
lowest-numbered chunks still missing to ranks 0, 1, … (in a fresh build chunk c → rank c mod world), so every
rank stays busy whatever the context count, and a resumed build of any world size, one process included,
fills exactly the holes. A chunk's shard name comes from its number, so ranks never collide, and its context
indices and positions are those of the one-process packing. A rank records a finished shard in a small
`shard_NNNNN.json` beside it (the manifest entry, written last and atomically); rank 0 alone writes
manifest.json: at the start (merging the records an interrupted build left) and, once every rank has
finished, the final one listing every shard with its sha256 (the records are then deleted). One process
records each shard in the manifest directly. Where the build stops (the token budget, the corpus's end) is
decided in cache_plan, identically on every rank, from the exchanged counts of kept tokens.

A half-written shard (no record, not in the manifest) is deleted and redone by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orthosae.activations.cache_plan import Keep, Plan
from orthosae.activations.cache_rounds import ChunkReader, exchange, harvest_round
from orthosae.activations.harvest import Harvest, harvest, hook_name
from orthosae.atomic import write_json, write_with
from orthosae.data.pack import Contexts, iter_contexts
from orthosae.data.texts import describe, iter_texts
from orthosae.errors import UserError
from orthosae.models.blocks import check_layer
from orthosae.models.loader import LoadedModel, load_model
from orthosae.train.distributed import Ranks, on_main

MANIFEST = "manifest.json"
FORMAT = "orthosae-activations"
VERSION = 1
# What a lost rank's message tells the user (see orthosae.train.distributed.failure_message).
RESUME_HINT = "Rerun the same command (any number of processes) to resume: finished shards are kept"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# Fields that must agree between a cache and a request to reuse or resume it.
_IDENTITY = (
    "model_id",
    "model_revision",
    "model_dtype",
    "layer",
    "context_size",
    "dtype",
    "corpus",
    "exclude_special",
    "remove_high_norm",
)
_RECORD_KEYS = ("acts", "meta", "n_tokens", "first_context", "n_contexts", "truncated", "sha256")


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
    ranks: Ranks | None = None,
) -> Path:
    """Harvest `n_tokens` activations of block `layer` into `out_dir`, resuming an interrupted build.

    `batch_size` is in contexts per forward pass; `shard_tokens` is rounded down to whole contexts.
    Pass `model` to reuse an already loaded model (its id must match `model_name`'s).
    `remove_high_norm`: drop tokens above this multiple of the batch median norm (0 keeps all).
    `ranks`: this process's place under torchrun (every rank calls this with the same arguments).
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
        "model_dtype": loaded.dtype,
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
    manifest = on_main(ranks, lambda: _start_manifest(out, wanted, n_tokens), f"preparing {out}")
    if ranks is not None and not ranks.is_main:
        manifest = _read_manifest(out)  # as rank 0 left it (on_main returns once it has)
    if manifest["complete"]:
        return out
    per_shard = int(manifest["contexts_per_shard"])

    def chunks(skip: int) -> Iterator[Contexts]:  # the packed corpus, a chunk at a time, from context `skip`
        texts = iter_texts(corpus, field=text_field)
        return iter_contexts(
            texts,
            loaded.tokenizer,
            context_size=context_size,
            batch_contexts=per_shard,
            skip_contexts=skip,
            exclude_special=exclude_special,
        )

    def harvest_batch(batch: Contexts) -> Harvest:
        return next(harvest(loaded, layer, [batch], remove_high_norm))

    def save(shard: dict[str, Any], first_context: int) -> None:
        if ranks is None:
            _write_shard(out, manifest, shard, first_context)  # updates `manifest` in place
        else:
            _write_record(out, manifest, shard, first_context)

    next(chunks(0))  # a corpus shorter than one context is refused here, alike on every rank
    plan = Plan.from_shards(manifest["shards"], n_tokens, per_shard)
    main = ranks is None or ranks.is_main
    with _progress(progress and main, n_tokens, min(n_tokens, plan.kept()), f"caching layer {layer}") as bar:

        def show(tokens: int) -> None:
            bar.update(max(0, min(tokens, n_tokens) - bar.n))

        _run_rounds(plan, ChunkReader(chunks, per_shard), harvest_batch, batch_size, ranks, show, save)
    on_main(ranks, lambda: _finish_manifest(out, manifest, plan), f"writing {out / MANIFEST}")
    if plan.kept() == 0:
        raise UserError(f"corpus {corpus!r} produced no tokens to cache")
    return out


def _run_rounds(
    plan: Plan,
    reader: ChunkReader,
    harvest_batch: Callable[[Contexts], Harvest],
    batch_size: int,
    ranks: Ranks | None,
    show: Callable[[int], None],
    save: Callable[[dict[str, Any], int], None],
) -> None:
    """Harvest round after round until the plan is done; each rank saves what the cache keeps of its chunk,
    and no round starts before every rank has saved (a failed save stops them all)."""
    while chunks := plan.next_round(ranks.world if ranks is not None else 1):
        got, work = harvest_round(plan, chunks, reader, harvest_batch, batch_size, ranks, show)
        keeps = plan.settle(chunks, got)
        error = None
        if work is not None and (keep := keeps[chunks.index(work.chunk)]) is not None:
            try:
                contexts = got[chunks.index(work.chunk)].contexts
                save(_shard(work.pieces, keep, plan.per_shard, contexts), keep.chunk * plan.per_shard)
            except Exception as e:  # every rank hears of it at the exchange below
                error = e
        exchange([], error, ranks, "writing shards")
    show(plan.kept())


def _shard(pieces: list[Harvest], keep: Keep, per_shard: int, contexts: int) -> dict[str, Any]:
    """The kept rows of a harvested chunk: its first `keep.tokens`, in (context, position) order."""
    first = keep.chunk * per_shard
    acts = torch.cat([p.acts for p in pieces])[: keep.tokens]
    tok = torch.cat([p.token_ids for p in pieces])[: keep.tokens]
    ctx = torch.cat([p.context_index for p in pieces])[: keep.tokens]
    pos = torch.cat([p.position for p in pieces])[: keep.tokens]
    # A cut shard ends inside the context of its last kept token.
    end = int(ctx[-1]) + 1 if keep.truncated and keep.tokens else first + contexts
    return {
        "acts": acts,
        "tok": tok,
        "ctx": ctx,
        "pos": pos,
        "n": keep.tokens,
        "end_context": end,
        "truncated": keep.truncated,
    }


def _start_manifest(out: Path, wanted: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """The manifest to build on: a new one, or an earlier build's with the records an interrupted build
    left merged in. A finished cache that already holds the request comes back untouched."""
    path = out / MANIFEST
    if path.is_file():
        manifest = _read_manifest(out)
        manifest.setdefault("model_dtype", "float32")  # caches from before the model dtype was recorded
        diffs = [
            f"{k}={manifest.get(k)!r} (requested {wanted[k]!r})"
            for k in _IDENTITY
            if manifest.get(k) != wanted[k]
        ]
        if diffs:
            raise UserError(
                f"{out} holds a different cache: {'; '.join(diffs)}; use another output dir or delete it"
            )
        if manifest["complete"] and (manifest["n_tokens"] >= n_tokens or manifest.get("corpus_exhausted")):
            return manifest
        per_shard = int(manifest["contexts_per_shard"])
        shards = _with_records(out, manifest["shards"])
        if manifest["complete"] and shards and shards[-1]["n_contexts"] < per_shard:
            shards.pop()  # an older build's last shard, short although the corpus goes on
        manifest.update(shards=shards, requested_tokens=n_tokens, complete=False)
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
    _save_manifest(out, manifest, manifest["n_tokens"])
    _clean_strays(out, manifest)  # after the save: the records just merged are no longer needed
    return manifest


def _with_records(out: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`shards` plus the shards that ranks recorded in shard_NNNNN.json files (newer than the manifest's
    entries, which they replace for a redone shard), ordered by first context."""
    by_name = {s["acts"]: s for s in shards}
    for f in sorted(out.glob("shard_*.json")):
        entry = _read_record(f)
        if entry is not None:
            by_name[entry["acts"]] = entry
    return sorted(by_name.values(), key=lambda s: int(s["first_context"]))


def _read_record(path: Path) -> dict[str, Any] | None:
    """A shard's record, or None when it is unreadable or its files are gone (the shard is then redone)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or any(k not in entry for k in _RECORD_KEYS):
        return None
    if not all((path.parent / str(entry[k])).is_file() for k in ("acts", "meta")):
        return None
    return entry


def _finish_manifest(out: Path, manifest: dict[str, Any], plan: Plan) -> None:
    """Rank 0 (or the one process), once every rank has written its shards: the complete manifest."""
    per_shard = int(manifest["contexts_per_shard"])
    entries = {int(s["first_context"]) // per_shard: s for s in _with_records(out, manifest["shards"])}
    chunks = plan.chunks()
    missing = [c for c in chunks if c not in entries]
    if missing:
        raise UserError(
            f"{out}: shard {missing[0]} was harvested but its record is missing; rerun the same command"
        )
    manifest["shards"] = [entries[c] for c in chunks]
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
    manifest["complete"] = True
    if manifest["n_tokens"] < plan.n_tokens:
        manifest["corpus_exhausted"] = True
    _save_manifest(out, manifest, manifest["n_tokens"])
    _clean_strays(out, manifest)


def _clean_strays(out: Path, manifest: dict[str, Any]) -> None:
    # Temp files of an interrupted write, shard files written but never recorded in the manifest, and the
    # ranks' shard records once the manifest holds them.
    keep = {MANIFEST} | {s[k] for s in manifest["shards"] for k in ("acts", "meta")}
    for f in out.iterdir():
        if (
            f.is_file()
            and f.name not in keep
            and (f.name.startswith((".shard_", ".manifest")) or f.name.startswith("shard_"))
        ):
            f.unlink()


def _shard_names(first_context: int, per_shard: int) -> dict[str, str]:
    """A shard's files, named after its chunk: the same name whichever rank writes it."""
    stem = f"shard_{first_context // per_shard:05d}"
    return {"acts": f"{stem}.acts.npy", "meta": f"{stem}.meta.npy"}


def _shard_files(
    out: Path, shard: dict[str, Any], first_context: int, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write a shard's two arrays; its manifest entry, with their sha256."""
    names = _shard_names(first_context, int(manifest["contexts_per_shard"]))
    acts = shard["acts"].numpy().astype(_NP_DTYPES[manifest["dtype"]], copy=False)
    meta = np.stack(
        [shard["tok"].numpy(), shard["ctx"].numpy().astype(np.int32), shard["pos"].numpy()], axis=1
    )
    _write_npy(out / names["acts"], acts)
    _write_npy(out / names["meta"], meta.astype(np.int32))
    return {
        **names,
        "n_tokens": shard["n"],
        "first_context": first_context,
        "n_contexts": shard["end_context"] - first_context,
        "truncated": shard["truncated"],
        "sha256": {k: sha256_file(out / v) for k, v in names.items()},
    }


def _write_shard(
    out: Path, manifest: dict[str, Any], shard: dict[str, Any], first_context: int
) -> dict[str, Any]:
    """One process: write a shard and record it in the manifest."""
    done, count = manifest["n_tokens"], len(manifest["shards"])
    try:
        entry = _shard_files(out, shard, first_context, manifest)
        others = [s for s in manifest["shards"] if s["first_context"] != first_context]  # a redone shard
        manifest["shards"] = sorted([*others, entry], key=lambda s: int(s["first_context"]))
        manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["shards"])
        _save_manifest(out, manifest, done)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            manifest["shards"] = [s for s in manifest["shards"] if s["first_context"] != first_context]
            acts = out / _shard_names(first_context, int(manifest["contexts_per_shard"]))["acts"]
            raise UserError(
                f"disk full while writing {acts}: kept {done:,} tokens in {count} complete shards; "
                "free space and rerun the same command to resume"
            ) from None
        raise
    return manifest


def _write_record(out: Path, manifest: dict[str, Any], shard: dict[str, Any], first_context: int) -> None:
    """A torchrun rank: write a shard, then its record (rank 0 gathers the records into the manifest)."""
    acts = out / _shard_names(first_context, int(manifest["contexts_per_shard"]))["acts"]
    try:
        entry = _shard_files(out, shard, first_context, manifest)
        write_json(acts.with_name(acts.name.replace(".acts.npy", ".json")), entry)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(
                f"disk full while writing {acts}: free space and rerun the same command to resume"
            ) from None
        raise


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
