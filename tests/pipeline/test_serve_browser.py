"""The page of `emollama serve` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium) loads it, uploads a real sample clip and waits for the answer; the
label, a bar per label and the contact sheet must show; then its timeline's plot. The screenshot is kept as a test artefact
(``$EMOLLAMA_ARTIFACTS/serve-page.png`` when that variable is set, else in the test's tmp folder).
Skips, with the reason, where Chromium or its driver cannot be had (`.ci/run` installs them with apt)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="headless Chromium not found: `apt-get install chromium chromium-driver` (.ci/run does)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from tiny_runs import tiny_run
    from emollama.pipeline.serve import ServeSettings, create_app, load_service

    tmp = tmp_path_factory.mktemp("serve-browser")
    run, _, _ = tiny_run(tmp, clips=6, seed=3)
    service = load_service(ServeSettings(run=str(run), upload_dir=str(tmp / "uploads")))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/", service
    srv.should_exit = True
    thread.join(timeout=10)
    service.close()


def _browser():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    except selenium.common.exceptions.WebDriverException as e:   # e.g. a driver of another Chromium version
        pytest.skip(f"headless Chromium would not start: {e.msg.splitlines()[0] if e.msg else e}")


def test_the_page_uploads_a_clip_and_shows_label_bars_and_contact_sheet(server, samples_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, service = server
    labels = service.predictor.labels
    clip = sorted(samples_dir.glob("*.mp4"))[2]
    driver = _browser()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: "run " in d.find_element(By.ID, "run").text)
        assert "tiny profile" in driver.find_element(By.ID, "note").text     # the fixture's warning, on the page
        driver.find_element(By.ID, "file").send_keys(str(clip))
        driver.find_element(By.ID, "subtitle").send_keys("I can't believe it.")
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "label").text.strip())
        wait.until(lambda d: d.execute_script("const i = document.getElementById('sheet');"
                                              "return i.style.display === 'block' && i.complete && i.naturalWidth > 0;"))
        label = driver.find_element(By.ID, "label-name").text.strip().lower()
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert label in labels
        assert sorted(b.get_attribute("data-label") for b in bars) == sorted(labels)
        top = driver.find_elements(By.CSS_SELECTOR, "#bars .bar.top")
        assert [b.get_attribute("data-label") for b in top] == [label]
        widths = [float(b.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width").removesuffix("px"))
                  for b in bars]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        sheet = driver.execute_script("const i = document.getElementById('sheet'); return [i.naturalWidth, i.naturalHeight];")
        assert sheet[0] > 100 and sheet[1] > 50
        history = driver.find_elements(By.CSS_SELECTOR, "#history li")
        assert len(history) == 1 and clip.name in history[0].text
        assert driver.find_element(By.ID, "reasoning").text.strip()
        # the same clip as a timeline: its plot is shown
        driver.find_element(By.ID, "timeline").click()
        wait.until(lambda d: d.execute_script("const i = document.getElementById('tl-plot');"
                                              "return i.complete && i.naturalWidth > 0;"))
        assert "windows of 4 s every 2 s" in driver.find_element(By.ID, "tl-info").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#history li")) == 2
        out = Path(os.environ.get("EMOLLAMA_ARTIFACTS") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "serve-page.png"
        driver.set_window_size(1280, max(900, driver.execute_script("return document.body.scrollHeight") + 40))
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        driver.quit()
    assert list(service.uploads.iterdir()) == []
