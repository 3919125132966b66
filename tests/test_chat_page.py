"""The chat page (nanoglm5/chat.html), served by the server at `/`, driven in a real headless browser:
Debian's chromium + chromedriver through selenium, against a tiny random checkpoint served by uvicorn
in-process on a loopback port. Greedy decoding (temperature 0) makes the streamed reply checkable
against the non-streamed API answer to the same conversation.

Without chromium, chromedriver or selenium the test is skipped with the reason, except in CI (CI=true),
where it fails.
"""

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from conftest import IN_CI, LiveServer

from nanoglm5.server import create_app

try:  # optional: only this test needs a browser
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None

PAGE = Path(__file__).resolve().parents[1] / "nanoglm5" / "chat.html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MAX_TOKENS = 12
WAIT_S = 60


@pytest.fixture(scope="module")
def server(tiny_chat_ckpt):
    ckpt = tiny_chat_ckpt
    srv = LiveServer(create_app(ckpt, max_batch=4, max_queue=8, default_max_tokens=8))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if webdriver is None:
        missing.append("selenium (pip install selenium)")
    if missing:
        msg = (
            "the chat page test needs "
            + ", ".join(missing)
            + " (Debian: apt-get install chromium chromium-driver)"
        )
        if IN_CI:
            pytest.fail("CI requires a browser: " + msg)
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    with (
        pytest.MonkeyPatch.context() as mp,
        tempfile.TemporaryDirectory(prefix="nanoglm5_chromium_") as profile,
    ):
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--window-size=1100,800",
            f"--user-data-dir={profile}",
        ):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def _greedy_reply(server, messages) -> str:
    """The non-streamed API's greedy answer to the same conversation."""
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _text(el) -> str:
    return el.get_property("textContent")  # exact text; WebElement.text normalises whitespace


def _wait_for_reply(driver, n_assistant: int) -> str:
    """Waits (bounded) until the n-th assistant message is complete and the status says done."""

    def finished(d):
        replies = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
        status = _text(d.find_element(By.ID, "status"))
        if status.startswith("error"):
            raise AssertionError(f"the page reports {status!r}")
        if len(replies) == n_assistant and status.startswith("done") and _text(replies[-1]):
            return _text(replies[-1])
        return False

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(finished)
    except TimeoutException:
        status = _text(driver.find_element(By.ID, "status"))
        raise AssertionError(f"no finished reply within {WAIT_S}s; status: {status!r}") from None


def _open(d, server):
    """Load the page, wait until it is ready and its task menu is filled, and record every request body it sends."""
    d.get(server.url + "/")
    WebDriverWait(d, WAIT_S).until(lambda d: _text(d.find_element(By.ID, "status")) == "ready"
                                   and len(Select(d.find_element(By.ID, "task")).options) > 1)
    d.execute_script("""window.sentBodies = []; const f = window.fetch;
        window.fetch = (url, opts) => { if (opts && opts.body) window.sentBodies.push(JSON.parse(opts.body));
                                        return f(url, opts); };""")


def _wait_sent(d, n: int) -> None:
    """Until the page has sent n chat requests and the last one is answered (a reply or an error)."""
    WebDriverWait(d, WAIT_S).until(lambda d: len(d.execute_script("return window.sentBodies")) == n
                                   and not _text(d.find_element(By.ID, "status")).startswith("generating"))


def test_chat_page_offers_trained_task_kinds_with_their_system_prompt(browser, server):
    """The page offers the task kinds the model was trained on (#20 item 7): a trained kind is selected by default,
    clicking its example fills the message box, and the request carries the kind's system prompt first, so the
    model sees the prompt it was trained with."""
    kinds = httpx.get(server.url + "/chat/tasks", timeout=30).json()["tasks"]
    assert {"code", "math", "agent"} <= {k["name"] for k in kinds} and all(k["system"] and k["example"] for k in kinds)
    d = browser
    _open(d, server)
    code = next(k for k in kinds if k["name"] == "code")
    assert Select(d.find_element(By.ID, "task")).first_selected_option.get_property("value") == kinds[0]["name"]
    Select(d.find_element(By.ID, "task")).select_by_value("code")
    assert code["system"] in _text(d.find_element(By.ID, "system"))
    temperature = d.find_element(By.ID, "temperature")
    temperature.send_keys(Keys.HOME)  # greedy
    max_tokens = d.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    d.find_element(By.ID, "example").click()
    assert d.find_element(By.ID, "input").get_property("value") == code["example"]
    d.find_element(By.ID, "send").click()  # (the tiny test model's 96-token context may not hold it: the request
    _wait_sent(d, 1)                       # is what this test checks, the answer is the API's)
    sent = d.execute_script("return window.sentBodies")[-1]["messages"]
    assert sent == [{"role": "system", "content": code["system"]}, {"role": "user", "content": code["example"]}]
    # another kind: its own system prompt, a new conversation
    Select(d.find_element(By.ID, "task")).select_by_value("math")
    assert d.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    d.find_element(By.ID, "example").click()
    d.find_element(By.ID, "send").click()
    _wait_sent(d, 2)
    sent = d.execute_script("return window.sentBodies")[-1]["messages"]
    assert sent[0] == {"role": "system", "content": next(k["system"] for k in kinds if k["name"] == "math")}
    assert len(sent) == 2
    # the only browser errors: the server's 400s for prompts longer than the tiny model's context (drained here)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert all("status of 400" in e["message"] for e in errors), errors


def test_chat_page_streams_a_conversation(browser, server):
    page = httpx.get(server.url + "/", timeout=30)
    if page.status_code == 404:
        pytest.fail(
            "the server has no GET / route: nanoglm5/server.py must serve nanoglm5/chat.html at `/` "
            '(@app.get("/", response_class=HTMLResponse) returning the file\'s text)'
        )
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == PAGE.read_text(encoding="utf-8")

    d = browser
    _open(d, server)
    assert _text(d.find_element(By.ID, "model")) == "tiny-chat"
    Select(d.find_element(By.ID, "task")).select_by_value("")  # free chat: no system prompt
    temperature = d.find_element(By.ID, "temperature")
    assert temperature.get_property("value") == "0.7"  # the default
    temperature.send_keys(Keys.HOME)  # the slider's minimum: greedy, so the reply is checkable
    assert (
        temperature.get_property("value") == "0"
        and _text(d.find_element(By.ID, "temperature-value")) == "0.00"
    )
    max_tokens = d.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))

    box = d.find_element(By.ID, "input")
    box.send_keys("hello model")
    d.find_element(By.ID, "send").click()
    first = _wait_for_reply(d, 1)
    convo = [{"role": "user", "content": "hello model"}]
    assert first == _greedy_reply(server, convo)
    assert [_text(m) for m in d.find_elements(By.CSS_SELECTOR, "#messages .msg.user")] == ["hello model"]

    # Shift+Enter is a new line; Enter sends, with the whole conversation so far
    box.send_keys("the cat", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "sat")
    assert box.get_property("value") == "the cat\nsat"
    assert len(d.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
    box.send_keys(Keys.ENTER)
    second = _wait_for_reply(d, 2)
    convo += [{"role": "assistant", "content": first}, {"role": "user", "content": "the cat\nsat"}]
    assert second == _greedy_reply(server, convo)
    assert box.get_property("value") == ""

    d.find_element(By.ID, "new-chat").click()
    assert d.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    assert _text(d.find_element(By.ID, "status")) == "ready"
    box.send_keys("hello model", Keys.ENTER)  # a fresh conversation: the first answer again
    assert _wait_for_reply(d, 1) == first
    assert len(d.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
