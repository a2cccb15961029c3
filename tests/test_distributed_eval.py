"""`orthosae eval` under torchrun (gloo on CPU, tiny llama): 2 and 3 ranks give one process's eval.json and
SAEBench files for core, absorption and sparse probing, rank 0 alone writes, a killed rank stops the other
with one line, and a failing rank names itself.

Tolerance: a rank runs the same forward batches as one process, so with the same thread count (1 here) the
numbers come out bit-identical except a few scalars summed in rank order instead of batch order (the
orthogonality means over all co-active pairs). Asserted: every number within 1e-9 relative (1e-12
absolute), far below anything a metric reports and far above float64 summation-order noise.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import orthosae
from conftest_models import SAMPLE_TEXTS, save_tiny_model, write_jsonl
from orthosae.errors import UserError
from orthosae.eval.core_stats import ContextSums, in_batch_order
from orthosae.eval.ranks import fingerprint, n_owned, owns, rank_device
from orthosae.sae import TopKSAE, save_sae
from orthosae.train.distributed import Ranks

REL, ABS = 1e-9, 1e-12
EVALS = "core,absorption,sparse_probing"
# Run-dependent keys: wall times, ids, timestamps, whether the LM part was reused.
VOLATILE = {"eval_wall_time_s", "timing_s", "seconds", "eval_id", "datetime_epoch_millis"}

# `python -m orthosae` with a toy labelled set for sparse probing; rank KILL_RANK SIGKILLs itself at its
# first core batch.
_SCRIPT = """
import os, random, signal, sys
from orthosae.eval import core, datasets, sparse_probing

def toy():
    rng = random.Random(0)
    texts, labels = [], []
    for label, letters, n in (("a", "abcde", 40), ("b", "vwxyz", 40), ("c", "klmno", 20)):
        for _ in range(n):
            texts.append(" ".join("".join(rng.choices(letters, k=4)) for _ in range(rng.randint(2, 5))))
            labels.append(label)
    return datasets.LabelledTexts("toy", texts, labels)

datasets.DATASETS["toy"] = toy
sparse_probing.load_dataset = lambda name: toy()
if os.environ.get("KILL_RANK", "-") == os.environ.get("RANK"):
    core._lm_batch = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from orthosae.cli import main
sys.exit(main(sys.argv[1:]))
"""

_TOML = """
[core]
dataset = "{corpus}"
context_size = 32
batch_size_prompts = 3
n_eval_reconstruction_batches = 3
n_eval_sparsity_variance_batches = 5
remove_high_norm = 1.2
n_bootstrap = 200

[absorption]
num_icl_examples = 2
prompt_token_pos = -23  # the word's byte before " has the first letter:"
max_k_value = 2
k_sparse_probe_num_epochs = 3
probe_num_epochs = 5
llm_batch_size = 4
min_feats_for_eval = 1
min_GT_probe_f1 = 0.0
n_bootstrap = 200

