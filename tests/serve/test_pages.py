"""The chat page (GET /, lmforge/serve/pages/chat.html) in a real browser: Debian's chromium, headless, driven by
playwright (its own browser download is never used). Type, see the reply stream with its tok/s, stop a reply.
With LMFORGE_SCREENSHOTS=docs/img the page's screenshot is saved there.

    .venv/bin/pytest tests/serve/test_pages.py -q
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs it)")

from test_openai_api import model, serving, tok  # noqa: E402, F401  (fixtures)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 700})
        finally:
            browser.close()


def test_chat_page_streams_a_reply_and_stops_one(model, tok, page, tmp_path):  # noqa: F811
    with serving(model, tok) as (url, loop):
        step = loop.engine.step
        loop.engine.step = lambda: (time.sleep(0.02), step())[1]  # ~50 tok/s: slow enough to press Stop
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#max_tokens", "12")
        page.fill("#input", "What is 2 + 3?")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('stats').textContent.includes('tok/s')", timeout=20000)
        bubbles = page.locator(".msg")
        assert bubbles.count() == 2 and bubbles.nth(0).inner_text() == "What is 2 + 3?"
        assert bubbles.nth(1).inner_text().strip()  # the reply came
        page.fill("#max_tokens", "40")
        page.fill("#input", "hello there")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg')[3].textContent.length > 2", timeout=20000)
        page.click("#stop")
        page.wait_for_function("document.querySelectorAll('.msg')[3].textContent.endsWith('[stopped]')")
        shots = os.environ.get("LMFORGE_SCREENSHOTS")
        page.screenshot(path=str(Path(shots or tmp_path) / "chat-page.png"))
        deadline = time.time() + 10
        while (s := loop.stats()).running or s.waiting or s.blocks_free != s.blocks_total:
            assert time.time() < deadline, s  # the stopped reply's request was cancelled, its blocks freed
            time.sleep(0.05)


def test_rate_page_votes_by_keyboard_undo_and_reward_train_reads_the_file(model, tok, page, tmp_path):  # noqa: F811
    import json

    from lmforge.align.pairs import load_pairs
    from lmforge.serve.rate import RateConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(5)))
    out = tmp_path / "prefs.jsonl"
    with serving(model, tok, rate=RateConfig(str(prompts), out, n_prompts=5, max_new_tokens=8)) as (url, _):
        page.goto(url + "/rate")

        def shown(rated: int) -> None:
            page.wait_for_function(f"document.getElementById('progress').textContent === '{rated} of 5 rated' && "
                                   "document.getElementById('prompt').textContent.startsWith('What is')")  # fmt: skip

        shown(0)
        assert page.inner_text("#prompt") == "What is 0 + 1?"
        for rated, key in enumerate("121", start=1):  # A better, B better, A better
            page.keyboard.press(key)
            shown(rated)
        page.keyboard.press("u")  # the third vote is taken back, and its pair shown again
        shown(2)
        assert page.inner_text("#prompt") == "What is 2 + 1?"
        shots = os.environ.get("LMFORGE_SCREENSHOTS")
        page.screenshot(path=str(Path(shots or tmp_path) / "rate-page.png"))
        page.goto(url + "/rate?rater=bob")  # a second rater: own progress, and agreement with the first
        shown(0)
        page.keyboard.press("1")  # the first rater also put prompt 0's left sample first
        page.wait_for_function("document.getElementById('agreement').textContent.includes('1/1 same as rate-page')")
        assert "rating as bob" in page.inner_text("#agreement")
    records = [json.loads(line) for line in out.read_text().splitlines() if '"human:rate-page"' in line]
    assert [r["prompt_index"] for r in records] == [0, 1] and all(r["label"] in ("a", "b") for r in records)
    sides = [r["rater_detail"]["side"] for r in records]
    assert sides == ["left", "right"]
    assert [r["label"] == r["shown_left"] for r in records] == [True, False]  # a screen side maps to its sample
    assert len(load_pairs(out)) == 3  # what `lmforge reward train data=FILE` reads: 2 votes, and bob's
