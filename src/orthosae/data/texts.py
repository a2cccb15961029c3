"""Text sources: the bundled corpus, local .txt / .jsonl / .parquet files, or a Hugging Face dataset id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from orthosae.data.paths import SOURCES_FILE, TEXT_FILE, corpus_dir
from orthosae.errors import UserError

BUNDLED = "bundled"


def describe(spec: str) -> str:
    """A stable identifier of the corpus for manifests (paths made absolute)."""
    if spec == BUNDLED:
        return BUNDLED
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def iter_texts(spec: str = BUNDLED, *, field: str = "text") -> Iterator[str]:
    """Yield documents from `spec`, in a fixed order.

    - "bundled": data/corpora/bundled.jsonl (built by scripts/fetch_corpora.py)
    - *.txt: documents separated by blank lines (a paragraph is a document; single newlines are kept)
    - *.jsonl: one JSON object per line, text in `field`
    - *.parquet: column `field` (needs pyarrow)
    - anything else that is not a local path: a Hugging Face dataset id, split "train" (needs `datasets`)
    """
    if spec == BUNDLED:
        directory = corpus_dir()
        if not (directory / SOURCES_FILE).is_file():
            raise UserError(
                f"the bundled corpus is missing at {directory}: run `python scripts/fetch_corpora.py` "
                "(or `make setup`), or pass --corpus FILE"
            )
        yield from _jsonl(directory / TEXT_FILE, "text")
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"corpus {spec!r} is a directory: pass a .txt, .jsonl or .parquet file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from _txt(path)
        elif suffix in {".jsonl", ".json"}:
            yield from _jsonl(path, field)
        elif suffix == ".parquet":
            yield from _parquet(path, field)
        else:
            raise UserError(f"corpus {spec!r} has an unknown format: use .txt, .jsonl or .parquet")
        return
    if spec.endswith((".txt", ".jsonl", ".json", ".parquet")) or spec.startswith((".", "/", "~")):
        raise UserError(f"corpus file {spec!r} does not exist")
    yield from _hf_dataset(spec, field)


def _txt(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise UserError(f"{path}:{lineno} has no {field!r} field: pass the text field's name")
            if text := str(record[field]):
                yield text


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # pyright: ignore[reportMissingImports]  (optional dependency)
    except ImportError:
        raise UserError(
            "reading .parquet corpora needs pyarrow: `pip install pyarrow`, or convert to .jsonl"
        ) from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise UserError(f"{path} has no column {field!r}: columns are {', '.join(table.schema_arrow.names)}")
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield str(text)


def _hf_dataset(name: str, field: str) -> Iterator[str]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  (optional dependency)
    except ImportError:
        raise UserError(
            f"corpus {name!r} is not a local file, and Hugging Face datasets need the `datasets` "
            "package: `pip install datasets`"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except (
        Exception
    ) as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFound…)
        raise UserError(
            f"cannot open dataset {name!r}: not a local file and the hub is unreachable or has no such "
            f"dataset ({type(exc).__name__})"
        ) from None
    for record in dataset:
        if field not in record:
            raise UserError(f"dataset {name!r} has no {field!r} column")
        if text := record[field]:
            yield str(text)
