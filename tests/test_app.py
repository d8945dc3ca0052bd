"""The web app (app.py) in a real browser: Debian's chromium driven by Playwright, on a free loopback port.

Skipped, saying why, when chromium or Playwright is missing; `.ci/run` installs chromium and sets
D2D_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
LOOPBACK = ("http://127.0.0.1", "data:", "blob:")  # everything else the page asks for is a fetch from outside


def browser_or_skip() -> str:
    missing = []
    if CHROMIUM is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        reason = f"browser test SKIPPED: {' and '.join(missing)} not installed"
        if os.environ.get("D2D_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + ", but D2D_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    return CHROMIUM


def test_uploads_that_cannot_be_scored_are_named_with_the_reason(tmp_path):
    from PIL import Image

    from d2dprompt.serve.app import check_upload
    from d2dprompt.core.data.images import ImageError

    good = tmp_path / "good.png"
    Image.new("RGB", (300, 200)).save(good)
    assert check_upload(good, max_mb=1, max_side=300, name="good.png").shape == (200, 300, 3)
    with pytest.raises(ImageError, match=r"^good.png: 300x200, larger than the 299 px limit \(--max-side\)"):
        check_upload(good, max_mb=1, max_side=299, name="good.png")
    (tmp_path / "big.bin").write_bytes(b"\0" * 3 * 2**20)
    with pytest.raises(ImageError, match=r"^big.bin: 3.0 MB, larger than the 2 MB limit \(--max-mb\)"):
        check_upload(tmp_path / "big.bin", max_mb=2, max_side=8192, name="big.bin")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match=r"^cut.png: cannot decode image"):
        check_upload(tmp_path / "cut.png", max_mb=1, max_side=8192, name="cut.png")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkout(workspace, trained, tmp_path_factory) -> Path:
    """A checkout-like folder: the trained run under stages/train/, evaluate's thresholds under stages/evaluate/."""
    root = tmp_path_factory.mktemp("app")
    shutil.copytree(trained, root / "stages/train/d2dprompt")
    (root / "stages/evaluate/d2dprompt/sample").mkdir(parents=True)
    shutil.copy(workspace / "stages/evaluate-trained/sample/thresholds.json", root / "stages/evaluate/d2dprompt/sample")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(checkout):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = (checkout / "app.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "d2dprompt.serve.app", "--port", str(port), "--samples", str(ROOT / "sample")],
                            cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() - started > 120:
                proc.kill()
                pytest.fail(f"the app did not start:\n{(checkout / 'app.log').read_text()[-3000:]}")
            time.sleep(0.2)
    print(f"app answered after {time.monotonic() - started:.1f} s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_upload_score_slider_and_downloads_in_chromium(checkout, server, tmp_path):
    chromium = browser_or_skip()
    from playwright.sync_api import sync_playwright

    from d2dprompt import Detector

    image = ROOT / "sample/weave/test/hole/000.png"
    expected = Detector.load(checkout / "stages/train").predict(image)
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.on("request", lambda r: None if r.url.startswith(LOOPBACK) else outside.append(r.url))
        page.goto(server)
        page.wait_for_selector("#run-info >> text=thresholds.json")
        page.set_input_files("#uploads input[type=file]", [str(image), str(checkout / "notes.txt")])
        clicked = time.monotonic()
        page.click("#detect")
        page.wait_for_selector("#score-value", timeout=120_000)
        print(f"one prediction through the page: {time.monotonic() - clicked:.2f} s")

        assert page.inner_text("#score-value") == f"{expected.score:.6f}"
        assert ("**anomalous**" if expected.label else "**normal**").strip("*") in page.inner_text("#verdict")
        assert re.search(r"notes\.txt: not an image file", page.inner_text("#problems"))
        before = int(page.inner_text("#mask-pixels"))
        assert before == int(expected.mask.sum())

        stricter = round(expected.thresholds.pixel + 0.05, 6)
        box = page.locator("#pixel-threshold input[type=number]")
        box.fill(str(stricter))
        box.press("Enter")
        box.blur()
        page.wait_for_function(f"document.querySelector('#mask-pixels').innerText != '{before}'", timeout=60_000)
        after = int(page.inner_text("#mask-pixels"))
        assert after == int(expected.with_thresholds(pixel=stricter).mask.sum()) and after < before
        assert page.inner_text("#score-value") == f"{expected.score:.6f}"  # the map was not recomputed: same score

        link = page.locator("#json-file a").first.get_attribute("href")
        record = json.loads(page.request.get(link if link.startswith("http") else server.rstrip("/") + link).text())
        (saved,) = record["images"]
        assert saved["image"] == "000.png" and abs(saved["score"] - expected.score) < 1e-9 and saved["pixel_threshold"] == stricter
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert outside == []  # offline: no CDN, font or telemetry request left the machine
