"""SAEBench 0.6.0's own result files from our results: the layout, the mapping, `orthosae eval` writing them,
and SAEBench's real readers and output classes (the peer venv) reading them.

Directory names below avoid 'scr', 'tpp', 'core', 'absorption', … : SAEBench's get_eval_results picks the
metric group by the first eval name found anywhere in a file's path.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_one_line_error
from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.cli import main
from orthosae.errors import UserError
from orthosae.eval import sparse_probing
from orthosae.eval.absorption_calc import headline
from orthosae.eval.datasets import DATASETS, LabelledTexts
from orthosae.eval.results import SECTION_KEYS
from orthosae.eval.saebench_files import (
    NOTES_KEY,
    SPECS,
    file_name,
    saebench_files,
    write_saebench_files,
)
from orthosae.sae import TopKSAE, save_sae
from saebench_peer import MAIN_PY_STUBS, run_saebench

# BaseEvalOutput's fields, in its order (evals/base_eval_output.py).
BASE_KEYS = [
    "eval_type_id",
    "eval_config",
    "eval_id",
    "datetime_epoch_millis",
    "eval_result_metrics",
    "eval_result_details",
    "sae_bench_commit_hash",
    "sae_lens_id",
    "sae_lens_release_id",
    "sae_lens_version",
    "sae_cfg_dict",
    "eval_result_unstructured",
]
SAE_ID = "lam0.1"
NAME = "org_tiny-lm_layer_3_sae_lam0.1_eval_results.json"


def _cfg_dict() -> dict[str, Any]:
    return {"model_name": "org/tiny-lm", "d_in": 32, "d_sae": 4096, "hook_layer": 3, "architecture": "topk"}


def _envelope(eval_type_id: str, millis: int) -> dict[str, Any]:
    return {
        "eval_type_id": eval_type_id,
        "eval_id": f"id-{eval_type_id}",
        "datetime_epoch_millis": millis,
        "orthosae_version": "0.0.test",
        "sae_cfg_dict": _cfg_dict(),
        "eval_wall_time_s": 1.5,
    }


def _core_groups(scale: float) -> dict[str, Any]:
    return {
        "model_behavior_preservation": {"kl_div_score": 0.9 * scale, "kl_div_score_ci95": [0.8, 1.0]},
        "model_performance_preservation": {
            "ce_loss_score": 0.8 * scale,
            "ce_loss_with_ablation": 9.0,
            "ce_loss_with_sae": 3.5,
            "ce_loss_without_sae": 3.0,
        },
        "reconstruction_quality": {
            "explained_variance": 0.5 * scale,
            "explained_variance_ci95": [0.4, 0.6],
            "explained_variance_legacy": 0.45 * scale,
            "explained_variance_saebench": 0.7 * scale,
            "explained_variance_saebench_ci95": [0.65, 0.75],
            "mse": 2.0,
            "cossim": 0.9,
            "mse_per_element": 0.0625,
            "formulas": {"mse": "mean_t sum_i ..."},
        },
        "shrinkage": {
            "l2_norm_in": 10.0,
            "l2_norm_out": 9.0,
            "l2_ratio": 0.9,
            "relative_reconstruction_bias": 1.0,
        },
        "sparsity": {"l0": 40.0 * scale, "l1": 50.0, "formulas": {"l0": "mean_t #..."}},
        "misc": {
            "frac_alive": 0.9,
            "frac_dead": 0.1,
            "freq_over_1_percent": 0.2,
            "freq_over_10_percent": 0.01,
        },
        "orthogonality": {"mean_cos2_coactive_pairs": 0.01},
    }


def _results() -> dict[str, Any]:
    """A small eval.json dict: every section as our evals write it (core: metrics + metrics.all_tokens)."""
    core = {
        "unique_id": "org/tiny-lm_layer_3_sae_lam0.1",
        "sae_set": "org/tiny-lm_layer_3_sae",
        "sae_id": SAE_ID,
        "eval_cfg": {
            "model_name": "org/tiny-lm",
            "dataset": "bundled",
            "context_size": 128,
            "compute_kl": True,
        },
        "metrics": _core_groups(1.0)
        | {
            "token_stats": {
                "total_tokens_eval_reconstruction": 900,
                "total_tokens_eval_sparsity_variance": 1000,
                "n_excluded_high_norm": 3,
            },
            "all_tokens": _core_groups(0.5)
            | {
                "token_stats": {
                    "total_tokens_eval_reconstruction": 950,
                    "total_tokens_eval_sparsity_variance": 1003,
                }
            },
        },
    } | _envelope("core", 1_700_000_000_000)
    rows = [
        {
            "first_letter": c,
            "mean_absorption_fraction": f,
            "full_absorption_rate": f / 2,
            "num_full_absorption": n,
            "num_probe_true_positives": 10,
            "num_split_features": n + 1,
        }
        for c, f, n in (("a", 0.1, 1), ("b", 0.3, 2), ("c", 0.2, 0))
    ]
    absorption = {
        "eval_config": {
            "model_name": "org/tiny-lm",
            "random_seed": 42,
            "max_words": None,
            "llm_batch_size": 16,
        },
        "eval_result_metrics": {
            "mean": headline(rows)
            | {
                "mean_absorption_fraction_score_ci95": [0.1, 0.3],
                "mean_full_absorption_score_ci95": [0.05, 0.15],
            }
        },
        "eval_result_details": rows,
        "eval_result_unstructured": {"departures_from_saebench": ["max_words=200"]},
    } | _envelope("absorption_first_letter", 1_700_000_000_001)
    probing = {
        "eval_config": {"random_seed": 42, "dataset_names": ["toy"], "k_values": [1, 3], "llm_batch_size": 8},
        "eval_result_metrics": {
            "llm": {
                "llm_test_accuracy": 0.95,
                "llm_top_1_test_accuracy": 0.7,
                "llm_top_3_test_accuracy": 0.8,
            },
            "sae": {
                "sae_test_accuracy": 0.93,
                "sae_top_1_test_accuracy": 0.75,
                "sae_top_1_test_accuracy_ci95": [0.6, 0.9],
                "sae_top_3_test_accuracy": 0.85,
            },
        },
        "eval_result_details": [
            {"dataset_name": "toy_results", "llm_test_accuracy": 0.95, "sae_top_1_test_accuracy": 0.75},
            {"dataset_name": "empty_results", "llm_test_accuracy": None},
        ],
        "eval_result_unstructured": {"toy_results": {"sae_top_1_test_accuracy": {"a": 0.75}}},
    } | _envelope("sparse_probing", 1_700_000_000_002)
    unlearning = {
        "eval_config": {
            "random_seed": 42,
            "multipliers": [25.0, 50.5],
            "dataset_size": None,
            "seq_len": 128,
            "protocol": "cloze",
        },
        "eval_result_metrics": {
            "unlearning": {"unlearning_score": 0.25, "unlearning_score_ci95": [0.1, 0.4]}
        },
        "eval_result_details": [],
        "eval_result_unstructured": {"protocol": "cloze"},
    } | _envelope("unlearning", 1_700_000_000_003)
    return {
        SECTION_KEYS["core"]: core,
        SECTION_KEYS["absorption"]: absorption,
        SECTION_KEYS["sparse_probing"]: probing,
        SECTION_KEYS["unlearning"]: unlearning,
    }


# ----------------------------------------------------------------- the mapping


def test_paths_ids_and_envelope_keys():
    results = _results()
    before = copy.deepcopy(results)
    files = saebench_files(results, SAE_ID)
    assert results == before  # eval.json's dict is not touched
    assert list(files) == [f"{d}/{NAME}" for d in ("core", "absorption", "sparse_probing", "unlearning")]
    assert file_name("a/b", "c/d") == "a_b_c_d_eval_results.json"  # SAEBench's get_results_filepath
    type_ids = {"core": "core", "absorption": "absorption_first_letter", "sparse_probing": "sparse_probing"}
    for (ev, section_key), (rel, content) in zip(SECTION_KEYS.items(), files.items(), strict=True):
        assert content is not None
        assert list(content)[: len(BASE_KEYS)] == BASE_KEYS, rel
        assert list(content)[len(BASE_KEYS) :] == ["orthosae_version", "eval_wall_time_s"]
        assert content["eval_type_id"] == type_ids.get(ev, ev) == SPECS[ev].eval_type_id
        ours = results[section_key]
        assert (content["eval_id"], content["datetime_epoch_millis"]) == (
            ours["eval_id"],
            ours["datetime_epoch_millis"],
        )
        assert (
            content["sae_lens_id"] == SAE_ID and content["sae_lens_release_id"] == "org/tiny-lm_layer_3_sae"
        )
        assert content["sae_bench_commit_hash"] == "Unknown" and content["sae_lens_version"] is None
        assert content["sae_cfg_dict"] == _cfg_dict()


def test_core_file_uses_saebench_groups_tokens_and_formula():
    core = saebench_files(_results(), SAE_ID)[f"core/{NAME}"]
    assert core is not None
    m = core["eval_result_metrics"]
    assert list(m) == [
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
        "token_stats",
        "misc_metrics",
    ]
    # metrics.all_tokens (SAEBench's token convention: scale 0.5 above), SAEBench's EV formula under its name.
    rq = m["reconstruction_quality"]
    assert rq["explained_variance"] == 0.35 and rq["explained_variance_ci95"] == [0.65, 0.75]
    assert (
        "explained_variance_saebench" not in rq and "formulas" not in rq and rq["mse_per_element"] == 0.0625
    )
    assert m["sparsity"]["l0"] == 20.0 and m["token_stats"]["total_tokens_eval_reconstruction"] == 950
    # What we do not compute is SAEBench's -1 placeholder, and said so.
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == -1
    assert (
        m["misc_metrics"]["frac_alive"] == 0.9 and m["misc_metrics"]["average_max_decoder_cosine_sim"] == -1
    )
    notes = core["eval_result_unstructured"][NOTES_KEY]
    assert any("misc_metrics.average_max_decoder_cosine_sim not computed" in n for n in notes)
    assert any("metrics.all_tokens" in n for n in notes)
    assert all(not isinstance(v, dict) for group in m.values() for v in group.values())
    assert core["eval_config"]["dataset"] == "bundled" and core["eval_result_details"] == []

    # Without metrics.all_tokens: the top-level groups.
    results = _results()
    del results[SECTION_KEYS["core"]]["metrics"]["all_tokens"]
    core = saebench_files(results, SAE_ID)[f"core/{NAME}"]
    assert core is not None and core["eval_result_metrics"]["sparsity"]["l0"] == 40.0


def test_other_files_keep_groups_details_and_unstructured():
    files = saebench_files(_results(), SAE_ID)
    absorption, probing, unlearning = (
        files[f"{d}/{NAME}"] for d in ("absorption", "sparse_probing", "unlearning")
    )
    assert absorption is not None and probing is not None and unlearning is not None
    ours = _results()
    assert absorption["eval_result_metrics"] == ours[SECTION_KEYS["absorption"]]["eval_result_metrics"]
    assert absorption["eval_result_details"] == ours[SECTION_KEYS["absorption"]]["eval_result_details"]
    assert absorption["eval_result_unstructured"] == {"departures_from_saebench": ["max_words=200"]}
    sae = probing["eval_result_metrics"]["sae"]
    assert sae["sae_top_1_test_accuracy"] == 0.75 and sae["sae_top_1_test_accuracy_ci95"] == [0.6, 0.9]
    assert sae["sae_top_3_test_accuracy"] == 0.85 and sae["sae_top_100_test_accuracy"] is None
    # A dataset row without SAEBench's required llm_test_accuracy is left out, and said so.
    assert [r["dataset_name"] for r in probing["eval_result_details"]] == ["toy_results"]
    assert any(
        "1 eval_result_details rows left out" in n for n in probing["eval_result_unstructured"][NOTES_KEY]
    )
    # SAEBench's config types: dataset_size is an int and multipliers ints; 25.0 is one, 50.5 is not.
    cfg = unlearning["eval_config"]
    assert "dataset_size" not in cfg and "multipliers" not in cfg and cfg["seq_len"] == 128
    notes = unlearning["eval_result_unstructured"][NOTES_KEY]
    assert any("eval_config.dataset_size=None left out" in n for n in notes)
    assert unlearning["eval_result_metrics"]["unlearning"]["unlearning_score"] == 0.25


def test_null_headline_writes_no_file_and_removes_a_stale_one(tmp_path: Path):
    results = _results()
    stale = tmp_path / "absorption" / NAME
    write_saebench_files(results, tmp_path, SAE_ID)
    assert stale.exists()
    mean = results[SECTION_KEYS["absorption"]]["eval_result_metrics"]["mean"]
    results[SECTION_KEYS["absorption"]]["eval_result_metrics"]["mean"] = dict.fromkeys(mean)
    results[SECTION_KEYS["unlearning"]]["eval_result_metrics"]["unlearning"]["unlearning_score"] = None
    files = saebench_files(results, SAE_ID)
    assert files[f"absorption/{NAME}"] is None and files[f"unlearning/{NAME}"] is None
    written = write_saebench_files(results, tmp_path, SAE_ID)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        f"core/{NAME}",
        f"sparse_probing/{NAME}",
    ]
    assert not stale.exists() and not (tmp_path / "unlearning" / NAME).exists()
    assert json.loads(written[0].read_text()) == files[f"core/{NAME}"]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries


def _broken(change: str) -> tuple[dict[str, Any], str]:
    results = _results()
    core = results[SECTION_KEYS["core"]]
    if change == "metrics":
        core["metrics"] = [1, 2]
    elif change == "eval_id":
        del core["eval_id"]
    elif change == "no_cfg":
        for block in results.values():
            del block["sae_cfg_dict"]
    elif change == "group":
        results[SECTION_KEYS["absorption"]]["eval_result_metrics"]["mean"] = 0.3
    return results, SAE_ID


@pytest.mark.parametrize(
    ("results", "sae_id", "message"),
    [
        ([], SAE_ID, "must be a JSON object"),
        ({}, SAE_ID, "no evaluation with an sae_cfg_dict"),
        (*_broken("metrics"), "core evaluation results.metrics must be a JSON object"),
        (*_broken("eval_id"), "has no eval_id"),
        (*_broken("no_cfg"), "no evaluation with an sae_cfg_dict"),
        (*_broken("group"), "mean must be a JSON object"),
        (_results(), "", "the SAE id is empty"),
        (_results(), " ", "the SAE id is empty"),
    ],
)
def test_bad_input_is_a_one_line_user_error(results: Any, sae_id: str, message: str):
    with pytest.raises(UserError, match=message) as err:
        saebench_files(results, sae_id)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------- `orthosae eval` writes them


def _toy() -> LabelledTexts:
    rng = random.Random(0)
    texts, labels = [], []
    for label, letters in (("a", "abcde"), ("b", "vwxyz")):
        for _ in range(40):
            texts.append(" ".join("".join(rng.choices(letters, k=4)) for _ in range(3)))
            labels.append(label)
    return LabelledTexts("toy", texts, labels)


def _question_sets(root: Path) -> str:
    """Cloze question sets and corpora for unlearning, as [unlearning] TOML lines."""
    rng = random.Random(0)
    lines = []
    for name, template in (("forget", "the {i} colour is"), ("retain", "a shape {i} was")):
        items = [
            {
                "question": template.format(i=i),
                "choices": rng.sample("rbgtpnkm", 4),
                "answer": rng.randrange(4),
            }
            for i in range(60)
        ]
        write_jsonl(root / f"{name}_corpus.jsonl", [x["question"] for x in items])
        (root / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        lines += [
            f'{name}_path = "{root / name}.jsonl"',
            f'{name}_corpus_path = "{root / name}_corpus.jsonl"',
        ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """`orthosae eval` with all four evals on a TopK SAE of a tiny llama: (run dir, eval TOML, stdout).
    Absorption's gate fails on this model (null headline), the other three give numbers."""
    root = tmp_path_factory.mktemp("sbfiles")
    model_dir = save_tiny_model(root / "model", "llama", n_layers=3)
    corpus = write_jsonl(root / "corpus.jsonl", SAMPLE_TEXTS)
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    run = root / "run"
    src = {"corpus": str(corpus), "n_tokens": 200, "context_size": 32}
    save_sae(sae, run, {"model_name": str(model_dir), "hook_layer": 1, "activations_source": src})
    toml = root / "eval.toml"
    toml.write_text(
        f'[core]\ndataset = "{corpus}"\ncontext_size = 32\nbatch_size_prompts = 4\n'
        "n_eval_reconstruction_batches = 1\nn_eval_sparsity_variance_batches = 2\nn_bootstrap = 50\n"
        '[sparse_probing]\ndataset_names = ["toy"]\nprobe_train_set_size = 40\nprobe_test_set_size = 20\n'
        "k_values = [1, 2]\nn_bootstrap = 50\n"
        f"[unlearning]\n{_question_sets(root)}\ndataset_size = 8\nseq_len = 32\nn_questions = 60\n"
        "retain_thresholds = [0.01, 1.1]\nn_features_list = [2]\nmultipliers = [1, 50]\nn_bootstrap = 50\n"
        "[absorption]\nmax_words = 200\nprobe_num_epochs = 2\nk_sparse_probe_num_epochs = 2\n"
        "n_bootstrap = 50\n"
    )
    evals = "core,absorption,sparse_probing,unlearning"
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny-model forwards: a second thread on a busy 2-core machine only waits
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setitem(DATASETS, "toy", _toy)
        mp.setattr(sparse_probing, "load_dataset", lambda name: _toy())
        code = main(["eval", str(run), "--evals", evals, "--config", str(toml), "--no-progress"])
    torch.set_num_threads(threads)
    assert code == 0
    return run, toml, stdout.getvalue()


