"""`wsi-llava extract`: raw slides (pyramidal tiled TIFFs written here, OpenSlide's generic-TIFF format)
→ tissue, tiles, features in TRIDENT's H5 layout; checked against independent computations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("openslide")

from wsi_llava.data.slides import load_slide  # noqa: E402
from wsi_llava.data.synthetic_wsi import draw_tissue, write_pyramid_tiff  # noqa: E402
from wsi_llava.data.tissue import mask_to_geojson, segment_tissue  # noqa: E402
from wsi_llava.data.wsi_reader import WsiError, magnification_for, open_wsi, read_mpp_csv  # noqa: E402
from wsi_llava.infer.extract import ExtractSettings, extract_cohort  # noqa: E402
from wsi_llava.infer.extract_slide import plan_slide  # noqa: E402
from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=64, patch_size=16, embed_dim=24, depth=1, num_heads=2)
BLOBS = [(600, 700, 420, 360), (1580, 760, 330, 520)]
HOLES = [(600, 700, 130)]


def make_slide(path: Path, seed: int = 0, size=(1536, 2048), mpp: float | None = 0.25, levels: int = 3,
               blobs=BLOBS, holes=HOLES):
    image, mask = draw_tissue(size[0], size[1], blobs, holes, seed=seed)
    write_pyramid_tiff(path, image, mpp=mpp, levels=levels)
    return image, mask


def damage_level(path: Path, level: int) -> None:
    """A zlib-compressed slide whose tiles of ``level`` are zeroed (undecodable)."""
    import tifffile

    image, _ = draw_tissue(1536, 2048, [(1000, 700, 600, 500)], [], seed=2)
    write_pyramid_tiff(path, image, compression="zlib")
    with tifffile.TiffFile(path) as t:
        page = t.pages[level]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset:offset + count] = bytes(count)
    path.write_bytes(bytes(data))


def independent_tiles(mask: np.ndarray, size0: int, share: float = 0.5) -> set[tuple[int, int]]:
    """Grid tiles (x, y) of side ``size0`` whose drawn tissue share is at least ``share``."""
    h, w = mask.shape
    return {(x, y) for y in range(0, h - size0 + 1, size0) for x in range(0, w - size0 + 1, size0)
            if mask[y:y + size0, x:x + size0].mean() >= share}


@pytest.fixture(scope="module")
def slide40(tmp_path_factory):
    """A 40x (0.25 µm) slide of 2048 x 1536 px, three levels, two tissue pieces, one with a hole."""
    path = tmp_path_factory.mktemp("wsi") / "s40.tiff"
    image, mask = make_slide(path)
    return path, image, mask


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return build_tile_encoder("vit", **TINY)


def test_reader_geometry_pixel_size_and_levels(slide40, tmp_path):
    path, image, _ = slide40
    with open_wsi(path) as r:
        assert (r.width, r.height) == (2048, 1536)
        assert r.downsamples == (1.0, 2.0, 4.0)
        assert (r.mpp, r.magnification, r.mpp_source) == (0.25, 40.0, "openslide.mpp-x")
        assert [r.level_for(d) for d in (1, 1.5, 2, 3.9, 4, 16)] == [0, 0, 1, 1, 2, 2]
        assert np.array_equal(r.read_region(100, 200, 0, 50, 40), image[200:240, 100:150])
    # no pixel size anywhere: an error naming the file and the CSV that fixes it; the CSV fixes it
    bare = tmp_path / "bare.tif"
    make_slide(bare, mpp=None, levels=1)
    with pytest.raises(WsiError, match=r"bare\.tif.*--mpp-csv"):
        open_wsi(bare)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\nbare.tif,0.5\n")
    with open_wsi(bare, read_mpp_csv(csv)) as r:
        assert (r.mpp, r.magnification, r.mpp_source) == (0.5, 20.0, "--mpp-csv")
    csv.write_text("slide,mpp\nbare,-1\n")
    with pytest.raises(WsiError, match=r"mpp\.csv: row 2 \[mpp\]"):
        read_mpp_csv(csv)


def test_magnification_from_pixel_size():
    from wsi_llava.data.wsi_reader import _tiff_mpp

    assert _tiff_mpp({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}) == 0.25
    assert _tiff_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800"}) == 0.5
    assert _tiff_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "72"}) is None
    assert [magnification_for(m) for m in (0.25, 0.2527, 0.5, 0.4942, 1.0)] == [40, 40, 20, 20, 10]
    assert magnification_for(0.3) == pytest.approx(33.33, abs=0.01)  # no standard objective within 10 %


def test_a_20x_tile_comes_from_level_1_and_equals_level_0_downsampled(slide40):
    path, image, _ = slide40
    x, y = 768, 512
    region = image[y:y + 512, x:x + 512].astype(np.float64)
    want = np.round(region.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))).astype(np.uint8)  # 2 x 2 mean
    with open_wsi(path) as r:
        assert r.level_for(512 / 256) == 1
        tile = r.read_tile(x, y, 512, 256)
    assert tile.shape == (256, 256, 3) and np.array_equal(tile, want)


def test_tissue_recall_precision_holes_and_geojson(slide40):
    path, _, mask = slide40
    with open_wsi(path) as r:
        ds = 8.0 / r.mpp
        thumb = r.thumbnail(ds)
        seg = segment_tissue(thumb, 8.0)
    h, w = seg.shape
    assert (h, w) == (48, 64)
    truth = mask[:h * 32, :w * 32].reshape(h, 32, w, 32).mean(axis=(1, 3)) >= 0.5
    tp = (seg & truth).sum()
    assert tp / truth.sum() >= 0.9, "recall"
    assert tp / seg.sum() >= 0.9, "precision"
    assert not seg[700 // 32, 600 // 32], "the hole is background"
    geo = mask_to_geojson(seg, ds)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2
    rings = [f["geometry"]["coordinates"] for f in geo["features"]]
    assert all(f["geometry"]["type"] == "Polygon" for f in geo["features"])
    assert sorted(len(r) for r in rings) == [1, 2]  # one piece has a hole
    from skimage.draw import polygon

    raster = np.zeros((1536, 2048), bool)  # the polygons drawn back at level 0 match the drawn tissue
    for rings_of_piece in rings:
        for k, ring in enumerate(rings_of_piece):
            xy = np.array(ring)
            rr, cc = polygon(xy[:, 1], xy[:, 0], raster.shape)
            raster[rr, cc] = k == 0
    iou = (raster & mask).sum() / (raster | mask).sum()
    assert iou >= 0.85
    assert all(ring[0] == ring[-1] for piece in rings for ring in piece)


def test_tile_grid_counts_and_coordinates(slide40):
    path, _, mask = slide40
    plan = plan_slide(path, 20, 64, 0.5)
    assert plan.patch_size_level0 == 128 and plan.level0_magnification == 40
    xy = plan.coords
    assert xy.dtype == np.int64 and (xy % 128 == 0).all()
    assert (xy[:, 0] + 128 <= 2048).all() and (xy[:, 1] + 128 <= 1536).all()
    assert np.array_equal(np.lexsort((xy[:, 0], xy[:, 1])), np.arange(len(xy)))  # row-major
    want = independent_tiles(mask, 128)
    got = {tuple(map(int, c)) for c in xy}
    assert abs(len(got) - len(want)) <= 0.1 * len(want)
    assert len(got ^ want) <= 0.15 * len(want)
    assert all(mask[y:y + 128, x:x + 128].mean() > 0.2 for x, y in got)
    # 10x from a 40x slide: 64-px tiles are 256 level-0 px
    assert plan_slide(path, 10, 64, 0.5).patch_size_level0 == 256
    with pytest.raises(WsiError, match="upsampling"):
        plan_slide(path, 80, 64, 0.5)


def _settings(**kw) -> ExtractSettings:
    return ExtractSettings(**{"encoder_id": "vit:test", "magnification": 20, "tile_size": 64, "batch_size": 16,
                              "workers": 1, **kw})


def test_cohort_features_h5_layout_errors_and_rerun(slide40, tiny_encoder, tmp_path):
    path, _, _ = slide40
    cohort = tmp_path / "slides"
    cohort.mkdir()
    os.symlink(path, cohort / "a.tiff")
    make_slide(cohort / "b.tif", seed=1, blobs=[(1000, 700, 600, 500)], holes=[])
    (cohort / "broken.svs").write_bytes(b"not a slide" * 100)
    damage_level(cohort / "damaged.tiff", level=1)  # opens and segments (level 2), its 20x tiles cannot be read
    out = tmp_path / "out"
    slides = sorted(cohort.iterdir())
    counts = extract_cohort(slides, out, tiny_encoder, _settings(), progress=False)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    failed = {e["slide_id"] for e in errors}
    assert failed == {"broken", "damaged"} and all(Path(e["slide"]).name in e["error"] for e in errors)
    assert "cannot open" in errors[0]["error"] and "cannot read level 1" in errors[1]["error"]
    assert "Traceback" not in errors[1]["error"]  # the worker's message, not its traceback
    assert counts == {"extracted": 2, "skipped": 0, "failed": 2, "tiles": counts["tiles"]}

    h5 = out / "features" / "a.h5"
    with h5py.File(h5, "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert feats.dtype == np.float32 and feats.shape[1] == 24 and coords.shape == (len(feats), 2)
    assert {k: int(attrs[k]) for k in ("patch_size", "patch_size_level0", "level0_magnification",
                                       "target_magnification", "overlap", "level0_width", "level0_height")} == \
        {"patch_size": 64, "patch_size_level0": 128, "level0_magnification": 40, "target_magnification": 20,
         "overlap": 0, "level0_width": 2048, "level0_height": 1536}
    # features = the encoder on the same tiles, read and preprocessed independently
    with open_wsi(path) as r:
        pick = np.linspace(0, len(coords) - 1, 6).astype(int)
        pixels = torch.stack([tiny_encoder.preprocess(r.read_tile(*map(int, coords[i]), 128, 64)) for i in pick])
    with torch.inference_mode():
        want = tiny_encoder(pixels).numpy()
    assert np.allclose(feats[pick], want, atol=1e-5)
    # our loader reads it: (x, y) coordinates, spatial order, all tiles
    slide = load_slide(h5)
    assert slide.n_total == len(feats) and np.array_equal(slide.coords, coords.astype(np.float32))
    # the manifest of the outputs, the GeoJSON and the overview
    import csv

    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "slides.csv"))}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["h5_path"] == "features/a.h5" and int(rows["a"]["n_tiles"]) == len(feats)
    assert json.loads((out / "tissue" / "a.geojson").read_text())["type"] == "FeatureCollection"
    from PIL import Image

    assert Image.open(out / "thumbnails" / "a.png").size == (64, 48)
    # a rerun skips every finished slide (files untouched) and lists the broken ones again
    before = {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    again = extract_cohort(slides, out, tiny_encoder, _settings(), progress=False)
    assert again["skipped"] == counts["extracted"] and again["extracted"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == before
    # other settings redo the slide
    assert extract_cohort([path], out, tiny_encoder, _settings(min_tissue=0.9), progress=False)["extracted"] == 1


def test_resume_after_sigkill_mid_cohort(tiny_encoder, tmp_path):
    cohort = tmp_path / "slides"
    cohort.mkdir()
    for i in range(4):
        make_slide(cohort / f"s{i}.tiff", seed=i, size=(1536, 2048))
    weights = tmp_path / "tiny.safetensors"
    save_tile_weights(tiny_encoder, weights)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_llava.cli", "extract", str(cohort), "--out", str(out), "--weights",
           str(weights), "--tile-size", "64", "--batch-size", "8", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    features = out / "features"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if features.is_dir() and any(p.suffix == ".h5" for p in features.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p for p in features.iterdir() if p.suffix == ".h5")
    assert 1 <= len(done) < 4
    first = {p: p.stat().st_mtime_ns for p in done}
    for p in done:
        assert load_slide(p).n_total > 0  # only complete files under the final names
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"skipped {len(done)} already done" in rerun.stdout
    assert sorted(p.name for p in features.iterdir()) == [f"s{i}.h5" for i in range(4)]  # no temporary left
    assert {p: p.stat().st_mtime_ns for p in done} == first
    assert (out / "errors.jsonl").read_text() == ""


def test_done_when_timm_vit_tiny_on_a_40x_tiff(tmp_path):
    """The issue's check: 40x generic tiled TIFF, timm:vit_tiny_patch16_224, 20x, 256 px tiles."""
    from wsi_llava.cli import main

    cohort = tmp_path / "slides"
    cohort.mkdir()
    _, mask = make_slide(cohort / "case.tiff", size=(3072, 4096), seed=3,
                         blobs=[(1200, 1400, 900, 800), (3000, 1500, 800, 1100)], holes=[(1200, 1400, 300)])
    (cohort / "corrupt.svs").write_bytes(os.urandom(4096))
    weights = tmp_path / "W.safetensors"
    torch.manual_seed(0)
    save_tile_weights(build_tile_encoder("timm:vit_tiny_patch16_224"), weights)
    out = tmp_path / "out"
    rc = main(["extract", str(cohort), "--out", str(out), "--encoder", "timm:vit_tiny_patch16_224", "--weights",
               str(weights), "--magnification", "20", "--tile-size", "256", "--no-progress", "--workers", "1"])
    assert rc == 1  # one slide failed, the other finished
    with h5py.File(out / "features" / "case.h5", "r") as f:
        coords = f["coords"][:]
        assert f["coords"].attrs["patch_size_level0"] == 512 and f["features"].shape == (len(coords), 192)
    want = independent_tiles(mask, 512)
    assert abs(len(coords) - len(want)) <= 0.15 * len(want)
    assert all(mask[y:y + 512, x:x + 512].mean() > 0.2 for x, y in coords)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["slide_id"] for e in errors] == ["corrupt"]
