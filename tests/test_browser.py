"""The chat page in a real browser: Debian's headless Chromium driven by Playwright for Python.

Playwright's own browser download does not work offline, so this launches the system `chromium`
(`apt-get install chromium`; .ci/run installs it). The server is chat_web's app on a loopback port
with EchoChatModel (conftest), whose reply echoes the user's message and calls the calculator, at 30 ms
a token so the page's streaming can be watched.
"""
import os
import shutil
import time

import httpx
import pytest

from nanochat.serve.app import create_app
from nanochat.serve.replicas import Worker

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or next(
    (p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                "(apt-get install chromium; .ci/run installs it)")

REPLY_STATE = "document.querySelector('.msg.assistant:last-of-type')?.dataset.state"


def assistant_text(page):
    """The last reply's text parts (tool calls excluded)."""
    return "".join(page.locator(".msg.assistant").last.locator(".content > .text").all_text_contents())


def wait_reply_done(page, timeout=15):
    page.wait_for_function(f"{REPLY_STATE} === 'done'", timeout=timeout * 1000)


def test_chat_page_streams_edits_and_regenerates(byte_tokenizer, echo_chat_model, serve_app):
    model = echo_chat_model(byte_tokenizer, delay=0.03)
    app = create_app([Worker(0, model, byte_tokenizer)], "nanochat-echo")
    with serve_app(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'nanochat-echo'")

            # send a message; the reply streams in token by token
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-state='streaming']")
            seen = []
            deadline = time.monotonic() + 15
            while page.evaluate(REPLY_STATE) == "streaming" and time.monotonic() < deadline:
                text = assistant_text(page)
                if text and (not seen or seen[-1] != text):
                    seen.append(text)
                time.sleep(0.01)
            wait_reply_done(page)
            assert len(seen) >= 5, seen  # many partial states, each extending the last
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
            assert assistant_text(page) == "You said: hello there ok"
            # the calculator call and its output are shown as their own boxes
            reply = page.locator(".msg.assistant").last
            assert reply.locator(".tool.call code").inner_text() == "6*7"
            assert reply.locator(".tool.call .label").inner_text().lower() == "calculator"  # the tool is named
            assert reply.locator(".tool.output code").inner_text() == "42"
            assert page.input_value("#input") == ""

            # a second turn carries the history (with the tool parts) back to the server
            page.fill("#input", "and more")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg').length === 4")
            wait_reply_done(page)
            assert assistant_text(page) == "You said: and more ok"

            # edit the first message: everything after it is replaced by a reply to the edited text
            page.locator(".msg.user").first.locator("button.edit").click()
            page.fill(".msg.user textarea.edit-box", "goodbye")
            page.click(".msg.user button.save")
            page.wait_for_function("document.querySelectorAll('.msg').length === 2")
            wait_reply_done(page)
            assert page.locator(".msg.user .content").inner_text() == "goodbye"
            assert assistant_text(page) == "You said: goodbye ok"

            # regenerate the last reply
            page.click(".msg.assistant button.regenerate")
            page.wait_for_selector(".msg.assistant[data-state='streaming']")
            wait_reply_done(page)
            assert page.locator(".msg").count() == 2 and assistant_text(page) == "You said: goodbye ok"

            # a request the server refuses: its error is shown, the message goes back into the input box
            page.click("#settings summary")
            page.fill("#max-tokens", "99999")
            page.fill("#input", "too long a reply")
            page.press("#input", "Enter")
            error = page.wait_for_selector(".msg.error")
            assert "max_tokens must be between 1 and 4096" in error.inner_text()
            assert page.input_value("#input") == "too long a reply"
            assert page.locator(".msg.user, .msg.assistant").count() == 2
            page.fill("#max-tokens", "")

            # stop a reply mid-stream: the partial reply stays, marked stopped, and the server's worker is freed
            page.fill("#input", "z" * 120)
            page.press("#input", "Enter")
            page.wait_for_function("(document.querySelector('.msg.assistant:last-of-type .text')?.textContent || '').length > 5")
            page.click("#stop")
            page.wait_for_function(f"{REPLY_STATE} === 'stopped'")
            assert "[stopped]" in page.locator(".msg.assistant").last.inner_text()
            assert 5 < len(assistant_text(page)) < len("You said: " + "z" * 120)
            deadline = time.monotonic() + 5
            while httpx.get(url + "/stats").json()["requests_cancelled"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(url + "/stats").json()["requests_cancelled"] == 1

            # new conversation
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0 and page.locator(".empty").is_visible()

            assert not page_errors
            assert requested and all(u.startswith(url + "/") for u in requested)  # nothing from elsewhere
        finally:
            browser.close()


def test_chat_page_asks_for_the_api_key(byte_tokenizer, echo_chat_model, serve_app):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-echo", api_key="s3cret")
    with serve_app(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/")  # the page itself needs no key
            page.fill("#input", "hello")
            page.press("#input", "Enter")
            # refused with 401: the settings open on the key field, and the server's message is shown
            page.wait_for_function("document.getElementById('settings').open")
            page.wait_for_function("document.body.innerText.includes('enter it under settings')")
            assert page.evaluate("document.activeElement.id") == "api-key"
            page.fill("#api-key", "s3cret")
            page.dispatch_event("#api-key", "change")
            page.fill("#input", "hello again")
            page.press("#input", "Enter")
            page.wait_for_function(f"{REPLY_STATE} === 'done'", timeout=15000)
            assert assistant_text(page) == "You said: hello again ok"
            page.reload()  # the key is remembered by this browser
            assert page.input_value("#api-key") == "s3cret"
        finally:
            browser.close()