def test_eval_writes_saebench_files_next_to_eval_json(evaluated):
    run, _, out = evaluated
    results = json.loads((run / "eval.json").read_text())
    name = file_name(f"{results[SECTION_KEYS['core']]['sae_set']}", "run")
    assert f"wrote SAEBench files under {run / 'eval_results'} (core, sparse_probing, unlearning)" in out
    found = sorted(p.relative_to(run / "eval_results").as_posix() for p in (run / "eval_results").rglob("*"))
    assert found == [
        "core",
        f"core/{name}",
        "sparse_probing",
        f"sparse_probing/{name}",
        "unlearning",
        f"unlearning/{name}",
    ]
    assert (
        results[SECTION_KEYS["absorption"]]["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"]
        is None
    )
    probing = json.loads((run / "eval_results" / "sparse_probing" / name).read_text())
    assert probing["eval_result_metrics"] == {
        g: v | {k: v.get(k) for k in SPECS["sparse_probing"].metrics[g]}
        for g, v in results[SECTION_KEYS["sparse_probing"]]["eval_result_metrics"].items()
    }


def test_out_and_saebench_dir_choose_where(evaluated, cli, tmp_path: Path):
    run, toml, _ = evaluated
    out = tmp_path / "x" / "res.json"
    r = cli("eval", run, "--evals", "core", "--config", toml, "--out", out, "--no-progress")
    assert r.code == 0, r.err
    assert [p.parent.name for p in (tmp_path / "x" / "eval_results").rglob("*.json")] == ["core"]
    r = cli("eval", run, "--evals", "core", "--config", toml, "--out", out, "--saebench-dir", tmp_path / "sb")
    assert r.code == 0, r.err
    assert f"wrote SAEBench files under {tmp_path / 'sb'} (core)" in r.out
    assert len(list((tmp_path / "sb" / "core").glob("*_run_eval_results.json"))) == 1
    bad = tmp_path / "file"
    bad.write_text("")
    r = cli("eval", run, "--evals", "core", "--config", toml, "--out", out, "--saebench-dir", bad)
    assert_one_line_error(r, "is a file")


