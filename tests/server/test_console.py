"""The console in a real browser: Debian's Chromium driven by Playwright against real
gunicorn serving the embedded model, with API keys on (issue 22). Without a key the page
asks for one and shows no data; with it, it lists the models, unloads the embedded model
and loads it again in 8 bits through its buttons (showing the load's progress), streams a
playground answer equal to the API's greedy answer for the same request, and its charts
show the traffic. Every request the page makes goes to this server. A screenshot of each
view is saved (TURSI_CONSOLE_SCREENSHOTS, else the test's temporary folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import Server

CHROMIUM = Path("/usr/bin/chromium")
MODEL = "smollm2-135m-instruct"
KEY = "console-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def server(embedded_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("console") / "server.log"
    srv = Server(
        {
            "TURSI_HOME": str(embedded_home),
            "TURSI_PRELOAD": MODEL,
            "TURSI_API_KEYS": KEY,
            "TURSI_RATE_LIMIT": "100000/minute",
        },
        log,
    )
    try:
        srv.wait_healthy()
        deadline = time.monotonic() + 300
        while model_status(srv) != "loaded":
            assert srv.process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.25)
        yield srv
    finally:
        srv.stop()


def model_status(server: Server) -> str:
    try:
        models = requests.get(f"{server.url}/models", headers=AUTH, timeout=5).json()["models"]
    except (requests.RequestException, ValueError, KeyError):
        return "unknown"
    return next(m["status"] for m in models if m["name"] == MODEL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def wait_for_attribute(page, selector: str, name: str, good, timeout: float = 60) -> None:
    """Until the element's attribute satisfies `good` (read from Python: the console's
    Content-Security-Policy forbids the string evaluation page.wait_for_function uses)."""
    deadline = time.monotonic() + timeout
    while not good(page.get_attribute(selector, name)):
        assert time.monotonic() < deadline, (selector, name, page.get_attribute(selector, name))
        time.sleep(0.25)


def test_the_console_end_to_end(server, browser, tmp_path):
    origin = server.url.removesuffix("/api/v1")
    shots = Path(os.environ.get("TURSI_CONSOLE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    page.set_default_timeout(120_000)

    # no key: a key prompt and no data
    page.goto(f"{origin}/console")
    page.wait_for_selector("#key-prompt:not([hidden])")
    assert page.locator("#models tbody tr").count() == 0
    assert page.locator("section.view:not([hidden])").count() == 0
    page.screenshot(path=str(shots / "console-key.png"))

    # the key: the catalog, the embedded model loaded
    page.fill("#key", KEY)
    page.click("#key-form button")
    row = f'tr[data-model="{MODEL}"]'
    page.wait_for_selector(f'{row}[data-status="loaded"]')
    assert page.locator("#models tbody tr").count() >= 1
    page.screenshot(path=str(shots / "console-models.png"))

    # unload, then load in 8 bits, through the buttons; what the table shows on the way
    page.evaluate(
        """(model) => {
          window.seenStates = [];
          const record = () => {
            const row = document.querySelector(`tr[data-model="${model}"]`);
            if (!row) return;
            const progress = row.querySelector('.details .progress');
            window.seenStates.push(row.dataset.status + (progress ? ':progress' : ''));
          };
          new MutationObserver(record).observe(
            document.querySelector('#models tbody'), {childList: true, subtree: true});
        }""",
        MODEL,
    )
    page.click(f"{row} button.unload")
    page.wait_for_selector(f'{row}[data-status="not_loaded"]')
    page.select_option(f"{row} select.bits", "8")
    page.click(f"{row} button.load")
    page.wait_for_selector(f'{row}[data-status="loaded"]')
    states = page.evaluate("window.seenStates")
    assert "loading:progress" in states, states
    assert page.inner_text(f"{row} td:nth-child(3)") == "8-bit dynamic"
    served = requests.get(f"{server.url}/models", headers=AUTH, timeout=10).json()["models"]
    assert next(m for m in served if m["name"] == MODEL)["bits"] == 8
    page.screenshot(path=str(shots / "console-models-8bit.png"))

    # the playground: a greedy answer, streamed, equal to the API's
    page.click('button[data-view="playground"]')
    page.wait_for_selector(f'#play-model option[value="{MODEL}"]', state="attached")
    page.select_option("#play-model", MODEL)
    page.fill("#play-temperature", "0")
    page.fill("#play-max-tokens", "32")
    page.fill("#play-input", "Once upon a time")
    page.click("#play-run")
    page.wait_for_selector('#play-output[data-done="true"], #play-error:not(:empty)')
    assert page.inner_text("#play-error") == ""
    shown = page.eval_on_selector("#play-output", "element => element.textContent")
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "top_p": 0.9}
    body |= {"max_tokens": 32, "return_full_text": False}
    answer = requests.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
    assert shown == answer.json()["text"]
    assert "time to first token" in page.inner_text("#play-stats")
    assert "tok/s" in page.inner_text("#play-stats")
    page.click("#copy-curl")
    assert f"{origin}/api/v1/generate" in page.inner_text("#play-snippet")
    page.screenshot(path=str(shots / "console-playground.png"), full_page=True)

    # the charts: the traffic shows (the history samples every 2 s)
    page.click('button[data-view="server"]')
    for chart in ("#chart-tokens", "#chart-requests"):
        wait_for_attribute(page, chart, "data-peak", lambda peak: float(peak or 0) > 0)
    assert float(page.get_attribute("#chart-memory", "data-latest")) > 0
    page.screenshot(path=str(shots / "console-server.png"), full_page=True)

    assert seen and all(url.startswith(f"{origin}/") for url in seen), seen
