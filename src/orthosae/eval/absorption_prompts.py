"""Words and prompts of the first-letter task: single-token real English words, ICL spelling prompts."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

LETTERS = string.ascii_lowercase


@lru_cache(maxsize=1)
def english_words(n: int = 100_000) -> frozenset[str]:
    """The `n` most frequent English words of wordfreq (lower case)."""
    from wordfreq import top_n_list

    return frozenset(top_n_list("en", n))


def word_tokens(tokenizer: Any, min_len: int = 2, vocabulary: frozenset[str] | None = None) -> list[str]:
    """Vocabulary tokens that are a leading space plus an ASCII-alphabetic real English word (wordfreq),
    as decoded strings (' cat', ' The'), sorted for determinism."""
    vocabulary = english_words() if vocabulary is None else vocabulary
    found = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if (
            text.startswith(" ")
            and len(word) >= min_len
            and word.isascii()
            and word.isalpha()
            and word.lower() in vocabulary
        ):
            found.add(text)
    return sorted(found)


def first_letter(word: str) -> str:
    return word.strip()[0].lower()


@dataclass
class Prompt:
    word: str  # with its leading space, as the vocabulary token
    text: str


def icl_prompt(word: str, examples: Sequence[str], template: str, rng: random.Random, n_icl: int) -> Prompt:
    """SAEBench's create_icl_prompt with a newline separator prepended to the first example:
    '\\n{ex} has the first letter: E' × n_icl, then '\\n{word} has the first letter:'. Examples are
    drawn from `examples` (the same split as the word) and never include the word itself."""
    pool = [e for e in examples if e != word]
    chosen = rng.sample(pool, min(n_icl, len(pool)))
    lines = [template.format(word=e) + " " + first_letter(e).upper() for e in chosen]
    lines.append(template.format(word=word))
    return Prompt(word, "\n" + "\n".join(lines))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids with BOS first when the tokenizer has one (the model saw BOS-led contexts in training)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if isinstance(bos, int) else []) + list(ids)


def word_at(ids: Sequence[int], position: int, tokenizer: Any, word: str) -> bool:
    """Does the token at `position` (negative: from the end) decode to `word`? Guards the template offset."""
    if not -len(ids) <= position < len(ids):
        return False
    return tokenizer.decode([ids[position]]) == word
