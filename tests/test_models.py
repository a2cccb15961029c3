"""Block location and the truncated forward on tiny random models of six families; model-name resolution."""

from __future__ import annotations

import pytest
import torch

from conftest_models import FAMILIES, save_tiny_model, tiny_model
from orthosae.activations.harvest import resid_post
from orthosae.errors import UserError
from orthosae.models import find_blocks, load_model
from orthosae.models.blocks import check_layer

N_LAYERS = 3


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        obj: object = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    raise AssertionError("no final norm found")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor]:
    model = tiny_model(request.param, N_LAYERS)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    return request.param, model, ids


def test_find_blocks_matches_config(family_model: tuple[str, torch.nn.Module, torch.Tensor]) -> None:
    _, model, _ = family_model
    assert len(find_blocks(model)) == N_LAYERS


def test_truncated_equals_hidden_states(family_model: tuple[str, torch.nn.Module, torch.Tensor]) -> None:
    family, model, ids = family_model
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS - 1):
        got = resid_post(model, ids, layer)
        torch.testing.assert_close(got, hidden[layer + 1], atol=1e-5, rtol=0, msg=f"{family} layer {layer}")


def test_last_layer_is_block_output_not_final_norm(
    family_model: tuple[str, torch.nn.Module, torch.Tensor],
) -> None:
    # transformers puts norm(block output) in hidden_states[-1]; we return the raw block output.
    _, model, ids = family_model
    last = N_LAYERS - 1
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    got = resid_post(model, ids, last)
    with torch.no_grad():
        normed = _final_norm(model)(got)
    torch.testing.assert_close(normed, hidden[-1], atol=1e-5, rtol=0)
    assert not torch.allclose(got, hidden[-1], atol=1e-3)
    assert torch.equal(resid_post(model, ids, -1), got)


def test_later_blocks_and_head_never_run(family_model: tuple[str, torch.nn.Module, torch.Tensor]) -> None:
    _, model, ids = family_model
    calls: list[int] = []
    blocks = find_blocks(model)
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    head = model.get_output_embeddings()
    handles.append(head.register_forward_pre_hook(lambda *_a: calls.append(-1)))
    try:
        resid_post(model, ids, 0)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]
    # The hook is removed afterwards: a normal forward runs everything.
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_layer_out_of_range() -> None:
    with pytest.raises(UserError, match=r"layers 0\.\.2"):
        check_layer(3, 3)
    with pytest.raises(UserError, match="out of range"):
        resid_post(tiny_model("llama", 2), torch.zeros(1, 4, dtype=torch.long), 5)
    assert check_layer(-1, 3) == 2


def test_load_local_dir(tmp_path) -> None:
    directory = save_tiny_model(tmp_path / "m", "gpt_neox", n_layers=2)
    loaded = load_model(str(directory))
    assert (loaded.n_layers, loaded.d_model, loaded.family) == (2, 32, "gpt_neox")
    assert loaded.revision.startswith("dir-sha256:")
    assert loaded.model_id == str(directory.resolve())
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_unknown_name_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes the hub lookup fail at once instead of retrying the network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not bundled.*not a local directory.*hub"):
        load_model("no-such-org/no-such-model-xyz")


def test_file_instead_of_dir(tmp_path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="not a model directory"):
        load_model(str(f))


def test_bad_dtype() -> None:
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="float8")
