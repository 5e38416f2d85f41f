"""The trace viewer in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against the live shared server: generate, steps appear, the kappa slider and
the strategy selector change which steps become [SKIP], token shading, answers side by
side, scoring pasted reasoning, server errors shown on the page; and the API key, against
a keyed app that needs no engine for the calls used. Every wait is bounded."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
import time

import pytest
import uvicorn

from clients.launcher import free_port
from server.app import create_app
from server.engine.engine import Engine
from server.settings import ServerSettings

pytestmark = pytest.mark.engine

WAIT_S = 240  # generous for a 2-core CI machine; a healthy run takes seconds per action


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert binary and driver_path, "needs chromium and chromium-driver (docker/setup.sh)"
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait_settled(driver, timeout: float = WAIT_S) -> str:
    """Wait until the page is no longer busy; returns 'ready' or 'error'."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state")
        in ("ready", "error"))
    return driver.find_element("tag name", "body").get_attribute("data-state")


def set_kappa(driver, tenths: int) -> None:
    """Move the slider with the keyboard, as a user would: Home, then right arrows."""
    from selenium.webdriver.common.keys import Keys

    slider = by_id(driver, "kappa")
    slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * tenths)
    assert by_id(driver, "kappa-value").text == f"{tenths / 10:.1f}"


def skipped(driver) -> list[int]:
    steps = driver.find_elements("css selector", "#steps .step.skipped")
    return [int(s.get_attribute("data-index")) for s in steps]


def test_generate_slide_shade_answer_score_and_errors(server, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(f"{server.url}/viewer/")
    assert d.title == "stepzip viewer"
    by_id(d, "load-examples").click()
    assert wait_settled(d) == "ready", by_id(d, "error").text
    Select(by_id(d, "examples")).select_by_index(3)
    problem = by_id(d, "problem").get_attribute("value")
    assert problem and by_id(d, "gold").get_attribute("value")
    max_tokens = by_id(d, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("64")
    by_id(d, "submit").click()
    assert wait_settled(d) == "ready", by_id(d, "error").text

    n = len(d.find_elements("css selector", "#steps .step"))
    assert n >= 1
    assert len(skipped(d)) == math.floor(0.8 * n)  # the default kappa
    for tenths in (0, 10, 5):
        set_kappa(d, tenths)
        assert len(skipped(d)) == math.floor(tenths / 10 * n)
        assert by_id(d, "skip-count").get_attribute("data-skipped") == str(len(skipped(d)))
    low = set(skipped(d))
    Select(by_id(d, "strategy")).select_by_value("high")
    high = set(skipped(d))
    assert len(high) == len(low) and not (high & low)  # the other end of the ranking
    assert "token reduction" in by_id(d, "reduction").text

    by_id(d, "shade-tokens").click()
    tokens = d.find_elements("css selector", "#steps .tok")
    assert tokens and all(t.get_attribute("title").endswith("nats") for t in tokens[:5])

    by_id(d, "answer").click()
    assert wait_settled(d) == "ready", by_id(d, "error").text
    assert by_id(d, "answers").is_displayed()
    assert "extracted:" in by_id(d, "answer-full").text
    assert "extracted:" in by_id(d, "answer-compressed").text
    d.save_screenshot(str(tmp_path / "viewer.png"))
    print(f"screenshot: {tmp_path / 'viewer.png'}")

    by_id(d, "mode-score").click()
    by_id(d, "reasoning").send_keys("Tom has 3 apples.\nHe buys 4 more.\n3 + 4 = 7.\n"
                                    "The answer is 7")
    by_id(d, "submit").click()
    assert wait_settled(d) == "ready", by_id(d, "error").text
    assert len(d.find_elements("css selector", "#steps .step")) == 3
    assert by_id(d, "status").text.startswith("scored")

    by_id(d, "mode-generate").click()
    max_tokens.clear()
    max_tokens.send_keys("100000")
    by_id(d, "submit").click()
    assert wait_settled(d) == "error"
    error = by_id(d, "error")
    assert error.is_displayed() and "HTTP 422" in error.text and "max_tokens" in error.text
    d.save_screenshot(str(tmp_path / "viewer-error.png"))


class NeverStarts(Engine):
    """No engine: the viewer's page and /v1/problems need none."""

    async def start(self) -> None:
        await asyncio.Event().wait()


@pytest.fixture(scope="module")
def keyed_server():
    settings = ServerSettings(api_key="sesame", port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_app(settings, NeverStarts(settings)),
                                           host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_page_is_public_and_its_calls_carry_the_key(keyed_server, browser):
    d = browser
    d.get(f"{keyed_server}/viewer/")
    d.execute_script("sessionStorage.clear()")
    by_id(d, "load-examples").click()
    assert wait_settled(d, 30) == "error"
    assert "HTTP 401" in by_id(d, "error").text and "API key" in by_id(d, "error").text
    by_id(d, "api-key").send_keys("sesame")
    by_id(d, "key-form").submit()
    assert by_id(d, "key-state").text == "key set (this tab)"
    assert by_id(d, "api-key").get_attribute("value") == ""  # not left in the field
    by_id(d, "load-examples").click()
    assert wait_settled(d, 30) == "ready", by_id(d, "error").text
    assert not by_id(d, "error").is_displayed()
    assert len(d.find_elements("css selector", "#examples option")) > 1
