"""The viewer's Deep Zoom routes (serve/deepzoom.py): which raw slide belongs to a slide id (the id itself, an
H5's ``source_slide`` attribute, a slide beside the H5), confinement to the slides root, level-0 aligned
pixels, the tile cache (never stale after a file is replaced), 404s for bad tiles, and the routes with auth.
:func:`make_viewer_root` is also the browser test's slides root (tests/test_serve_viewer_browser.py)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from wsi_llava.data.synthetic_wsi import downsample2, draw_tissue, write_pyramid_tiff  # noqa: E402
from wsi_llava.data.wsi_reader import DeepZoom, TileAddressError  # noqa: E402
from wsi_llava.infer.engine import SlideAssistant  # noqa: E402
from wsi_llava.serve.app import create_app  # noqa: E402
from wsi_llava.serve.deepzoom import SlideImages, parse_tile  # noqa: E402
from wsi_llava.serve.errors import ApiError  # noqa: E402
from wsi_llava.serve.security import real_root  # noqa: E402

from serve_helpers import openai_error, running, serve_config, tiny_serving_cached  # noqa: E402

SIZE = (1536, 2048)  # (height, width) of the synthetic slides, level 0
BLOBS = [(620, 640, 430, 380), (1560, 860, 330, 470)]
GRID = 256  # level-0 side of the H5 tiles
FEATURE_DIM = 16  # the tiny served model's


@dataclass
class ViewerRoot:
    root: Path
    image: np.ndarray
    """RGB level 0 of the raw slides ``cases/a.tif`` and ``scans/b_scan.tiff``."""
    mask: np.ndarray
    coords: np.ndarray
    """[N, 2] (x, y) of the H5 tiles (tissue share >= 1/2), row-major."""
    outside: Path
    """A raw slide outside the root."""


def write_h5(path: Path, coords: np.ndarray, source: str | None = None, seed: int = 0) -> Path:
    """A slide H5 (features [N, 16] random, coords (x, y)) with an optional ``source_slide`` attribute."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rng.normal(size=(len(coords), FEATURE_DIM)).astype(np.float32))
        f.create_dataset("coords", data=coords.astype(np.int64))
        if source is not None:
            f.attrs["source_slide"] = source
    return path


def make_viewer_root(base: Path) -> ViewerRoot:
    """``base/slides``: ``cases/a.{tif,h5}`` (raw slide beside the H5); ``features/b.h5`` naming
    ``scans/b_scan.tiff`` by absolute path (as ``wsi-llava extract`` writes), ``features/c.h5`` by a path
    relative to its folder, ``features/d.h5`` a slide outside the root; ``plain.h5`` (no raw slide);
    ``cases/link.tif`` a symlink to the slide outside the root."""
    root = base / "slides"
    image, mask = draw_tissue(*SIZE, BLOBS, seed=3)
    (root / "cases").mkdir(parents=True)
    (root / "scans").mkdir()
    write_pyramid_tiff(root / "cases" / "a.tif", image, mpp=0.5, levels=3)
    shutil.copy(root / "cases" / "a.tif", root / "scans" / "b_scan.tiff")
    outside = shutil.copy(root / "cases" / "a.tif", base / "outside.tif")
    ys, xs = np.mgrid[0:SIZE[0] - GRID + 1:GRID, 0:SIZE[1] - GRID + 1:GRID]
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    share = np.array([mask[y:y + GRID, x:x + GRID].mean() for x, y in coords])
    coords = coords[share >= 0.5]
    write_h5(root / "cases" / "a.h5", coords)
    write_h5(root / "features" / "b.h5", coords, str((root / "scans" / "b_scan.tiff").resolve()))
    write_h5(root / "features" / "c.h5", coords, "../scans/b_scan.tiff")
    write_h5(root / "features" / "d.h5", coords, str(Path(outside).resolve()))
    write_h5(root / "plain.h5", coords)
    os.symlink(outside, root / "cases" / "link.tif")
    return ViewerRoot(root, image, mask, coords, Path(outside))


@pytest.fixture(scope="module")
def vroot(tmp_path_factory) -> ViewerRoot:
    return make_viewer_root(tmp_path_factory.mktemp("viewer"))


@pytest.fixture
def images(vroot):
    svc = SlideImages(real_root(vroot.root))
    yield svc
    svc.close()


def _api_error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


