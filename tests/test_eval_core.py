"""Core eval: every metric against a hand-computed case, the splice on a tiny llama, held-out data."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from conftest_models import SAMPLE_TEXTS, byte_tokenizer, tiny_model, write_jsonl
from orthosae.data.pack import iter_contexts
from orthosae.eval import core
from orthosae.eval import metrics as M
from orthosae.eval import uncertainty as U
from orthosae.eval.context import EvalContext
from orthosae.eval.splice import run_spliced
from orthosae.models.loader import LoadedModel
from orthosae.sae import TopKSAE

# ----------------------------------------------------------------- pure formulas


def test_explained_variance_perfect_and_mean():
    x = torch.randn(50, 6)
    assert M.explained_variance(x, x) == pytest.approx(1.0)
    assert M.explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)


def test_explained_variance_legacy_known_case():
    # Two tokens in 1-d: x = [1, 3], batch mean 2, x̂ = [1, 2] → per-token 1 - [0/1, 1/1] = [1, 0] → mean 0.5.
    x, x_hat = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]])
    assert M.explained_variance_legacy(x, x_hat) == pytest.approx(0.5)
    # The conventional formula on the same data: 1 - 1 / (1 + 1) = 0.5 too; change x̂[0] to tell them apart.
    x_hat2 = torch.tensor([[2.0], [2.0]])
    assert M.explained_variance_legacy(x, x_hat2) == pytest.approx(0.0)  # 1 - mean(1/1, 1/1)
    assert M.explained_variance(x, x_hat2) == pytest.approx(0.0)


def test_mse_is_per_token_sum_over_dims():
    x = torch.zeros(2, 3)
    x_hat = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])  # per-token squared errors 3 and 4
    assert M.mse_per_token(x, x_hat) == pytest.approx(3.5)
    s = M.ReconStats()
    s.update(x, x_hat)
    assert s.result()["mse"] == pytest.approx(3.5)
    assert s.result()["mse_per_element"] == pytest.approx(3.5 / 3)


def test_recon_stats_stream_equals_whole_tensor():
    x, x_hat = torch.randn(40, 5) + 3, torch.randn(40, 5) + 3
    s = M.ReconStats()
    for chunk in range(0, 40, 10):
        s.update(x[chunk : chunk + 10], x_hat[chunk : chunk + 10])
    r = s.result()
    assert r["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat))
    legacy = sum(M.explained_variance_legacy(x[c : c + 10], x_hat[c : c + 10]) for c in range(0, 40, 10)) / 4
    assert r["explained_variance_legacy"] == pytest.approx(legacy)
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    assert r["cossim"] == pytest.approx(float(cos), rel=1e-6)
    assert r["l2_norm_in"] == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-6)
    assert r["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-6)
    rrb = x_hat.pow(2).sum() / (x * x_hat).sum()
    assert r["relative_reconstruction_bias"] == pytest.approx(float(rrb), rel=1e-6)
    mean_sq = float(x.pow(2).sum(-1).mean())
    saebench = 1 - float((x - x_hat).pow(2).sum(-1).mean()) / (mean_sq - (mean_sq / 5) ** 2)
    assert r["explained_variance_saebench"] == pytest.approx(saebench, rel=1e-6)


def test_scores():
    assert M.score(10.0, 10.0, 2.0) == 0.0  # SAE as bad as ablation
    assert M.score(10.0, 2.0, 2.0) == 1.0  # SAE as good as the clean model
    assert M.score(4.0, 1.0) == pytest.approx(0.75)  # KL form


def test_feature_stats_and_histogram():
    acts = torch.tensor([[1.0, 2.0], [0.5, 0.0], [3.0, 1.0]])
    idx = torch.tensor([[0, 1], [0, 2], [1, 2]])  # (1, 2) entry is 0: not firing
    f = M.FeatureStats(4)
    f.update(acts, idx)
    r = f.result(bins_per_decade=1, min_log10=-2)
    assert r["l0"] == pytest.approx(5 / 3)
    assert r["l1"] == pytest.approx(7.5 / 3)
    assert f.fires.tolist() == [2, 2, 1, 0]
    assert r["frac_dead"] == 0.25 and r["frac_alive"] == 0.75
    hist = r["feature_density_histogram"]
    assert hist["log10_density_bin_edges"] == [-2.0, -1.0, 0.0]
    assert hist["counts"] == [0, 3] and hist["n_dead"] == 1  # densities 2/3, 2/3, 1/3


def test_coactivation_stats_match_literal_loop():
    gen = torch.Generator().manual_seed(0)
    n, d, k, T = 12, 5, 3, 40
    w = torch.randn(n, d, generator=gen)
    acts = torch.rand(T, k, generator=gen) * (torch.rand(T, k, generator=gen) > 0.2)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(T)])
    s = M.CoactivationStats(w, chunk_tokens=7)
    s.update(acts, idx)
    r = s.result()

    unit = w.double() / w.double().norm(dim=1, keepdim=True)
    S = (unit @ unit.T).pow(2)
    C = torch.zeros(n, n, dtype=torch.float64)
    P = torch.zeros(n, n, dtype=torch.float64)
    for t in range(T):
        for a, b in itertools.combinations(range(k), 2):
            if acts[t, a] > 0 and acts[t, b] > 0:
                i, j = sorted((int(idx[t, a]), int(idx[t, b])))
                C[i, j] += 1
                P[i, j] += float(acts[t, a]) * float(acts[t, b])
    co = C > 0
    assert r["n_coactive_pairs"] == int(co.sum())
    assert r["mean_cos2_coactive_pairs"] == pytest.approx(float(S[co].mean()))
    assert r["max_cos2_coactive_pairs"] == pytest.approx(float(S[co].max()))
    assert r["coact_weighted_mean_cos2"] == pytest.approx(float((C * S).sum() / C.sum()))
    assert r["coact_product_weighted_mean_cos2"] == pytest.approx(float((P * S).sum() / P.sum()))
    off = ~torch.eye(n, dtype=torch.bool)
    assert r["mean_cos2_all_pairs"] == pytest.approx(float(S[off].mean()))


# ----------------------------------------------------------------- the splice on a tiny llama


def _loaded(n_layers: int = 3) -> LoadedModel:
    model = tiny_model("llama", n_layers)
    model.requires_grad_(False)
    return LoadedModel(model, byte_tokenizer(), "tiny-llama", "test", n_layers, 32, "llama")


def _identity_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs exactly: latents relu(x), relu(-x); decoder [I; -I]; k = d."""
    sae = TopKSAE(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return _loaded()


def _batch(loaded: LoadedModel):
    return next(iter_contexts(SAMPLE_TEXTS, loaded.tokenizer, context_size=24, batch_contexts=3))


def test_identity_splice_gives_clean_logits(tiny: LoadedModel):
    b = _batch(tiny)
    out = run_spliced(tiny.model, 1, b.tokens, b.mask, lambda x: x)
    torch.testing.assert_close(out.spliced, out.clean)
    assert float(M.kl_per_position(out.clean, out.spliced).abs().max()) < 1e-6
    assert not torch.allclose(out.ablated, out.clean)


def test_zero_reconstruction_equals_ablation(tiny: LoadedModel):
    b = _batch(tiny)
    everywhere = torch.ones_like(b.mask)
    out = run_spliced(tiny.model, 1, b.tokens, everywhere, torch.zeros_like)
    torch.testing.assert_close(out.spliced, out.ablated)
    ce = [float(M.ce_per_position(t, b.tokens).mean()) for t in (out.clean, out.spliced, out.ablated)]
    assert M.score(ce[2], ce[1], ce[0]) == pytest.approx(0.0, abs=1e-6)


def _ctx(tiny: LoadedModel, sae: TopKSAE, sae_cfg: dict | None = None) -> EvalContext:
    return EvalContext(sae, sae_cfg or {}, "tiny-llama", 1, progress=False, _model=tiny)


def _small_cfg(tmp_path: Path) -> core.Config:
    """Two reconstruction and three sparsity batches of 4 contexts × 32 tokens of the sample texts."""
    corpus = write_jsonl(tmp_path / "c.jsonl", SAMPLE_TEXTS)
    return core.Config(
        dataset=str(corpus),
        context_size=32,
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=3,
    )


def test_core_eval_with_identity_sae(tiny: LoadedModel, tmp_path: Path):
    cfg = _small_cfg(tmp_path)
    section = core.evaluate(_ctx(tiny, _identity_sae(32)), cfg)
    m = section["metrics"]
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    rq = m["reconstruction_quality"]
    assert rq["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rq["mse"] == pytest.approx(0.0, abs=1e-8)
    assert "formulas" in rq and "explained_variance_legacy" in rq["formulas"]
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    # Exactly one of relu(x_i), relu(-x_i) is non-zero per dimension (ties at 0 aside).
    assert m["sparsity"]["l0"] == pytest.approx(32, abs=0.1)
    tokens = m["token_stats"]["total_tokens_eval_sparsity_variance"]
    assert 0 < tokens <= 3 * 4 * 31
    assert set(section) >= {"unique_id", "sae_set", "sae_id", "eval_cfg", "metrics"}
    assert section["eval_cfg"]["heldout_first_context"] == 0
    orth = m["orthogonality"]
    # Decoder rows ±e_i: any two distinct co-active rows are orthogonal.
    assert orth["max_cos2_coactive_pairs"] == pytest.approx(0.0, abs=1e-12)


def test_heldout_skips_exactly_the_training_tokens(tiny: LoadedModel):
    batches = list(iter_contexts(SAMPLE_TEXTS, tiny.tokenizer, context_size=24, batch_contexts=5))
    kept = torch.cat([b.mask.sum(1) for b in batches])
    skip = int(kept[:7].sum()) - 3  # the training budget ends inside context 6
    held = core.HeldOut(SAMPLE_TEXTS, tiny.tokenizer, context_size=24, batch=4, skip_tokens=skip)
    out = list(held)
    assert held.first_context == 7
    assert out[0].first_index == 7 and len(out[0].tokens) == 4
    all_tokens = torch.cat([b.tokens for b in batches])
    torch.testing.assert_close(torch.cat([b.tokens for b in out]), all_tokens[7:])


def test_training_tokens_rule():
    src = {"corpus": "bundled", "n_tokens": 1000, "context_size": 128}
    assert core.training_tokens({"activations_source": src}, "bundled", 128)[0] == 1000
    assert core.training_tokens({"activations_source": src}, "bundled", 64)[0] == 1128
    assert core.training_tokens({}, "bundled", 128)[0] == 0
    assert core.training_tokens({"activations_source": src | {"corpus": "/x.jsonl"}}, "bundled", 128)[0] == 0


@pytest.mark.slow
def test_core_on_bundled_model_with_identity_sae():
    from orthosae.models import load_model

    loaded = load_model("smollm2-135m")
    sae = _identity_sae(loaded.d_model)
    ctx = EvalContext(sae, {}, "smollm2-135m", 6, progress=False, _model=loaded)
    cfg = core.Config(
        batch_size_prompts=2,
        n_eval_reconstruction_batches=1,
        n_eval_sparsity_variance_batches=1,
        context_size=64,
        compute_orthogonality=False,
    )
    m = core.evaluate(ctx, cfg)["metrics"]
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert perf["ce_loss_with_ablation"] > perf["ce_loss_without_sae"]
    assert math.isfinite(m["model_behavior_preservation"]["kl_div_with_ablation"])
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)


def test_core_stores_pairable_replicates_of_its_headline_metrics(tiny: LoadedModel, tmp_path: Path):
    """Each SAE's section keeps the resampled values its intervals come from; two SAEs scored on the same
    contexts pair, so --compare decides their differences by the paired rule."""
    from orthosae.eval.compare import compare_rows
    from orthosae.eval.results import section_replicates

    cfg = dataclasses.replace(_small_cfg(tmp_path), n_bootstrap=200)
    saes = [TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    blocks = [core.evaluate(_ctx(tiny, sae), cfg) for sae in saes]
    reps = blocks[0][U.REPLICATES_KEY]
    assert {"reconstruction_quality.explained_variance", "model_performance_preservation.ce_loss_score",
            "all_tokens.sparsity.l0", "model_behavior_preservation.kl_div_score"} <= set(reps)  # fmt: skip
    for key, values in reps.items():
        group, name = key.rsplit(".", 1)
        node = blocks[0]["metrics"]
        for part in group.split("."):
            node = node[part]
        stored = U.replicates_tensor(values)
        assert stored is not None and len(stored) == 200
        iv = U.percentile_interval(stored)
        assert iv == pytest.approx(tuple(node[U.ci_key(name)]), rel=1e-6, abs=1e-9)
    keys = [section_replicates(b)[0] for b in blocks]
    assert keys[0] is not None and keys[0] == keys[1]
    rows = {r.metric: r for r in compare_rows([{"core evaluation results": b} for b in blocks])}
    assert rows["core/reconstruction_quality/explained_variance"].rules == ["paired", "paired"]
    assert rows["core/shrinkage/l2_ratio"].rules == ["independent", "independent"]  # not stored


@pytest.mark.parametrize("keep_logits", [True, False])
def test_shared_lm_forwards_give_the_same_results(
    tiny: LoadedModel, tmp_path: Path, monkeypatch, keep_logits
):
    """Two SAEs scored with one shared memo (an experiment) equal each scored alone, whether the clean
    logits are kept for the next SAE or recomputed (over the memory budget)."""
    if not keep_logits:
        monkeypatch.setattr(core, "LOGITS_MEMO_BYTES", 0)
    cfg = _small_cfg(tmp_path)
    saes = [TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    alone = [core.evaluate(_ctx(tiny, sae), cfg)["metrics"] for sae in saes]
    shared: dict = {}
    together = []
    for sae in saes:
        ctx = _ctx(tiny, sae)
        ctx.shared = shared
        together.append(core.evaluate(ctx, cfg)["metrics"])
    assert len(shared) == 4  # one entry per batch, computed once, and the splicer
    assert together == alone
    assert alone[0] != alone[1]
