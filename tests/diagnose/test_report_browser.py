"""report.html in a real browser: headless Chromium renders the page (DOM and a screenshot) from a
file:// URL. Skipped when no ``chromium`` / ``chromium-browser`` is on PATH (CI installs one)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from gradguard.diagnose import html as report
from gradguard.diagnose import plots

from tests.diagnose.test_report import FINDINGS, HOSTILE, write_run

pytestmark = pytest.mark.slow  # two headless Chromium starts

WIDTH, HEIGHT = 1200, 2400


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium or chromium-browser on PATH (apt-get install chromium)")


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",  # a fresh profile: no lock shared with another browser
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class _Page(HTMLParser):
    """The rendered DOM's text, its img sources and every start tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.imgs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    browser = _chromium()
    tmp = tmp_path_factory.mktemp("browser")
    run_dir = write_run(tmp / "run", hostile=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "diagnose", lambda run: FINDINGS)
        path = report.write_report(run_dir)
    url = path.resolve().as_uri()
    dom = _run(browser, tmp / "profile-dom", "--dump-dom", url).stdout
    shot = tmp / "shot.png"
    _run(
        browser,
        tmp / "profile-shot",
        f"--screenshot={shot}",
        f"--window-size={WIDTH},{HEIGHT}",
        url,
    )
    return dom, shot


def test_dom_has_the_report_text_and_images(rendered):
    dom, _ = rendered
    page = _Page()
    page.feed(dom)
    text = " ".join(" ".join(page.text).split())
    assert "gradguard report: run" in text
    assert "Events (5)" in text and "nonfinite_grad" in text
    for f in FINDINGS:
        assert f.title in text
    assert HOSTILE in text  # shown as text ...
    assert "script" not in page.tags  # ... never run as a script
    assert len(page.imgs) == len(plots.FIGURES)
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)


def test_screenshot_is_not_blank(rendered):
    _, shot = rendered
    img = imread(shot)[..., :3]
    assert img.shape[0] >= HEIGHT * 0.9 and img.shape[1] >= WIDTH * 0.9, img.shape
    pixels = img.reshape(-1, 3)
    ink = (pixels.min(axis=1) < 0.9).mean()
    assert ink > 0.05, f"only {ink:.1%} of the page is not white"
    # Saturated pixels come from the figures and the badges, not from black text on white.
    colorful = (pixels.max(axis=1) - pixels.min(axis=1) > 0.3).mean()
    assert colorful > 0.005, f"only {colorful:.2%} colored pixels"
    q = (pixels * 7).round().astype(int)  # 8 levels a channel, one int a color
    _, counts = np.unique(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], return_counts=True)
    assert (counts >= 200).sum() >= 10, "too few distinct colors for a page with plots"