# ------------------------------------------------------------------------------------- which image


def test_find_the_raw_slide_of_each_kind_of_id(images, vroot):
    b_scan = str((vroot.root / "scans" / "b_scan.tiff").resolve())
    assert images.find("cases/a").image.id == "cases/a.tif"  # beside the H5
    assert images.find("cases/a.h5").image.id == "cases/a.tif"
    for ref in ("features/b", "features/c", "scans/b_scan.tiff", "scans/b_scan"):  # attribute abs/rel; raw ids
        assert images.find(ref).image.path == b_scan, ref
    assert images.find("features/b").id == "features/b"


def test_extract_output_finds_its_raw_slide(vroot, tmp_path):
    """``wsi-llava extract``'s H5 (its ``source_slide`` attribute) leads to the raw slide it came from."""
    import torch

    from wsi_llava.infer.extract import ExtractSettings, extract_cohort
    from wsi_llava.model.tile_encoder import build_tile_encoder

    root = tmp_path / "data"
    (root / "scans").mkdir(parents=True)
    raw = shutil.copy(vroot.root / "cases" / "a.tif", root / "scans" / "s1.tif")
    torch.manual_seed(0)
    encoder = build_tile_encoder("vit", img_size=64, patch_size=16, embed_dim=24, depth=1, num_heads=2)
    settings = ExtractSettings(encoder_id="vit:test", magnification=10, tile_size=64, batch_size=16, workers=0)
    assert extract_cohort([Path(raw)], root / "extracted", encoder, settings, progress=False)["extracted"] == 1
    svc = SlideImages(real_root(root))
    try:
        found = svc.find("extracted/features/s1")
        assert found.image.id == "scans/s1.tif" and found.id == "extracted/features/s1"
        # the same output served from a root that does not hold the raw slide: no image
        alone = SlideImages(real_root(root / "extracted"))
        assert _api_error(alone.find, "features/s1").code == "slide_image_not_found"
        alone.close()
    finally:
        svc.close()


@pytest.mark.parametrize("ref, status, code", [
    ("plain", 404, "slide_image_not_found"),      # an H5 without a raw slide: the viewer draws its tile grid
    ("features/d", 404, "slide_image_not_found"),  # its attribute names a slide outside the root
    ("cases/link.tif", 404, "slide_not_found"),    # a symlink out of the root
    ("nothing/here", 404, "slide_not_found"),
    ("../outside.tif", 400, "invalid_slide"),
    ("/etc/passwd", 400, "invalid_slide"),
])
def test_find_refuses(images, ref, status, code):
    err = _api_error(images.find, ref)
    assert (err.status, err.code) == (status, code), err.message
    assert "/tmp" not in err.message


# ------------------------------------------------------------------------------------------ pixels


def _decode(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)


def test_tiles_are_level0_aligned(images, vroot):
    dzi = ET.fromstring(images.dzi_sync("features/b"))
    size = dzi.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (SIZE[1], SIZE[0])
    tile_size, overlap = int(dzi.get("TileSize")), int(dzi.get("Overlap"))
    with DeepZoom(vroot.root / "cases" / "a.tif", tile_size, overlap) as dz:
        top = dz.levels - 1
    for level, ref in ((top, vroot.image), (top - 1, downsample2(vroot.image))):  # full size, then half
        col, row = 2, 2
        tile = _decode(images.tile_sync("features/b", level, col, row))
        x0, y0 = col * tile_size - overlap, row * tile_size - overlap
        h, w = tile.shape[:2]
        assert (h, w) == (tile_size + 2 * overlap,) * 2
        diffs = {(dx, dy): np.abs(tile - ref[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w].astype(np.int16)).mean()
                 for dx in range(-2, 3) for dy in range(-2, 3)}
        assert diffs[0, 0] < 10, (level, diffs[0, 0])  # JPEG error only (chroma subsampling of the texture)
        assert min(diffs, key=diffs.get) == (0, 0), (level, diffs)  # the texture matches only in place


