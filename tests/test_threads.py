"""Thread count: affinity, cgroup v1/v2 quotas, torchrun ranks, OMP_NUM_THREADS and --threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from orthosae.errors import UserError
from orthosae.threads import choose_threads, default_threads, quota_cpus


def test_cgroup_v2_quota(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cpus(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert quota_cpus(tmp_path) == 1.5


def test_cgroup_v1_quota(tmp_path: Path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert quota_cpus(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert quota_cpus(tmp_path) == 3.0
    assert quota_cpus(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("cpus", "quota", "ranks", "expected"),
    [
        (8, None, 1, 8),
        (8, 1.5, 1, 2),  # a fractional quota rounds up: the last thread still gets half a core
        (8, 0.2, 1, 1),
        (2, 4.0, 1, 2),  # the affinity mask is the tighter limit
        (8, None, 2, 4),
        (2, None, 2, 1),
        (2, None, 3, 1),  # more ranks than cores: one thread each, never zero
    ],
)
def test_default_threads(cpus: int, quota: float | None, ranks: int, expected: int):
    assert default_threads(cpus, quota, ranks) == expected


def test_explicit_settings_win():
    assert choose_threads(3, {"OMP_NUM_THREADS": "1"}) == 3
    assert choose_threads(None, {"OMP_NUM_THREADS": "1"}) is None  # torch already honoured it
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "64"}) == 1
    with pytest.raises(UserError, match="at least 1"):
        choose_threads(0, {})


def test_cli_threads_flag(cli, acts_file: Path, tmp_path: Path):
    before = torch.get_num_threads()
    try:
        fast = ["--steps", "2", "--batch-size", "64", "--no-progress", "--d-sae", "8", "--k", "2"]
        r = cli("train", "--activations", acts_file, *fast, "--threads", "1", "--out", tmp_path / "a")
        assert r.code == 0, r.err
        assert torch.get_num_threads() == 1
        assert_one_line_error(cli("eval", tmp_path / "a", "--threads", "0"), "--threads must be at least 1")
    finally:
        torch.set_num_threads(before)
