"""Unlearning: the clamp intervention on a tiny model, prompts of both protocols, the packed corpus, the
upper-blocks shortcut, the ordering filter, and the whole eval (shortcuts off = shortcuts on, memo, folding).

Changed with the eval's rework: the score test now lives with the literal references in
test_unlearning_score.py; `encode_items(…, "letter")` became the 'saebench_mcq' protocol (chat template,
"Answer: ("), tested here through `mcq_prompt`; the bundled-model test checks the new JSON keys."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest_models import byte_tokenizer, tiny_model
from orthosae.activations.harvest import resid_post
from orthosae.errors import UserError
from orthosae.eval import unlearning
from orthosae.eval.context import EvalContext
from orthosae.eval.fold import folded
from orthosae.eval.unlearning import clamp_hook, clamp_latents, edited_residual
from orthosae.eval.unlearning_forward import answer, answer_from_hidden, upper_matches
from orthosae.eval.unlearning_prompts import (
    chat_wrap,
    encode_cloze,
    letter_tokens,
    mcq_item,
    mcq_prompt,
    pack_corpus,
)
from orthosae.models.blocks import find_blocks
from orthosae.models.loader import LoadedModel
from orthosae.sae.relu import ReLUSAE
from orthosae.sae.topk import TopKSAE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny-model forwards are microseconds of work: with a second thread on a busy 2-core machine they
    # spend 20× longer waiting on each other (measured) than computing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHAT = (
    "{% for m in messages %}<bos>user\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}model\n{% endif %}"
)


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
        with clamp_hook(model, layer, sae, [f], 50.0):
            edited = model(input_ids=ids).logits[0]
    h_edit = edited_residual(h.unsqueeze(0), sae, [f], 50.0)[0]
    z_edit_f = (h_edit - h) @ sae.W_dec[f] / sae.W_dec[f].pow(2).sum() + z[:, f]
    assert torch.allclose(z_edit_f[active], torch.full_like(z_edit_f[active], -50.0), atol=1e-3)
    assert torch.equal(h_edit[~active], h[~active])
    # Causal model: logits before the first edited position are bit-identical, from there on they change.
    assert torch.equal(edited[:first], base[:first])
    assert not torch.allclose(edited[first], base[first])


# ---------------------------------------------------------------- prompts and corpus


def test_encode_cloze_drops_choices_sharing_a_first_token():
    tok = byte_tokenizer()
    items = [
        {"question": "The sky is", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "A cat says", "choices": ["meow", "moo"], "answer": 0},  # both start with byte 'm'
    ]
    seqs, cands, answers, used = encode_cloze(tok, items)
    assert used == [0] and answers == [0]
    assert cands[0] == [[ord("b")], [ord("g")], [ord("r")]]
    assert seqs[0][0] == tok.bos_token_id and tok.decode(seqs[0][1:]) == "The sky is"


def test_mcq_prompt_in_the_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    item = {"question": "Q?", "choices": [" x", "y "], "answer": 1, "subject": "tests"}
    question, choices, answer_i, subject = mcq_item(item, "default")
    assert (question, choices, answer_i, subject) == ("Q?", ["x", "y"], 1, "tests")
    text = mcq_prompt(question, choices, subject, chat_wrap(tok, "tiny"))
    assert text == (
        "<bos>user\nThe following are multiple choice questions (with answers) about tests.\nQ?\nA. x\nB. y"
        "<eos>\nmodel\nAnswer: ("
    )
    # A cloze item's own MCQ phrasing wins over its cloze text; the subject falls back to the default.
    assert mcq_item({**item, "mcq_question": "Which?"}, "d")[0] == "Which?"
    assert mcq_item({"question": "q", "choices": ["a"], "answer": 0}, "d")[3] == "d"
    # Byte tokens: 'A' is one token, ' A' is two (space, A), so only 'A' scores the letter.
    assert letter_tokens(tok, 2) == [[ord("A")], [ord("B")]]
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        chat_wrap(tok, "tiny")


def test_pack_corpus_joins_with_eos_and_counts_no_special_tokens():
    tok = byte_tokenizer()
    texts = ["abc", "defgh", "ij", "klmnopq"]
    ids, counted = pack_corpus(tok, texts, n_seqs=10, seq_len=5, seed=0)
    order = list(range(4))
    random.Random(0).shuffle(order)
    stream = []
    for i in order:
        if stream:
            stream.append(tok.eos_token_id)
        stream.extend(texts[i].encode())
    rows = len(stream) // 4
    assert ids.tolist() == [[tok.bos_token_id, *stream[r * 4 : (r + 1) * 4]] for r in range(rows)]
    assert counted.tolist() == [[t not in (256, 257, 258) for t in row] for row in ids.tolist()]
    assert pack_corpus(tok, texts, n_seqs=2, seq_len=5, seed=0)[0].shape == (2, 5)


# ---------------------------------------------------------------- the upper-blocks shortcut


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "gemma2", "gpt2"]
)  # gemma scales, gpt2 adds to the input
def test_upper_blocks_from_the_cached_output_equal_the_hooked_full_forward(family):
    tok = byte_tokenizer()
    loaded = LoadedModel(tiny_model(family, n_layers=3), tok, "tiny", "r", 3, 32, family)
    sae = TopKSAE(32, 64, 8, generator=torch.Generator().manual_seed(3))
    rng = random.Random(0)
    seqs = [[256, *f"item {i} is {'x' * rng.randrange(5)}".encode()] for i in range(12)]
    cands = [[[ord(c)] for c in rng.sample("rbgtpn", 4)] for _ in seqs]
    base, hidden = answer(loaded, 1, seqs, cands, 5, capture=True)
    assert hidden is not None and [len(h) for h in hidden] == [len(s) for s in seqs]
    assert upper_matches(loaded, 1, seqs, hidden)[0]
    assert torch.equal(answer_from_hidden(loaded, 1, seqs, hidden, cands, 5), base)
    changed = 0
    for feats, m in (([0, 1, 2], 25.0), (list(range(20)), 200.0)):

        def edit(h: torch.Tensor, feats: list[int] = feats, m: float = m) -> torch.Tensor:
            return edited_residual(h, sae, feats, m)

        upper = answer_from_hidden(loaded, 1, seqs, hidden, cands, 5, edit)
        full, _ = answer(loaded, 1, seqs, cands, 5, edit=edit)
        assert torch.equal(upper, full)
        changed += int((upper != base).sum())
    assert changed > 0


def test_upper_blocks_shortcut_is_refused_where_state_crosses_blocks():
    """Block 0's output feeds block 2 directly (as in models that share state across layers): starting
    after block 1 from its output changes the logits, so the check must fail."""
    tok = byte_tokenizer()
    loaded = LoadedModel(tiny_model("llama", n_layers=3), tok, "tiny", "r", 3, 32, "llama")
    seqs = [[256, *b"hello there"], [256, *b"abc"]]
    _, hidden = answer(loaded, 1, seqs, [[[1], [2]]] * 2, 4, capture=True)
    assert hidden is not None and upper_matches(loaded, 1, seqs, hidden)[0]
    blocks = find_blocks(loaded.model)
    saved: list[torch.Tensor] = []
    blocks[0].register_forward_hook(lambda _m, _a, out: saved.append(out) and None)
    blocks[2].register_forward_pre_hook(lambda _m, args: (args[0] + saved[-1], *args[1:]))
    _, hidden = answer(loaded, 1, seqs, [[[1], [2]]] * 2, 4, capture=True)
    assert hidden is not None and not upper_matches(loaded, 1, seqs, hidden)[0]


# ---------------------------------------------------------------- the whole eval on a tiny model


def _write_sets(d: Path, n: int = 200) -> dict[str, str]:
    rng = random.Random(0)
    templates = {"forget": "the {i} colour is", "retain": "a shape {i} was"}
    paths = {}
    for name, tmpl in templates.items():
        items = [
            {"question": tmpl.format(i=i), "choices": rng.sample("rbgtpnkm", 4), "answer": rng.randrange(4)}
            for i in range(n)
        ]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        corpus = "".join(json.dumps({"text": x["question"]}) + "\n" for x in items)
        (d / f"{name}_corpus.jsonl").write_text(corpus)
        paths[f"{name}_path"] = str(d / f"{name}.jsonl")
        paths[f"{name}_corpus_path"] = str(d / f"{name}_corpus.jsonl")
    return paths


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("unl")
    tok = byte_tokenizer()
    loaded = LoadedModel(tiny_model("llama", n_layers=3), tok, "tiny", "r", 3, 32, "llama")
    cfg = unlearning.Config(
        **_write_sets(d),
        dataset_size=16,
        seq_len=64,
        n_questions=200,
        # 1.1 lets latents that fire on retain text be chosen too: those interventions break retain.
        retain_thresholds=[0.01, 1.1],
        n_features_list=[1, 2, 4],
        multipliers=[1, 50],
        n_bootstrap=200,
    )
    return loaded, cfg


def _ctx(loaded: LoadedModel, sae, shared=None) -> EvalContext:
    cfg = {"d_in": 32, "d_sae": sae.W_dec.shape[0]}
    return EvalContext(
        sae, cfg, "tiny", 1, progress=False, _model=loaded, shared=shared if shared is not None else {}
    )


def test_shortcuts_change_no_number(tiny_eval, monkeypatch):
    loaded, cfg = tiny_eval
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(3))
    fast = unlearning.evaluate(_ctx(loaded, sae), cfg)
    rows = fast["eval_result_unstructured"]["interventions"]
    assert fast["eval_result_unstructured"]["upper_layers_only"]
    assert any(r.get("forget_skipped") for r in rows)  # the early stop and the skip are exercised …
    assert any(
        r["retain_accuracy"] is not None and r["retain_accuracy"] >= 0.99 for r in rows
    )  # … and not only
    # Shortcuts off: full forwards with the hook, every retain and forget question scored.
    monkeypatch.setattr(unlearning, "gate_fails_everywhere", lambda *a: False)
    monkeypatch.setattr(unlearning, "upper_matches", lambda *a: (False, float("nan")))
    slow = unlearning.evaluate(_ctx(loaded, sae), cfg)
    assert not slow["eval_result_unstructured"]["upper_layers_only"]
    assert slow["eval_result_metrics"] == fast["eval_result_metrics"]
    for a, b in zip(rows, slow["eval_result_unstructured"]["interventions"], strict=True):
        if a["retain_accuracy"] is not None:
            assert a["retain_accuracy"] == b["retain_accuracy"]
        else:  # stopped early: its bound holds, and the gate fails
            assert b["retain_accuracy"] <= a["retain_accuracy_at_most"] < 0.99
        if a["forget_accuracy"] is not None:
            assert a["forget_accuracy"] == b["forget_accuracy"]
        for key in ("forget_correct", "retain_correct"):  # per-question answers: same where both ran
            assert "?" not in b[key] and all(x in ("?", y) for x, y in zip(a[key], b[key], strict=True))
    metrics = fast["eval_result_metrics"]["unlearning"]
    lo, hi = metrics["unlearning_score_ci95"]
    assert lo <= metrics["unlearning_score"] <= hi and hi > lo


def test_json_keys_memo_and_protocol_name(tiny_eval):
    loaded, cfg = tiny_eval
    shared: dict = {}
    a = unlearning.evaluate(
        _ctx(loaded, TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(3)), shared), cfg
    )
    other = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(4))
    b = unlearning.evaluate(_ctx(loaded, other, shared), cfg)
    alone = unlearning.evaluate(_ctx(loaded, other), cfg)
    assert b["eval_result_metrics"] == alone["eval_result_metrics"]  # shared work reused, same result
    assert a["eval_result_unstructured"]["timing_s"]["shared_computed_now"] > 0
    assert b["eval_result_unstructured"]["timing_s"]["shared_computed_now"] == 0
    assert set(a["eval_result_metrics"]["unlearning"]) == {"unlearning_score", "unlearning_score_ci95"}
    u, c = a["eval_result_unstructured"], a["eval_config"]
    assert u["protocol"] == c["protocol"] == "cloze" and "cloze" in u["note"]
    assert c["bootstrap_config"]["n_resamples"] == 200 and c["bootstrap_config"]["n_units"] == len(
        u["baseline"]["forget"]["kept_ids"]
    )
    assert len(u["interventions"]) == 2 * 3 * 2 and c["decoder_norms_folded"] is False
    assert c["dataset_size"] == 16 and c["n_questions"] == 200


def test_folding_is_applied_and_exact(tiny_eval):
    loaded, cfg = tiny_eval
    relu = ReLUSAE(32, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        relu.W_dec.mul_(torch.linspace(0.1, 2.0, 64).unsqueeze(1))  # rows far from unit norm
    out = unlearning.evaluate(_ctx(loaded, relu), cfg)
    pre = unlearning.evaluate(_ctx(loaded, folded(relu)), cfg)
    assert out["eval_config"]["decoder_norms_folded"] is True
    assert out["eval_result_metrics"] == pre["eval_result_metrics"]
    raw = unlearning.evaluate(
        _ctx(loaded, relu), unlearning.Config(**{**cfg.__dict__, "fold_decoder_norms": False})
    )
    assert raw["eval_config"]["decoder_norms_folded"] is False
    # Folding a ReLU SAE keeps which latents fire, so the same latents are chosen; only the clamp differs.
    feats = [r["features"] for r in out["eval_result_unstructured"]["interventions"]]
    assert feats == [r["features"] for r in raw["eval_result_unstructured"]["interventions"]]


def test_ordering_filter_keeps_only_questions_right_in_every_order(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    loaded = LoadedModel(tiny_model("llama", n_layers=3), tok, "tiny", "r", 3, 32, "llama")
    items = [
        {
            "question": f"{'known' if i % 3 == 0 else 'guess'} {i}",
            "choices": ["w", "x", "y", "z"],
            "answer": i % 4,
        }
        for i in range(12)
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    real_answer = unlearning.answer
    asked: list[int] = []

    def oracle(loaded_, layer, seqs, cands, bs, *, capture=False, edit=None, deal=None):  # one process
        # 'known' questions: the listed letter of the right choice; 'guess' ones: always A.
        preds = []
        for s in seqs:
            text = tok.decode(s)
            i = int(text.split("\nA.")[0].split()[-1])
            listing = [line[3:].split("<")[0] for line in text.split("\n") if line[1:3] == ". "]
            right = items[i]["choices"][items[i]["answer"]]
            preds.append(listing.index(right) if "known" in text else 0)
        asked.append(len(seqs))
        _, hidden = real_answer(loaded_, layer, seqs, cands, bs, capture=capture)
        return torch.tensor(preds), hidden

    monkeypatch.setattr(unlearning, "answer", oracle)
    cfg = unlearning.resolved(unlearning.Config(protocol="saebench_mcq", n_questions=12))
    qs = unlearning.prepare_questions(loaded, 1, cfg, path, "tests", "forget")
    assert qs.stats["kept_ids"] == [0, 3, 6, 9]
    # 'guess' questions right in the original order are those whose answer is A (i % 4 == 0): 0, 4, 8.
    assert qs.stats["n_correct_original_order"] == 4 + 2 and qs.stats["n_orderings"] == 24
    assert qs.answers.tolist() == [0, 3, 2, 1] and len(qs.hidden or []) == 4
    # Early exit: after the first order only 6 questions are asked again, and 'guess' ones drop out.
    assert asked[0] == 12 and sum(asked) < 12 + 23 * 6


def test_bad_input_is_refused(tmp_path):
    paths = _write_sets(tmp_path, n=10)
    loaded = LoadedModel(tiny_model("llama", n_layers=3), byte_tokenizer(), "tiny", "r", 3, 32, "llama")
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(UserError, match="has 10 questions but unlearning.n_questions = 50"):
        unlearning.evaluate(_ctx(loaded, sae), unlearning.Config(**paths, n_questions=50))
    for bad, match in (
        ({"protocol": "letter"}, "protocol"),
        ({"multipliers": []}, "multipliers is empty"),
        ({"n_features_list": [0]}, "positive counts"),
        ({"seq_len": 1}, "seq_len"),
        ({"intervention_method": "scale"}, "not implemented"),
    ):
        with pytest.raises(UserError, match=match):
            unlearning.Config(**bad).validate()  # type: ignore[arg-type]


@pytest.mark.slow
def test_unlearning_on_the_bundled_model(tmp_path):
    from orthosae.eval.unlearning_data import build_unlearning_set

    data = build_unlearning_set(tmp_path / "unl", n_questions=12, n_corpus=40)
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
        dataset_size=4,
        seq_len=32,
        n_questions=12,
    )
    out = unlearning.evaluate(ctx, cfg)
    score = out["eval_result_metrics"]["unlearning"]["unlearning_score"]
    assert score is not None and 0.0 <= score <= 1.0
    base = out["eval_result_unstructured"]["baseline"]
    assert base["forget"]["n_items"] == 12 and base["forget"]["chance"] == pytest.approx(0.25)
    assert len(out["eval_result_unstructured"]["interventions"]) == 1
    assert out["eval_result_unstructured"]["upper_layers_only"] is True
