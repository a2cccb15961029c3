"""Tiny randomly initialised models and a byte-level tokenizer, built offline (shared by several tests).

Import from tests as `from conftest_models import ...` (pytest puts tests/ on sys.path: rootdir-relative
imports with the default "prepend" import mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "gpt2", "gpt_neox", "gemma2", "qwen2", "mistral")
_SPECIALS = ["<bos>", "<eos>", "<pad>"]


def tiny_config(family: str, n_layers: int = 3, vocab: int = 300) -> Any:
    import transformers as tf

    hidden, heads = 32, 4
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=heads,
            n_positions=256,
            bos_token_id=256,
            eos_token_id=257,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=64,
            max_position_embeddings=256,
            bos_token_id=256,
            eos_token_id=257,
        )
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    cls = {
        "llama": tf.LlamaConfig,
        "gemma2": tf.Gemma2Config,
        "qwen2": tf.Qwen2Config,
        "mistral": tf.MistralConfig,
    }[family]
    if family == "gemma2":
        common.update(head_dim=8, sliding_window=16)
    return cls(**common)


def tiny_model(family: str, n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers), dtype=torch.float32)
    return model.eval()


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: ids 0..255 are bytes, 256 <bos>, 257 <eos>, 258 <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps every byte to a printable char; order them by byte value so ids are bytes.
    byte_chars = sorted(alphabet, key=lambda ch: _INV[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i, tok in enumerate(_SPECIALS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _inverse_byte_map() -> dict[str, int]:
    # GPT-2's reversible byte → unicode table.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_INV = _inverse_byte_map()


def save_tiny_model(directory: Path, family: str = "llama", n_layers: int = 3, seed: int = 0) -> Path:
    """Save a tiny model + byte tokenizer as a local HF model directory (loadable by load_model)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(family, n_layers, seed).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def write_jsonl(path: Path, texts: list[str]) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


SAMPLE_TEXTS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7} times, then rests by the river."
    * (1 + i % 3)
    for i in range(60)
]
