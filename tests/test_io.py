"""Strict save/load: round trip, and every mismatch refused with a one-line UserError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orthosae.errors import UserError
from orthosae.sae import BatchTopKSAE, ReLUSAE, TopKSAE, load_sae, save_sae
from orthosae.sae.io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

W = WEIGHTS_NAME


def _saved(tmp_path: Path, arch: str = "topk") -> Path:
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(8, 32, 4, generator=gen) if arch == "topk" else ReLUSAE(8, 32, generator=gen)
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "run", {"hook_name": "blocks.3.hook_resid_post", "hook_layer": 3})
    return tmp_path / "run"


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_round_trip_is_exact(tmp_path: Path, arch: str):
    run = _saved(tmp_path, arch)
    sae, cfg = load_sae(run)
    tensors = load_file(run / W)
    for name, t in tensors.items():
        assert torch.equal(getattr(sae, name), t)
    assert cfg["hook_layer"] == 3 and cfg["d_in"] == 8 and cfg["d_sae"] == 32
    # SAELens layout and names: TopK's threshold is no tensor (SAELens's TopKSAE refuses one)
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert tensors["W_enc"].shape == (8, 32) and tensors["W_dec"].shape == (32, 8)
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard"}[arch]
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    x = torch.randn(3, 8)
    again, _ = load_sae(run / W)
    assert torch.equal(again.reconstruct(x), sae.reconstruct(x))


def _edit_cfg(run: Path, **changes) -> None:
    cfg = json.loads((run / "cfg.json").read_text())
    cfg.update(changes)
    (run / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"d_sae": 64}, "shape"),
        ({"d_in": 9}, "shape"),
        ({"arch": "relu"}, "but 'architecture' says 'topk'"),
        ({"inference_threshold": "high"}, "'inference_threshold' must be a finite number"),
        ({"arch": "gated"}, "'arch' must be one of"),
        ({"k": 0}, "'k' must be a positive integer"),
        ({"k": 99}, "larger than d_sae"),
        ({"dtype": "float16"}, "is float32 but cfg.json says float16"),
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"d_in": "8"}, "positive integer"),
    ],
)
def test_cfg_mismatch_is_refused(tmp_path: Path, change: dict, fragment: str):
    run = _saved(tmp_path)
    _edit_cfg(run, **change)
    with pytest.raises(UserError, match=None) as e:
        load_sae(run)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _without_checksum(run: Path) -> None:
    """As for a file written by another tool: the parser, not the checksum, must catch the damage."""
    cfg = json.loads((run / "cfg.json").read_text())
    del cfg["weights_sha256"]
    (run / "cfg.json").write_text(json.dumps(cfg))


def test_checksum_catches_a_flipped_bit(tmp_path: Path):
    run = _saved(tmp_path)
    blob = bytearray((run / W).read_bytes())
    blob[-3] ^= 0x04  # inside the tensor data: still a valid, finite file
    (run / W).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="does not match the sha256"):
        load_sae(run)
    _without_checksum(run)
    load_sae(run)  # without the checksum the damage is invisible, which is why it is recorded


def test_truncated_weights(tmp_path: Path):
    run = _saved(tmp_path)
    _without_checksum(run)
    blob = (run / W).read_bytes()
    (run / W).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_sae(run)


def test_garbage_weights(tmp_path: Path):
    run = _saved(tmp_path)
    _without_checksum(run)
    (run / W).write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_sae(run)


def test_missing_and_malformed_cfg(tmp_path: Path):
    run = _saved(tmp_path)
    (run / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(run)
    (run / "cfg.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        load_sae(run)
    (run / "cfg.json").unlink()
    with pytest.raises(UserError, match="missing cfg.json"):
        load_sae(run)


def test_missing_paths(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(UserError, match="no sae_weights.safetensors"):
        load_sae(tmp_path)


def test_wrong_tensor_dtype_and_nan(tmp_path: Path):
    run = _saved(tmp_path)
    _without_checksum(run)
    tensors = load_file(run / W)
    save_file({**tensors, "W_dec": tensors["W_dec"].half()}, run / W)
    with pytest.raises(UserError, match="'W_dec' is float16"):
        load_sae(run)
    bad = tensors["W_enc"].clone()
    bad[0, 0] = float("nan")
    save_file({**tensors, "W_enc": bad}, run / W)
    with pytest.raises(UserError, match="NaN"):
        load_sae(run)


def test_save_refuses_non_finite_and_keeps_previous_file(tmp_path: Path):
    run = _saved(tmp_path)
    before = (run / W).read_bytes()
    sae, _ = load_sae(run)
    with torch.no_grad():
        sae.W_dec[0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN or inf"):
        save_sae(sae, run)
    assert (run / W).read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_topk_and_batchtopk_thresholds_round_trip_exactly(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    for sae in (TopKSAE(8, 32, 4, generator=gen), BatchTopKSAE(8, 32, 4, generator=gen)):
        sae.threshold.fill_(0.1234567)
        save_sae(sae, tmp_path / sae.arch)
        again, _ = load_sae(tmp_path / sae.arch)
        assert torch.equal(again.threshold, sae.threshold)
    # BatchTopK is saved as SAELens's JumpReLU: the one threshold, once per latent
    assert load_file(tmp_path / "batchtopk" / W)["threshold"].shape == (32,)


def test_batchtopk_refuses_per_latent_thresholds_that_differ(tmp_path: Path):
    save_sae(BatchTopKSAE(8, 32, 4), tmp_path / "b")
    _without_checksum(tmp_path / "b")
    tensors = load_file(tmp_path / "b" / W)
    save_file({**tensors, "threshold": torch.linspace(0, 1, 32)}, tmp_path / "b" / W)
    with pytest.raises(UserError, match="per-latent thresholds differ; load it as a jumprelu"):
        load_sae(tmp_path / "b")


def test_pre_0_2_run_directories_still_load(tmp_path: Path):
    """The old layout: sae.safetensors, thresholds as scalar tensors, activation_fn_str keys, no metadata."""
    gen = torch.Generator().manual_seed(0)
    for sae in (TopKSAE(8, 32, 4, generator=gen), BatchTopKSAE(8, 32, 4, generator=gen)):
        run = tmp_path / sae.arch
        run.mkdir()
        sae.threshold.fill_(0.25)
        tensors = {n: getattr(sae, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        save_file({**tensors, "threshold": sae.threshold.clone()}, run / LEGACY_WEIGHTS_NAME)
        old = {"arch": sae.arch, "d_in": 8, "d_sae": 32, "k": 4, "architecture": sae.arch, "dtype": "float32"}
        old |= {"activation_fn_str": "relu", "hook_name": None, "model_name": "m", "hook_layer": 1}
        (run / "cfg.json").write_text(json.dumps(old))
        again, cfg = load_sae(run)
        assert float(again.threshold) == 0.25 and cfg["model_name"] == "m"
        x = torch.randn(5, 8)
        assert torch.equal(again.encode(x), sae.encode(x))
