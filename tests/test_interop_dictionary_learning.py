"""Our SAEs in dictionary_learning's layout and back, checked with the real dictionary-learning 0.1.0 package
in its own venv (tests/dl_peer.py), never a re-implementation.

- Each of our five architectures, written with `write_dictionary_learning`, loads with dictionary_learning's
  own `utils.load_dictionary(dir, "cpu")` (which calls the class's `from_pretrained`, with config.json's k
  for the k-sparse classes) as the matching class, and its encode / decode / forward equal ours within
  1e-5 on fixed inputs. AutoEncoder is the one exception by design: load_dictionary normalises decoder
  columns, which scales the latents by the decoder norms and leaves x̂ unchanged; its
  `from_pretrained(normalize_decoder=False)` equals ours exactly.
- The reverse: dictionary_learning's trainers create each class (weights perturbed so that no bias or
  threshold is trivial), save it as training.py does, and `read_dictionary_learning` gives our module
  computing the same; writing that back reproduces ae.pt's tensors and config.json's trainer block.
- GatedAutoEncoder, AutoEncoderNew and broken directories are refused with one-line UserErrors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dl_peer import run_dl
from orthosae.errors import UserError
from orthosae.interop.dictionary_learning import (
    CLASSES,
    is_dictionary_learning_dir,
    read_dictionary_learning,
    to_dictionary_learning,
    write_dictionary_learning,
)
from orthosae.sae.archs import ARCHS
from orthosae.sae.base import SAE
from orthosae.sae.jumprelu import JumpReLUSAE
from orthosae.sae.topk import TopKSAE

TOL = 1e-5
D_IN, D_SAE, K, GROUPS = 16, 64, 4, [8, 24, 32]
MODEL, LAYER = "EleutherAI/pythia-70m-deduped", 3
META = {
    "model_name": MODEL,
    "hook_layer": LAYER,
    "hook_name": f"blocks.{LAYER}.hook_resid_post",
    "training": {"lr": 1e-3, "steps": 5000, "seed": 7, "batch_size": 4096, "device": "cpu"},
}
# (directory name, our arch, inference threshold for the scalar-threshold archs, dictionary_learning class)
EXPORTS = [
    ("relu", "relu", None, "AutoEncoder"),
    ("topk", "topk", 0.5, "AutoEncoderTopK"),
    ("topk-untracked", "topk", -1.0, "AutoEncoderTopK"),  # dictionary_learning's default encode is top-k too
    ("batchtopk", "batchtopk", 1.0, "BatchTopKSAE"),
    ("matryoshka", "matryoshka", 1.0, "MatryoshkaBatchTopKSAE"),
    ("jumprelu", "jumprelu", None, "JumpReluAutoEncoder"),
]


def _inputs() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2


def random_sae(arch: str, threshold: float | None = None, seed: int = 0) -> SAE:
    """Random weights, decoder rows of varied norms (ours are free in relu), non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    hp = {"d_in": D_IN, "d_sae": D_SAE, "k": K, "group_sizes": GROUPS}
    sae = ARCHS[arch].from_hyperparams(hp, {"dtype": torch.float32, "device": "cpu"})
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        norms = 0.5 + torch.rand(D_SAE, 1, generator=g)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=g), dim=1) * norms)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.1)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g))
        elif threshold is not None:
            getattr(sae, "threshold").fill_(threshold)  # noqa: B009 (a buffer only some archs have)
    return sae.eval()


