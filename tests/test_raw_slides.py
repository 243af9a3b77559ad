"""Chat, predict and serve on raw slides (issue #16): tile features extracted once into the feature cache
(keyed by content hash + tile encoder + settings), the same answers as on the H5 that `wsi-llava extract`
writes, and clear errors for corrupt slides and mismatched encoders."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("openslide")

from wsi_llava.cli import main as cli  # noqa: E402
from wsi_llava.data.synthetic_wsi import draw_tissue, write_pyramid_tiff  # noqa: E402
from wsi_llava.data.wsi_reader import WsiError  # noqa: E402
from wsi_llava.infer.engine import SlideAssistant  # noqa: E402
from wsi_llava.infer.extract import ExtractSettings  # noqa: E402
from wsi_llava.infer.generation import GenerationSettings  # noqa: E402
from wsi_llava.infer.roi import TileWidthError  # noqa: E402
from wsi_llava.infer.slide_features import (FeatureCache, feature_cache,  # noqa: E402
                                            remembered_sha256, slide_files)
from wsi_llava.model.tile_encoder import build_tile_encoder, load_tile_encoder, save_tile_weights  # noqa: E402
from wsi_llava.serve.app import create_app  # noqa: E402

from serve_helpers import MODEL, one_thread, openai_error, running, serve_config, tiny_serving_cached  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# a tiny ViT giving 16-d features, the width of the tiny served model (as in test_roi.py)
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, init_values=1e-5)
QUESTION = "What is the diagnosis?"


def make_slide(path: Path, seed: int = 0) -> Path:
    """A 40x (0.25 µm) pyramidal TIFF of 2048 × 1536 px with two tissue pieces: at 20x and 256-px tiles,
    a 4 × 3 grid of 512-px level-0 tiles, several of them tissue."""
    image, _ = draw_tissue(1536, 2048, [(600, 700, 420, 360), (1580, 760, 330, 520)], seed=seed)
    write_pyramid_tiff(path, image, mpp=0.25, levels=3)
    return path


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.h5"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The shared tiny model; a slides root holding its H5 slides plus ``raw/case.tiff`` and a corrupt
    ``raw/bad.svs``; tiny tile encoder weights (16-d) and weights of the wrong width (8-d)."""
    shared = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    base = tmp_path_factory.mktemp("raw_slides")
    root = base / "slides"
    shutil.copytree(shared.slides_root, root)
    (root / "raw").mkdir()
    make_slide(root / "raw" / "case.tiff")
    (root / "raw" / "bad.svs").write_bytes(os.urandom(4096))
    torch.manual_seed(0)
    save_tile_weights(build_tile_encoder("vit", **TINY_VIT).eval(), base / "tile.safetensors")
    save_tile_weights(build_tile_encoder("vit", **{**TINY_VIT, "embed_dim": 8}), base / "tile8.safetensors")
    return dataclasses.replace(shared, slides_root=root), base


