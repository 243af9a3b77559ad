"""The web viewer in headless Chromium (Debian `chromium`, driven by Playwright with the system browser;
no browser download): pick a slide, see its tile grid, ask, see the streamed answer and the heatmap.
The real slide (Deep Zoom) in the viewer: tests/test_serve_viewer_browser.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import sync_playwright

from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.serve.app import create_app
from wsi_llava.serve.config import ServeConfig

from serve_helpers import TINY_ANSWER, running, tiny_serving_cached  # tests/

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# counts heatmap pixels: coloured (not white/grey background) and red outline
PIXELS_JS = """() => {
  const c = document.getElementById('heatmap');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let coloured = 0, outline = 0;
  for (let i = 0; i < d.length; i += 4) {
    const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
    if (!(r > 240 && g > 240 && b > 240)) coloured++;
    if (r > 200 && g < 60 && b < 80) outline++;
  }
  return {coloured, outline};
}"""


@contextmanager
def served_in_chromium(app) -> Iterator[tuple[str, object]]:
    """Serve ``app`` (:func:`running`) and launch the system Chromium; yields ``(url, browser)``."""
    with running(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield url, browser
        finally:
            browser.close()


def open_viewer(browser, url: str, key: str, problems: list[str], **page_options):
    """A new page of the viewer of a server that wants ``key``: the viewer first says it needs a key, then
    gets it (typed in). Page errors and console errors after that are appended to ``problems``."""
    page = browser.new_page(**page_options)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')",
                           timeout=15_000)
    problems.clear()  # the 401s just checked are logged as console errors
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    return page


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    tiny = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    cfg = ServeConfig(model=str(tiny.model_dir), slides_root=str(tiny.slides_root), model_name="tiny",
                      torch_threads=1, default_max_tokens=40, api_key="viewer-key")
    with served_in_chromium(create_app(cfg, SlideAssistant.from_pretrained(tiny.model_dir))) as (url, browser):
        yield url, browser, tiny


def test_viewer_chat_and_heatmap(viewer):
    url, browser, tiny = viewer
    problems: list[str] = []
    # the server wants a key: the viewer says so, then works once it is given
    page = open_viewer(browser, url, "viewer-key", problems)
    page.wait_for_function("n => document.querySelectorAll('#slide-select option').length === n",
                           arg=len(tiny.slide_ids), timeout=15_000)
    page.wait_for_selector("#slide-view[data-mode=grid]", timeout=15_000)  # no raw slide image: the tile grid
    assert int(page.get_attribute("#slide-view", "data-tiles")) > 0
    assert page.eval_on_selector("#slide-select", "s => s.value") == tiny.slide_ids[0]

    page.fill("#question", "What is the diagnosis?")
    page.click("#send")
    page.wait_for_selector("#heatmap[data-selected]", timeout=30_000)
    page.wait_for_selector(".msg.assistant:not(.pending)", timeout=30_000)
    answer = page.text_content(".msg.assistant")
    assert answer.startswith("the slide shows") and len(answer) <= len(TINY_ANSWER) + 40
    assert page.get_attribute("#heatmap", "data-selected") == "6"  # image_seq_length of the tiny model
    pixels = page.evaluate(PIXELS_JS)
    assert pixels["coloured"] > 1000 and pixels["outline"] > 20, pixels
    assert "prompt_topk" in page.text_content("#heatmap-caption")
    assert page.get_attribute("#slide-view", "data-overlay") == "6"  # the selected tiles, on the grid too

    # a follow-up question keeps the conversation
    page.fill("#question", "What grade is it?")
    page.press("#question", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant:not(.pending)').length === 2",
                           timeout=30_000)
    assert len(page.query_selector_all(".msg.user")) == 2

    # another slide starts a new conversation and clears the heatmap
    page.select_option("#slide-select", tiny.slide_ids[1])
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 0", timeout=15_000)
    assert page.get_attribute("#heatmap", "data-selected") is None
    assert problems == []
