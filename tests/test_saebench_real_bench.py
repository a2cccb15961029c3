"""Smoke test of benchmarks/saebench_real.py's --quick path on a tiny random setup.

A 3-layer random llama with SmolLM2's real tokenizer (so the first-letter task has its ~47k alphabetic
words) and a random TopK SAE on its layer 1: every eval runs ours and SAEBench's code (peer venv) end to
end. With a random model nothing is meaningful except that both sides saw the same inputs, so the
checks are the identity ones: same prompts, same stand-in latents, same scoring of the same tables.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest_models import tiny_config
from orthosae.sae import TopKSAE, save_sae

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "saebench_real.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("saebench_real", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_setup(tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orthosae.models import bundled

    tok = AutoTokenizer.from_pretrained(bundled.converted_dir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", n_layers=3, vocab=len(tok)))
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sae = TopKSAE(32, 96, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(2))
    return save_sae(sae, tmp / "sae", {"model_name": str(model_dir), "hook_layer": 1})


@pytest.fixture
def one_thread():
    """Tiny tensors: with conftest's 2 threads on a loaded 2-core machine thread hand-offs dominate (the
    quick path took 60 s instead of 25 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_path_on_tiny_setup(bench, one_thread, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    sae_dir = _tiny_setup(tmp_path)
    out = tmp_path / "result.json"
    bench.main(["--quick", "--saes", str(sae_dir), "--out", str(out), "--workdir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert "=== absorption" in printed and "=== sparse probing" in printed and "=== unlearning" in printed
    res = json.loads(out.read_text())
    assert res["size"] == "quick"

    lm = res["absorption"]["lm"]
    assert lm["alphabetic_tokens_equal"] and lm["probe_prompts_equal"]
    assert lm["lm_probe_weight_max_abs_diff"] < 1e-5
    assert lm["stand_in_encode_max_abs_diff"]["sae"] == 0
    for variant in res["absorption"]["saes"]["sae"]["variants"].values():
        assert variant["checks"]["true_positives_equal"]
        assert variant["checks"]["missing_prompts_only_in_letters_not_kept"]

    probing = res["sparse_probing"]
    assert probing["common"]["stand_in_encode_max_abs_diff"]["sae"] == 0
    rows = {r["metric"]: r for r in probing["saes"]["sae"]["rows"]}
    for k in (1, 2, 5):  # the same top-k latents and objective: sklearn's tolerance at most
        assert abs(rows[f"sae_top_{k}_test_accuracy"]["difference"]) <= 0.1

    unl = res["unlearning"]["saes"]["sae"]
    assert unl["checks"]["firing_frequency_max_abs_diff"]["forget"] < 1e-6
    assert unl["checks"]["clamp_edit_max_abs_diff"] < 1e-3
    score = unl["rows"][0]
    if score["ours"] is not None:
        assert score["difference"] == pytest.approx(0, abs=1e-6)