# ----------------------------------------------------------------- SAEBench's own code reads them

PEER = (
    MAIN_PY_STUBS
    + r"""
import ast, dataclasses, json, os, types
from pathlib import Path
from unittest import mock

# graphing_utils imports matplotlib, plotly and seaborn at the top for its plots; the readers called here
# use json and os only, so those packages (not in this venv) are mocks.
for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors", "matplotlib.lines", "plotly",
             "plotly.graph_objects", "seaborn"):
    sys.modules[name] = mock.MagicMock()

import pydantic
import sae_bench
from sae_bench.sae_bench_utils import general_utils, graphing_utils as gu
from sae_bench.evals.core import eval_output as core_out, eval_config as core_cfg
from sae_bench.evals.absorption import eval_output as abs_out, eval_config as abs_cfg
from sae_bench.evals.sparse_probing import eval_output as sp_out, eval_config as sp_cfg
from sae_bench.evals.unlearning import eval_output as un_out, eval_config as un_cfg

root = inputs["root"]
classes = {
    "core": (core_out.CoreEvalOutput, core_out.EVAL_TYPE_ID_CORE, core_cfg.CoreEvalConfig,
             core_out.CoreMetricCategories, None),
    "absorption": (abs_out.AbsorptionEvalOutput, abs_out.EVAL_TYPE_ID_ABSORPTION,
                   abs_cfg.AbsorptionEvalConfig, abs_out.AbsorptionMetricCategories,
                   abs_out.AbsorptionResultDetail),
    "sparse_probing": (sp_out.SparseProbingEvalOutput, sp_out.EVAL_TYPE_ID_SPARSE_PROBING,
                       sp_cfg.SparseProbingEvalConfig, sp_out.SparseProbingMetricCategories,
                       sp_out.SparseProbingResultDetail),
    "unlearning": (un_out.UnlearningEvalOutput, un_out.EVAL_TYPE_ID_UNLEARNING, un_cfg.UnlearningEvalConfig,
                   un_out.UnlearningMetricCategories, None),
}

def kind(tp):
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    if isinstance(tp, types.UnionType):
        return kind(args[0]) + "?"
    if getattr(tp, "__origin__", None) is list:
        return f"list[{kind(args[0])}]"
    return tp.__name__

def required(cls):
    return {n: f.is_required() for n, f in cls.__pydantic_fields__.items()}

# SAEBench's own schema, to compare with the tables of orthosae.eval.saebench_files.
src = Path(sae_bench.__file__).parent / "custom_saes" / "run_all_evals_custom_saes.py"
folders = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(src.read_text()))
               if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "output_folders")
outputs["schema"] = {
    ev: {
        "directory": folders[ev].removeprefix("eval_results/"),
        "eval_type_id": type_id,
        "config": {n: kind(f.annotation) for n, f in cfg.__pydantic_fields__.items()},
        "metrics": {g: required(f.annotation) for g, f in cats.__pydantic_fields__.items()},
        "detail": required(detail) if detail else None,
        "fields": [f.name for f in dataclasses.fields(out)],
    }
    for ev, (out, type_id, cfg, cats, detail) in classes.items()
}

# Each file through its eval's output class (what SAEBench's writers build and its UIs' schemas describe),
# dumped back as SAEBench's to_json does.
files = sorted(gu.find_eval_results_files([root]))
outputs["files"] = files
outputs["validated"] = {}
for path in files:
    ev = Path(path).parent.name
    data = json.loads(Path(path).read_text())
    obj = pydantic.TypeAdapter(classes[ev][0]).validate_python(data)
    classes[ev][0](**data)  # the constructor, as core/convert_directory.py rebuilds a file
    outputs["validated"][path] = json.loads(obj.to_json())
    assert path == general_utils.get_results_filepath(
        os.path.join(root, ev), data["sae_lens_release_id"], data["sae_lens_id"]), path

# The plots' data path (plot_results): per-SAE rows of each eval joined with core's L0 and CE score by
# file name, and the metric SAEBench plots for that eval.
by_eval = {ev: [f for f in files if Path(f).parent.name == ev] for ev in classes}
core_rows = gu.get_core_results(by_eval["core"])
outputs["core_rows"] = core_rows
outputs["rows"] = {}
for ev in ("core", "absorption", "sparse_probing", "unlearning"):
    rows = gu.get_eval_results(by_eval[ev])
    metric, _ = gu.get_custom_metric_key_and_name(ev, 1)
    for sae in rows:
        rows[sae].update(core_rows[sae])
    outputs["rows"][ev] = {
        sae: {"metric": metric, "value": row[metric], "l0": row["l0"], "ce_loss_score": row["ce_loss_score"],
              "sae_class": row["sae_class"], "d_sae": row["d_sae"], "eval_config": row["eval_config"],
              "flat": {k: v for k, v in row.items() if k != "eval_config"}}
        for sae, row in rows.items()
    }
"""
)


