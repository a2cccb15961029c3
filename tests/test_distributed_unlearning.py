"""`orthosae eval --evals unlearning` under torchrun (gloo on CPU, tiny llama): 2 and 3 ranks give one
process's eval.json and SAEBench file for every run of one command, which covers both routes of the eval:

- cached_a, cached_b (cloze, everything kept): the kept questions' block-L outputs and the corpora's
  activations are kept, interventions run the upper blocks only, the retain early stop fires inside a round
  of batches, and cached_b reuses cached_a's question sets and corpora (each rank's own corpus batches);
- nocache (cloze, `MAX_CACHED_BYTES = 0`, its own memo): active latents and firing counts from fresh
  forwards, interventions as full forwards with the edit hooked in;
- mcq (saebench_mcq, nothing kept): the ordering filter's many small forward calls, dealt in turn (the
  random model answers no question right under all 24 orderings, so it has no interventions).

Tolerance: none. Everything put back over ranks is an integer (answers, firing counts, flags) or a float row
filled by one rank with zeros at the others (x + 0 is exact), so the files must be equal, bit for bit, apart
from the run-dependent keys (wall times, ids, timestamps).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import orthosae
from conftest_models import byte_tokenizer, save_tiny_model
from orthosae.eval.ranks import Deal
from orthosae.sae import TopKSAE, save_sae
from orthosae.train.distributed import Ranks

VOLATILE = {"eval_wall_time_s", "timing_s", "seconds", "eval_id", "datetime_epoch_millis"}
RUNS = {"cached_a": 3, "cached_b": 4, "nocache": 3, "mcq": 3}  # run → its SAE's seed
BATCH = 4  # llm_batch_size

# `python -m orthosae`, with each run's route picked by its name (one command covers them all).
_SCRIPT = """
import dataclasses, sys
from orthosae.eval import unlearning

real, keep = unlearning.evaluate, unlearning.MAX_CACHED_BYTES

def evaluate(ctx, cfg):
    name = ctx.run_dir.name
    unlearning.MAX_CACHED_BYTES = keep if name.startswith("cached") else 0
    if not name.startswith("cached"):  # its own memo: nothing reused from the cached runs
        ctx = dataclasses.replace(ctx, shared={})
    if name == "mcq":
        cfg = dataclasses.replace(cfg, protocol="saebench_mcq", n_questions=48)
    return real(ctx, cfg)

unlearning.evaluate = evaluate
from orthosae.cli import main
sys.exit(main(sys.argv[1:]))
"""

_TOML = """
[unlearning]
forget_path = "{d}/forget.jsonl"
retain_path = "{d}/retain.jsonl"
forget_corpus_path = "{d}/forget_corpus.jsonl"
retain_corpus_path = "{d}/retain_corpus.jsonl"
n_questions = 120
dataset_size = 15  # 4 corpus batches, the last short
seq_len = 48
retain_thresholds = [0.01, 1.1]  # 1.1 lets latents firing on retain text be chosen: those break retain
n_features_list = [1, 2, 4]
multipliers = [1, 50]
llm_batch_size = {batch}
n_bootstrap = 200
"""

CHAT = (
    "{% for m in messages %}<bos>user\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}model\n{% endif %}"
)


def _write_sets(d: Path) -> None:
    """Forget and retain sets of 2- to 4-choice questions and their corpora (the question texts)."""
    rng = random.Random(0)
    for name, template in {"forget": "the {i} colour is", "retain": "a shape {i} was"}.items():
        items = []
        for i in range(150):
            choices = rng.sample("rbgtpnkm", 2 + i % 3)
            items.append({"question": template.format(i=i), "choices": choices, "answer": i % len(choices)})
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        corpus = "".join(json.dumps({"text": x["question"]}) + "\n" for x in items)
        (d / f"{name}_corpus.jsonl").write_text(corpus)


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(orthosae.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer has a chat template, a TopK SAE on its block 1 per run, the sets."""
    root = tmp_path_factory.mktemp("dist-unlearning")
    model = save_tiny_model(root / "model", "llama", n_layers=3)
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(model)
    for name, seed in RUNS.items():
        sae = TopKSAE(32, 64, 4, generator=torch.Generator().manual_seed(seed))
        save_sae(sae, root / "runs" / name, {"model_name": str(model), "hook_layer": 1})
    _write_sets(root)
    (root / "launch.py").write_text(_SCRIPT)
    (root / "eval.toml").write_text(_TOML.format(d=root, batch=BATCH))
    return root


