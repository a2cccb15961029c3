"""--model-dtype: the language model runs in bfloat16/float16 while the SAE still receives float32
activations; a cache records the dtype its model ran in and refuses to be resumed or extended in another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from conftest_models import SAMPLE_TEXTS, write_jsonl
from orthosae.activations.cache import MANIFEST, build_cache
from orthosae.activations.harvest import harvest
from orthosae.activations.source import stream_activations
from orthosae.data.pack import iter_contexts
from orthosae.data.texts import iter_texts
from orthosae.models.loader import dtype_name, load_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("c") / "texts.jsonl", SAMPLE_TEXTS[:12])


def _acts(model_dir: Path, corpus: Path, dtype: str) -> torch.Tensor:
    loaded = load_model(str(model_dir), dtype=dtype)
    batches = iter_contexts(iter_texts(str(corpus)), loaded.tokenizer, context_size=32, batch_contexts=4)
    return torch.cat([h.acts for h in harvest(loaded, 1, list(batches)[:3])])


def test_dtype_names() -> None:
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "float32",
        "bfloat16",
        "float16",
    ]


def test_bfloat16_model_harvests_float32_activations_close_to_float32(model_dir: Path, corpus: Path) -> None:
    loaded = load_model(str(model_dir), dtype="bf16")
    assert loaded.dtype == "bfloat16" and next(loaded.model.parameters()).dtype == torch.bfloat16
    ref, low = _acts(model_dir, corpus, "float32"), _acts(model_dir, corpus, "bfloat16")
    assert low.dtype == torch.float32 and low.shape == ref.shape and bool(torch.isfinite(low).all())
    err = float((low - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err  # bf16 keeps 8 bits of mantissa: close, not equal


def test_stream_runs_the_model_in_the_requested_dtype(model_dir: Path, corpus: Path) -> None:
    src = stream_activations(
        str(model_dir), 1, str(corpus), context_size=32, batch_size=64, n_tokens=400, model_dtype="bfloat16",
        progress=False,
    )  # fmt: skip
    batch = next(src)
    assert batch.dtype == torch.float32 and batch.shape == (64, 32) and bool(torch.isfinite(batch).all())
    assert src.metadata["model_dtype"] == "bfloat16"


def test_cache_records_the_model_dtype_and_refuses_another(
    model_dir: Path, corpus: Path, tmp_path: Path, cli
):
    out = tmp_path / "cache"
    kw = dict(model_name=str(model_dir), layer=1, context_size=32, corpus=str(corpus), progress=False)
    build_cache(out, n_tokens=200, model=load_model(str(model_dir), dtype="bfloat16"), **kw)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model_dtype"] == "bfloat16" and manifest["dtype"] == "float32"
    common = ["cache", "--model", model_dir, "--layer", "1", "--context-size", "32", "--corpus", corpus]
    common += ["--out", out, "--no-progress"]
    r = cli(*common, "--tokens", "400")  # extending it in float32
    assert_one_line_error(r, "model_dtype='bfloat16'", "requested 'float32'")
    r = cli(*common, "--tokens", "400", "--model-dtype", "bfloat16")
    assert r.code == 0, r.err
    assert json.loads((out / MANIFEST).read_text())["n_tokens"] == 400


def test_cache_without_a_recorded_model_dtype_is_float32(
    model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    kw = dict(model_name=str(model_dir), layer=1, context_size=32, corpus=str(corpus), progress=False)
    build_cache(out, n_tokens=200, **kw)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["model_dtype"]  # as caches built before it was recorded
    (out / MANIFEST).write_text(json.dumps(manifest))
    build_cache(out, n_tokens=300, **kw)
    assert json.loads((out / MANIFEST).read_text())["n_tokens"] == 300
