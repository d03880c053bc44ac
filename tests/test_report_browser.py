"""The report in a real browser: headless Chromium opens index.html from disk (offline), every picture
loads, the random-weights banner is visible at the top, and a screenshot is written.

Skipped when no chromium is installed (``apt-get install -y chromium``), unless REPORT_BROWSER_REQUIRED=1
(what ``.ci/run`` sets after installing it): then a missing browser fails the test. Part of ``make test``.
The page itself has no JavaScript: the check below runs on a copy of it (``_check.html``) that this
test harness writes next to it and deletes afterwards.
"""
from __future__ import annotations

import html as _html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.report import build_report
from report_fixtures import make_experiment

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-dev-shm-usage"]

CHECK = """<script>
window.addEventListener("load", function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!(im.complete && im.naturalWidth > 0)) broken.push(im.getAttribute("src"));
  }
  var b = document.getElementById("random-weights-warning"), vis = false, top = null;
  if (b) {
    var r = b.getBoundingClientRect(), st = getComputedStyle(b);
    top = r.top;
    vis = r.width > 0 && r.height > 0 && st.display !== "none" && st.visibility !== "hidden" && r.top < window.innerHeight;
  }
  var pre = document.createElement("pre");
  pre.id = "check-result";
  pre.textContent = JSON.stringify({images: document.images.length, broken: broken, banner: vis, banner_top: top});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def browser_check(exe: str, report: Path, profile: Path) -> tuple[dict, str]:
    """Load a copy of index.html with the check script (lazy loading off so every picture loads);
    returns the check's result and chromium's log."""
    page = (report / "index.html").read_text().replace(' loading="lazy"', "")
    check = report / "_check.html"
    check.write_text(page.replace("</body>", CHECK + "\n</body>"))
    try:
        proc = run_chromium(exe, profile, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
                            "--dump-dom", check.resolve().as_uri())
    finally:
        check.unlink(missing_ok=True)
    m = re.search(r'<pre id="check-result">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium gave no check result (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(_html.unescape(m.group(1))), proc.stderr


def screenshot(exe: str, report: Path, profile: Path, out: Path, size=(1280, 900)) -> Path:
    proc = run_chromium(exe, profile, f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
                        (report / "index.html").resolve().as_uri())
    assert out.is_file(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def exe():
    e = chromium()
    if e is None:
        if os.environ.get("REPORT_BROWSER_REQUIRED") == "1":
            pytest.fail("REPORT_BROWSER_REQUIRED=1 but no chromium on PATH (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return e


def test_report_in_headless_chromium(exe, tmp_path):
    from PIL import Image

    base = make_experiment(tmp_path / "outputs", tmp_path / "data")
    build_report(base)
    report = base / "report"
    result, log = browser_check(exe, report, tmp_path / "profile")
    n_img = (report / "index.html").read_text().count("<img ")
    assert result["images"] == n_img > 10
    assert result["broken"] == [], f"pictures that did not load: {result['broken']}"
    assert result["banner"] and result["banner_top"] < 200, result
    assert not re.search(r"ERR_FILE_NOT_FOUND|Not allowed to load local resource|Uncaught", log), log[-3000:]
    assert not (report / "_check.html").exists()
    shot = screenshot(exe, report, tmp_path / "profile", tmp_path / "report.png")
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 900)
        # the banner's red (#b00020) is on screen in the top 250 px
        top = rgb.crop((0, 0, 1280, 250)).getdata()
        assert sum(1 for p in top if abs(p[0] - 0xB0) < 12 and p[1] < 20 and abs(p[2] - 0x20) < 16) > 5000


def test_real_weights_report_shows_no_banner(exe, tmp_path):
    base = make_experiment(tmp_path / "outputs", tmp_path / "data", random_init=False)
    build_report(base)
    result, _ = browser_check(exe, base / "report", tmp_path / "profile")
    assert result["broken"] == [] and result["banner"] is False and result["banner_top"] is None
