"""`wsi-llava heatmap`: PNG heatmap of the selector's scores and GeoJSON of the kept tiles."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from wsi_llava.cli import main as cli
from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.data.tile_size import TileSizeError, read_tile_size
from wsi_llava.infer.heatmap import (KEPT_RGB, TileSelection, draw_heatmap, figure_title, select_tiles, thumbnail_scale,
                                     to_geojson)
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration

pytestmark = pytest.mark.timeout(120)


def _save_model(tiny_llm, out, **config):
    torch.manual_seed(0)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, **config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prumerge_model(tiny_llm, tmp_path_factory):
    return _save_model(tiny_llm, tmp_path_factory.mktemp("pm"), vision_mode="wsi", mm_hidden_size=16,
                       vision_config=dict(in_dim=16, embed_dim=16, depth=1, num_heads=2), image_seq_length=6,
                       vision_feature_select_mode="prumerge")


@pytest.fixture(scope="module")
def random_model(tiny_llm, tmp_path_factory):
    return _save_model(tiny_llm, tmp_path_factory.mktemp("rs"), vision_mode="none", mm_hidden_size=16,
                       image_seq_length=5, vision_feature_select_mode="random_sample")


@pytest.fixture(scope="module")
def topk_model(tiny_llm, tmp_path_factory):
    return _save_model(tiny_llm, tmp_path_factory.mktemp("tk"), vision_mode="none", mm_hidden_size=16,
                       image_seq_length=6, vision_feature_select_mode="prompt_topk")


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _tile_coords(path):
    with h5py.File(path, "r") as f:
        c = f["coords"][:] if "coords" in f else f["coords_yx"][:][:, ::-1]
    return {tuple(map(float, xy)) for xy in c}


def test_cli_png_and_geojson_match_the_selection(prumerge_model, cohort, tmp_path, capsys):
    slide = str(cohort.slides[0])
    png, gj = tmp_path / "map.png", tmp_path / "sel.geojson"
    assert cli(["heatmap", "--model", str(prumerge_model), "--slide", slide, "--out", str(png),
                "--geojson", str(gj)]) == 0
    printed = capsys.readouterr().out
    assert "kept 6 of" in printed and "tile size 256 px (from attribute patch_size (file))" in printed
    px = _pixels(png)
    assert px.shape[0] > 200 and px.shape[1] > 200 and px.std() > 20  # a real picture, not a blank canvas
    assert png.stat().st_size > 10_000

    # the independent truth: the model's own selection on the same tiles
    assistant = SlideAssistant.from_pretrained(prumerge_model)
    s = assistant.load(slide)
    m = assistant.model
    with torch.no_grad():
        ref = m.encode_slides(torch.from_numpy(s.features)[None], torch.from_numpy(s.coords)[None],
                              torch.ones(1, len(s.coords), dtype=torch.bool)).selection
    kept = sorted(set(ref.indices[0].tolist()))
    scores = ref.scores[0].numpy()

    doc = json.loads(gj.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(kept) == 6
    assert doc["wsi_llava"]["selector"] == "prumerge" and doc["wsi_llava"]["budget"] == 6
    meta = doc["wsi_llava"]
    assert meta["patch_size"] == 256 and meta["patch_size_source"] == "attribute patch_size (file)"
    with Image.open(png) as im:  # the PNG's metadata says it too
        assert "tile size 256 px: attribute patch_size (file)" in im.info["Description"]
    assert sorted(f["properties"]["index"] for f in doc["features"]) == kept
    all_tiles = _tile_coords(slide)
    for f in doc["features"]:
        p = f["properties"]
        assert f["type"] == "Feature" and p["objectType"] == "annotation"
        assert p["classification"]["name"] and len(p["classification"]["color"]) == 3
        i = p["index"]
        x, y = (float(v) for v in s.coords[i])
        assert (x, y) in all_tiles  # level-0 coordinates of a real tile of the file
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert ring == [[x, y], [x + 256, y], [x + 256, y + 256], [x, y + 256], [x, y]]  # patch_size attr 256
        assert p["score"] == pytest.approx(float(scores[i]), abs=1e-6)
        assert p["measurements"]["selection score"] == pytest.approx(p["score"])
    ranked = sorted(doc["features"], key=lambda f: f["properties"]["rank"])
    assert [f["properties"]["rank"] for f in ranked] == list(range(1, 7))
    got = [f["properties"]["score"] for f in ranked]
    assert got == sorted(got, reverse=True)  # rank 1 = highest score


def test_selector_without_scores_draws_kept_tiles(random_model, cohort, tmp_path):
    assistant = SlideAssistant.from_pretrained(random_model)
    slide = assistant.load(cohort.slides[1])
    sel = select_tiles(assistant, slide)
    assert sel.scores is None and sel.selector == "random_sample" and len(sel.indices) == 5
    out = draw_heatmap(sel, tmp_path / "rs.png")
    assert _pixels(out).std() > 20
    doc = to_geojson(sel, object_type="detection")
    props = [f["properties"] for f in doc["features"]]
    assert all(p["score"] is None and "selection score" not in p["measurements"] for p in props)
    assert all(p["objectType"] == "detection" for p in props)
    assert [p["index"] for p in props] == sel.indices.tolist()  # rank follows the selector's order
    assert [p["rank"] for p in props] == [1, 2, 3, 4, 5]


def test_prompt_topk_selection_follows_the_question(topk_model, cohort):
    assistant = SlideAssistant.from_pretrained(topk_model)
    slide = assistant.load(cohort.slides[2])
    a = select_tiles(assistant, slide, "Is there necrosis?")
    b = select_tiles(assistant, slide, "Which diagnosis fits these glands best?")
    assert a.question == "Is there necrosis?" and a.scores is not None
    assert not np.allclose(a.scores, b.scores)
    for sel in (a, b):  # the kept tiles are the top-k by the drawn score
        top = set(np.argsort(-sel.scores, kind="stable")[:6].tolist())
        assert set(sel.indices.tolist()) == top


def test_thumbnail_underneath_changes_the_picture(prumerge_model, cohort, tmp_path):
    slide = str(cohort.slides[0])
    thumb = tmp_path / "thumb.png"
    yy, xx = np.mgrid[0:120, 0:160]
    Image.fromarray((((xx // 10 + yy // 10) % 2) * 200 + 30).astype(np.uint8)).save(thumb)
    plain, under = tmp_path / "plain.png", tmp_path / "under.png"
    args = ["heatmap", "--model", str(prumerge_model), "--slide", slide]
    assert cli(args + ["--out", str(plain)]) == 0
    assert cli(args + ["--out", str(under), "--image", str(thumb), "--downsample", "40"]) == 0
    a, b = _pixels(plain), _pixels(under)
    assert a.shape != b.shape or np.abs(a - b).mean() > 1.0


def test_thumbnail_scale():
    coords = np.array([[0.0, 0.0], [744.0, 1000.0]])
    assert thumbnail_scale((100, 50), coords, 256, downsample=32) == pytest.approx(1 / 32)
    assert thumbnail_scale((100, 50), coords, 256, slide_size=(4000, 2000)) == pytest.approx(100 / 4000)
    # estimate: the tighter axis (tissue reaching the slide edge) decides: min(100/1000, 50/1256)
    assert thumbnail_scale((100, 50), coords, 256) == pytest.approx(50 / 1256)
    with pytest.raises(ValueError, match="downsample"):
        thumbnail_scale((100, 50), coords, 256, downsample=0)


def test_patch_size_from_attributes(cohort, tmp_path):
    """heatmap reads the data layer's one tile-size rule (tests/test_tile_size.py has the rule itself)."""
    src = cohort.slides[0]
    assert read_tile_size(src).size == 256
    path = tmp_path / "s.h5"
    shutil.copy(src, path)
    with h5py.File(path, "a") as f:
        del f.attrs["patch_size"]
    assert read_tile_size(path).size == 256 and "spacing" in read_tile_size(path).source  # the 256-px grid
    with h5py.File(path, "a") as f:  # CLAM: patch_size at patch_level 1 with downsample 4
        key = "coords" if "coords" in f else "coords_yx"
        f[key].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    assert read_tile_size(path).size == 1024
    with h5py.File(path, "a") as f:  # TRIDENT's level-0 size wins
        f.attrs["patch_size_level0"] = 512
    assert read_tile_size(path).size == 512
    with h5py.File(path, "a") as f:
        f.attrs["patch_size_level0"] = -3
    with pytest.raises(TileSizeError, match="s.h5.*patch_size_level0"):
        read_tile_size(path)


