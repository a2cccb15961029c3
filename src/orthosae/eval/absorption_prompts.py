"""Words and prompts of the first-letter task, as SAEBench 0.6 builds them.

- Words: every vocabulary token whose text is ASCII letters only, optionally after one leading space
  (' cat', 'cat', ' McDonald'); no dictionary filter, no minimum length. Tokens are taken in token-id
  order, so the list is deterministic (SAEBench walks the tokenizer's vocab dict, whose order is not).
- Split: the word list is shuffled (`rng.sample` of all of it), optionally cut to `max_words`, and the
  first `train_fraction` (0.8) of it trains the probes; the rest are the test words.
- Prompts: `n_icl` in-context examples drawn from a pool of words (the word's own split for the probe
  data, the whole vocabulary for the absorption re-prompting), each "{ex} has the first letter: E",
  joined by newlines, a newline before the first, then "{word} has the first letter:". A draw that
  contains the word itself is redrawn. With a seeded `random.Random` and the same word lists, the draws
  (and so the prompt texts) are those of SAEBench's functions run after `random.seed(seed)`.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orthosae.errors import UserError

LETTERS = string.ascii_lowercase
_ALPHA = frozenset(string.ascii_letters)
# SAEBench drops probe-data tokens that start with a digit, '<' or '>' (byte tokens such as <0x6A>).
_DROPPED = re.compile(r"[\d<>]")
MAX_ATTEMPTS = 1000


def token_text(tokenizer: Any, token: str) -> str:
    """A vocabulary entry as text. SentencePiece's '▁' prefix must come out as a leading space, which
    some tokenizers drop when converting a single token."""
    text = tokenizer.convert_tokens_to_string([token])
    if token.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


def is_alpha_word(text: str) -> bool:
    """ASCII letters only, after at most one leading space."""
    body = text[1:] if text.startswith(" ") else text
    return bool(body) and all(c in _ALPHA for c in body)


def alpha_tokens(tokenizer: Any) -> list[str]:
    """The texts of all alphabetic vocabulary tokens, in token-id order (duplicates kept, as SAEBench)."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    texts = (token_text(tokenizer, tok) for tok, _ in by_id)
    return [t for t in texts if is_alpha_word(t)]


def first_letter(word: str) -> str:
    """The word's first letter, lower case ('  Zebra' → 'z'); SAEBench ignores spaces and non-letters."""
    letters = [c for c in word.strip() if c.isalpha()]
    if not letters:
        raise UserError(f"word {word!r} has no letter: the first-letter task needs alphabetic words")
    return letters[0].lower()


def letter_index(word: str) -> int:
    return LETTERS.index(first_letter(word))


def answer(word: str) -> str:
    """The completion of a prompt: a space and the capital first letter (' Z')."""
    return " " + first_letter(word).upper()


def keep_probe_word(word: str) -> bool:
    """False for the tokens SAEBench's probe-data loader drops (first character a digit, '<' or '>')."""
    return _DROPPED.match(word) is None


def split_words(
    vocab: Sequence[str], rng: random.Random, train_fraction: float, max_words: int | None
) -> tuple[list[str], list[str]]:
    """Shuffle all words, keep the first `max_words` (None: all), and split train / test."""
    shuffled = rng.sample(list(vocab), len(vocab))
    if max_words is not None:
        shuffled = shuffled[:max_words]
    cut = int(len(shuffled) * train_fraction)
    return shuffled[:cut], shuffled[cut:]


@dataclass
class Prompt:
    word: str  # as in the vocabulary, leading space included
    text: str


def icl_prompt(
    word: str,
    examples: Sequence[str],
    template: str,
    rng: random.Random,
    n_icl: int,
    separator: str = "\n",
) -> Prompt:
    """'\\n{ex} has the first letter: E' × n_icl, then '\\n{word} has the first letter:'. The examples are
    `rng.sample(examples, n_icl)`, drawn again while they contain `word`."""
    for _ in range(MAX_ATTEMPTS):
        chosen = rng.sample(examples, n_icl)
        if word not in chosen:
            break
    else:
        raise UserError(
            f"cannot draw {n_icl} in-context examples without {word!r} from {len(examples)} words: "
            "use more words (max_words) or fewer examples (num_icl_examples)"
        )
    lines = [template.format(word=ex) + answer(ex) for ex in chosen]
    lines.append(template.format(word=word))
    return Prompt(word, separator + separator.join(lines))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids with BOS first when the tokenizer has one (the model saw BOS-led contexts in training)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if isinstance(bos, int) else []) + list(ids)


def word_at(ids: Sequence[int], position: int, tokenizer: Any, word: str) -> bool:
    """Does the token at `position` (negative: from the end) decode to `word`? A diagnostic of the
    template offset: SAEBench reads the position without checking."""
    if not -len(ids) <= position < len(ids):
        return False
    return tokenizer.decode([ids[position]]) == word