[sparse_probing]
dataset_names = ["toy"]
probe_train_set_size = 30
probe_test_set_size = 16
k_values = [1, 2]
llm_batch_size = 4
sae_batch_size = 7
n_bootstrap = 200
"""


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(orthosae.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KILL_RANK"):
        env.pop(key, None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TopK SAE on block 1 of a tiny llama, the eval TOML, the launcher script, and the one-process run."""
    root = tmp_path_factory.mktemp("dist-eval")
    model = save_tiny_model(root / "model", "llama", n_layers=3)
    corpus = write_jsonl(root / "corpus.jsonl", SAMPLE_TEXTS)
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    run = root / "run"
    src = {"corpus": str(corpus.resolve()), "n_tokens": 200, "context_size": 32}
    save_sae(sae, run, {"model_name": str(model), "hook_layer": 1, "activations_source": src})
    toml = root / "eval.toml"
    toml.write_text(_TOML.format(corpus=corpus))
    script = root / "launch.py"
    script.write_text(_SCRIPT)
    paths = {"run": run, "toml": toml, "script": script, "root": root}
    one = root / "one"
    proc = subprocess.run(_command(paths, one), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return paths | {"one": one}


def _command(paths: dict[str, Path], out: Path, nproc: int = 1, *extra: str) -> list[str]:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args = ["eval", str(paths["run"]), "--evals", EVALS, "--config", str(paths["toml"]), "--no-progress"]
    args += ["--out", str(out / "eval.json"), *extra]
    return [*launch, str(paths["script"]), *args]


def _torchrun(paths: dict[str, Path], out: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(paths, out, nproc), env=_env(), capture_output=True, text=True, timeout=300
    )


def _diffs(a: Any, b: Any, path: str = "") -> dict[str, float]:
    """Every numeric leaf's |a − b| relative to max(|b|, ABS/REL), keyed by path; structure and every
    non-numeric value must match exactly. Run-dependent keys are skipped."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        out: dict[str, float] = {}
        for k in b:
            if k not in VOLATILE:
                out |= _diffs(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        out = {}
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out |= _diffs(x, y, f"{path}[{i}]")
        return out
    if isinstance(b, float) and not isinstance(a, bool) and isinstance(a, int | float):
        return {path: abs(a - b) / max(abs(b), ABS / REL) if math.isfinite(b) else float(a != b)}
    assert a == b, (path, a, b)
    return {}


def _assert_same(out: Path, ref: Path) -> dict[str, float]:
    """eval.json and every SAEBench file equal to the one-process run's; returns the relative diffs."""
    diffs = _diffs(json.loads((out / "eval.json").read_text()), json.loads((ref / "eval.json").read_text()))
    files = sorted(p.relative_to(ref) for p in (ref / "eval_results").rglob("*.json"))
    assert files and files == sorted(p.relative_to(out) for p in (out / "eval_results").rglob("*.json"))
    for f in files:
        diffs |= _diffs(json.loads((out / f).read_text()), json.loads((ref / f).read_text()), str(f))
    worst = max(diffs, key=diffs.__getitem__)
    assert diffs[worst] <= REL, f"{worst}: relative difference {diffs[worst]:.3g}"
    return diffs


def test_two_ranks_equal_one_process(setup: dict[str, Path]) -> None:
    out = setup["root"] / "two"
    proc = _torchrun(setup, out, 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 2, proc.stdout  # rank 0 alone writes and prints
    ref = json.loads((setup["one"] / "eval.json").read_text())
    core = ref["core evaluation results"]["metrics"]
    assert core["model_performance_preservation"]["ce_loss_score_ci95"] is not None
    assert core["token_stats"]["n_excluded_high_norm_reconstruction"] > 0  # excluded tokens, both splices
    assert core["token_stats"]["n_contexts_eval_sparsity_variance"] == 15  # 5 batches of 3 contexts
    probing = ref["sparse probing evaluation results"]["eval_result_metrics"]["sae"]
    assert probing["sae_top_1_test_accuracy_ci95"] is not None
    absorption = ref["absorption evaluation results"]["eval_result_unstructured"]
    assert absorption["lm_diagnostics"]["prompts_run"] > 40 and absorption["num_letters_kept"] > 0
    assert absorption["lm_diagnostics"]["prompts_whose_read_token_is_not_the_word"] == 0
    diffs = _assert_same(out, setup["one"])
    assert any("ce_loss_score_ci95" in k for k in diffs) and any("probe_f1" in k for k in diffs)


def test_three_ranks_with_batches_not_divisible_by_three(setup: dict[str, Path]) -> None:
    out = setup["root"] / "three"
    proc = _torchrun(setup, out, 3)
    assert proc.returncode == 0, proc.stderr
    _assert_same(out, setup["one"])


def _spawn(setup: dict[str, Path], out: Path, **extra: str) -> list[subprocess.Popen[str]]:
    """Two ranks started by hand (no torchrun agent to tear the job down or print its summary)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=port, **extra)
        cmd = _command(setup, out, 1, "--dist-timeout", "60")
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def test_a_killed_rank_stops_the_other_with_one_line(setup: dict[str, Path]) -> None:
    out = setup["root"] / "killed"
    procs = _spawn(setup, out, KILL_RANK="1")
    started = time.monotonic()
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - started
    errors = _errors(results[0][1])
    assert procs[0].returncode == 1 and len(errors) == 1, results[0][1]
    assert errors[0].startswith("orthosae: error: rank 0: lost contact with another rank (it exited or was")
    assert "while gathering the core eval's statistics" in errors[0] or "co-active pairs" in errors[0]
    assert "Rerun the evaluation" in errors[0] and elapsed < 90
    assert procs[1].returncode == -9 and not (out / "eval.json").exists()


def test_a_failing_rank_names_itself(setup: dict[str, Path], cli, monkeypatch) -> None:
    """A rank's own error is printed by that rank, with its rank, on one line; a bad option is reported by
    rank 0 alone (here in one process, as rank 1, with a stand-in process group)."""
    from orthosae.commands import eval as command
    from orthosae.train import distributed

    def fail(*args: object) -> int:
        raise UserError("no memory left")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(
        distributed, "start", lambda device, timeout, hint: Ranks(1, 2, 1, timeout, None, hint)
    )
    monkeypatch.setattr(distributed, "stop", lambda: None)
    monkeypatch.setattr(command, "_evaluate_runs", fail)
    r = cli("eval", setup["run"], "--config", setup["toml"])
    assert r.code == 2 and r.err.strip() == "orthosae: error: rank 1: no memory left", r.err
    r = cli("eval", setup["run"], "--evals", "nope")  # options: rank 0 speaks, the others stay silent
    assert r.code == 2 and r.err == ""


def _errors(stderr: str) -> list[str]:
    """stderr less the progress lines ("[1/3] core …"); no traceback allowed."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


# --- the pieces, in one process ------------------------------------------------------------------------


def test_batches_are_dealt_round_robin() -> None:
    ranks = [Ranks(r, 3, r, 1.0) for r in range(3)]
    assert [[i for i in range(7) if owns(i, r)] for r in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [n_owned(7, r) for r in ranks] == [3, 2, 2] and n_owned(7, None) == 7
    assert all(owns(i, None) for i in range(7))


def test_context_sums_go_back_in_batch_order() -> None:
    pieces = [ContextSums(), ContextSums()]
    for batch in range(5):  # batch b holds the contexts 10b, 10b + 1
        pieces[batch % 2].add({"n": torch.tensor([10.0 * batch, 10.0 * batch + 1])}, batch)
    merged = in_batch_order(pieces)
    assert merged.batches == [0, 1, 2, 3, 4]
    assert merged.stacked()["n"].tolist() == [0, 1, 10, 11, 20, 21, 30, 31, 40, 41]


def test_device_per_rank() -> None:
    assert rank_device("cuda:1", 1, 0, 0) == "cuda:1"  # one process: as given
    assert rank_device("cpu", 4, 3, 0) == "cpu"
    assert rank_device("cuda", 4, 3, 4) == "cuda:3"
    with pytest.raises(UserError, match="LOCAL_RANK 3 has no GPU"):
        rank_device("cuda", 4, 3, 2)
    with pytest.raises(UserError, match="give --device cuda, not cuda:0"):
        rank_device("cuda:0", 2, 1, 2)
    with pytest.raises(UserError, match="must be cpu or cuda"):
        rank_device("meta", 2, 0, 0)
    with pytest.raises(UserError, match="not a torch device"):
        rank_device("gpu", 2, 0, 0)


def test_probing_rows_of_simulated_ranks_add_up_to_one_process(monkeypatch) -> None:
    """Both probing paths, split as 3 ranks would split them (the sum over ranks done here by hand): the
    LM pass with an encoder (no token cache) and the token cache encoded chunk by chunk."""
    from conftest_models import byte_tokenizer, tiny_model
    from orthosae.eval import probing_acts
    from orthosae.models.loader import LoadedModel

    monkeypatch.setattr(probing_acts, "sum_rows_", lambda t, ranks, what: t)
    monkeypatch.setattr(probing_acts, "check_same_inputs", lambda seqs, ranks, what: None)
    loaded = LoadedModel(tiny_model("llama", n_layers=3), byte_tokenizer(), "tiny", "0", 3, 32, "llama")
    seqs = [[256, *range(1 + i, 4 + 3 * (i % 5))] for i in range(11)]
    drop = {256, 257, 258}
    sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(0))
    kw: dict[str, Any] = {"encode": sae.encode, "keep_tokens": True, "batch_size": 2}
    one = probing_acts.collect(loaded, 1, seqs, drop, **kw)
    parts = [probing_acts.collect(loaded, 1, seqs, drop, **kw, ranks=Ranks(r, 3, r, 1.0)) for r in range(3)]
    assert one.latents is not None and one.tokens is not None
    assert torch.equal(sum(p.lm for p in parts), one.lm)  # type: ignore[arg-type]
    assert torch.equal(sum(p.latents for p in parts), one.latents)  # type: ignore[arg-type]
    assert all(torch.equal(p.tokens.offsets, one.tokens.offsets) for p in parts)  # type: ignore[union-attr]
    assert torch.equal(sum(p.tokens.acts for p in parts), one.tokens.acts)  # type: ignore[union-attr,arg-type]
    pooled = [one.tokens.pooled(sae.encode, 3, Ranks(r, 3, r, 1.0)) for r in range(3)]
    assert torch.equal(sum(pooled), one.tokens.pooled(sae.encode, 3))  # type: ignore[arg-type]


def test_fingerprint_sees_order_and_boundaries() -> None:
    assert fingerprint([[1, 2], [3]]) == fingerprint([[1, 2], [3]])
    assert fingerprint([[1, 2], [3]]) != fingerprint([[1], [2, 3]])
    assert fingerprint([[1, 2], [3]]) != fingerprint([[3], [1, 2]])


def test_synthetic_and_compare_refused_under_torchrun(cli, monkeypatch) -> None:
    from conftest import assert_one_line_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli("eval", "--synthetic"), "--synthetic runs as one process")
    assert_one_line_error(cli("eval", "a", "b", "--compare"), "--compare runs as one process")
    assert_one_line_error(cli("eval", "nope"), "no run directory")
    monkeypatch.setenv("RANK", "1")
    r = cli("eval", "--synthetic")
    assert r.code == 2 and r.err == ""