def test_long_slide_names_are_wrapped_not_clipped(tmp_path):
    import matplotlib

    name = ("TCGA-A1-A0SB-01Z-00-DX1." + "0123456789abcdef" * 8)[:117] + ".h5"
    assert len(name) == 120
    sel = TileSelection(coords=np.array([[0, 0], [256, 0]], dtype=float), indices=np.array([1]),
                        scores=None, selector="random_sample", budget=1, question="q", patch_size=256,
                        slide=str(tmp_path / name))
    title = figure_title(sel)
    assert name in title.replace("\n", "") and max(len(line) for line in title.split("\n")) < 100
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # the figure's own title text, read back from an SVG
        svg = draw_heatmap(sel, tmp_path / "long.svg").read_text()
    import re

    texts = "".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))
    assert name in texts.replace(" ", "").replace("\n", "")


def test_repeated_indices_and_overlapping_tiles(tmp_path):
    """Fewer tiles than the budget (cycled repeats) → each tile once; overlapping tiles still draw."""
    coords = np.array([[0, 0], [128, 0], [256, 0]], dtype=float)
    sel = TileSelection(coords=coords, indices=np.array([0, 2, 1, 0, 2]), scores=np.array([0.1, 0.5, 0.3]),
                        selector="prompt_topk", budget=5, question="q", patch_size=256, slide="x.h5")
    idx, ranks = sel.kept()
    assert idx.tolist() == [1, 2, 0] and ranks.tolist() == [1, 2, 3]
    assert [f["properties"]["index"] for f in to_geojson(sel)["features"]] == [1, 2, 0]
    out = draw_heatmap(sel, tmp_path / "overlap.png")
    assert _pixels(out).std() > 20
    with pytest.raises(ValueError, match="object_type"):
        to_geojson(sel, object_type="cell")


