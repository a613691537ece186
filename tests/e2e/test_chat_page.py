"""The chat page of ``scriptorium serve`` as a person uses it, in headless Chromium (Debian's,
driven by Playwright): a message gets a reply that streams in token by token and completes; a
second reply is stopped midway, and the server drops it from its batch.

The server is a real ``scriptorium serve`` subprocess on a tiny random model whose stop tokens
can never win the argmax, so a greedy reply runs to ``max_tokens``: long enough to watch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from llm_core.generate import generate
from llm_core.sft import encode_prompt
from tests.e2e.test_browser import TIMEOUT_MS, chromium_executable, screenshot
from tests.pipeline.serve.serving import Served, one_thread, serve, tiny_chat_model

REPLY_TOKENS = 300  # the first reply, compared with llm_core's greedy generation
STOPPED_TOKENS = 3000  # the second one asks for this many, and is stopped after a few


@pytest.fixture(scope="module")
def chat_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Served, object, object]]:
    out = tmp_path_factory.mktemp("chat_page_model")
    with one_thread():
        model, tok = tiny_chat_model(out, ctx=8192, never_stop=True)
    with serve(out, "--model-name", "tiny-chat") as served:
        yield served, model, tok


def test_chat_page_streams_a_reply_and_stops_another(chat_server, artifacts_dir: Path) -> None:
    served, model, tok = chat_server
    executable = chromium_executable()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(served.url + "/")
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('tiny-chat')"
            )
            page.fill("#temperature", "0")
            page.fill("#max_tokens", str(REPLY_TOKENS))

            # Every text the reply shows on its way is recorded as the page writes it (a
            # MutationObserver's records keep each written text node, so no poll can miss one).
            page.evaluate(
                """() => { window.seenTexts = [];
                    new MutationObserver((records) => {
                      const c = document.querySelectorAll('.msg.assistant .content')[0];
                      for (const r of records)  // each write replaces the text node: keep each
                        if (r.target === c && r.addedNodes.length)
                          window.seenTexts.push(r.addedNodes[0].data);
                    }).observe(document.getElementById('messages'),
                               {childList: true, subtree: true}); }"""
            )

            # 1. A reply streams in, token by token, and completes.
            page.fill("#input", "hello")
            page.click("#send")
            reply = page.locator(".msg.assistant .content").nth(0)
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[0].dataset.state === 'done'"
            )
            final = reply.text_content() or ""
            assert page.text_content("#status") == "done (length)"
            ids = encode_prompt(tok, [{"role": "user", "content": "hello"}])
            with one_thread():
                new = generate(model, ids, REPLY_TOKENS, temperature=0)[0]
            expected = tok.decode(new, skip_special_tokens=True)
            assert final == expected  # the page shows exactly the model's greedy reply
            seen = page.evaluate("window.seenTexts")
            partial = {t for t in seen if 0 < len(t) < len(final)}
            assert len(partial) > 10, seen[:5]  # many intermediate states, not one blob
            assert all(final.startswith(t) for t in partial)
            screenshot(page, artifacts_dir, "chat-page-reply")

            # 2. A second reply is stopped midway: the page says so and the server cancels it.
            page.fill("#max_tokens", str(STOPPED_TOKENS))
            page.fill("#input", "and again")
            # Stop as soon as the first tokens show: clicked from an observer of the reply, so
            # a fast tiny model cannot finish during a round trip of the test.
            page.evaluate(
                """() => { const obs = new MutationObserver(() => {
                      const c = document.querySelectorAll('.msg.assistant .content')[1];
                      if (c && c.textContent.length) {
                        obs.disconnect(); document.getElementById('stop').click(); }
                    });
                    obs.observe(document.getElementById('messages'),
                                {childList: true, subtree: true, characterData: true}); }"""
            )
            page.click("#send")
            second = page.locator(".msg.assistant").nth(1)
            state = page.wait_for_function(
                """() => { const m = document.querySelectorAll('.msg.assistant')[1];
                           return m.dataset.state !== 'streaming' && m.dataset.state; }"""
            ).json_value()
            assert state == "stopped", second.text_content()
            assert page.text_content("#status") == "stopped"
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            stopped = second.locator(".content").text_content() or ""
            health: dict[str, object] = {}
            for _ in range(50):  # the server notices the closed stream within a step or two
                health = requests.get(f"{served.url}/health", timeout=5).json()
                if health["finished"].get("cancelled") == 1:  # type: ignore[union-attr]
                    break
                time.sleep(0.1)
            assert health["finished"] == {"length": 1, "cancelled": 1}, health
            assert health["running"] == 0
            assert len(page.locator(".msg").all()) == 4  # two user turns, two replies
            assert stopped and (second.locator(".content").text_content() or "") == stopped
            screenshot(page, artifacts_dir, "chat-page-stopped")
        finally:
            with contextlib.suppress(Exception):
                browser.close()
