"""report.html in a real headless Chromium: it loads offline, its JS runs without console messages, and the
rendered DOM holds the tables and plots. Skipped where Chromium is not installed (CI installs it:
`apt-get install -y chromium`)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orthosae.report import build_report
from test_report import SMALL, build_tiny_world, make_experiment

CHROMIUM = next(
    (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (CI: apt-get update && apt-get install -y chromium)"
)


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on a local file, isolated and offline-friendly; console output goes to stderr."""
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    """Every message the page wrote to the console (errors, uncaught exceptions, failed loads)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


class _DomCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables = self.svgs = self.data_imgs = 0
        self.body_classes: list[str] = []
        self.active_tabs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        self.tables += tag == "table"
        self.svgs += tag == "svg"
        if tag == "img" and a.get("src", "").startswith("data:image/png;base64,") and len(a["src"]) > 2000:
            self.data_imgs += 1
        if tag == "body":
            self.body_classes = classes
        if tag == "section" and "active" in classes:
            self.active_tabs.append(a.get("id", ""))


def test_console_scan_catches_errors(tmp_path: Path) -> None:
    """The check below would see a broken page: an uncaught exception reaches the console log."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>throw new Error("boom")</script></body></html>')
    result = chromium(bad, tmp_path / "profile", "--dump-dom")
    assert any("boom" in line for line in console_lines(result.stderr)), result.stderr[-2000:]


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    model_dir, cache = build_tiny_world(tmp_path / "world")
    exp = make_experiment(tmp_path, cache, str(model_dir))
    _, page = build_report(exp, "topk", feature_options=SMALL)
    result = chromium(page, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result.stderr) == []
    dom = _DomCounter()
    dom.feed(result.stdout)
    assert "js" in dom.body_classes and dom.active_tabs == ["study"]  # the tab script ran
    assert dom.tables >= 6 and dom.data_imgs == 5 and dom.svgs >= 10
    shot = tmp_path / "report.png"
    result = chromium(page, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 1600)
        colors = img.convert("L").getcolors(maxcolors=1 << 16)
        assert colors is not None and len(colors) > 20  # something was drawn, not a blank page