def test_missing_slide_names_the_file(prumerge_model, tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(Exception, match="nope.h5"):
        cli(["--debug", "heatmap", "--model", str(prumerge_model), "--slide", str(missing), "--out", str(tmp_path / "m.png")])


def test_roi_image_heatmap_marks_the_kept_tiles(prumerge_model, tmp_path, capsys):
    """heatmap --image (ROI mode, issue #15): the ROI is tiled, encoded, and the kept tiles outlined on it."""
    from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights

    torch.manual_seed(0)
    enc = build_tile_encoder("vit", img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, init_values=1e-5)
    weights = tmp_path / "tile.safetensors"
    save_tile_weights(enc, weights)
    rng = np.random.default_rng(0)
    arr = np.full((96, 160, 3), 128, np.uint8)  # 3 × 5 tiles of 32 px; a grey image with noise
    arr = np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)
    image, png, gj = tmp_path / "roi.png", tmp_path / "roi_map.png", tmp_path / "roi.geojson"
    Image.fromarray(arr).save(image)
    assert cli(["heatmap", "--model", str(prumerge_model), "--image", str(image), "--tile-weights", str(weights),
                "--out", str(png), "--geojson", str(gj)]) == 0
    out = capsys.readouterr().out
    assert "kept 6 of 15 tiles" in out and "tile size 32 px (from the tile encoder's tile size" in out
    px = _pixels(png)
    h, w, _ = px.shape
    assert h * 160 == w * 96 and h >= 96  # the image's aspect
    f = h // 96
    doc = json.loads(gj.read_text())
    kept = {tuple(f_["geometry"]["coordinates"][0][0]) for f_ in doc["features"]}
    assert len(kept) == 6 and doc["wsi_llava"]["patch_size"] == 32
    red = np.all(px == np.array(KEPT_RGB, dtype=float), axis=2)
    for y in range(0, 96, 32):
        for x in range(0, 160, 32):
            box = red[y * f:(y + 32) * f, x * f:(x + 32) * f]
            if (x, y) in kept:  # outlined: the whole border is the kept colour, the centre is not
                assert box[0].all() and box[-1].all() and box[:, 0].all() and box[:, -1].all()
                assert not box[box.shape[0] // 2, box.shape[1] // 2]
            else:
                assert not box.any()
            centre = px[(y + 16) * f, (x + 16) * f]
            assert np.abs(centre - arr[y + 16, x + 16]).max() > 10  # every tile is tinted by its score
    # ROI options are for ROI mode only; an ROI needs its tile encoder
    with pytest.raises(SystemExit, match="tile-weights"):
        cli(["heatmap", "--model", str(prumerge_model), "--image", str(image), "--out", str(png)])


def test_roi_overlay_without_scores_marks_kept_tiles_orange(tmp_path):
    from wsi_llava.infer.heatmap import UNSCORED_RGB, draw_roi_overlay

    image = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(image)  # 1 × 2 tiles of 40 px
    sel = TileSelection(coords=np.array([[0, 0], [40, 0]], dtype=float), indices=np.array([1]), scores=None,
                        selector="random_sample", budget=1, question="q", patch_size=40, slide=str(image),
                        patch_size_source="test")
    px = _pixels(draw_roi_overlay(sel, image, tmp_path / "o.png", min_side=80))  # factor 1: pixel-aligned
    assert px.shape == (40, 80, 3)
    assert tuple(px[0, 40]) == KEPT_RGB and tuple(px[20, 0]) != KEPT_RGB  # the kept tile's outline only
    assert np.allclose(px[20, 60], 0.45 * np.array(UNSCORED_RGB[1]), atol=1)  # kept: orange tint on black
    assert np.allclose(px[20, 20], 0.45 * np.array(UNSCORED_RGB[0]), atol=1)  # not kept: grey tint