@pytest.fixture(scope="module")
def assistant(setup):
    return SlideAssistant.from_pretrained(setup[0].model_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def extracted(setup):
    """``wsi-llava extract`` of ``raw/case.tiff`` with the tiny encoder: the H5 file it writes."""
    tiny, base = setup
    out = base / "extract_out"
    assert cli(["extract", str(tiny.slides_root / "raw" / "case.tiff"), "--out", str(out), "--weights",
                str(base / "tile.safetensors"), "--workers", "0", "--no-progress", "--device", "cpu",
                "--precision", "fp32"]) == 0
    return out / "features" / "case.h5"


def chat(capsys, tiny, *args) -> tuple[int, str, str]:
    rc = cli(["chat", "--model", str(tiny.model_dir), "--device", "cpu", "--precision", "fp32",
              "--question", QUESTION, "--max-new-tokens", "12", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -------------------------------------------------------------------------------------- chat


def test_chat_on_a_raw_slide_answers_like_its_extracted_h5_and_reuses_the_cache(setup, extracted, capsys, tmp_path):
    tiny, base = setup
    cache = tmp_path / "cache"
    slide = tiny.slides_root / "raw" / "case.tiff"
    raw = ("--slide", str(slide), "--tile-weights", str(base / "tile.safetensors"), "--feature-cache", str(cache))
    rc, first, err = chat(capsys, tiny, *raw)
    assert rc == 0, err
    assert "extracting tile features of" in err and "extracted" in err  # the progress lines
    rc, from_h5, err_h5 = chat(capsys, tiny, "--slide", str(extracted))
    assert rc == 0, err_h5
    assert first == from_h5 and first.strip()
    [entry] = entries(cache)
    with h5py.File(entry, "r") as a, h5py.File(extracted, "r") as b:
        assert np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["coords"][:], b["coords"][:])
        key = json.loads(a.attrs["extraction"])
    assert key["tile_size"] == 256 and key["magnification"] == 20 and len(key["slide_sha256"]) == 64
    # the second chat does no extraction: no progress line, the entry untouched
    stamp = entry.stat().st_mtime_ns
    rc, second, err = chat(capsys, tiny, *raw)
    assert rc == 0 and second == first and "extracting" not in err
    assert entries(cache) == [entry] and entry.stat().st_mtime_ns == stamp
    # another magnification is another entry (10x, 128-px tiles: the same 512-px level-0 grid)
    rc, _, err = chat(capsys, tiny, *raw, "--magnification", "10", "--tile-size", "128")
    assert rc == 0 and "extracting" in err and len(entries(cache)) == 2, err
    rc, _, err = chat(capsys, tiny, *raw, "--magnification", "10", "--tile-size", "128")
    assert rc == 0 and "extracting" not in err and len(entries(cache)) == 2
    # a copy of the file (same content) reuses the entry; a changed file is a new entry
    copy = shutil.copy(slide, tmp_path / "renamed.tif")
    rc, _, err = chat(capsys, tiny, "--slide", str(copy), *raw[2:])
    assert rc == 0 and "extracting" not in err and len(entries(cache)) == 2
    make_slide(Path(copy), seed=5)
    rc, _, err = chat(capsys, tiny, "--slide", str(copy), *raw[2:])
    assert rc == 0 and "extracting" in err and len(entries(cache)) == 3


def test_chat_raw_slide_errors(setup, capsys, tmp_path):
    tiny, base = setup
    cache = tmp_path / "cache"
    weights = ("--tile-weights", str(base / "tile.safetensors"), "--feature-cache", str(cache))
    bad = tiny.slides_root / "raw" / "bad.svs"
    rc, out, err = chat(capsys, tiny, "--slide", str(bad), *weights)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and "bad.svs" in last and "cannot open the slide" in last
    assert "Traceback" not in err and not entries(cache)
    # the model takes 16-d tile features: an 8-d encoder is refused, naming both widths
    rc, _, err = chat(capsys, tiny, "--slide", str(tiny.slides_root / "raw" / "case.tiff"), "--tile-weights",
                      str(base / "tile8.safetensors"), "--feature-cache", str(cache))
    assert rc == 2 and "8-d" in err and "16-d" in err and not entries(cache)
    with pytest.raises(SystemExit, match="--tile-weights"):
        chat(capsys, tiny, "--slide", str(tiny.slides_root / "raw" / "case.tiff"))


# ------------------------------------------------------------------------------- the cache


class Interrupting(torch.nn.Module):
    """A tile encoder that is killed (KeyboardInterrupt) at its second batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.embed_dim, self.preprocess, self.name = inner.embed_dim, inner.preprocess, inner.name

    def forward(self, pixels):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.inner(pixels)


def test_an_interrupted_extraction_leaves_no_entry(setup, tmp_path):
    tiny, base = setup
    slide = tiny.slides_root / "raw" / "case.tiff"
    weights = base / "tile.safetensors"
    encoder = load_tile_encoder(weights)
    settings = ExtractSettings("", batch_size=2, workers=0)
    lines: list[str] = []
    killed = FeatureCache(Interrupting(encoder), weights, settings, tmp_path, report=lines.append)
    with pytest.raises(KeyboardInterrupt):
        killed.entry(slide)
    assert not entries(tmp_path) and not list(tmp_path.glob(".*.tmp")) and killed.extractions == 0
    cache = FeatureCache(encoder, weights, settings, tmp_path, report=lines.append)
    entry = cache.entry(slide)
    assert entries(tmp_path) == [entry] and cache.extractions == 1
    assert cache.entry(slide) == entry and cache.extractions == 1
    assert cache.settings.encoder_id == f"vit:{hashlib.sha256(weights.read_bytes()).hexdigest()}"
    # an mpp override is part of the key
    over = FeatureCache(encoder, weights, settings, tmp_path, mpp_table={"case.tiff": 0.5}, report=lines.append)
    assert over.entry(slide) != entry and len(entries(tmp_path)) == 2
    # a slide with no tissue tile is an error naming it, and caches nothing
    blank = tmp_path / "blank.tiff"
    write_pyramid_tiff(blank, np.full((1024, 1024, 3), 240, np.uint8), mpp=0.25)
    with pytest.raises(WsiError, match="blank.tiff.*no tile"):
        cache.entry(blank)
    assert len(entries(tmp_path)) == 2


def test_mirax_companion_files_are_part_of_the_content(tmp_path):
    slide = tmp_path / "m.mrxs"
    slide.write_bytes(b"index")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"pixels")
    assert slide_files(slide) == [slide, tmp_path / "m" / "Data0000.dat"]
    cache = FeatureCache(build_tile_encoder("vit", **TINY_VIT), tmp_path / "unused.safetensors", ExtractSettings(""),
                         tmp_path / "cache")
    before = cache.content_hash(slide)
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"other pixels")
    assert cache.content_hash(slide) != before


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path):
    f = tmp_path / "slide.svs"
    f.write_bytes(b"abc")
    digest = remembered_sha256(f, tmp_path / "cache")
    assert digest == hashlib.sha256(b"abc").hexdigest()
    [memo] = (tmp_path / "cache" / "hashes").iterdir()
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "sha256": "remembered"}))
    assert remembered_sha256(f, tmp_path / "cache") == "remembered"  # not read again
    f.write_bytes(b"abcd")
    assert remembered_sha256(f, tmp_path / "cache") == hashlib.sha256(b"abcd").hexdigest()


def test_width_mismatch_names_both_widths(setup):
    _, base = setup
    with pytest.raises(TileWidthError, match="8-d features, the model takes 16-d"):
        feature_cache(base / "tile8.safetensors", build_tile_encoder("vit", **{**TINY_VIT, "embed_dim": 8}), 16)


# ------------------------------------------------------------------------------------ predict


def test_predict_rows_whose_h5_path_is_a_raw_slide(setup, extracted, tmp_path):
    tiny, base = setup
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["h5_path", "caption", "question", "answer", "slide_id", "dataset"])
        w.writerow([str(tiny.slides_root / "raw" / "case.tiff"), "", QUESTION, "x", "case", "t"])
        w.writerow([str(extracted), "", QUESTION, "x", "case-h5", "t"])
        w.writerow([str(tiny.slides_root / "raw" / "bad.svs"), "", QUESTION, "x", "bad", "t"])
    common = ["predict", "--model", str(tiny.model_dir), "--data", str(manifest), "--device", "cpu",
              "--precision", "fp32", "--max-new-tokens", "12", "--feature-cache", str(tmp_path / "cache")]
    # without --tile-weights the raw rows are errors saying what to do
    assert cli([*common, "--out", str(tmp_path / "none.jsonl")]) == 1
    errors = [json.loads(line) for line in (tmp_path / "none.errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2, 4] and all("--tile-weights" in e["error"] for e in errors)
    out = tmp_path / "p.jsonl"
    assert cli([*common, "--out", str(out), "--tile-weights", str(base / "tile.safetensors")]) == 1
    lines = {json.loads(x)["slide_id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert lines["case"]["prediction"] == lines["case-h5"]["prediction"] and lines["case"]["prediction"]
    [error] = [json.loads(x) for x in (tmp_path / "p.errors.jsonl").read_text().splitlines()]
    assert error["row"] == 4 and "bad.svs" in error["error"]
    assert len(entries(tmp_path / "cache")) == 1


# -------------------------------------------------------------------------------------- serve


def _post(url: str, slide: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": MODEL, "max_tokens": 12, "slide": slide, "messages": [{"role": "user", "content": QUESTION}]})


def test_serve_answers_on_a_raw_slide_by_id(setup, assistant, extracted, tmp_path):
    tiny, base = setup
    cache = tmp_path / "cache"
    config = serve_config(tiny, tile_weights=str(base / "tile.safetensors"), feature_cache=str(cache),
                          slide_reader="thread")
    with running(create_app(config, assistant)) as url:
        assert not cache.exists()  # nothing is hashed or written before a raw slide is used
        ids = [s["id"] for s in httpx.get(url + "/v1/slides").json()["data"]]
        assert {"raw/case.tiff", "raw/bad.svs"} <= set(ids) and set(tiny.slide_ids) <= set(ids)
        with one_thread():
            ref = assistant.answer([assistant.load(extracted)], [QUESTION],
                                   settings=GenerationSettings(max_new_tokens=12))[0]
        r = _post(url, "raw/case.tiff")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref.text
        assert len(entries(cache)) == 1
        # the id without its suffix resolves to the same slide; the slide info and tiles routes work too
        assert _post(url, "raw/case").json()["choices"][0]["message"]["content"] == ref.text
        info = httpx.get(url + "/v1/slides/raw/case.tiff").json()
        assert info["id"] == "raw/case.tiff" and info["dim"] == 16 and info["n_total"] == len(ref_coords(extracted))
        assert httpx.get(url + "/health").json()["feature_cache"] == {"extractions": 1}
        err = openai_error(_post(url, "raw/bad.svs"), 400, "invalid_slide_file")
        assert "raw/bad.svs" in err["message"] and err["param"] == "slide"
    # a restarted server finds the entry on disk: no extraction
    with running(create_app(config, assistant)) as url:
        assert _post(url, "raw/case.tiff").json()["choices"][0]["message"]["content"] == ref.text
        assert httpx.get(url + "/health").json()["feature_cache"] == {"extractions": 0}
    # without a tile encoder raw slides are refused clearly
    with running(create_app(serve_config(tiny, slide_reader="thread"), assistant)) as url:
        err = openai_error(_post(url, "raw/case.tiff"), 400, "raw_slides_not_enabled")
        assert "--tile-weights" in err["message"]


def ref_coords(h5: Path) -> np.ndarray:
    with h5py.File(h5, "r") as f:
        return f["coords"][:]
