"""On the real bundled model: cached activations equal output_hidden_states[L + 1] on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orthosae.activations.cache import build_cache, open_cache
from orthosae.data import corpus_dir, iter_contexts, iter_texts
from orthosae.data.paths import SOURCES_FILE
from orthosae.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    if not (corpus_dir() / SOURCES_FILE).is_file():
        pytest.skip("bundled corpus missing: run scripts/fetch_corpora.py")
    return load_model("smollm2-135m")


def test_bundled_model_shape(smol) -> None:
    assert (smol.n_layers, smol.d_model, smol.family) == (30, 576, "llama")
    assert len(smol.tokenizer) == 49152


@pytest.mark.parametrize("layer", [15])
def test_cache_equals_hidden_states(tmp_path: Path, smol, layer: int) -> None:
    out = build_cache(
        tmp_path / "c",
        model_name="smollm2-135m",
        model=smol,
        layer=layer,
        n_tokens=2000,
        context_size=128,
        batch_size=8,
        shard_tokens=1024,
        progress=False,
    )
    cache = open_cache(out)
    assert cache.n_tokens == 2000 and cache.d_model == 576 and cache.n_shards == 2
    acts = np.concatenate([np.asarray(cache.shard(i)) for i in range(cache.n_shards)])
    meta = np.concatenate([np.asarray(cache.meta(i)) for i in range(cache.n_shards)])
    n_ctx = int(meta[:, 1].max()) + 1
    contexts = [
        c.tokens
        for c in iter_contexts(iter_texts("bundled"), smol.tokenizer, context_size=128, batch_contexts=8)
    ][: -(-n_ctx // 8)]
    tokens = torch.cat(contexts)[:n_ctx]
    with torch.inference_mode():
        hidden = smol.model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[
            layer + 1
        ]
    assert (meta[:, 2] > 0).all()  # BOS never cached
    assert np.array_equal(tokens[meta[:, 1], meta[:, 2]].numpy(), meta[:, 0])
    expected = hidden[meta[:, 1], meta[:, 2]].numpy()
    np.testing.assert_allclose(acts, expected, atol=1e-4, rtol=1e-4)
