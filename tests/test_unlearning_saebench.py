"""Unlearning against SAEBench 0.6.0's own functions (run in the peer venv, tests/saebench_peer.py).

* feature selection: SAEBench's `get_top_features(...)[:n]` (what its sweep clamps) chooses the latents
  we choose, from the same sparsity arrays, for every retain threshold and n;
* firing frequencies: SAEBench's `get_feature_activation_sparsity` (mask_bos_pad_eos_tokens=True), given
  a duck model/SAE that return our latents for our packed tokens, equals our `firing_frequency`;
* the MCQ protocol: SAEBench's `calculate_MCQ_metrics` over all 24 orderings, with a duck Gemma model
  that answers from logits we fix per prompt string, asks exactly our prompts (Gemma's chat format, the
  pre-question line, "Answer: ("), marks the same answers correct, and `_find_all_permutation_correct_ans`
  keeps the questions we keep;
* the score: per-question correctness tables written as SAEBench's per-intervention metrics files and
  read back by its `get_metrics_df` + `get_unlearning_scores` give our score (the retain set split over
  SAEBench's four MMLU subjects, which it pools). SAEBench's forget accuracy is a float32 mean, ours a
  float64 ratio of counts: equal to 1e-6.
"""

from __future__ import annotations

import random

import pytest
import torch

from orthosae.eval.unlearning import Corpus, firing_frequency
from orthosae.eval.unlearning_prompts import counted_mask, mcq_prompt
from orthosae.eval.unlearning_score import (
    choose,
    orderings,
    permute,
    score_from_tables,
    select_features,
    survives_all_orderings,
)
from saebench_peer import MAIN_PY_STUBS, run_saebench

LETTERS8 = ["A", "B", "C", "D", " A", " B", " C", " D"]  # SAEBench's answer strings for Gemma: ids 0..7
BOS, EOS, PAD, VOCAB = 8, 9, 10, 12
RETAIN_SUBJECTS = [
    "high_school_us_history",
    "college_computer_science",
    "high_school_geography",
    "human_aging",
]


def gemma_wrap(text: str) -> str:
    """Gemma's chat format for one user turn and the model header (our chat_wrap renders the model's own)."""
    return f"<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