def _subset_equal(saebench: Any, ours: Any, where: str) -> None:
    """Every value SAEBench kept (its declared fields) equals ours; defaults it added are None or absent."""
    if isinstance(saebench, dict):
        for key, value in saebench.items():
            if key in ours:
                _subset_equal(value, ours[key], f"{where}.{key}")
            else:
                assert where.endswith("eval_config") or value is None, f"{where}.{key} = {value!r} not ours"
    elif isinstance(saebench, list):
        assert len(saebench) == len(ours), where
        for i, (a, b) in enumerate(zip(saebench, ours, strict=True)):
            _subset_equal(a, b, f"{where}[{i}]")
    else:
        assert saebench == ours, f"{where}: SAEBench {saebench!r}, ours {ours!r}"


def test_saebench_reads_our_files(evaluated, tmp_path_factory: pytest.TempPathFactory):
    run, _, _ = evaluated
    root = tmp_path_factory.mktemp("sbpeer") / "eval_results"
    real = json.loads((run / "eval.json").read_text())
    write_saebench_files(real, root, "run")
    write_saebench_files(_results(), root, SAE_ID)  # a second SAE, with an absorption result
    ours = {str(p): json.loads(p.read_text()) for p in root.rglob("*.json")}
    assert len(ours) == 7
    out = run_saebench(PEER, {"root": str(root)}, tmp_path_factory.mktemp("sbpeer_work"))

    # Our tables are SAEBench's classes.
    for ev, spec in SPECS.items():
        theirs = out["schema"][ev]
        assert theirs["fields"] == BASE_KEYS
        assert (spec.directory, spec.eval_type_id) == (theirs["directory"], theirs["eval_type_id"])
        assert spec.config == theirs["config"], ev
        assert spec.metrics == theirs["metrics"], ev
        assert spec.detail == theirs["detail"], ev

    # Every file passes its output class, and what it keeps is ours unchanged.
    assert sorted(out["files"]) == sorted(ours)
    for path, validated in out["validated"].items():
        assert list(validated) == BASE_KEYS
        _subset_equal(validated, ours[path], Path(path).parent.name)

    # The readers behind SAEBench's plots: rows keyed '<release>_<sae_id>', joined across evals.
    key_real = file_name(real[SECTION_KEYS["core"]]["sae_set"], "run").removesuffix("_eval_results.json")
    key_ours = NAME.removesuffix("_eval_results.json")
    assert set(out["core_rows"]) == {key_real, key_ours}
    assert set(out["rows"]["absorption"]) == {key_ours}  # the tiny model's absorption has no headline
    for ev in ("core", "sparse_probing", "unlearning"):
        assert set(out["rows"][ev]) == {key_real, key_ours}
    mine = {key_real: real, key_ours: _results()}
    for key, results in mine.items():
        every = results[SECTION_KEYS["core"]]["metrics"]["all_tokens"]
        assert out["core_rows"][key] == {
            "l0": every["sparsity"]["l0"],
            "ce_loss_score": every["model_performance_preservation"]["ce_loss_score"],
        }
        for ev, rows in out["rows"].items():
            if key not in rows:
                continue
            row = rows[key]
            section = results[SECTION_KEYS[ev]]
            expected = {
                "core": every["model_performance_preservation"]["ce_loss_score"],
                "absorption": section.get("eval_result_metrics", {}).get("mean", {}).get(row["metric"]),
                "sparse_probing": section.get("eval_result_metrics", {}).get("sae", {}).get(row["metric"]),
                "unlearning": section.get("eval_result_metrics", {}).get("unlearning", {}).get(row["metric"]),
            }[ev]
            assert row["value"] == expected, (key, ev)
            cfg = section["sae_cfg_dict"]
            assert (
                row["sae_class"] == cfg["architecture"] and row["d_sae"] == f"{round(cfg['d_sae'] / 1000)}k"
            )
    core_flat = out["rows"]["core"][key_ours]["flat"]
    assert (
        core_flat["explained_variance"]
        == _results()[SECTION_KEYS["core"]]["metrics"]["all_tokens"]["reconstruction_quality"][
            "explained_variance_saebench"
        ]
    )
