"""Core eval token sets on a tiny llama with one planted huge-norm token ('~'): the training rule, the splice
that leaves excluded tokens alone, and every number against a literal per-token computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest_models import SAMPLE_TEXTS, byte_tokenizer, tiny_model, write_jsonl
from orthosae.activations.harvest import resid_post
from orthosae.data.texts import iter_texts
from orthosae.errors import UserError
from orthosae.eval import core
from orthosae.eval import metrics as M
from orthosae.eval.context import EvalContext
from orthosae.eval.splice import Splicer, spliced_logits
from orthosae.models.blocks import find_blocks
from orthosae.models.loader import LoadedModel
from orthosae.sae import ReLUSAE, TopKSAE

LAYER = 1
D = 32


@pytest.fixture(scope="module")
def planted() -> tuple[LoadedModel, int]:
    """A tiny llama whose '~' embedding is 300× its size: at block 1 that token's residual is ~200× the
    median norm, like SmolLM2's attention sinks."""
    model = tiny_model("llama", 3)
    tok = byte_tokenizer()
    tid = tok("~", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[tid] *= 300
    model.requires_grad_(False)
    return LoadedModel(model, tok, "tiny-llama", "test", 3, D, "llama"), tid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [t.replace("fox", "f~x") if i % 2 == 0 else t for i, t in enumerate(SAMPLE_TEXTS)]
    return write_jsonl(tmp_path_factory.mktemp("core") / "c.jsonl", texts)


def _overshoot_sae(loaded: LoadedModel, tid: int) -> ReLUSAE:
    """Exact on ordinary tokens (latents relu(±x), decoder ±I); one extra latent fires only on the huge
    '~' token and adds a vector off its direction, as a ReLU SAE does on attention sinks."""
    e = loaded.model.model.embed_tokens.weight[tid].detach()
    u = e / e.norm()
    v = torch.randn(D, generator=torch.Generator().manual_seed(1))
    v = v - (v @ u) * u
    sae = ReLUSAE(D, 2 * D + 1)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye, u[:, None]], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye, 3 * v[None] / v.norm()], 0))
        sae.b_enc[-1] = -0.5 * float(e.norm())
    return sae.requires_grad_(False)


def _lossy_topk(k: int = 8) -> TopKSAE:
    """Identity-like TopK SAE that keeps only the k largest of relu(±x): a lossy reconstruction."""
    sae = TopKSAE(D, 2 * D, k)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae.requires_grad_(False)


def _cfg(corpus: Path, **kw) -> core.Config:
    base = dict(
        dataset=str(corpus),
        context_size=32,
        batch_size_prompts=4,
        n_eval_reconstruction_batches=3,
        n_eval_sparsity_variance_batches=4,
        n_bootstrap=100,
    )
    return core.Config(**(base | kw))


def _evaluate(loaded: LoadedModel, sae, cfg: core.Config, sae_cfg: dict | None = None) -> dict:
    return core.evaluate(
        EvalContext(sae, sae_cfg or {}, "tiny-llama", LAYER, progress=False, _model=loaded), cfg
    )


def _batches(loaded: LoadedModel, corpus: Path, n: int, batch: int = 4) -> list:
    held = core.HeldOut(iter_texts(str(corpus)), loaded.tokenizer, context_size=32, batch=batch)
    return [b for _, b in zip(range(n), held, strict=False)]


def _kept_literal(hidden: torch.Tensor, nonspecial: torch.Tensor, factor: float) -> torch.Tensor:
    """Training's rule written out: drop non-special tokens above factor × the median norm of the batch's
    non-special tokens (torch's median: the lower middle value)."""
    B, T = nonspecial.shape
    norms = [[float(hidden[r, t].double().norm()) for t in range(T)] for r in range(B)]
    values = sorted(norms[r][t] for r in range(B) for t in range(T) if nonspecial[r, t])
    median = values[(len(values) - 1) // 2]
    kept = torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):
        for t in range(T):
            kept[r, t] = bool(nonspecial[r, t]) and (factor <= 0 or norms[r][t] <= factor * median)
    return kept


# ----------------------------------------------------------------- the rule and where it comes from


def test_high_norm_rule_follows_the_sae_cfg():
    assert core.high_norm_rule({"activations_source": {"remove_high_norm": 4.0}})[0] == 4.0
    assert core.high_norm_rule({"activations_source": {"remove_high_norm": 0.0}})[0] == 0.0
    streamed = {"training": {"activations": None, "remove_high_norm": 7}}
    assert core.high_norm_rule(streamed)[0] == 7.0
    array = {"training": {"activations": "x.npy", "remove_high_norm": 7}}  # says nothing about the array
    f, why = core.high_norm_rule(array)
    assert f == core.DEFAULT_HIGH_NORM and "records no" in why
    assert core.high_norm_rule({"activations_source": {"remove_high_norm": 4.0}}, 2.5) == (
        2.5,
        "core.remove_high_norm=2.5 given",
    )
    with pytest.raises(UserError, match="remove_high_norm"):
        core.Config(remove_high_norm=-2).validate()
    with pytest.raises(UserError, match="n_bootstrap"):
        core.Config(n_bootstrap=-1).validate()


