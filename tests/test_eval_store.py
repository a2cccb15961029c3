"""EvalContext.memo_on_disk: SAE-independent work kept on disk for later processes (absorption's LM side)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orthosae.eval import absorption as A
from orthosae.eval.context import EvalContext, store_file
from orthosae.sae.topk import TopKSAE
from test_eval_absorption import _toy_world


def _ctx(store: Path | None, seed: int = 0) -> EvalContext:
    sae = TopKSAE(40, 64, 4, generator=torch.Generator().manual_seed(0))
    return EvalContext(sae, {}, "toy-model", 3, seed=seed, progress=False, store=store)


def _memo(ctx: EvalContext, calls: list[int], key: tuple = ("demo", 1)) -> dict[str, torch.Tensor]:
    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(4.0) + len(calls)}

    return ctx.memo_on_disk(key, compute, lambda v: v, lambda s: s)


def test_a_later_process_loads_instead_of_computing(tmp_path: Path):
    calls: list[int] = []
    first = _memo(_ctx(tmp_path), calls)
    path = store_file(tmp_path, ("demo", 1), "toy-model", 3, 0, "cpu")
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    again = _memo(_ctx(tmp_path), calls)  # a new context: nothing shared in memory
    assert calls == [1] and torch.equal(again["x"], first["x"])
    _memo(_ctx(tmp_path, seed=1), calls)  # another seed, another key, another file
    _memo(_ctx(tmp_path), calls, key=("demo", 2))
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("damage", [b"", b"not a torch file"])
def test_an_unreadable_file_is_recomputed_and_replaced(tmp_path: Path, damage: bytes):
    calls: list[int] = []
    _memo(_ctx(tmp_path), calls)
    path = store_file(tmp_path, ("demo", 1), "toy-model", 3, 0, "cpu")
    path.write_bytes(damage)
    value = _memo(_ctx(tmp_path), calls)
    assert calls == [1, 1] and torch.equal(value["x"], torch.arange(4.0) + 2)
    assert torch.equal(torch.load(path, weights_only=True)["x"], value["x"])


def test_without_a_store_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    calls: list[int] = []
    ctx = _ctx(None)
    _memo(ctx, calls)
    _memo(ctx, calls)  # the same context: memory
    _memo(_ctx(None), calls)  # a new one: computed again
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_absorption_keeps_its_lm_side_and_scores_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    words, acts_fn, _, _ = _toy_world()
    cfg = A.Config(
        k_sparse_probe_num_epochs=5, k_sparse_probe_batch_size=64, max_k_value=2, probe_num_epochs=20
    )
    calls: list[int] = []

    def lm_data(ctx: EvalContext, c: A.Config) -> A.LMData:
        calls.append(1)
        return A.prepare_lm(words, acts_fn, c, ctx.seed)

    monkeypatch.setattr(A, "lm_data", lm_data)
    first = A.evaluate(_ctx(tmp_path), cfg)
    second = A.evaluate(_ctx(tmp_path), cfg)
    assert calls == [1]
    seconds = [out["eval_result_unstructured"].pop("seconds") for out in (first, second)]
    assert [s["lm_part_reused"] for s in seconds] == [False, True]
    for out in (first, second):
        out.pop("datetime_epoch_millis", None)
        out.pop("eval_wall_time_s", None)
        out.pop("eval_id")
    assert first == second
