"""Unlearning: feature selection on planted frequencies, the clamp intervention on a tiny model, scoring."""

from __future__ import annotations

import pytest
import torch

from conftest_models import byte_tokenizer, tiny_model
from orthosae.activations.harvest import resid_post
from orthosae.eval.unlearning import (
    clamp_hook,
    clamp_latents,
    edited_residual,
    encode_items,
    select_features,
    unlearning_score,
)
from orthosae.sae.topk import TopKSAE


def test_select_features_on_planted_frequencies():
    forget = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.0, 0.35])
    retain = torch.tensor([0.0, 0.02, 0.0005, 0.0, 0.0, 0.005])
    # threshold 0.01 rules out latent 1; latent 4 never fires on forget text, so it is never chosen.
    assert select_features(forget, retain, 0.01, 10) == [0, 5, 2, 3]
    assert select_features(forget, retain, 0.01, 2) == [0, 5]
    # threshold 0.001 also rules out latent 5 (0.005 ≥ 0.001).
    assert select_features(forget, retain, 0.001, 10) == [0, 2, 3]


def test_clamp_sets_active_chosen_latents_to_minus_multiplier():
    z = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 3.0]])
    out = clamp_latents(z, [1, 2], 50)
    assert out.tolist() == [[0.0, -50.0, -50.0], [1.0, 0.0, -50.0]]
    assert z.tolist() == [[0.0, 2.0, 0.5], [1.0, 0.0, 3.0]]  # the input is not modified


@pytest.fixture(scope="module")
def model_and_sae():
    model = tiny_model("llama", n_layers=3)
    sae = TopKSAE(32, 64, 8, generator=torch.Generator().manual_seed(3))
    return model, sae


def test_edit_adds_only_the_clamp_difference(model_and_sae):
    _, sae = model_and_sae
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    z = sae.encode(h.reshape(-1, 32)).reshape(2, 5, -1)
    f = int((z[:, 1:] > 0).float().sum(dim=(0, 1)).argmax())  # a latent active somewhere after BOS
    out = edited_residual(h, sae, [f], 100.0)
    active = z[..., f] > 0
    active[:, 0] = False  # BOS is never edited
    expected = h + ((-100.0 - z[..., f]) * active).unsqueeze(-1) * sae.W_dec[f]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out[~active], h[~active])  # untouched where the latent is silent


def test_clamp_hook_changes_the_model_only_where_the_feature_fires(model_and_sae):
    model, sae = model_and_sae
    layer = 1
    ids = torch.tensor([[256, *range(60, 75)]])
    with torch.no_grad():
        h = resid_post(model, ids, layer)[0]
        z = sae.encode(h)
        active_positions = (z[1:] > 0).nonzero()
        pos, f = (int(v) for v in active_positions[len(active_positions) // 2])
        pos += 1
        active = z[:, f] > 0
        active[0] = False
        first = int(active.nonzero()[0])
        base = model(input_ids=ids).logits[0]
        captured = []
        handle = model.model.layers[layer].register_forward_hook(lambda m, a, o: captured.append(o))
        with clamp_hook(model, layer, sae, [f], 50.0):
            edited = model(input_ids=ids).logits[0]
        handle.remove()
    # The clamp hook runs after the capture hook, so recompute the edited block output to check it.
    h_edit = edited_residual(h.unsqueeze(0), sae, [f], 50.0)[0]
    z_edit_f = (h_edit - h) @ sae.W_dec[f] / sae.W_dec[f].pow(2).sum() + z[:, f]
    assert torch.allclose(z_edit_f[active], torch.full_like(z_edit_f[active], -50.0), atol=1e-3)
    assert torch.equal(h_edit[~active], h[~active])
    # Causal model: logits before the first edited position are bit-identical, from there on they change.
    assert torch.equal(edited[:first], base[:first])
    assert not torch.allclose(edited[first], base[first])


def test_unlearning_score_picks_the_best_intervention_that_spares_retain():
    runs = [
        {"forget_accuracy": 0.2, "retain_accuracy": 0.9},  # best forget drop but hurts retain: ignored
        {"forget_accuracy": 0.6, "retain_accuracy": 1.0},
        {"forget_accuracy": 0.7, "retain_accuracy": 0.995},
    ]
    assert unlearning_score(runs, 0.99) == pytest.approx(0.4)
    assert unlearning_score([{"forget_accuracy": 0.1, "retain_accuracy": 0.5}], 0.99) == 0.0


def test_encode_items_drops_choices_sharing_a_first_token():
    tok = byte_tokenizer()
    items = [
        {"question": "The sky is", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "A cat says", "choices": ["meow", "moo"], "answer": 0},  # both start with byte 'm'
    ]
    seqs, cands, answers = encode_items(tok, items, "cloze", 64)
    assert len(seqs) == 1 and answers == [0]
    assert cands[0] == [ord("b"), ord("g"), ord("r")]
    assert seqs[0][0] == tok.bos_token_id
    seqs, cands, _ = encode_items(tok, items, "letter", 64)
    assert len(seqs) == 2 and tok.decode(seqs[1][1:]).endswith("\nA. meow\nB. moo\nAnswer:")


@pytest.mark.slow
def test_unlearning_on_the_bundled_model(tmp_path):
    from orthosae.eval import unlearning
    from orthosae.eval.context import EvalContext
    from orthosae.eval.unlearning_data import build_unlearning_set

    data = build_unlearning_set(tmp_path / "unl", n_questions=12, n_corpus=12)
    sae = TopKSAE(576, 256, 8, generator=torch.Generator().manual_seed(0))
    ctx = EvalContext(sae, {"d_in": 576, "d_sae": 256, "k": 8}, "smollm2-135m", 6, progress=False)
    cfg = unlearning.Config(
        forget_path=str(data / "forget.jsonl"),
        retain_path=str(data / "retain.jsonl"),
        forget_corpus_path=str(data / "forget_corpus.jsonl"),
        retain_corpus_path=str(data / "retain_corpus.jsonl"),
        retain_thresholds=[0.01],
        n_features_list=[5],
        multipliers=[50],
        seq_len=32,
    )
    out = unlearning.evaluate(ctx, cfg)
    score = out["eval_result_metrics"]["unlearning"]["unlearning_score"]
    assert score is not None and 0.0 <= score <= 1.0
    base = out["eval_result_unstructured"]["baseline"]
    assert base["forget"]["n_items"] == 12 and base["forget"]["chance"] == pytest.approx(0.25)
    assert len(out["eval_result_unstructured"]["interventions"]) == 1
