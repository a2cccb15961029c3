"""SAELens loads our run directories as they are, and we load and evaluate SAELens's: checked with the real
sae-lens package (tests/peers/saelens-requirements.txt) in its own venv, never a re-implementation.

- Every architecture we train, trained with our CLI, loads with `SAE.load_from_disk(run_dir)` (and with
  device="cpu") as the SAELens class that computes the same function: identical latents, and encode,
  decode and forward equal to ours within 1e-5 on fixed inputs.
- A model-trained run's metadata (model, hook, layer, context size, BOS) arrives in `sae.cfg.metadata`.
- `orthosae export --to saelens` writes only SAELens's keys and still loads.
- The reverse: SAEs SAELens creates and saves (standard, topk, jumprelu; with SAELens's options that we
  fold into the weights) load with our reader and compute what SAELens computes; `orthosae eval` scores one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.interop.load import load_any
from orthosae.sae import load_sae
from peer_venv import Peer

REQUIREMENTS = Path(__file__).resolve().parent / "peers" / "saelens-requirements.txt"
SAELENS = Peer("saelens", installs=(("-r", str(REQUIREMENTS)),), pins=REQUIREMENTS.read_text())
TOL = 1e-5
D_IN = 16
FAST = ["--steps", "30", "--batch-size", "64", "--log-every", "10", "--no-progress", "--d-sae", "64"]

# (run name, extra train flags, the SAELens class it must load as)
RUNS = [
    ("topk", ["--arch", "topk", "--k", "4"], "TopKSAE"),
    ("topk-orth", ["--arch", "topk", "--k", "4", "--orth", "--orth-lambda", "0.1"], "TopKSAE"),
    ("relu", ["--arch", "relu", "--l1", "0.01"], "StandardSAE"),
    ("batchtopk", ["--arch", "batchtopk", "--k", "4"], "JumpReLUSAE"),
    ("matryoshka", ["--arch", "matryoshka", "--k", "4", "--matryoshka-fractions", "1/4,3/4"], "JumpReLUSAE"),
    ("jumprelu", ["--arch", "jumprelu", "--k", "4"], "JumpReLUSAE"),
]

LOAD_SCRIPT = """
from sae_lens import SAE
for name, path in inputs["dirs"].items():
    for kwargs in ({}, {"device": "cpu"}):
        sae = SAE.load_from_disk(path, **kwargs)
    x = inputs["x"]
    with torch.no_grad():
        f = sae.encode(x)
        outputs[name] = {
            "cls": type(sae).__name__, "latents": f, "decoded": sae.decode(f), "forward": sae(x),
            "k": getattr(sae.cfg, "k", None), "metadata": sae.cfg.metadata.to_dict(),
        }
"""


def _ours(path: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae, _ = load_any(path)
    with torch.no_grad():
        f = sae.encode(x)
        return {"latents": f, "decoded": sae.decode(f), "forward": sae(x).x_hat}


def _assert_same(theirs: dict, ours: dict[str, torch.Tensor], what: str) -> None:
    for key in ("latents", "decoded", "forward"):
        diff = (theirs[key].double() - ours[key].double()).abs().max().item()
        assert diff <= TOL, f"{what}: {key} differs by {diff:.2e}"
    assert torch.equal(theirs["latents"] != 0, ours["latents"] != 0), f"{what}: different active latents"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture trained with `orthosae train` on a small array (--model-name/--hook-name given)."""
    from orthosae.cli import main

    root = tmp_path_factory.mktemp("saelens")
    acts = root / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((4096, D_IN)).astype(np.float32))
    names = ["--model-name", "HuggingFaceTB/SmolLM2-135M", "--hook-name", "blocks.3.hook_resid_post"]
    runs = {}
    for name, flags, _ in RUNS:
        out = root / name
        assert main(["train", "--activations", str(acts), *FAST, *flags, *names, "--out", str(out)]) == 0
        runs[name] = out
    return runs