def ours(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        f = sae.encode(x)
        return {"latents": f, "decoded": sae.decode(f), "forward": sae(x).x_hat}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_same(theirs: dict[str, Any], mine: dict[str, torch.Tensor], what: str) -> float:
    """Every output within TOL and the same active latents; returns the largest difference."""
    worst = 0.0
    for key in ("latents", "decoded", "forward"):
        diff = max_diff(theirs[key], mine[key])
        assert diff <= TOL, f"{what}: {key} differs by {diff:.2e}"
        worst = max(worst, diff)
    assert torch.equal(theirs["latents"] != 0, mine["latents"] != 0), f"{what}: different active latents"
    return worst


# ---------------------------------------------------------------------------- ours → dictionary_learning

LOAD_SCRIPT = """
from dictionary_learning import utils
from dictionary_learning.dictionary import AutoEncoder

def outputs_of(ae, x):
    with torch.no_grad():
        f = ae.encode(x)
        return {"cls": type(ae).__name__, "latents": f, "decoded": ae.decode(f), "forward": ae(x)}

x = inputs["x"]
for name, path in inputs["dirs"].items():
    ae, config = utils.load_dictionary(path, "cpu")
    outputs[name] = {"loaded": outputs_of(ae, x), "trainer": config["trainer"]}
    if isinstance(ae, AutoEncoder):  # without load_dictionary's decoder normalisation
        exact = AutoEncoder.from_pretrained(path + "/ae.pt", normalize_decoder=False)
        outputs[name]["exact"] = outputs_of(exact, x)
"""


def test_dictionary_learning_loads_every_architecture(tmp_path: Path):
    x = _inputs()
    saes, dirs = {}, {}
    for name, arch, threshold, _ in EXPORTS:
        saes[name] = random_sae(arch, threshold)
        dirs[name] = str(tmp_path / name)
        written = write_dictionary_learning(saes[name], META, dirs[name])
        assert [p.name for p in written] == ["ae.pt", "config.json"]
    out = run_dl(LOAD_SCRIPT, {"dirs": dirs, "x": x}, tmp_path / "peer")
    worst = {}
    for name, _, _, cls in EXPORTS:
        sae, theirs = saes[name], out[name]
        mine = ours(sae, x)
        assert theirs["loaded"]["cls"] == cls, name
        trainer = theirs["trainer"]
        assert (trainer["lm_name"], trainer["layer"], trainer["dict_class"]) == (MODEL, LAYER, cls)
        assert trainer["submodule_name"] == META["hook_name"]
        assert (trainer["lr"], trainer["steps"], trainer["seed"]) == (1e-3, 5000, 7)
        if cls != "AutoEncoder":
            worst[name] = assert_same(theirs["loaded"], mine, name)
            continue
        worst[name] = assert_same(theirs["exact"], mine, f"{name} (normalize_decoder=False)")
        # load_dictionary's normalised decoder: the same x̂, latents scaled by the decoder row norms.
        loaded, norms = theirs["loaded"], sae.W_dec.detach().norm(dim=1)
        scaled = {**mine, "latents": mine["latents"] * norms}
        worst[f"{name} (load_dictionary, latents × norms)"] = assert_same(
            loaded, scaled, f"{name} (normalised)"
        )
    print("ours → dictionary_learning, max |difference|:", {k: f"{v:.1e}" for k, v in worst.items()})


# ---------------------------------------------------------------------------- dictionary_learning → ours

SAVE_SCRIPT = """
import json, os
from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate
from dictionary_learning.trainers.top_k import TopKTrainer
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.gdm import GatedSAETrainer

d, n, k = inputs["d"], inputs["n"], inputs["k"]
common = dict(
    steps=10_000, activation_dim=d, dict_size=n, layer=inputs["layer"], lm_name=inputs["model"],
    submodule_name="resid_post_layer_3", device="cpu", seed=0,
)
trainers = {
    "AutoEncoder": StandardTrainerAprilUpdate(**common),
    "AutoEncoderTopK": TopKTrainer(k=k, **common),
    "BatchTopKSAE": BatchTopKTrainer(k=k, **common),
    "BatchTopKSAE-untracked": BatchTopKTrainer(k=k, **common),
    "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKTrainer(k=k, group_fractions=[0.125, 0.375, 0.5], **common),
    "JumpReluAutoEncoder": JumpReluTrainer(**common),
    "GatedAutoEncoder": GatedSAETrainer(**common),
}
g = torch.Generator().manual_seed(1)
x = inputs["x"]
for name, trainer in trainers.items():
    ae = trainer.ae
    with torch.no_grad():
        for p in ae.parameters():  # no zero bias, no encoder = decoderᵀ, no unit decoder norms
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
        if name == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand(n, generator=g))
        elif name != "BatchTopKSAE-untracked" and hasattr(ae, "threshold"):
            ae.threshold.fill_(0.5)
    out = os.path.join(inputs["root"], name)
    os.makedirs(out)
    # as dictionary_learning's training.py saves a finished trainer
    torch.save({key: v.cpu() for key, v in ae.state_dict().items()}, os.path.join(out, "ae.pt"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"trainer": trainer.config}, f, indent=4)
    with torch.no_grad():
        if name == "BatchTopKSAE-untracked":  # the batch top-k rule, which ours falls back to
            f = ae.encode(x, use_threshold=False)
            forward, dense = ae.decode(f), ae(x)
        else:
            f = ae.encode(x)
            forward, dense = ae(x), None
        outputs[name] = {"latents": f, "decoded": ae.decode(f), "forward": forward, "dense": dense}
        outputs[name]["keys"] = list(trainer.config)
"""
ARCH_OF = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "BatchTopKSAE-untracked": "batchtopk",
    "MatryoshkaBatchTopKSAE": "matryoshka",
    "JumpReluAutoEncoder": "jumprelu",
}


