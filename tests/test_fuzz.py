"""Property-based fuzzing of the loaders: any input gives a valid object or a one-line UserError, never
another exception, and a damaged SAE file never loads as something else."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orthosae.config import from_dict, load_toml
from orthosae.errors import UserError
from orthosae.sae import TopKSAE, load_sae
from orthosae.sae.io import save_sae
from orthosae.train.config import TrainConfig

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["2M", "1e400", "-1k", "inf", "nan", "topk", "relu", "pairwise", "auto", "", "none"]),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2)
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_letters + "_-", min_size=1, max_size=12))
configs = st.dictionaries(keys, values, max_size=8)


def test_infinite_count_is_a_user_error():
    with pytest.raises(UserError):
        from_dict(TrainConfig, {"activations": "a.npy", "steps": "1e400"})


def _one_line(e: UserError) -> None:
    assert "\n" not in str(e) and str(e)


@SETTINGS
@given(data=configs)
def test_config_dicts(data: dict):
    try:
        cfg = from_dict(TrainConfig, {"activations": "a.npy", **data})
    except UserError as e:
        _one_line(e)
    else:
        assert isinstance(cfg, TrainConfig)


@SETTINGS
@given(data=configs)
def test_config_toml_files(tmp_path_factory: pytest.TempPathFactory, data: dict):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    try:
        path.write_text(tomli_w.dumps(data))
    except (TypeError, ValueError):
        assume(False)  # not representable in TOML (e.g. NaN keys): not an input a user can write
    try:
        load_toml(TrainConfig, path)
    except UserError as e:
        _one_line(e)


@SETTINGS
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_random_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_bytes(raw)
    try:
        load_toml(TrainConfig, path)
    except UserError as e:
        _one_line(e)


# --- the SAE loader ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], bytes, bytes]:
    sae = TopKSAE(6, 10, 3, generator=torch.Generator().manual_seed(0))
    out = save_sae(sae, tmp_path_factory.mktemp("sae") / "run", {"training": {"steps": 5}})
    weights, cfg = (out / "sae_weights.safetensors").read_bytes(), (out / "cfg.json").read_bytes()
    return out, {k: v.clone() for k, v in sae.state_dict().items()}, weights, cfg


def _data_start(weights: bytes) -> int:
    return 8 + int.from_bytes(weights[:8], "little")  # safetensors: u64 header length, JSON header, data


corruptions = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
)


def _corrupt(raw: bytes, op: tuple[str, int, int]) -> tuple[bytes, int]:
    kind, pos, byte = op
    if not raw:
        return raw, 0
    pos %= len(raw)
    if kind == "flip":
        return raw[:pos] + bytes([raw[pos] ^ byte]) + raw[pos + 1 :], pos
    if kind == "truncate":
        return raw[:pos], pos
    return raw[:pos] + bytes([byte]) + raw[pos:], pos


@SETTINGS
@given(ops=st.lists(st.tuples(st.sampled_from(["weights", "cfg"]), corruptions), min_size=1, max_size=3))
def test_corrupted_sae_files(tmp_path_factory: pytest.TempPathFactory, saved, ops):
    _, original, weights, cfg = saved
    run = tmp_path_factory.mktemp("bad")
    files = {"weights": weights, "cfg": cfg}
    for which, op in ops:
        files[which], _ = _corrupt(files[which], op)
    (run / "sae_weights.safetensors").write_bytes(files["weights"])
    (run / "cfg.json").write_bytes(files["cfg"])
    try:
        sae, cfg_out = load_sae(run)
    except UserError as e:
        _one_line(e)
        return
    loaded = sae.state_dict()
    assert set(loaded) == set(original)
    for name, t in loaded.items():
        assert t.shape == original[name].shape and t.dtype == original[name].dtype
        assert torch.isfinite(t).all()
    # cfg.json carries the weights' sha256, so changed weights may only load if the checksum went too.
    if files["weights"] != weights:
        assert cfg_out.get("weights_sha256") is None
    if files["weights"] == weights:
        # Only cfg.json changed and still loads: the weights must be exactly the saved ones.
        for name, t in loaded.items():
            assert torch.equal(t, original[name]), name
    json.dumps(cfg_out)


def test_a_flipped_weight_bit_is_detected(saved, tmp_path: Path):
    _, _, weights, cfg = saved
    raw = bytearray(weights)
    raw[_data_start(weights) + 5] ^= 0x01
    (tmp_path / "sae_weights.safetensors").write_bytes(bytes(raw))
    (tmp_path / "cfg.json").write_bytes(cfg)
    with pytest.raises(UserError):
        load_sae(tmp_path)
