"""The splice from block L's output (eval.splice.Splicer) against the splice from the tokens: equal logits,
equal core metrics, the blocks' own forwards restored, and the fallback when a model fails calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest_models import SAMPLE_TEXTS, byte_tokenizer, tiny_model, write_jsonl
from orthosae.eval import core
from orthosae.eval.context import EvalContext
from orthosae.eval.splice import (
    Splicer,
    ablated_logits,
    clean_run,
    given_block_output,
    spliced_logits,
)
from orthosae.models.blocks import find_blocks
from orthosae.models.loader import LoadedModel
from orthosae.sae import TopKSAE

D = 32


def _loaded(n_layers: int = 4, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = tiny_model("llama", n_layers).requires_grad_(False)
    return LoadedModel(model, byte_tokenizer(), "tiny-llama", "test", n_layers, D, "llama")


def _tokens(loaded: LoadedModel) -> torch.Tensor:
    ids = [loaded.tokenizer(t)["input_ids"][:24] for t in SAMPLE_TEXTS[:3]]
    return torch.tensor([i + [0] * (24 - len(i)) for i in ids])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_spliced_and_ablated_logits_equal_the_runs_from_the_tokens(layer: int):
    loaded = _loaded()
    tokens = _tokens(loaded)
    hidden, clean = clean_run(loaded.model, layer, tokens)
    splicer = Splicer(loaded.model, layer)
    assert splicer.calibrate(tokens, hidden, clean) is True
    g = torch.Generator().manual_seed(layer)
    mask = torch.rand(tokens.shape, generator=g) > 0.4
    replacement = hidden + torch.randn(hidden.shape, generator=g)
    want = spliced_logits(loaded.model, layer, tokens, replacement, mask)
    got = splicer.spliced(tokens, hidden, replacement, mask)
    assert not torch.allclose(want, clean, atol=1e-3)  # the splice changes the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        splicer.ablated(tokens, hidden), ablated_logits(loaded.model, layer, tokens), rtol=1e-5, atol=1e-5
    )


def test_the_blocks_skip_their_work_and_get_their_forwards_back():
    loaded = _loaded()
    blocks = find_blocks(loaded.model)
    ran: list[int] = []
    originals = [type(b).forward for b in blocks]
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i))
    marker = blocks[3].forward  # an instance attribute already there (accelerate's hooks set one) stays
    blocks[3].forward = marker
    tokens = _tokens(loaded)
    hidden = torch.zeros(*tokens.shape, D)
    with given_block_output(loaded.model, 1, hidden):
        out = loaded.model(input_ids=tokens, use_cache=False).logits
    assert out.shape[:2] == tokens.shape
    assert ran == [0, 1, 2, 3]  # hooks fire, but blocks 0 and 1 returned `hidden` without computing
    assert "forward" not in blocks[0].__dict__ and "forward" not in blocks[1].__dict__
    assert blocks[3].__dict__["forward"] is marker
    for b, f in zip(blocks[:3], originals[:3], strict=True):
        assert b.forward.__func__ is f  # type: ignore[attr-defined]


def test_a_model_with_state_across_blocks_fails_calibration_and_runs_from_the_tokens():
    """Block 0's output feeds block 3 directly (as in models that share state across layers): starting at
    block 2 changes the logits, so the splicer must fall back."""
    loaded = _loaded()
    blocks = find_blocks(loaded.model)
    saved: list[torch.Tensor] = []
    blocks[0].register_forward_hook(lambda _m, _a, out: saved.append(out) and None)
    blocks[3].register_forward_pre_hook(lambda _m, args: (args[0] + saved[-1], *args[1:]))
    tokens = _tokens(loaded)
    hidden, clean = clean_run(loaded.model, 2, tokens)
    splicer = Splicer(loaded.model, 2)
    assert splicer.calibrate(tokens, hidden, clean) is False
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    replacement = hidden * 0.5
    want = spliced_logits(loaded.model, 2, tokens, replacement, mask)
    torch.testing.assert_close(splicer.spliced(tokens, hidden, replacement, mask), want, rtol=0, atol=0)
    # calibration is done once: a later call keeps the verdict
    assert splicer.calibrate(tokens, hidden, hidden.new_zeros(clean.shape)) is False


def test_core_metrics_are_those_of_the_splice_from_the_tokens(tmp_path: Path, monkeypatch):
    loaded = _loaded()
    corpus = write_jsonl(tmp_path / "c.jsonl", SAMPLE_TEXTS)
    torch.manual_seed(3)
    sae = TopKSAE(D, 4 * D, 6).requires_grad_(False)
    cfg = core.Config(
        dataset=str(corpus),
        context_size=32,
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        skip_contexts=0,
        n_bootstrap=50,
    )

    def run() -> dict:
        ctx = EvalContext(sae, {}, "tiny-llama", 2, progress=False, _model=loaded)
        return core.evaluate(ctx, cfg)

    fast = run()
    monkeypatch.setattr(Splicer, "calibrate", lambda self, *_a: setattr(self, "from_block_output", False))
    slow = run()
    assert fast["eval_cfg"]["splice_from_block_output"] is True
    assert slow["eval_cfg"]["splice_from_block_output"] is False
    for group, name in [
        ("model_performance_preservation", "ce_loss_score"),
        ("model_performance_preservation", "ce_loss_with_sae"),
        ("model_performance_preservation", "ce_loss_with_ablation"),
        ("model_behavior_preservation", "kl_div_score"),
        ("model_behavior_preservation", "kl_div_with_sae"),
    ]:
        a, b = fast["metrics"][group][name], slow["metrics"][group][name]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), name