def test_token_masks_match_the_literal_rule(planted, corpus: Path):
    loaded, _ = planted
    for factor in (1.0, 1.5, 10.0):
        for b in _batches(loaded, corpus, 3):
            hidden = resid_post(loaded.model, b.tokens, LAYER)
            masks = core.token_masks(hidden, b.mask, factor, splice_special=False)
            assert torch.equal(masks.kept, _kept_literal(hidden, b.mask, factor))
            assert torch.equal(masks.splice_kept, masks.kept)
            assert torch.equal(masks.splice_all, b.mask)
    b = _batches(loaded, corpus, 1)[0]
    hidden = resid_post(loaded.model, b.tokens, LAYER)
    with_special = core.token_masks(hidden, b.mask, 1.0, splice_special=True)
    assert torch.equal(with_special.splice_all, torch.ones_like(b.mask))
    assert torch.equal(with_special.splice_kept, with_special.kept | ~b.mask)


# ----------------------------------------------------------------- the splice


def test_splice_leaves_unmasked_hidden_states_unchanged(planted, corpus: Path):
    loaded, _ = planted
    b = _batches(loaded, corpus, 1)[0]
    clean = resid_post(loaded.model, b.tokens, LAYER)
    mask = torch.rand(b.mask.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    replacement = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    seen = _next_block_inputs(
        loaded, lambda: spliced_logits(loaded.model, LAYER, b.tokens, replacement, mask)
    )
    assert torch.equal(seen[0][~mask], clean[~mask])
    assert torch.equal(seen[0][mask], replacement[mask])


def _next_block_inputs(loaded: LoadedModel, run) -> list[torch.Tensor]:
    """Hidden states entering block LAYER + 1 (what the rest of the model sees) during `run()`."""
    seen: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = find_blocks(loaded.model)[LAYER + 1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_eval_splices_keep_excluded_tokens_unchanged(planted, corpus: Path, monkeypatch):
    loaded, tid = planted
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = Splicer.spliced

    def spy(self, tokens, hidden, replacement, mask):
        out: list[torch.Tensor] = []
        seen = _next_block_inputs(loaded, lambda: out.append(real(self, tokens, hidden, replacement, mask)))
        calls.append((tokens, mask, seen[0]))
        return out[0]

    monkeypatch.setattr(Splicer, "spliced", spy)
    cfg = _cfg(corpus, n_eval_reconstruction_batches=3, n_eval_sparsity_variance_batches=3)
    _evaluate(loaded, _overshoot_sae(loaded, tid), cfg)
    batches = _batches(loaded, corpus, 3)
    with_tilde = sum(int(bool((b.tokens == tid).any())) for b in batches)
    assert with_tilde >= 2  # the corpus plants enough of them
    default = [c for c in calls if len(c[0]) == 4 and not bool(c[1][c[0] == tid].any())]
    every = [c for c in calls if bool(c[1][c[0] == tid].any())]
    assert len(default) == 3 and len(every) == with_tilde and len(calls) == 3 + with_tilde
    for (tokens, mask, seen), b in zip(default, batches, strict=True):
        assert torch.equal(mask, b.mask & (tokens != tid))  # exactly the training set is spliced
        clean = resid_post(loaded.model, tokens, LAYER)
        assert torch.equal(seen[~mask], clean[~mask])  # '~' (and BOS) keep their own hidden state
    for tokens, mask, seen in every:
        clean = resid_post(loaded.model, tokens, LAYER)
        assert bool(((tokens == tid) | ~mask).all(1).logical_not().all())  # only rows holding a '~' rerun
        assert torch.equal(seen[~mask], clean[~mask])
        huge = tokens == tid
        assert not torch.allclose(seen[huge], clean[huge])  # the all-tokens splice reconstructs them


# ----------------------------------------------------------------- one huge token, both token sets


def test_one_huge_token_dominates_all_tokens_ev_but_not_the_default(planted, corpus: Path):
    loaded, tid = planted
    sae = _overshoot_sae(loaded, tid)
    section = _evaluate(loaded, sae, _cfg(corpus))
    m = section["metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9)
    every = m["all_tokens"]
    assert every["reconstruction_quality"]["explained_variance"] < 0
    # The tiny model's KL to ablation is itself small (~0.006): the overshoot costs about 0.5 % of it.
    assert every["model_behavior_preservation"]["kl_div_with_sae"] > 1e-6
    assert every["model_behavior_preservation"]["kl_div_score"] < 0.999
    ts = m["token_stats"]
    batches = _batches(loaded, corpus, 4)
    n_tilde = sum(int((b.tokens[b.mask] == tid).sum()) for b in batches)
    n_nonspecial = sum(int(b.mask.sum()) for b in batches)
    assert n_tilde > 0
    assert ts["n_excluded_high_norm"] == n_tilde
    assert ts["frac_excluded_high_norm"] == pytest.approx(n_tilde / n_nonspecial)
    assert ts["total_tokens_eval_sparsity_variance"] == n_nonspecial - n_tilde
    assert every["token_stats"]["total_tokens_eval_sparsity_variance"] == n_nonspecial
    assert ts["n_special_tokens"] == sum(int((~b.mask).sum()) for b in batches)
    assert ts["n_excluded_high_norm_reconstruction"] == sum(
        int((b.tokens[b.mask] == tid).sum()) for b in batches[:3]
    )
    assert ts["excluded_share_of_squared_error"] == pytest.approx(1.0)
    assert ts["excluded_share_of_ev_denominator"] > 0.9
    assert ts["excluded_norm_over_batch_median"][0] > 10
    cfg = section["eval_cfg"]
    assert cfg["remove_high_norm_resolved"] == core.DEFAULT_HIGH_NORM
    assert "records no" in cfg["remove_high_norm_source"]
    assert cfg["bootstrap_config"]["unit"].startswith("eval context")
    assert cfg["bootstrap_config"]["n_units"] == ts["n_contexts_eval_sparsity_variance"] == 16
    # Every headline number has an interval around it.
    for group, name in (
        ("reconstruction_quality", "explained_variance"),
        ("reconstruction_quality", "explained_variance_legacy"),
        ("reconstruction_quality", "mse"),
        ("reconstruction_quality", "cossim"),
        ("shrinkage", "l2_ratio"),
        ("shrinkage", "relative_reconstruction_bias"),
        ("sparsity", "l0"),
        ("sparsity", "l1"),
        ("model_behavior_preservation", "kl_div_score"),
        ("model_behavior_preservation", "kl_div_with_sae"),
        ("model_performance_preservation", "ce_loss_score"),
        ("model_performance_preservation", "ce_loss_with_sae"),
        ("orthogonality", "coact_weighted_mean_cos2"),
        ("orthogonality", "coact_product_weighted_mean_cos2"),
    ):
        for block in (m, every):
            value, ci = block[group][name], block[group][name + "_ci95"]
            assert ci is not None and ci[0] - 1e-9 <= value <= ci[1] + 1e-9, (group, name)


def test_rule_off_makes_both_token_sets_equal(planted, corpus: Path):
    loaded, tid = planted
    sae = _overshoot_sae(loaded, tid)
    m = _evaluate(loaded, sae, _cfg(corpus), {"activations_source": {"remove_high_norm": 0}})["metrics"]
    for group in ("reconstruction_quality", "model_performance_preservation", "sparsity"):
        for k, v in m["all_tokens"][group].items():
            if k != "formulas":
                assert m[group][k] == pytest.approx(v, rel=1e-9), (group, k)
    assert m["token_stats"]["n_excluded_high_norm"] == 0
    assert m["reconstruction_quality"]["explained_variance"] < 0
    assert "all_tokens" not in _evaluate(loaded, sae, _cfg(corpus, all_tokens=False))["metrics"]


# ----------------------------------------------------------------- every number by hand


def _ce(logits: torch.Tensor, tokens: torch.Tensor, r: int, t: int) -> float:
    return -float(torch.log_softmax(logits[r, t].double(), -1)[tokens[r, t + 1]])


def _kl(clean: torch.Tensor, new: torch.Tensor, r: int, t: int) -> float:
    p = torch.log_softmax(clean[r, t].double(), -1)
    q = torch.log_softmax(new[r, t].double(), -1)
    return float((p.exp() * (p - q)).sum())


def _run_with(loaded: LoadedModel, tokens: torch.Tensor, edit) -> torch.Tensor:
    def hook(_m, _a, output):
        h = output[0] if isinstance(output, tuple) else output
        new = edit(h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = find_blocks(loaded.model)[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return loaded.model(input_ids=tokens, use_cache=False).logits
    finally:
        handle.remove()


def test_core_numbers_equal_a_literal_per_token_computation(planted, corpus: Path):
    """factor 1.5 leaves out about a third of the tokens of every batch; a lossy TopK SAE; the eval's EV,
    legacy EV, CE and KL on both token sets against loops over tokens."""
    loaded, _ = planted
    sae = _lossy_topk()
    factor = 1.5
    cfg = _cfg(
        corpus, remove_high_norm=factor, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=3
    )
    m = _evaluate(loaded, sae, cfg)["metrics"]
    batches = _batches(loaded, corpus, 3)

    xs: dict[str, list[torch.Tensor]] = {"kept": [], "all": []}
    legacy: dict[str, list[float]] = {"kept": [], "all": []}
    loss: dict[str, dict[str, float]] = {
        s: dict.fromkeys(("c", "s", "a", "n", "ks", "ka", "kn"), 0.0) for s in xs
    }
    n_excluded = 0
    for i, b in enumerate(batches):
        hidden = resid_post(loaded.model, b.tokens, LAYER)
        kept = _kept_literal(hidden, b.mask, factor)
        n_excluded += int((b.mask & ~kept).sum())
        sets = {"kept": kept, "all": b.mask.clone()}
        for name, keep in sets.items():
            pos = [(r, t) for r in range(len(b.tokens)) for t in range(32) if keep[r, t]]
            x = torch.stack([hidden[r, t] for r, t in pos]).float()
            x_hat = torch.stack([sae.reconstruct(hidden[r, t][None].float())[0] for r, t in pos])
            xs[name].append(torch.stack([x, x_hat]))
            mu = x.double().mean(0)
            for a, h in zip(x.double(), x_hat.double(), strict=True):
                legacy[name].append(1 - float((a - h).pow(2).sum()) / float((a - mu).pow(2).sum()))
            if i >= 2:
                continue

            def splice(h: torch.Tensor, pos=pos) -> torch.Tensor:
                out = h.clone()
                for r, t in pos:
                    out[r, t] = sae.reconstruct(h[r, t][None].float())[0]
                return out

            clean = _run_with(loaded, b.tokens, lambda h: h)
            spliced = _run_with(loaded, b.tokens, splice)
            ablated = _run_with(loaded, b.tokens, torch.zeros_like)
            acc = loss[name]
            for r, t in pos:
                if t < 31:
                    acc["c"] += _ce(clean, b.tokens, r, t)
                    acc["s"] += _ce(spliced, b.tokens, r, t)
                    acc["a"] += _ce(ablated, b.tokens, r, t)
                    acc["n"] += 1
                acc["ks"] += _kl(clean, spliced, r, t)
                acc["ka"] += _kl(clean, ablated, r, t)
                acc["kn"] += 1

    assert m["token_stats"]["n_excluded_high_norm"] == n_excluded > 0
    for name, block in (("kept", m), ("all", m["all_tokens"])):
        x, x_hat = torch.cat([p[0] for p in xs[name]]), torch.cat([p[1] for p in xs[name]])
        rq = block["reconstruction_quality"]
        assert rq["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat), rel=1e-5), name
        assert rq["mse"] == pytest.approx(M.mse_per_token(x, x_hat), rel=1e-5), name
        assert rq["explained_variance_legacy"] == pytest.approx(
            sum(legacy[name]) / len(legacy[name]), rel=1e-5
        )
        acc = loss[name]
        c, s, a = acc["c"] / acc["n"], acc["s"] / acc["n"], acc["a"] / acc["n"]
        perf = block["model_performance_preservation"]
        assert perf["ce_loss_without_sae"] == pytest.approx(c, rel=1e-5), name
        assert perf["ce_loss_with_sae"] == pytest.approx(s, rel=1e-5), name
        assert perf["ce_loss_score"] == pytest.approx((a - s) / (a - c), rel=1e-4), name
        beh = block["model_behavior_preservation"]
        assert beh["kl_div_with_sae"] == pytest.approx(acc["ks"] / acc["kn"], rel=1e-4, abs=1e-9), name
        assert beh["kl_div_score"] == pytest.approx(1 - acc["ks"] / acc["ka"], rel=1e-4), name
    assert not math.isclose(
        m["reconstruction_quality"]["explained_variance"],
        m["all_tokens"]["reconstruction_quality"]["explained_variance"],
    )


def test_more_loss_batches_than_sparsity_batches_and_ce_only(planted, corpus: Path):
    loaded, tid = planted
    cfg = _cfg(corpus, n_eval_reconstruction_batches=3, n_eval_sparsity_variance_batches=1, compute_kl=False)
    m = _evaluate(loaded, _overshoot_sae(loaded, tid), cfg)["metrics"]
    batches = _batches(loaded, corpus, 3)
    ts = m["token_stats"]
    assert ts["n_contexts_eval_reconstruction"] == 12 and ts["n_contexts_eval_sparsity_variance"] == 4
    kept = [b.mask & (b.tokens != tid) for b in batches]
    assert ts["total_tokens_eval_reconstruction"] == sum(int(k[:, :-1].sum()) for k in kept)  # CE positions
    assert m["model_behavior_preservation"] == {}
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["all_tokens"]["model_performance_preservation"]["ce_loss_score"] < 1
