"""The web page at `/`, in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
with an API key (asked for, then kept in localStorage) and without; a generation shows step previews, lands in the
gallery with its settings, and "reproduce" makes the identical image (bytes), which is also the pipeline's."""

import base64
import io
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import pytest
from PIL import Image

from fluxion.pipeline import Pipeline
from server_fixtures import LiveServer, one_thread  # noqa: F401  (fixture)

KEY = "page-test-key"
STEPS = 8  # previews are sent for steps 1..STEPS-1: a few chances to see one while the image is made
INSTALL = ("the web page tests need headless Chromium and its driver: `apt-get install -y chromium chromium-driver` "
           "(Debian; `make test` installs them) and `pip install -e '.[test]'` (selenium)")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


@pytest.fixture(scope="module")
def browser():
    """Chromium, never a downloaded one: Selenium is given the system's browser and driver (no Selenium Manager)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}", pytrace=False)
    binary = os.environ.get("FLUXION_CHROMIUM") or next((p for p in CHROMIUM_PATHS if os.path.exists(p)), None)
    driver_path = os.environ.get("FLUXION_CHROMEDRIVER") or shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail(f"no {'chromium' if binary is None else 'chromedriver'} found: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def schnell(one_thread):  # noqa: F811
    return Pipeline.from_pretrained("tiny-schnell")


def wait(driver, condition, what: str, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waiting for {what}")


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def card_done(driver, number: int):
    """Card #number once finished (state done or error)."""
    def finished(d):
        cards = by_css(d, f"#image-{number}")
        return cards[0] if cards and cards[0].get_attribute("data-state") != "running" else None

    card = wait(driver, finished, f"image #{number}")
    assert card.get_attribute("data-state") == "done", card.text
    return card


def image_bytes(card) -> bytes:
    src = by_css(card, "img")[0].get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def fill(driver, field: str, value) -> None:
    element = by_css(driver, f"#{field}")[0]
    element.clear()
    element.send_keys(str(value))


def test_page_with_a_key_previews_gallery_and_reproduce(tmp_path, browser, schnell):
    server = LiveServer(tmp_path / "data", "--model", "tiny-schnell", "--api-key", KEY, "--max-steps", 12).start()
    try:
        browser.get(server.url + "/")
        status = wait(browser, lambda d: by_css(d, "#status")[0].text, "the missing key notice")
        assert "needs an API key" in status
        fill(browser, "key", KEY + "\n")  # the change event stores it and loads the models
        wait(browser, lambda d: by_css(d, "#model option"), "the model list")
        fill(browser, "prompt", "a red circle left of a blue square")
        fill(browser, "size", "64x64")
        fill(browser, "steps", STEPS)  # the seed is left empty: the server picks it, the gallery shows it
        by_css(browser, "#generate")[0].click()

        first = card_done(browser, 1)
        assert int(first.get_attribute("data-previews")) >= 1, "no step preview was shown"
        seed = int(first.get_attribute("data-seed"))
        settings = dict(zip([e.text for e in by_css(first, "dt")], [e.text for e in by_css(first, "dd")]))
        assert settings == {"model": "tiny-schnell", "size": "64x64", "seed": str(seed), "steps": str(STEPS)}

        by_css(first, ".reproduce")[0].click()
        assert by_css(browser, "#seed")[0].get_attribute("value") == str(seed)  # the form was refilled
        second = card_done(browser, 2)
        assert second.get_attribute("data-identical") == "true"
        assert image_bytes(second) == image_bytes(first)
        reference = schnell("a red circle left of a blue square", seed=seed, height=64, width=64,
                            num_inference_steps=STEPS)[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image_bytes(first))).convert("RGB")),
                              np.asarray(reference))

        browser.refresh()  # the key was kept in localStorage: no notice, the models load at once
        wait(browser, lambda d: by_css(d, "#model option"), "the model list after a reload")
        assert by_css(browser, "#key")[0].get_attribute("value") == KEY
        assert by_css(browser, "#status")[0].text == ""
    finally:
        server.stop()


def test_page_on_an_open_server(tmp_path, browser):
    server = LiveServer(tmp_path / "data", "--model", "tiny-schnell", "--model", "tiny-dev", "--no-preload").start()
    try:
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        sources = page.text + "".join(httpx.get(f"{server.url}/page/{name}").text for name in ("app.js", "style.css"))
        assert "://" not in sources, "the page must load nothing from elsewhere (it works offline)"
        assert httpx.get(server.url + "/page/secret.txt").status_code == 404
        browser.get(server.url + "/")
        options = wait(browser, lambda d: by_css(d, "#model option"), "the model list")
        assert [o.get_attribute("value") for o in options] == ["tiny-schnell", "tiny-dev"]
        assert by_css(browser, "#key")[0].get_attribute("value") == ""
        fill(browser, "prompt", "two yellow circles")
        fill(browser, "seed", 3)
        fill(browser, "steps", 2)
        by_css(browser, "#generate")[0].click()
        card = card_done(browser, 1)
        assert card.get_attribute("data-seed") == "3"
        assert Image.open(io.BytesIO(image_bytes(card))).size == (64, 64)  # the model's default size
        assert by_css(browser, "#status")[0].text == ""
    finally:
        server.stop()
