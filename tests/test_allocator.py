"""orthosae sets torch's huge-page allocator flag on import and keeps a value the user set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orthosae.allocator import THP_VAR

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(code: str, **env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != THP_VAR}
    env.update(PYTHONPATH=SRC, **env_overrides)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_import_sets_the_flag_and_keeps_a_users_value():
    code = f"import os, orthosae; print(os.environ.get({THP_VAR!r}))"
    assert _run(code) == "1"
    assert _run(code, **{THP_VAR: "0"}) == "0"


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="huge pages are only opt-in under THP mode 'madvise'")
def test_a_large_tensor_gets_huge_pages_after_import():
    # AnonHugePages of the process, in kB, after filling a 64 MiB tensor; without the flag glibc's mmap is
    # not 2 MiB-aligned nor madvised, so it stays 0 under 'madvise'.
    code = (
        "import orthosae, torch, re\n"
        "t = torch.ones(16 * 2**20)\n"
        "text = open('/proc/self/smaps_rollup').read()\n"
        "print(re.search(r'AnonHugePages:\\s+(\\d+)', text).group(1))"
    )
    assert int(_run(code)) >= 32 * 1024
    assert int(_run(code, **{THP_VAR: "0"})) < 32 * 1024
