"""--compare with intervals: values with their 95 % interval, differences marked inside or outside noise."""

from __future__ import annotations

import json
from pathlib import Path

from orthosae.eval.compare import compare_rows, flatten_intervals, format_rows
from orthosae.eval.uncertainty import differs


def _results(ev: float, ev_ci: list[float] | None, l0: float) -> dict:
    rq: dict = {"explained_variance": ev}
    if ev_ci is not None:
        rq["explained_variance_ci95"] = ev_ci
    return {"core evaluation results": {"metrics": {"reconstruction_quality": rq, "sparsity": {"l0": l0}}}}


def test_intervals_are_read_and_not_listed_as_metrics():
    r = _results(0.7, [0.69, 0.71], 40.0)
    assert flatten_intervals(r) == {"core/reconstruction_quality/explained_variance": (0.69, 0.71)}
    rows = {row.metric for row in compare_rows([r, r])}
    assert rows == {"core/reconstruction_quality/explained_variance", "core/sparsity/l0"}


def test_noise_verdicts_follow_the_difference_rule():
    base = _results(0.70, [0.69, 0.71], 40.0)
    far = _results(0.75, [0.74, 0.76], 40.0)
    near = _results(0.705, [0.695, 0.715], 40.0)
    bare = _results(0.80, None, 40.0)
    rows = {row.metric: row for row in compare_rows([base, far, near, bare])}
    ev = rows["core/reconstruction_quality/explained_variance"]
    assert ev.outside_noise == [False, True, False, None]
    assert ev.outside_noise[1] == differs(0.70, [0.69, 0.71], 0.75, [0.74, 0.76])
    assert rows["core/sparsity/l0"].outside_noise is None  # no interval anywhere: no verdict
    text = format_rows(list(rows.values()), ["base", "far", "near", "bare"])
    line = next(li for li in text.splitlines() if li.startswith("core/reconstruction_quality/explained"))
    assert "0.7 [0.69, 0.71]" in line and "+0.05 *" in line and "+0.005 ~" in line
    assert "outside the noise" in text


def test_compare_cli_prints_intervals(cli, tmp_path: Path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results(0.70, [0.69, 0.71], 40.0)))
    b.write_text(json.dumps(_results(0.60, [0.58, 0.62], 40.0)))
    r = cli("eval", a, b, "--compare")
    assert r.code == 0, r.err
    assert "-0.1 *" in r.out and "[0.58, 0.62]" in r.out