def _launch(base: Path, nproc: int) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Evaluate copies of every run with `nproc` processes (each run's files land in its directory)."""
    out = base / str(nproc)
    shutil.copytree(base / "runs", out)
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args = [
        "eval",
        *(str(out / r) for r in RUNS),
        "--evals",
        "unlearning",
        "--config",
        str(base / "eval.toml"),
    ]
    cmd = [*launch, str(base / "launch.py"), *args, "--no-progress"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def one(base: Path) -> Path:
    """The one-process reference."""
    return _launch(base, 1)[0]


def _files(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in [run / "eval.json", *(run / "eval_results").rglob("*.json")])


def _same(a: Any, b: Any, path: str = "") -> None:
    """Equal structure and values (floats bit for bit), run-dependent keys left out."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b.keys() - VOLATILE:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _section(run: Path) -> dict[str, Any]:
    return json.loads((run / "eval.json").read_text())["unlearning evaluation results"]


def _check_cloze_is_exercised(ref: Path, nproc: int) -> None:
    """A cloze run must hold what the split has to put back, or the comparison proves little."""
    section = _section(ref)
    u, rows = section["eval_result_unstructured"], section["eval_result_unstructured"]["interventions"]
    assert section["eval_result_metrics"]["unlearning"]["unlearning_score_ci95"] is not None
    assert any(r.get("forget_skipped") for r in rows)  # the gate failed everywhere: forget not run
    assert any(r["forget_accuracy"] is not None for r in rows)  # … and not everywhere
    kept = [len(u["baseline"][n]["kept_ids"]) for n in ("forget", "retain")]
    assert min(kept) > 2 * BATCH * nproc, kept  # several rounds of batches
    stopped = [r["retain_rerun"] for r in rows if r["retain_accuracy"] is None]
    assert any(-(-n // BATCH) % nproc for n in stopped), stopped  # stopped inside a round


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_equal_one_process(base: Path, one: Path, nproc: int) -> None:
    for run in ("cached_a", "nocache"):
        _check_cloze_is_exercised(one / run, nproc)
    assert _section(one / "cached_a")["eval_result_unstructured"]["upper_layers_only"] is True
    assert _section(one / "nocache")["eval_result_unstructured"]["upper_layers_only"] is False
    mcq = _section(one / "mcq")["eval_result_unstructured"]["baseline"]["forget"]
    assert mcq["n_orderings"] == 24 and mcq["n_correct_original_order"] > 0
    out, proc = _launch(base, nproc)
    assert proc.stdout.count("wrote ") == 2 * len(RUNS), proc.stdout  # rank 0 alone writes and prints
    for run in RUNS:
        files = _files(one / run)
        # eval.json and SAEBench's unlearning file (none for a null score, as SAEBench: mcq keeps no question)
        assert len(files) == (1 if run == "mcq" else 2) and files == _files(out / run)
        for f in files:
            _same(json.loads((out / run / f).read_text()), json.loads((one / run / f).read_text()), str(f))


def test_deal_counts_batches_across_calls() -> None:
    """Batch j of a phase on rank j mod W, j running on from one call to the next."""
    deals = [Deal(Ranks(r, 3, r, 1.0)) for r in range(3)]
    calls = [2, 1, 4]  # batches per call
    mine = [[[d.take() for _ in range(n)] for n in calls] for d in deals]
    assert mine[0] == [[True, False], [False], [True, False, False, True]]
    assert mine[1] == [[False, True], [False], [False, True, False, False]]
    assert mine[2] == [[False, False], [True], [False, False, True, False]]
    assert all(d.width == 3 for d in deals) and Deal().width == 1
    assert all(Deal().take() for _ in range(5))
