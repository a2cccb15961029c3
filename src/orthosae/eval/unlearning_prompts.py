"""Token sequences for the unlearning eval: questions under both protocols, and the packed frequency corpus.

Protocols (see eval.unlearning):

- "cloze": BOS + the question text; each choice is scored by its first token's logit right after it
  (choices carry their leading space). Items whose choices share a first token cannot be told apart
  and are dropped (counted).
- "saebench_mcq": SAEBench's multiple-choice prompt. The user turn of the model's chat template holds
  "The following are multiple choice questions (with answers) about {subject}.\\n", the question and the
  choices as "\\nA. …\\nB. …"; after the template's assistant header comes "Answer: (" and the next
  token is read: each letter scores the better of its two spellings "A" / " A" (the single-token ones).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from orthosae.errors import UserError

LETTERS = "ABCDEFGHIJ"
PRE_QUESTION = "The following are multiple choice questions (with answers) about {subject}.\n"
ANSWER_PREFIX = "Answer: ("
MAX_MCQ_CHOICES = 5  # 5! = 120 orderings per question in the filter; more is not a multiple-choice test


def encode_cloze(
    tokenizer: Any, items: Sequence[dict]
) -> tuple[list[list[int]], list[list[list[int]]], list[int], list[int]]:
    """(prompt ids, per-choice candidate tokens, answers, indices of the usable items)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    seqs, cands, answers, used = [], [], [], []
    for i, item in enumerate(items):
        firsts = [tokenizer(str(c), add_special_tokens=False)["input_ids"][0] for c in item["choices"]]
        if len(set(firsts)) != len(firsts):
            continue
        seqs.append(head + tokenizer(item["question"], add_special_tokens=False)["input_ids"])
        cands.append([[f] for f in firsts])
        answers.append(int(item["answer"]))
        used.append(i)
    return seqs, cands, answers, used


def mcq_user_text(question: str, choices: Sequence[str], subject: str) -> str:
    """The user turn: SAEBench's pre-question line, the question, the lettered choices."""
    listing = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return PRE_QUESTION.format(subject=subject) + question + listing


def mcq_prompt(question: str, choices: Sequence[str], subject: str, wrap: Callable[[str], str]) -> str:
    """The full prompt text: `wrap` puts the user turn into the chat template (ending with the
    assistant header), then "Answer: (" so that the next token is the letter."""
    return wrap(mcq_user_text(question, choices, subject)) + ANSWER_PREFIX


def chat_wrap(tokenizer: Any, model_name: str) -> Callable[[str], str]:
    """user text → the chat template's rendering of one user turn plus the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"protocol 'saebench_mcq' needs an instruct model with a chat template; {model_name} has none: "
            "use protocol = 'cloze'"
        )

    def wrap(text: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    return wrap


def letter_tokens(tokenizer: Any, n: int) -> list[list[int]]:
    """For each of the first n letters, its single-token spellings among "A" and " A"."""
    out = []
    for letter in LETTERS[:n]:
        ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in (letter, " " + letter)]
        single = list(dict.fromkeys(t[0] for t in ids if len(t) == 1))
        if not single:
            raise UserError(f"the tokenizer has no single token for the answer letter {letter!r}")
        out.append(single)
    return out


def mcq_item(item: dict, default_subject: str) -> tuple[str, list[str], int, str]:
    """(question, choices, answer, subject) of a jsonl item for the MCQ protocol: an item's own
    "mcq_question" (a cloze item phrased as a question) and "subject" take precedence; choices are
    stripped of surrounding whitespace (cloze choices carry a leading space)."""
    question = str(item.get("mcq_question", item["question"]))
    choices = [str(c).strip() for c in item["choices"]]
    return question, choices, int(item["answer"]), str(item.get("subject", default_subject))


def tokenize_prompt(tokenizer: Any, text: str) -> list[int]:
    # The chat template already holds any BOS it wants (as SAEBench's Gemma format holds <bos>).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the frequency corpus


def pack_corpus(
    tokenizer: Any, texts: Sequence[str], n_seqs: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench-like packed sequences for firing frequencies: the texts, shuffled, tokenized and joined
    with EOS, cut into `n_seqs` rows of BOS + seq_len − 1 tokens (fewer rows if the text runs out; the
    last partial row is dropped). Returns (ids (rows, seq_len), counted (rows, seq_len) bool), where
    BOS, EOS and pad tokens are not counted (SAEBench's mask_bos_pad_eos_tokens)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    body = seq_len - len(head)
    need = n_seqs * body
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        if len(stream) >= need:
            break
        if stream and isinstance(eos, int):
            stream.append(eos)
        stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
    rows = min(n_seqs, len(stream) // body)
    ids = torch.tensor([head + stream[r * body : (r + 1) * body] for r in range(rows)], dtype=torch.long)
    ids = ids.reshape(rows, seq_len)
    return ids, counted_mask(ids, tokenizer)


def counted_mask(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True where a token is none of BOS, EOS and pad (the tokens whose latents are counted)."""
    ids_of = (getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id"))
    special = [t for t in ids_of if isinstance(t, int)]
    if not special:
        return torch.ones_like(ids, dtype=torch.bool)
    return ~torch.isin(ids, torch.tensor(special, dtype=torch.long))
