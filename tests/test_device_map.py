"""--model-device-map: parsing, refusal under torchrun, the input-device rule, and that a model loaded through
transformers' device_map (and dispatched with accelerate's hooks) harvests and evaluates exactly as the
plain load. No GPU here: the maps used put every module on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error
from orthosae.activations.harvest import harvest, resid_post
from orthosae.activations.source import stream_activations
from orthosae.data.pack import iter_contexts
from orthosae.data.texts import iter_texts
from orthosae.errors import UserError
from orthosae.eval import core
from orthosae.eval.context import EvalContext
from orthosae.eval.prompt_acts import acts_at_positions
from orthosae.models.loader import LoadedModel, load_model
from orthosae.models.placement import check_single_process, input_device, parse_device_map
from orthosae.sae import TopKSAE, save_sae

LAYER = 1

# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", None),
        ("", None),
        ("auto", "auto"),
        ("balanced", "balanced"),
        ("balanced_low_0", "balanced_low_0"),
        ("sequential", "sequential"),
        ("cpu", "cpu"),
        ("cuda:1", "cuda:1"),
        ('{"": "cpu"}', {"": "cpu"}),
        ('{"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"}',
         {"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"}),
    ],
)  # fmt: skip
def test_parse_accepts(text: str, expected: Any) -> None:
    assert parse_device_map(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus", "not a strategy or a device"),
        ("Auto", "not a strategy or a device"),
        ('{"a": ', "not valid json"),
        ("[0, 1]", "not a strategy or a device"),
        ("{}", "empty json object"),
        ('{"a": -1}', "gpu index is ≥ 0"),
        ('{"a": "disk"}', "not supported"),
        ('{"a": "meta"}', "not supported"),
        ('{"a": true}', "not a gpu index"),
        ('{"a": [0]}', "not a gpu index"),
        ('{"a": "gpu7"}', "not a strategy or a device"),
    ],
)
def test_parse_refuses_with_one_line(text: str, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        parse_device_map(text)
    message = str(err.value)
    assert "\n" not in message and fragment in message.lower(), message


def test_refused_under_torchrun_only() -> None:
    check_single_process(None, 2)
    check_single_process("auto", 1)
    with pytest.raises(UserError, match="drop torchrun"):
        check_single_process("auto", 2)


def test_a_gpu_that_is_not_there_is_a_user_error(model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="0 GPU"):
        load_model(str(model_dir), device_map='{"model.layers": 0, "lm_head": "cpu"}')


# ----------------------------------------------------------------- the CLI


def _cache_args(model_dir: Path, corpus: Path, out: Path) -> list[Any]:
    common = ["--layer", LAYER, "--tokens", 200, "--context-size", 32, "--corpus", corpus, "--no-progress"]
    return ["cache", "--model", model_dir, *common, "--out", out]


def _args(command: str, model_dir: Path, corpus: Path, tmp_path: Path) -> list[Any]:
    """`command`'s arguments, writing under tmp_path/c (cache) or tmp_path/r (train), or evaluating
    tmp_path/run."""
    run = tmp_path / "run"
    save_sae(TopKSAE(32, 64, 4), run, {"model_name": str(model_dir), "hook_layer": LAYER})
    return {
        "cache": _cache_args(model_dir, corpus, tmp_path / "c"),
        "train": ["train", "--model", model_dir, "--layer", LAYER, "--out", tmp_path / "r"],
        "eval": ["eval", run, "--evals", "core"],
    }[command]


@pytest.mark.parametrize("command", ["cache", "train", "eval"])
def test_bad_value_is_one_line_error_in_every_command(
    cli, command: str, model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    r = cli(*_args(command, model_dir, corpus, tmp_path), "--model-device-map", "{bad")
    assert_one_line_error(r, "--model-device-map", "not valid json")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_train_needs_model_for_a_device_map(cli, acts_file: Path, tmp_path: Path) -> None:
    r = cli("train", "--activations", acts_file, "--model-device-map", "auto", "--out", tmp_path / "r")
    assert_one_line_error(r, "--model-device-map", "needs --model")


@pytest.mark.parametrize("command", ["cache", "train", "eval"])
def test_refused_under_torchrun(
    cli, command: str, model_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(command, model_dir, corpus, tmp_path)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    r = cli(*args, "--model-device-map", "auto")
    assert_one_line_error(r, "--model-device-map", "drop torchrun")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


# ----------------------------------------------------------------- where the token ids go


class _Hook:
    def __init__(self, device: str) -> None:
        self.execution_device = device


class _Stub(nn.Module):
    """A model whose input embedding is offloaded (weights on meta) and runs where its hook says."""

    def __init__(self, hook: object | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2, device="meta")
        self.head = nn.Linear(2, 2)
        if hook is not None:
            self.embed._hf_hook = hook  # pyright: ignore[reportAttributeAccessIssue]

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


class _Sequential:
    def __init__(self, *hooks: object) -> None:
        self.hooks = list(hooks)


def test_input_device_is_the_embedding_hooks_execution_device() -> None:
    assert input_device(_Stub(_Hook("cuda:1"))) == torch.device("cuda", 1)
    assert input_device(_Stub(_Sequential(object(), _Hook("cuda:2")))) == torch.device("cuda", 2)


def test_input_device_without_hooks_is_the_embedding_weights() -> None:
    assert input_device(_Stub(None)) == torch.device("meta")  # not the first parameter's: the head is on cpu
    bare = nn.Sequential(nn.Linear(2, 2))  # no get_input_embeddings: the first parameter's device
    assert input_device(bare) == torch.device("cpu")


# ----------------------------------------------------------------- the real loading path, on the CPU


def _hooked(model_dir: Path) -> LoadedModel:
    """Loaded with a device map, then dispatched by accelerate with hooks on every module (force_hooks: the
    hooks a multi-GPU map attaches, here with every execution device the CPU)."""
    from accelerate import dispatch_model

    loaded = load_model(str(model_dir), device_map={"": "cpu"})
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    names += [f"model.layers.{i}" for i in range(loaded.n_layers)]
    dispatch_model(loaded.model, device_map=dict.fromkeys(names, "cpu"), force_hooks=True)
    assert hasattr(loaded.model.get_input_embeddings(), "_hf_hook")
    return loaded


@pytest.fixture(scope="module")
def models(model_dir: Path) -> dict[str, LoadedModel]:
    plain = load_model(str(model_dir))
    return {
        "plain": plain,
        "auto": load_model(str(model_dir), device_map="auto"),
        "cpu": load_model(str(model_dir), device_map="cpu"),
        "hooked": _hooked(model_dir),
    }


def _acts(loaded: LoadedModel, corpus: Path) -> torch.Tensor:
    texts = iter_texts(str(corpus))
    batches = list(iter_contexts(texts, loaded.tokenizer, context_size=32, batch_contexts=4))[:3]
    return torch.cat([h.acts for h in harvest(loaded, LAYER, batches, remove_high_norm=10.0)])


@pytest.mark.parametrize("name", ["auto", "cpu", "hooked"])
def test_harvest_equals_the_plain_load(models: dict[str, LoadedModel], corpus: Path, name: str) -> None:
    ref, got = _acts(models["plain"], corpus), _acts(models[name], corpus)
    assert got.shape == ref.shape and len(ref) > 0
    assert torch.equal(got, ref)
    assert input_device(models[name].model) == torch.device("cpu")


def test_prompt_acts_and_last_block_equal_the_plain_load(models: dict[str, LoadedModel]) -> None:
    seqs = [[256, 5, 6, 7], [256, 9, 10], [256, 1, 2, 3, 4, 5]]
    ref = acts_at_positions(models["plain"], LAYER, seqs, -1)
    assert torch.equal(acts_at_positions(models["hooked"], LAYER, seqs, -1), ref)
    ids = torch.tensor([seqs[0]])
    last = models["plain"].n_layers - 1
    assert torch.equal(
        resid_post(models["hooked"].model, ids, last), resid_post(models["plain"].model, ids, last)
    )


def test_stream_with_a_device_map_equals_the_plain_stream(model_dir: Path, corpus: Path) -> None:
    kw: dict[str, Any] = dict(context_size=32, batch_size=64, n_tokens=400, progress=False)
    plain = stream_activations(str(model_dir), LAYER, str(corpus), **kw)
    mapped = stream_activations(str(model_dir), LAYER, str(corpus), model_device_map="auto", **kw)
    for _ in range(3):
        assert torch.equal(next(mapped), next(plain))


def _numbers(tree: Any, path: str = "") -> dict[str, float]:
    """Every number of a results tree except timings, by path."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for k, v in tree.items():
            if not (k.endswith("_s") or "time" in k):
                out |= _numbers(v, f"{path}/{k}")
        return out
    if isinstance(tree, list):
        return {p: x for i, v in enumerate(tree) for p, x in _numbers(v, f"{path}/{i}").items()}
    return {path: tree} if isinstance(tree, int | float) and not isinstance(tree, bool) else {}