def test_saelens_loads_every_architecture_we_train(trained: dict[str, Path], tmp_path: Path):
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    out = SAELENS.run(LOAD_SCRIPT, {"dirs": {n: str(p) for n, p in trained.items()}, "x": x}, tmp_path)
    for name, _, cls in RUNS:
        theirs = out[name]
        assert theirs["cls"] == cls, name
        _assert_same(theirs, _ours(trained[name], x), name)
        assert theirs["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M"
        assert theirs["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
        assert theirs["metadata"]["hook_layer"] == 3
    assert out["topk"]["k"] == 4
    # The TopK inference threshold, which SAELens has no tensor for, is still ours after the round trip.
    sae, cfg = load_sae(trained["topk"])
    assert float(sae.threshold) == cfg["inference_threshold"] > 0


def test_model_trained_metadata_arrives_in_saelens(tmp_path: Path):
    from orthosae.activations.cache import build_cache
    from orthosae.cli import main

    model_dir = save_tiny_model(tmp_path / "model", "llama", n_layers=3)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", SAMPLE_TEXTS)
    cache = build_cache(
        tmp_path / "cache", model_name=str(model_dir), layer=1, n_tokens=600, corpus=str(corpus),
        context_size=32, progress=False,
    )  # fmt: skip
    run = tmp_path / "run"
    flags = ["--activations", str(cache), "--d-sae", "32", "--k", "4", "--steps", "5", "--batch-size", "64"]
    assert main(["train", *flags, "--no-progress", "--out", str(run)]) == 0
    out = SAELENS.run(LOAD_SCRIPT, {"dirs": {"run": str(run)}, "x": torch.randn(4, 32)}, tmp_path / "peer")
    meta = out["run"]["metadata"]
    assert meta["model_name"] == str(model_dir)
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["hook_layer"] == 1
    assert meta["context_size"] == 32
    assert meta["prepend_bos"] is True
    assert meta["exclude_special_tokens"] is True
    assert meta["dataset_path"]
    assert meta["training_tokens"] == 5 * 64
    assert None not in {meta[k] for k in ("model_name", "hook_name", "context_size", "prepend_bos")}


def test_export_to_saelens_writes_only_saelens_keys(cli, trained: dict[str, Path], tmp_path: Path):
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    dirs = {}
    for name in ("topk", "jumprelu"):
        dirs[name] = tmp_path / name
        assert cli("export", trained[name], dirs[name], "--to", "saelens").code == 0
        cfg = json.loads((dirs[name] / "cfg.json").read_text())
        assert "arch" not in cfg and "training" not in cfg
        assert sorted(p.name for p in dirs[name].iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    out = SAELENS.run(LOAD_SCRIPT, {"dirs": {n: str(p) for n, p in dirs.items()}, "x": x}, tmp_path / "peer")
    for name, path in dirs.items():
        _assert_same(out[name], _ours(trained[name], x), name)
        _assert_same(out[name], _ours(path, x), f"{name} (read back as SAELens's)")


SAVE_SCRIPT = """
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
torch.manual_seed(0)
d_in, d_sae = inputs["d_in"], inputs["d_sae"]
meta = {"model_name": inputs["model"], "hook_name": "blocks.1.hook_resid_post"}
made = {
    "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)),
    "standard-nocentre": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)),
    "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5)),
    "topk-rescaled": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5, rescale_acts_by_decoder_norm=True)),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)),
    "jumprelu-centred": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True)),
}
x = inputs["x"]
for name, sae in made.items():
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.3)
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    sae.save_model(inputs["root"] + "/" + name)
    with torch.no_grad():
        f = sae.encode(x)
        outputs[name] = {"latents": f, "decoded": sae.decode(f), "forward": sae(x)}
"""


@pytest.fixture(scope="module")
def saelens_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, torch.Tensor, Path]:
    root = tmp_path_factory.mktemp("from_saelens")
    model_dir = save_tiny_model(root / "model", "llama", n_layers=3)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    inputs = {"d_in": 32, "d_sae": 96, "x": x, "root": str(root), "model": str(model_dir)}
    return root, SAELENS.run(SAVE_SCRIPT, inputs, root / "peer"), x, model_dir


def test_we_read_what_saelens_saves(saelens_saved):
    root, theirs, x, model_dir = saelens_saved
    for name, result in theirs.items():
        _, cfg = load_any(root / name)
        assert cfg["format"] == "saelens" and cfg["hook_layer"] == 1 and cfg["model_name"] == str(model_dir)
        _assert_same(result, _ours(root / name, x), name)


def test_orthosae_eval_scores_a_saelens_sae(cli, saelens_saved, tmp_path: Path):
    root, _, _, model_dir = saelens_saved
    corpus = write_jsonl(tmp_path / "corpus.jsonl", SAMPLE_TEXTS)
    toml = tmp_path / "eval.toml"
    toml.write_text(
        f'[core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        "n_eval_reconstruction_batches = 1\nn_eval_sparsity_variance_batches = 2\n"
    )
    out = tmp_path / "eval.json"
    r = cli("eval", root / "topk", "--evals", "core", "--config", toml, "--out", out, "--no-progress")
    assert r.code == 0, r.err
    core = json.loads(out.read_text())["core evaluation results"]
    assert core["metrics"]["sparsity"]["l0"] == pytest.approx(5.0)
    assert core["sae_cfg_dict"]["model_name"] == str(model_dir)


def test_unknown_directory_and_unsupported_architecture_are_one_line_errors(cli, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("eval", empty, "--no-progress"), "holds no SAE orthosae can read")
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "cfg.json").write_text(
        json.dumps({"architecture": "gated", "d_in": 4, "d_sae": 8, "metadata": {}})
    )
    (gated / "sae_weights.safetensors").write_bytes(b"")
    assert_one_line_error(cli("eval", gated, "--no-progress"), "architecture 'gated' is not supported")
    assert_one_line_error(cli("export", gated, tmp_path / "o", "--to", "saelens"), "'gated'")
    assert_one_line_error(cli("export", empty, tmp_path / "o", "--to", "sparsify"), "unknown export format")