def test_tile_cache_and_replaced_file(images, vroot, tmp_path):
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(vroot.root / "cases" / "a.tif", root / "r.tif")
    svc = SlideImages(real_root(root))
    try:
        first = svc.tile_sync("r.tif", 11, 2, 2)
        assert svc.tile_sync("r.tif", 11, 2, 2) == first and svc.tiles.stats()["hits"] == 1
        inverted = (255 - vroot.image).astype(np.uint8)
        write_pyramid_tiff(root / "r.tif", inverted, mpp=0.5, levels=3)
        os.utime(root / "r.tif", ns=(1, 1))  # a new mtime even on coarse clocks
        again = _decode(svc.tile_sync("r.tif", 11, 2, 2))
        assert abs(again.mean() - (255 - _decode(first).mean())) < 4  # the new file, not the cached tile
    finally:
        svc.close()


@pytest.mark.parametrize("level, name", [("99", "0_0.jpeg"), ("11", "9_0.jpeg"), ("11", "0_7.jpeg"),
                                         ("x", "0_0.jpeg"), ("-1", "0_0.jpeg"), ("11", "0_0.png"),
                                         ("11", "a_0.jpeg"), ("11", "0_0"), ("1" * 5, "0_0.jpeg")])
def test_bad_tiles_are_404(images, level, name):
    async def go():
        try:
            return await images.tile("cases/a", level, name)
        except ApiError as e:
            return e
    err = asyncio.run(go())
    assert isinstance(err, ApiError) and (err.status, err.code) == (404, "tile_not_found"), err


def test_parse_tile_and_address_errors(vroot):
    assert parse_tile("s", "3", "4_5.jpeg") == (3, 4, 5) and parse_tile("s", "0", "0_0.jpg") == (0, 0, 0)
    with DeepZoom(vroot.root / "cases" / "a.tif") as dz:
        with pytest.raises(TileAddressError):
            dz.tile(dz.levels, 0, 0)
        assert dz.tile(0, 0, 0).shape == (1, 1, 3)


def test_slow_render_times_out(vroot):
    svc = SlideImages(real_root(vroot.root), workers=1, timeout=0.2)

    def slow(ref):
        import time

        time.sleep(1.0)
        return ref

    async def go():
        with pytest.raises(ApiError) as e:
            await svc.run(slow, "x")
        return e.value
    try:
        err = asyncio.run(go())
    finally:
        svc.close()
    assert (err.status, err.code) == (504, "slide_timeout") and svc.timeouts == 1


# ------------------------------------------------------------------------------------------ routes


@pytest.fixture(scope="module")
def server(tmp_path_factory, vroot):
    import dataclasses

    tiny = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    tiny = dataclasses.replace(tiny, slides_root=vroot.root)
    app = create_app(serve_config(tiny, api_key="k"), SlideAssistant.from_pretrained(tiny.model_dir))
    with running(app) as url:
        yield url


def test_routes(server):
    auth = {"Authorization": "Bearer k"}
    dzi = httpx.get(server + "/v1/slides/cases/a/deepzoom.dzi", headers=auth)
    assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
    assert 'Width="2048"' in dzi.text and 'Height="1536"' in dzi.text
    tile = httpx.get(server + "/v1/slides/features/c/deepzoom_files/11/1_1.jpeg", headers=auth)
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert _decode(tile.content).shape == (256, 256, 3)
    tiles = httpx.get(server + "/v1/slides/cases/a/tiles", headers=auth).json()  # still routed
    assert tiles["n_used"] > 6 and tiles["image"] == "cases/a.tif"
    assert httpx.get(server + "/v1/slides/features/c/tiles", headers=auth).json()["image"] == "scans/b_scan.tiff"
    assert httpx.get(server + "/v1/slides/plain/tiles", headers=auth).json()["image"] is None
    openai_error(httpx.get(server + "/v1/slides/cases/a/deepzoom_files/11/0_0.jpeg"), 401, "invalid_api_key")
    openai_error(httpx.get(server + "/v1/slides/cases/a/deepzoom_files/12/0_0.jpeg", headers=auth), 404,
                 "tile_not_found")
    openai_error(httpx.get(server + "/v1/slides/cases/a/deepzoom_files/11/0_x.jpeg", headers=auth), 404,
                 "tile_not_found")
    openai_error(httpx.get(server + "/v1/slides/plain/deepzoom.dzi", headers=auth), 404, "slide_image_not_found")
    openai_error(httpx.get(server + "/v1/slides/cases/link.tif/deepzoom.dzi", headers=auth), 404, "slide_not_found")
    health = httpx.get(server + "/health").json()["deepzoom"]
    assert health["tile_cache"]["items"] >= 1 and health["open_slides"] >= 1