def test_core_eval_with_accelerate_hooks_equals_the_plain_load(
    models: dict[str, LoadedModel], corpus: Path
) -> None:
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    cfg = core.Config(
        dataset=str(corpus),
        context_size=32,
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=3,
    )
    got = {}
    for name in ("plain", "hooked"):
        ctx = EvalContext(sae, {}, "tiny", LAYER, progress=False, _model=models[name])
        got[name] = _numbers(core.evaluate(ctx, cfg)["metrics"])
    assert len(got["plain"]) > 20 and got["hooked"] == got["plain"]


def test_eval_cli_with_a_device_map_equals_the_plain_load(
    cli, model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    source = {"corpus": str(corpus.resolve()), "n_tokens": 200, "context_size": 32}
    save_sae(sae, run, {"model_name": str(model_dir), "hook_layer": LAYER, "activations_source": source})
    toml = tmp_path / "eval.toml"
    toml.write_text(
        f'[core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        "n_eval_reconstruction_batches = 1\nn_eval_sparsity_variance_batches = 2\n"
    )
    got = {}
    for name, extra in (("plain", []), ("mapped", ["--model-device-map", '{"": "cpu"}'])):
        out = tmp_path / f"{name}.json"
        r = cli("eval", run, "--evals", "core", "--config", toml, "--out", out, "--no-progress", *extra)
        assert r.code == 0, r.err
        got[name] = _numbers(json.loads(out.read_text()))
    assert len(got["plain"]) > 20 and got["mapped"] == got["plain"]


def test_cache_and_train_cli_take_a_device_map(cli, model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    r = cli(*_cache_args(model_dir, corpus, tmp_path / "c"), "--model-device-map", "auto")
    assert r.code == 0, r.err
    out = tmp_path / "r"
    r = cli("train", "--model", model_dir, "--layer", LAYER, "--corpus", corpus, "--context-size", 32,
            "--steps", 2, "--batch-size", 64, "--d-sae", 64, "--k", 4, "--out", out, "--no-progress",
            "--no-tensorboard", "--model-device-map", "auto")  # fmt: skip
    assert r.code == 0, r.err
    assert 'model_device_map = "auto"' in (out / "config.toml").read_text()
