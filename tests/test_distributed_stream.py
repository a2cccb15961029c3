"""Streaming from --model under torchrun (gloo on CPU, a tiny local llama): the ranks split every window's
forward batches and all-gather the kept rows, so each global batch is the one a single process forms.

Checked: the stream of 3 ranks (windows of 8 contexts in forward batches of 3, so runs of uneven length,
and a corpus end inside a window) equals one process's batch for batch, is the same when read twice, and
resumes at a checkpointed position; one process's stream holds every kept token once (less the final
partial batch); a 2-rank training run matches one process to 1e-5 of the largest weight after 20 steps,
and a SIGTERM mid-run then --resume gives the uninterrupted run's bytes.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from orthosae.activations.harvest import harvest
from orthosae.activations.source import stream_activations
from orthosae.activations.stream import StreamWindows, rank_span
from orthosae.data.pack import iter_contexts
from orthosae.data.texts import iter_texts
from orthosae.models.loader import load_model
from test_distributed import TOPK, _assert_close, _env, _finish, _script, _single, _torchrun

# Small windows (8 contexts) in forward batches of 3: a window's runs are 3+3 / 2 contexts, or 3 / 3 / 2.
KW: dict[str, Any] = dict(context_size=32, batch_size=96, window_tokens=256, forward_batch=3)
KW |= dict(remove_high_norm=1.1, seed=4, progress=False)
TOKENS = 1500  # 49 contexts: the last window is cut at the budget

_STREAM_SCRIPT = """
import sys, torch
from orthosae.activations.source import stream_activations
from orthosae.train import distributed
model, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(context_size=32, batch_size=96, window_tokens=256, forward_batch=3, remove_high_norm=1.1, seed=4,
          progress=False)
ranks = distributed.start("cpu", 60)
for tokens in map(int, sys.argv[4:]):
    def run(state=None):
        return stream_activations(model, 1, corpus, n_tokens=tokens, ranks=ranks, state=state, **kw)
    first, again = list(run()), list(run())
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    src = run()
    head = [next(src) for _ in range(4)]
    resumed = list(run(src.state()))
    assert len(head) + len(resumed) == len(first)
    assert all(torch.equal(a, b) for a, b in zip(head + resumed, first))
    torch.save(first, f"{out}/rank-{ranks.rank}-{tokens}.pt")
distributed.stop()
distributed.exit_process(0)
"""


def _one_process(model_dir: Path, corpus: Path, tokens: int) -> list[torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        return list(stream_activations(str(model_dir), 1, str(corpus), n_tokens=tokens, **KW))
    finally:
        torch.set_num_threads(threads)


def test_rank_spans_cover_a_window_once_in_rank_order() -> None:
    for start, stop, fb, world in [(0, 8, 3, 2), (8, 16, 3, 3), (16, 17, 3, 2), (40, 49, 3, 4), (0, 6, 8, 3)]:
        spans = [rank_span(start, stop, fb, (r, world)) for r in range(world)]
        assert spans[0][0] == start and spans[-1][1] == stop
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert all((a - start) % fb == 0 for a, _ in spans)  # whole forward batches only


def test_one_process_stream_holds_every_kept_token_once(model_dir: Path, corpus: Path) -> None:
    batches = _one_process(model_dir, corpus, TOKENS)
    loaded = load_model(str(model_dir))
    windows = StreamWindows(loaded, 1, n_tokens=TOKENS, corpus=str(corpus), context_size=32, forward_batch=3)
    contexts = iter_contexts(iter_texts(str(corpus)), loaded.tokenizer, context_size=32, batch_contexts=3)
    wanted = [b for b in contexts if b.first_index < windows.max_contexts]
    kept = torch.cat([h.acts for h in harvest(loaded, 1, wanted, remove_high_norm=1.1)])
    assert len(batches) == len(kept) // 96  # the final partial batch (< 96 rows) is dropped
    have = Counter(row.numpy().tobytes() for b in batches for row in b)
    pool = Counter(row.numpy().tobytes() for row in kept)
    assert sum(have.values()) == len(batches) * 96 and not have - pool


def test_three_ranks_form_one_process_batches(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    budgets = [TOKENS, 100_000]  # cut at the budget; the corpus ending inside a window
    script = tmp_path / "stream.py"
    script.write_text(_STREAM_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    cmd += [str(script), str(model_dir), str(corpus), str(tmp_path), *map(str, budgets)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for tokens in budgets:
        parts = [torch.load(tmp_path / f"rank-{r}-{tokens}.pt") for r in range(3)]
        whole = _one_process(model_dir, corpus, tokens)
        assert len(whole) > 5 and all(len(p) == len(whole) for p in parts)
        for i, batch in enumerate(whole):
            assert [len(p[i]) for p in parts] == [32, 32, 32]
            assert torch.equal(torch.cat([p[i] for p in parts]), batch), (tokens, i)


# --- training ------------------------------------------------------------------------------------------

COMMON = ["--batch-size", "128", "--steps", "20", "--log-every", "5", "--warmup-steps", "2", "--seed", "1"]
COMMON += ["--no-progress", "--checkpoint-every", "5", "--context-size", "32", "--tokens", "3000"]
COMMON += ["--remove-high-norm", "1.1", "--layer", "1"]


@pytest.fixture(scope="module")
def two_rank_stream(model_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream-ref") / "run"
    args = ["--model", model_dir, "--corpus", corpus, *TOPK, *COMMON, "--out", out]
    code, stdout, err = _finish(_torchrun(*args))
    assert code == 0, err
    assert stdout.count("saved SAE") == 1, stdout
    return out


def test_two_rank_streaming_matches_one_process(
    model_dir: Path, corpus: Path, two_rank_stream: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "one"
    done = _single("--model", model_dir, "--corpus", corpus, *TOPK, *COMMON, "--out", ref)
    assert done.returncode == 0, done.stderr
    _assert_close(two_rank_stream, ref)


def test_two_rank_streaming_resumes_exactly(
    model_dir: Path, corpus: Path, two_rank_stream: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["--model", model_dir, "--corpus", corpus, *TOPK, *COMMON, "--out", out]
    code, _, err = _finish(_torchrun(*args, script=_script(tmp_path), STOP_AT="9"))
    assert code != 0 and err.count("stopped at step 10 of 20") == 1, err
    code, _, err = _finish(_torchrun("--resume", out))
    assert code == 0, err
    weights = "sae_weights.safetensors"
    assert (out / weights).read_bytes() == (two_rank_stream / weights).read_bytes()
