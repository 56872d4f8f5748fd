"""The HTML report in a real browser: headless Chromium (Debian's chromium and chromium-driver, which .ci/run
installs) opens reports/report.html from the known-answer run, every image decodes, the console stays clean, and
a full-page screenshot is kept in test-artifacts/report.png."""

from __future__ import annotations

import base64
import os
import shutil

import pytest

from conftest import ROOT

BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(BROWSER) and shutil.which(DRIVER)):
        message = f"needs {BROWSER} and {DRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("REQUIRE_BROWSER"):  # CI sets it: there a missing browser is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    # no sandbox (CI runs as root); no background networking: this machine's network is closed
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_report_loads_with_every_image_and_no_errors(browser, known_answers):
    page = known_answers.outputs.report_html
    browser.get(page.resolve().as_uri())
    assert browser.title == f"Results: {known_answers.evaluation['best']} did best"
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) >= 10
    broken = [alt for alt, complete, width, height in images if not (complete and width > 0 and height > 0)]
    assert not broken, f"images that did not decode: {broken}"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert headings[:3] == ["What each ingredient bought", "The final test", "How it scales with labelled data"]
    # the per-variant details open on a click, showing the confusion matrices inside
    browser.execute_script("document.querySelector('details').open = true")
    shown = browser.execute_script("return document.querySelector('details img').getBoundingClientRect().width")
    assert shown > 100
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    png = base64.b64decode(shot["data"])
    assert png[:4] == b"\x89PNG" and size["height"] > 3000  # the whole page, not one screen
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(png)