PEER = (
    MAIN_PY_STUBS
    + """
import os, pickle
import numpy as np
import sae_bench.evals.unlearning.utils.feature_activation as fa
import sae_bench.evals.unlearning.utils.metrics as M
import sae_bench.evals.unlearning.main as main
import sae_bench.sae_bench_utils.activation_collection as ac

# 1. feature selection
outputs["top"] = {
    (case, t): fa.get_top_features(f.numpy().copy(), r.numpy().copy(), retain_threshold=t).tolist()
    for case, (f, r) in inputs["sparsity"].items() for t in inputs["thresholds"]
}

# 2. firing frequencies, through a duck model and SAE serving our latents batch by batch
class Tok:
    bos_token_id, eos_token_id, pad_token_id = inputs["specials"]

class FreqModel(ac.HookedTransformer):  # the class its type check holds (each stub access makes a new one)
    def __init__(self):
        self.tokenizer = Tok()
        self.at = 0
    def run_with_cache(self, tokens, stop_at_layer=None, names_filter=None):
        z = inputs["z"][self.at : self.at + len(tokens)]
        self.at += len(tokens)
        return None, {names_filter: z}

class FreqSAE:
    device = "cpu"
    W_dec = torch.zeros(inputs["z"].shape[-1], 1)
    def encode(self, x):
        return x

outputs["freq"] = ac.get_feature_activation_sparsity(
    inputs["tokens"], FreqModel(), FreqSAE(), 3, 0, "blocks.0.hook_resid_post", mask_bos_pad_eos_tokens=True
)

# 3. the MCQ protocol: a duck Gemma whose answer logits are looked up by prompt string
LETTERS8 = inputs["letters"]
BOS, VOCAB = inputs["bos"], inputs["vocab"]
logit_of = inputs["logits"]

class Cfg:
    model_name = "gemma-2-2b-it"
    device = "cpu"

class TokG:
    bos_token_id = BOS

class Gemma(M.HookedTransformer):
    def __init__(self):
        self.cfg, self.tokenizer, self.prompts = Cfg(), TokG(), []
    def to_tokens(self, x, prepend_bos=True, padding_side=None):
        xs = [x] if isinstance(x, str) else list(x)
        if all(s in LETTERS8 for s in xs):
            return torch.tensor([[LETTERS8.index(s)] for s in xs])
        rows = []
        for s in xs:
            if s not in self.prompts:
                self.prompts.append(s)
            rows.append([BOS, 100 + self.prompts.index(s)])
        return torch.tensor(rows)
    def __call__(self, tokens, return_type="logits"):
        out = torch.zeros(len(tokens), tokens.shape[1], VOCAB)
        for b, row in enumerate(tokens):
            out[b, 1] = logit_of[self.prompts[int(row[1]) - 100]]
        return out

M.HookedTransformer = Gemma
M.load_dataset_with_retries = lambda path, name, split: inputs["items"]
gemma = Gemma()
metrics = M.calculate_MCQ_metrics(
    gemma, 16, ".", inputs["subject_dataset"], permutations=M.all_permutations, verbose=False
)
outputs["is_correct"] = torch.tensor(metrics["is_correct"])
outputs["kept"] = torch.tensor(M._find_all_permutation_correct_ans(metrics)).long()
outputs["prompts"] = gemma.prompts

# 4. the score from per-intervention metrics files
scores = {}
for case, (forget, retain, grid) in inputs["tables"].items():
    folder = os.path.join("metrics", case)
    os.makedirs(folder, exist_ok=True)
    splits = np.array_split(np.arange(retain.shape[1]), [7, 30, 31])
    for i, (t, n, m) in enumerate(grid):
        row = {}
        for name, cols in [("wmdp-bio", None), *zip(inputs["retain_subjects"], splits)]:
            table = forget[i] if cols is None else retain[i][cols]
            is_correct = table.to(torch.float)
            row[name] = {
                "mean_correct": float(is_correct.mean().item()),
                "total_correct": int(np.sum(is_correct.numpy())),
                "is_correct": is_correct.numpy(),
            }
        row["ablate_params"] = {"multiplier": m}
        name = f"clamp_feature_activation_multiplier{m}_nfeatures{n}_layer3_retainthres{t}.pkl"
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(row, f)
    scores[case] = float(main.get_unlearning_scores(main.get_metrics_df(folder)))
outputs["scores"] = scores
"""
)

GRID = [(t, n, m) for t in (0.001, 0.01) for n in (10, 20) for m in (25, 50, 100, 200)]


def _sparsity_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    cases = {}
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        d = 2000
        # Continuous frequencies (no exact ties: SAEBench's order among ties is its unstable sort's),
        # log-uniform over four decades, a third of the latents silent on forget text.
        forget = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-9, -1, generator=g))
        forget[torch.rand(d, generator=g) < 0.33] = 0
        retain = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-11, -2, generator=g))
        retain[torch.rand(d, generator=g) < 0.2] = 0
        cases[f"s{seed}"] = (forget, retain)
    return cases