@pytest.fixture(scope="module")
def saved_by_dl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], torch.Tensor]:
    """Every class created and saved by dictionary_learning itself, with its outputs on fixed inputs."""
    root = tmp_path_factory.mktemp("dl_saved")
    x = _inputs()
    inputs = {"d": D_IN, "n": D_SAE, "k": K, "x": x, "root": str(root), "layer": LAYER, "model": MODEL}
    return root, run_dl(SAVE_SCRIPT, inputs, root / "peer"), x


def test_we_read_what_dictionary_learning_saves(saved_by_dl: tuple[Path, dict[str, Any], torch.Tensor]):
    root, out, x = saved_by_dl
    worst = {}
    for name, arch in ARCH_OF.items():
        assert is_dictionary_learning_dir(root / name)
        sae, cfg = read_dictionary_learning(root / name)
        assert sae.arch == arch and (cfg["arch"], cfg["d_in"], cfg["d_sae"]) == (arch, D_IN, D_SAE), name
        assert (cfg["model_name"], cfg["hook_layer"], cfg["submodule_name"]) == (
            MODEL,
            LAYER,
            "resid_post_layer_3",
        )
        assert cfg.get("k") == (None if arch in ("relu", "jumprelu") else K)
        worst[name] = assert_same(out[name], ours(sae, x), name)
    # Untracked (−1), dictionary_learning's default encode keeps every positive latent: not what ours do.
    untracked = read_dictionary_learning(root / "BatchTopKSAE-untracked")[0]
    assert max_diff(out["BatchTopKSAE-untracked"]["dense"], ours(untracked, x)["forward"]) > 1e-2
    assert read_dictionary_learning(root / "MatryoshkaBatchTopKSAE")[1]["group_sizes"] == GROUPS
    print("dictionary_learning → ours, max |difference|:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_dictionary_learning_round_trip_is_exact(
    saved_by_dl: tuple[Path, dict[str, Any], torch.Tensor], tmp_path: Path
):
    """dictionary_learning → ours → dictionary_learning: the same tensors and the same trainer block."""
    root, out, _ = saved_by_dl
    for name in ARCH_OF:
        sae, cfg = read_dictionary_learning(root / name)
        if name == "BatchTopKSAE-untracked":  # ours computes batch top-k, which that file would not
            with pytest.raises(UserError, match="no inference threshold"):
                write_dictionary_learning(sae, cfg, tmp_path / name)
            continue
        write_dictionary_learning(sae, cfg, tmp_path / name)
        before = torch.load(root / name / "ae.pt", weights_only=True)
        after = torch.load(tmp_path / name / "ae.pt", weights_only=True)
        assert set(before) == set(after), name
        for key, t in before.items():
            assert after[key].dtype == t.dtype and torch.equal(after[key], t), f"{name}: {key}"
        trainer = json.loads((root / name / "config.json").read_text())["trainer"]
        assert json.loads((tmp_path / name / "config.json").read_text())["trainer"] == trainer, name
        # A fresh export of ours writes exactly the keys dictionary_learning's trainer writes, in its order.
        assert list(to_dictionary_learning(sae, {})[1]["trainer"]) == out[name]["keys"], name


