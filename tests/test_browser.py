"""A real browser on the real command: `python app.py` in a subprocess, headless Chromium via Playwright.

Reports (printed, and written to <tmp>/figures.json; reported, not asserted: a busy CPU would make a
timing assert flaky): seconds from `python app.py` to a served page and to a first answered chat
request, from pressing Send to the first revealed step on screen, from opening the poem tab to its
stored evaluation, and from Ask to the poem's first step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from ui_support import free_port

from llada_app.studio import build_studio

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y "
                                       "chromium; .ci/run does it) to run the browser test")


@pytest.fixture(scope="module")
def app(app_models, tmp_path_factory):
    """`python app.py` on a free port; yields (url, seconds to the served page, seconds to a first answer)."""
    mdm, arm, _ = app_models
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", mdm, "--arm", arm, "--port", str(port),
                                 "--device", "cpu"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        page_s = _wait_for_page(url, proc, log, timeout=120) - started
        from gradio_client import Client

        Client(url, verbose=False).predict("Hello", api_name="/chat")
        answer_s = time.perf_counter() - started
        yield url, page_s, answer_s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_page(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no page at {url} after {timeout} s:\n{log.read_text()[-3000:]}")


# Timestamps taken in the page: the click, then the first revealed token shown in `watched`.
_CLICK_AND_WATCH = """([button, watched]) => {
    window.__firstStep = null;
    new MutationObserver((_, obs) => {
        if (document.querySelector(watched + ' .ld-new')) {
            window.__firstStep = performance.now(); obs.disconnect(); }
    }).observe(document.querySelector(watched), {subtree: true, childList: true});
    window.__clicked = performance.now();
    document.querySelector(button).click();
}"""


def _click_and_watch(page, button: str, watched: str) -> None:
    page.evaluate(_CLICK_AND_WATCH, [button, watched])


def _first_step_s(page) -> float:
    return page.evaluate("() => (window.__firstStep - window.__clicked) / 1000")


def test_browser_chat_shows_the_live_answer(app, app_models, tmp_path):
    from playwright.sync_api import sync_playwright

    url, page_s, answer_s = app
    mdm, arm, bundled = app_models
    question = 'What is the next line after "From fairest creatures we desire increase,"?'
    # The answer the app must show: same model, same default settings, greedy, computed here.
    threads = torch.get_num_threads()
    studio = build_studio(mdm, None, device="cpu", threads=0, progress=lambda msg: None)  # as app.py does
    *_, final = studio.stream_chat([], question, studio.default_settings())
    expected = final.text
    torch.set_num_threads(threads)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            outside = []  # the app works offline: nothing but this server is ever asked for anything
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                (url, "data:", "blob:")) else None)
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=30_000)
            page.fill("#message textarea", question)
            _click_and_watch(page, "#send", "#chatbot")
            page.wait_for_selector("#chat-stats :text('done')", timeout=120_000)
            first_step_s = _first_step_s(page)
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            shown = page.inner_text("#chatbot")
        finally:
            browser.close()

    figures = dict(startup_to_page_s=round(page_s, 2), startup_to_first_answer_s=round(answer_s, 2),
                   send_to_first_revealed_step_s=round(first_step_s, 3), bundled_model=bundled,
                   screenshot=str(shot))
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=2))
    print("\nUI figures:", json.dumps(figures))
    assert shot.stat().st_size > 10_000
    assert question in shown
    assert not outside, outside
    assert " ".join(expected.split()) in " ".join(shown.split())
    assert first_step_s > 0  # the first step was on screen before the answer was done


def test_browser_stop_ends_the_answer_between_steps(app, app_models):
    from playwright.sync_api import sync_playwright

    from llada_app.loading import load_model

    url = app[0]
    context = load_model(app_models[0], device="cpu").model.config.max_sequence_length
    length = min(512, 32 * ((context - 64) // 32))  # a long answer: many steps to stop in the middle
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=30_000)
            for slider in ("#gen-length", "#steps"):
                page.fill(f"{slider} input[type=number]", str(length))
                page.press(f"{slider} input[type=number]", "Enter")
            page.click("text=More settings")
            page.fill("#chat-lengths textarea", "")  # the gen length decides, not a length search
            page.fill("#message textarea", "Tell me a long story.")
            page.click("#send")
            page.wait_for_selector("#chatbot .ld-new", timeout=30_000)
            page.click("#stop")
            page.wait_for_selector("#chat-stats :text('Stopped')", timeout=30_000)
            stats = page.inner_text("#chat-stats")
            step = int(stats.split("step ")[1].split(")")[0])
            page.wait_for_timeout(500)
            assert "ld-canvas" not in page.inner_html("#chatbot")  # the unfinished answer is gone
            assert page.input_value("#message textarea") == "Tell me a long story."  # ready to resend
        finally:
            browser.close()
    assert 1 <= step < length


def test_browser_poem_stop_leaves_the_unfinished_answers(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app[0])
            page.click("button[role=tab]:has-text('Reversal poem')")
            page.click("text=Poem settings and raw result")
            page.fill("#poem-pace input[type=number]", "200")  # 200 ms per step and model: a slow answer
            page.press("#poem-pace input[type=number]", "Enter")
            # one fixed-length chat canvas (32 masks), not a length search, whose leading candidate can be
            # a short one, already complete, at the moment Stop lands
            page.click("#poem-protocol label:has-text('chat')")
            page.fill("#poem-lengths textarea", "")
            page.fill("#poem-line textarea", "From fairest creatures we desire increase,")
            page.click("#poem-ask")
            page.wait_for_selector("#poem-mdm .ld-new", timeout=30_000)
            page.click("#poem-stop")
            page.wait_for_selector("#poem-verdict :text('Stopped')", timeout=10_000)
            masks = page.inner_text("#poem-mdm").count("\u2591")
            page.wait_for_timeout(1500)  # nothing moves once stopped
            assert masks > 0 and page.inner_text("#poem-mdm").count("\u2591") == masks
            assert "Stopped" in page.inner_text("#poem-verdict")
            page.fill("#poem-pace input[type=number]", "0")  # the tab still answers after a stop
            page.press("#poem-pace input[type=number]", "Enter")
            page.click("#poem-ask")
            page.wait_for_selector("#poem-verdict :text('Expected')", timeout=60_000)
            assert "\u2591" not in page.inner_text("#poem-mdm")
        finally:
            browser.close()


def test_browser_poem_completion_shows_the_given_line_and_the_verdict(app, app_models, tmp_path):
    """A held-out "previous" line in completion mode (the tab's default for a model trained here): the
    given line is shown as given, after the gap, in both canvases; the verdict line names the expected
    line. With a stored evaluation, the line is the page's own showcase example (a held-out previous
    line the MDM got right and its twin wrong): the browser must show that same outcome."""
    from playwright.sync_api import sync_playwright

    from llada_app.ui import poem_examples

    url = app[0]
    studio = build_studio(app_models[0], app_models[1], device="cpu", threads=None, progress=lambda m: None)
    results, _ = studio.stored_evaluation()
    rows, labels = poem_examples(studio, results)
    showcase = next((row for row, label in zip(rows, labels) if "MDM right, twin wrong" in label), None)
    line = showcase[0] if showcase else studio.corpus.split("heldout")[0].lines[3]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=30_000)
            page.evaluate("() => { window.__tab = performance.now(); }")
            page.click("button[role=tab]:has-text('Reversal poem')")
            page.wait_for_selector("#eval-table", timeout=30_000)
            tab_to_table_s = page.evaluate("() => (performance.now() - window.__tab) / 1000")
            stored = "Stored with the models" in page.inner_text("#eval-note")
            assert page.is_checked("#poem-protocol input[value=completion]")
            page.fill("#poem-line textarea", line)
            page.click("#poem-protocol label:has-text('completion')")
            page.click("label:has-text('previous')")
            _click_and_watch(page, "#poem-ask", "#poem-mdm")
            page.wait_for_selector("#poem-verdict :text('Expected')", timeout=60_000)
            ask_to_first_step_s = _first_step_s(page)
            verdict = page.inner_text("#poem-verdict")
            given = page.inner_text("#poem-mdm .ld-given")
            arm_given = page.inner_text("#poem-arm .ld-unseen")
            mdm_text = page.inner_text("#poem-mdm")
            page.screenshot(path=str(tmp_path / "poem.png"), full_page=True)
        finally:
            browser.close()
    figures = dict(tab_to_stored_evaluation_s=round(tab_to_table_s, 3), stored_evaluation_shown=stored,
                   ask_to_first_poem_step_s=round(ask_to_first_step_s, 3))
    print("\nPoem tab figures:", json.dumps(figures))
    assert " ".join(given.split()) == line and " ".join(arm_given.split()) == line
    assert mdm_text.index(line) > 0  # the gap comes first, then the given line
    expected = studio.corpus.expected(line, "previous")
    assert f"Expected: {expected}" in " ".join(verdict.split()) and "held-out sonnet" in verdict
    if showcase:
        assert "MDM ✓ right" in verdict and "ARM ✗ wrong" in verdict, verdict
