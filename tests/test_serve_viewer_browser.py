"""The viewer shows the real slide, in headless Chromium (Debian `chromium` through Playwright, as
tests/test_serve_browser.py): a synthetic pyramidal TIFF beside its H5, served with the tiny model. Checked
on screenshots of the slide canvas: the drawn tissue colour where the slide has tissue and near-white where
it has none; after a question with ``explain``, each selected tile's outline in its score's colour at its
level-0 position; the same after zooming in (a finer Deep Zoom level) and after panning; the tile grid for a
slide without a raw image."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from wsi_llava.infer.engine import SlideAssistant  # noqa: E402
from wsi_llava.serve.app import create_app  # noqa: E402

from serve_helpers import serve_config, tiny_serving_cached  # noqa: E402
from test_serve_browser import open_viewer, served_in_chromium  # noqa: E402
from test_serve_viewer import make_viewer_root  # noqa: E402

#: viridis stops of the score colours (an independent statement of the viewer's ramp)
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)

CANVAS_JS = """() => {
  const c = document.getElementById('slide-view'), r = c.getBoundingClientRect();
  return {x: r.left + c.clientLeft, y: r.top + c.clientTop, width: c.width, height: c.height,
          cssWidth: c.clientWidth, view: c.dataset.view.split(',').map(Number), level: Number(c.dataset.level)};
}"""
SETTLED_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))"


def viridis(t: float) -> np.ndarray:
    u = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(u), len(VIRIDIS) - 2)
    return VIRIDIS[i] + (u - i) * (VIRIDIS[i + 1] - VIRIDIS[i])


def is_tissue(px: np.ndarray) -> np.ndarray:
    """The synthetic stain (pink stroma, purple nuclei, as JPEG and downsampling leave them)."""
    r, g, b = (px[..., k].astype(int) for k in range(3))
    return (r > 175) & (g > 105) & (g < 190) & (b > 150) & (r - g > 35)


def is_background(px: np.ndarray) -> np.ndarray:
    return (px.min(-1) > 215) & (px.max(-1).astype(int) - px.min(-1) < 25)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    vroot = make_viewer_root(tmp_path_factory.mktemp("viewer_browser"))
    tiny = dataclasses.replace(tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny"),
                               slides_root=vroot.root)
    app = create_app(serve_config(tiny, api_key="viewer-key", default_max_tokens=24),
                     SlideAssistant.from_pretrained(tiny.model_dir))
    with served_in_chromium(app) as (url, browser):
        yield url, browser, vroot


class Canvas:
    """A screenshot of the slide canvas and its view: level-0 (x, y) -> canvas pixel."""

    def __init__(self, page):
        page.evaluate(SETTLED_JS)
        info = page.evaluate(CANVAS_JS)
        assert info["cssWidth"] == info["width"]  # shown at its own size: canvas px = screenshot px
        from PIL import Image

        png = page.screenshot(clip={k: info[k] for k in ("x", "y", "width", "height")})
        self.pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert self.pixels.shape[:2] == (info["height"], info["width"])
        self.vx, self.vy, self.scale = info["view"]
        self.level = info["level"]

    def at(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.vx) * self.scale, (y - self.vy) * self.scale

    def inside(self, cx: float, cy: float, margin: float = 4) -> bool:
        h, w = self.pixels.shape[:2]
        return margin <= cx < w - margin and margin <= cy < h - margin

    def window(self, cx: float, cy: float, r: int = 2) -> np.ndarray:
        x, y = int(cx), int(cy)
        return self.pixels[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3)


def check_slide(canvas: Canvas, vroot, boxes: list, size: float, min_points: int) -> None:
    """Tissue colour at level-0 points deep inside tissue, near-white deep inside background (points in
    view and outside the selected ``boxes``)."""
    mask, step, r0 = vroot.mask, 32, 24
    verdicts = {True: [], False: []}
    for y in range(r0, mask.shape[0] - r0, step):
        for x in range(r0, mask.shape[1] - r0, step):
            around = mask[y - r0:y + r0, x - r0:x + r0]
            if around.all() != around.any():
                continue  # near the tissue border
            if any(bx - 8 <= x < bx + size + 8 and by - 8 <= y < by + size + 8 for bx, by in boxes):
                continue
            cx, cy = canvas.at(x, y)
            if not canvas.inside(cx, cy):
                continue
            win = canvas.window(cx, cy)
            tissue = bool(around.all())
            verdicts[tissue].append((is_tissue(win) if tissue else is_background(win)).mean() > 0.5)
    assert len(verdicts[True]) >= min_points, verdicts
    assert np.mean(verdicts[True]) > 0.9, f"tissue drawn at {np.mean(verdicts[True]):.0%} of its points"
    if verdicts[False]:
        assert np.mean(verdicts[False]) > 0.9, f"background at {np.mean(verdicts[False]):.0%} of its points"


def check_overlay(canvas: Canvas, explain: dict, size: float) -> int:
    """Each selected tile in view: its outline (a band inside the tile's left edge) has its score's colour.
    Returns how many were checked."""
    lo, hi = min(explain["scores"]), max(explain["scores"])
    checked = 0
    for (x, y), score in zip(explain["coords"], explain["tile_scores"]):
        cx0, cy0 = canvas.at(x, y)
        side = size * canvas.scale
        if not (canvas.inside(cx0, cy0) and canvas.inside(cx0 + side, cy0 + side)):
            continue
        column = canvas.pixels[int(cy0 + 0.2 * side):int(cy0 + 0.8 * side), int(cx0 + 1.5)].astype(float)
        expected = viridis((score - lo) / (hi - lo or 1))
        close = np.abs(column - expected).max(-1) <= 30
        assert close.mean() > 0.8, (x, y, score, expected, np.median(column, 0))
        checked += 1
    return checked


def test_viewer_shows_the_real_slide(viewer):
    url, browser, vroot = viewer
    problems: list[str] = []
    page = open_viewer(browser, url, "viewer-key", problems, viewport={"width": 1400, "height": 1000})
    # (the Deep Zoom tiles are fetched with the key too)
    page.wait_for_function("() => document.getElementById('slide-select').value === 'cases/a'", timeout=15_000)
    page.wait_for_selector("#slide-view[data-mode=image][data-complete='1']", timeout=30_000)
    size = float(page.evaluate("() => state.tiles.tile_size"))
    assert size == 256

    # the whole slide, fitted: tissue where the slide has tissue, near-white elsewhere
    fitted = Canvas(page)
    check_slide(fitted, vroot, [], size, min_points=200)

    # a question with explain: the selected tiles in place, in their scores' colours
    page.fill("#question", "What is the diagnosis?")
    page.click("#send")
    page.wait_for_selector("#slide-view[data-overlay='6']", timeout=60_000)
    page.wait_for_selector(".msg.assistant:not(.pending)", timeout=60_000)
    explain = page.evaluate("() => state.explain")
    assert explain["slide"] == "cases/a" and len(explain["coords"]) == 6
    assert {tuple(c) for c in explain["coords"]} <= {tuple(c) for c in vroot.coords.tolist()}
    boxes = [tuple(c) for c in explain["coords"]]
    shot = Canvas(page)
    assert check_overlay(shot, explain, size) == 6
    check_slide(shot, vroot, boxes, size, min_points=150)

    # zoom in on the best tile (mouse wheel): a finer level, the tile's outline still in place
    best = int(np.argmax(explain["tile_scores"]))
    bx, by = explain["coords"][best]
    cx, cy = shot.at(bx + size / 2, by + size / 2)
    info = page.evaluate(CANVAS_JS)
    px, py = round(info["x"] + cx), round(info["y"] + cy)  # pointer events have whole CSS pixels
    cx, cy = px - info["x"], py - info["y"]
    under = (shot.vx + cx / shot.scale, shot.vy + cy / shot.scale)  # the level-0 point under the pointer
    page.mouse.move(px, py)
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"() => Number(document.getElementById('slide-view').dataset.level) > {shot.level}",
                           timeout=15_000)
    page.wait_for_selector("#slide-view[data-complete='1']", timeout=30_000)
    zoomed = Canvas(page)
    assert zoomed.scale > 3 * shot.scale and zoomed.level == shot.level + 1
    assert np.allclose(zoomed.at(*under), (cx, cy), atol=0.1)  # zoomed about the pointer
    assert check_overlay(zoomed, explain, size) >= 1
    check_slide(zoomed, vroot, boxes, size, min_points=15)

    # pan by dragging: the view moves with the pointer; pixels follow
    page.mouse.move(info["x"] + 320, info["y"] + 220)
    page.mouse.down()
    page.mouse.move(info["x"] + 220, info["y"] + 170, steps=5)
    page.mouse.up()
    page.wait_for_selector("#slide-view[data-complete='1']", timeout=30_000)
    panned = Canvas(page)
    assert np.allclose((panned.vx - zoomed.vx) * zoomed.scale, 100, atol=1)
    assert np.allclose((panned.vy - zoomed.vy) * zoomed.scale, 50, atol=1)
    assert check_overlay(panned, explain, size) >= 1
    check_slide(panned, vroot, boxes, size, min_points=15)

    # a slide without a raw image: the tile grid, as before
    page.select_option("#slide-select", "plain")
    page.wait_for_selector("#slide-view[data-mode=grid]", timeout=15_000)
    grid = Canvas(page)
    purple = (np.abs(grid.pixels.astype(int) - [165, 139, 196]).max(-1) < 8).mean()
    assert purple > 0.05 and page.get_attribute("#slide-view", "data-overlay") == "0"
    assert problems == []