def test_unsupported_dictionary_classes_are_refused(
    saved_by_dl: tuple[Path, dict[str, Any], torch.Tensor], tmp_path: Path
):
    root, _, _ = saved_by_dl
    with pytest.raises(UserError) as info:
        read_dictionary_learning(root / "GatedAutoEncoder")
    message = str(info.value)
    assert "GatedAutoEncoder" in message and "\n" not in message
    assert all(name in message for name in CLASSES)
    config = json.loads((root / "AutoEncoder" / "config.json").read_text())
    config["trainer"]["dict_class"] = "AutoEncoderNew"
    (tmp_path / "ae.pt").write_bytes((root / "AutoEncoder" / "ae.pt").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="AutoEncoderNew"):
        read_dictionary_learning(tmp_path)


# ---------------------------------------------------------------------------- without the peer


class _NotATensor:
    pass


def _edit_tensors(change):
    def apply(d: Path) -> None:
        tensors = torch.load(d / "ae.pt", weights_only=True)
        change(tensors)
        torch.save(tensors, d / "ae.pt")

    return apply


def _edit_trainer(**changes):
    def apply(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config["trainer"].update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return apply


def _set(name: str, value: torch.Tensor):
    return _edit_tensors(lambda t: t.__setitem__(name, value))


def _both(first, second):
    return lambda d: (first(d), second(d))


BROKEN = {
    "missing ae.pt": (lambda d: (d / "ae.pt").unlink(), "missing"),
    "truncated ae.pt": (
        lambda d: (d / "ae.pt").write_bytes((d / "ae.pt").read_bytes()[:300]),
        "not a readable",
    ),
    "garbage ae.pt": (lambda d: (d / "ae.pt").write_bytes(b"not a zip"), "not a readable"),
    "pickled object": (lambda d: torch.save({"obj": _NotATensor()}, d / "ae.pt"), "not a readable"),
    "list, not a dict": (lambda d: torch.save([torch.zeros(1)], d / "ae.pt"), "state dict"),
    "missing config": (lambda d: (d / "config.json").unlink(), "missing config.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
    "no trainer block": (lambda d: (d / "config.json").write_text('{"buffer": {}}'), "'trainer'"),
    "no dict_class": (_edit_trainer(dict_class=None), "not supported"),
    "missing tensor": (_edit_tensors(lambda t: t.pop("b_dec")), "missing ['b_dec']"),
    "extra tensor": (_set("W_enc", torch.zeros(D_IN, D_SAE)), "unexpected ['W_enc']"),
    "decoder not transposed": (
        _edit_tensors(lambda t: t.update({"decoder.weight": t["decoder.weight"].T})),
        "shape",
    ),
    "wrong bias size": (_set("encoder.bias", torch.zeros(D_SAE + 1)), "shape"),
    "NaN": (_set("encoder.bias", torch.full((D_SAE,), float("nan"))), "NaN"),
    "integer weights": (_set("encoder.weight", torch.zeros(D_SAE, D_IN, dtype=torch.int64)), "dtype"),
    "k disagrees": (_edit_trainer(k=K + 1), "k="),
    "k too large": (
        _both(_set("k", torch.tensor(D_SAE + 1, dtype=torch.int32)), _edit_trainer(k=D_SAE + 1)),
        "between 1",
    ),
    "dict_size disagrees": (_edit_trainer(dict_size=D_SAE * 2), "dict_size"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_directories_are_refused(tmp_path: Path, case: str):
    write_dictionary_learning(random_sae("topk", 0.5), META, tmp_path)
    corrupt, fragment = BROKEN[case]
    corrupt(tmp_path)
    with pytest.raises(UserError) as info:
        read_dictionary_learning(tmp_path)
    message = str(info.value)
    assert "\n" not in message and fragment.lower() in message.lower(), message


def test_matryoshka_groups_must_cover_the_dictionary(tmp_path: Path):
    write_dictionary_learning(random_sae("matryoshka", 1.0), META, tmp_path)
    _set("group_sizes", torch.tensor([8, 8], dtype=torch.int64))(tmp_path)
    with pytest.raises(UserError, match="group_sizes"):
        read_dictionary_learning(tmp_path)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_untracked_batch_threshold_is_refused(tmp_path: Path, arch: str):
    """dictionary_learning's BatchTopK classes would keep every positive latent with threshold −1."""
    with pytest.raises(UserError, match="no inference threshold") as info:
        write_dictionary_learning(random_sae(arch, -1.0), META, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_not_a_directory(tmp_path: Path):
    assert not is_dictionary_learning_dir(tmp_path)
    assert not is_dictionary_learning_dir(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no dictionary_learning directory"):
        read_dictionary_learning(tmp_path / "nowhere")


def test_ae_pt_holds_only_tensors_and_keeps_the_dtype(tmp_path: Path):
    sae = random_sae("jumprelu").to(torch.bfloat16)
    write_dictionary_learning(sae, {}, tmp_path)
    tensors = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors.values())
    back, cfg = read_dictionary_learning(tmp_path)
    assert cfg["dtype"] == "bfloat16" and "model_name" not in cfg and "hook_layer" not in cfg
    for name, t in sae.saved_tensors().items():
        assert torch.equal(back.saved_tensors()[name], t), name


def test_a_trained_run_exports_its_settings(tmp_path: Path):
    """`orthosae export --to dictionary_learning` fills the trainer block from the run's cfg.json."""
    from orthosae.cli import main
    from orthosae.sae import load_sae

    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((1024, D_IN)).astype(np.float32))
    flags = [
        "--steps",
        "10",
        "--batch-size",
        "64",
        "--d-sae",
        "32",
        "--k",
        "4",
        "--no-progress",
        "--lr",
        "1e-3",
    ]
    site = ["--model-name", MODEL, "--hook-name", f"blocks.{LAYER}.hook_resid_post"]
    assert main(["train", "--activations", str(acts), *flags, *site, "--out", str(tmp_path / "run")]) == 0
    sae, cfg = load_sae(tmp_path / "run")
    to = ["export", str(tmp_path / "run"), str(tmp_path / "dl"), "--to", "dictionary_learning"]
    assert main(to) == 0
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert (trainer["lm_name"], trainer["layer"], trainer["submodule_name"]) == (
        MODEL,
        LAYER,
        cfg["hook_name"],
    )
    assert (trainer["lr"], trainer["steps"], trainer["seed"], trainer["k"]) == (1e-3, 10, 0, 4)
    assert trainer["warmup_steps"] == 1 and trainer["decay_start"] == 8  # 10 // 10 and 0.8 · 10
    back, info = read_dictionary_learning(tmp_path / "dl")
    assert (info["model_name"], info["hook_layer"], info["hook_name"]) == (MODEL, LAYER, cfg["hook_name"])
    x = _inputs()
    for key, value in ours(sae, x).items():
        assert torch.equal(ours(back, x)[key], value), key


def test_orthosae_eval_scores_a_dictionary_learning_sae(cli, tmp_path: Path):
    """`orthosae eval` on an ae.pt + config.json directory: model and layer from lm_name and layer."""
    from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl

    model_dir = save_tiny_model(tmp_path / "model", "llama", n_layers=3)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", SAMPLE_TEXTS)
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    write_dictionary_learning(sae, {"model_name": str(model_dir), "hook_layer": 1}, tmp_path / "dl")
    toml = tmp_path / "eval.toml"
    toml.write_text(
        f'[core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        "n_eval_reconstruction_batches = 1\nn_eval_sparsity_variance_batches = 2\n"
    )
    out = tmp_path / "eval.json"
    r = cli("eval", tmp_path / "dl", "--evals", "core", "--config", toml, "--out", out, "--no-progress")
    assert r.code == 0, r.err
    core = json.loads(out.read_text())["core evaluation results"]
    assert core["metrics"]["sparsity"]["l0"] == pytest.approx(4.0)
    assert core["sae_cfg_dict"]["model_name"] == str(model_dir) and core["sae_cfg_dict"]["hook_layer"] == 1