def _mcq_case() -> tuple[list[dict], dict[str, torch.Tensor], list[list[torch.Tensor]]]:
    """Questions, logits per prompt string, and the same logits per (question, ordering)."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    items, logits, per_question = [], {}, []
    for q in range(30):
        choices = [f"option {q}-{c} {'x' * rng.randrange(3)}".strip() for c in range(4)]
        answer = rng.randrange(4)
        items.append({"question": f"Question {q}: which one?", "choices": choices, "answer": answer})
        skill = 8.0 if q % 3 == 0 else 1.2  # a third are known well: they should survive all orderings
        rows = []
        for p in orderings(4):
            _, target = permute(choices, answer, p)
            row = torch.randn(VOCAB, generator=g)
            row[target + 4 * int(torch.rand(1, generator=g) < 0.5)] += skill  # 'A' or ' A' spelling
            prompt = mcq_prompt(
                items[-1]["question"], permute(choices, answer, p)[0], "high school geography", gemma_wrap
            )
            logits[prompt] = row
            rows.append(row)
        per_question.append(rows)
    return items, logits, per_question


def _tables() -> dict[str, tuple[torch.Tensor, torch.Tensor, list[tuple[float, int, int]]]]:
    tables = {}
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        strength = torch.rand(len(GRID), 1, generator=g)
        forget = torch.rand(len(GRID), 41, generator=g) > strength * 0.9
        retain = torch.rand(len(GRID), 100, generator=g) > strength * 0.02
        tables[f"t{seed}"] = (forget, retain, GRID)
    # The gate's boundary: exactly 99 of 100 retain answers right counts (≥ 0.99).
    forget = torch.ones(len(GRID), 41, dtype=torch.bool)
    retain = torch.ones(len(GRID), 100, dtype=torch.bool)
    forget[3, :20] = False
    retain[3, 50] = False
    forget[5, :30] = False
    retain[5, :2] = False
    tables["boundary"] = (forget, retain, GRID)
    return tables


def _freq_case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8, (7, 16), generator=g)
    tokens[:, 0] = BOS
    tokens[torch.rand(7, 16, generator=g) < 0.1] = EOS
    tokens[5, 12:] = PAD
    z = torch.relu(torch.randn(7, 16, 50, generator=g) - 1.0)
    return tokens, z


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    items, logits, per_question = _mcq_case()
    tokens, z = _freq_case()
    inputs = {
        "sparsity": _sparsity_cases(),
        "thresholds": [0.001, 0.01, 0.05],
        "specials": (BOS, EOS, PAD),
        "tokens": tokens,
        "z": z,
        "letters": LETTERS8,
        "bos": BOS,
        "vocab": VOCAB,
        "logits": logits,
        "items": items,
        "subject_dataset": "high_school_geography",
        "tables": _tables(),
        "retain_subjects": RETAIN_SUBJECTS,
    }
    out = run_saebench(PEER, inputs, tmp_path_factory.mktemp("unlearning_peer"))
    return inputs | {"per_question": per_question}, out


def test_feature_selection_matches_saebench(peer):
    inputs, out = peer
    for case, (forget, retain) in inputs["sparsity"].items():
        for t in inputs["thresholds"]:
            theirs = out["top"][(case, t)]
            assert len(theirs) > 20
            for n in (1, 10, 20, len(theirs), len(theirs) + 5):
                assert select_features(forget, retain, t, n) == theirs[:n]


def test_firing_frequency_matches_saebench(peer):
    inputs, out = peer

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    class Identity:
        W_dec = torch.zeros(50, 1)

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x

    tokens, z = inputs["tokens"], inputs["z"]
    corpus = Corpus(tokens, counted_mask(tokens, Tok()), z)
    ours = firing_frequency(None, 0, Identity(), corpus, 3)  # type: ignore[arg-type]  # acts are given
    assert torch.allclose(ours, out["freq"].float(), rtol=1e-6, atol=0)


def test_mcq_prompts_answers_and_ordering_filter_match_saebench(peer):
    inputs, out = peer
    ours_prompts, ours_correct = [], []
    cands = [[0, 4], [1, 5], [2, 6], [3, 7]]
    for item, rows in zip(inputs["items"], inputs["per_question"], strict=True):
        correct = []
        for p, row in zip(orderings(4), rows, strict=True):
            shown, target = permute(item["choices"], item["answer"], p)
            ours_prompts.append(mcq_prompt(item["question"], shown, "high school geography", gemma_wrap))
            correct.append(int(choose(row.unsqueeze(0), [cands])[0]) == target)
        ours_correct.append(correct)
    assert out["prompts"] == ours_prompts  # same prompt text, same question-major ordering order
    assert out["is_correct"].bool().tolist() == [c for row in ours_correct for c in row]
    kept = survives_all_orderings(torch.tensor(ours_correct)).nonzero().flatten()
    assert out["kept"].tolist() == kept.tolist()
    assert 5 <= len(kept) < 30  # the case exercises both outcomes


def test_score_from_correctness_tables_matches_saebench(peer):
    inputs, out = peer
    for case, (forget, retain, _) in inputs["tables"].items():
        assert score_from_tables(forget, retain, 0.99) == pytest.approx(out["scores"][case], abs=1e-6)
    assert out["scores"]["boundary"] == pytest.approx(1 - 21 / 41, abs=1e-6)
