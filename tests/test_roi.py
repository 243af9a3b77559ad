"""ROI mode: an image → tiles → tile encoder → the same answer as an H5 file of those tiles' features."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_llava.data.slides import load_slide
from wsi_llava.infer.roi import RoiError, grid_coords, roi_to_slide, write_roi_h5
from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights

# a tiny ViT giving 16-d features, the width of the tiny served model
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, init_values=1e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serve_helpers import tiny_serving_cached

    return tiny_serving_cached(tmp_path_factory.mktemp("tiny_serving"))


@pytest.fixture()
def roi(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    enc = build_tile_encoder("vit", **TINY_VIT)
    weights = tmp_path / "tile.safetensors"
    save_tile_weights(enc, weights)
    arr = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)  # 2 × 3 whole 32-px tiles
    image = tmp_path / "roi.png"
    Image.fromarray(arr).save(image)
    return enc, weights, image, arr


def test_grid_is_row_major_whole_tiles():
    assert grid_coords(70, 100, 32).tolist() == [[0, 0], [32, 0], [64, 0], [0, 32], [32, 32], [64, 32]]


def test_roi_tiles_are_the_encoder_outputs_of_the_crops(roi):
    enc, _, image, arr = roi
    slide = roi_to_slide(image, enc)
    assert slide.features.shape == (6, 16) and slide.n_total == 6
    x, y = slide.coords[4].astype(int)
    want = enc(enc.preprocess(arr[y:y + 32, x:x + 32])[None])[0]
    assert torch.allclose(torch.from_numpy(slide.features[4]), want, atol=1e-6)
    # patches_per_wsi keeps the tiles load_slide keeps, in spatial order
    h5 = write_roi_h5(slide, image.with_suffix(".h5"))
    assert np.array_equal(roi_to_slide(image, enc, patches_per_wsi=4).coords, load_slide(h5, 4).coords)


def test_roi_and_h5_of_the_same_tiles_give_the_same_answer(served, roi, tmp_path):
    from wsi_llava.infer.engine import SlideAssistant
    from wsi_llava.infer.generation import GenerationSettings

    enc, weights, image, _ = roi
    assistant = SlideAssistant.from_pretrained(served.model_dir, device="cpu", precision="fp32")
    from_image = roi_to_slide(image, enc, assistant.patches_per_wsi)
    h5 = write_roi_h5(from_image, tmp_path / "roi.h5", "vit")
    from_h5 = assistant.load(h5)
    assert np.array_equal(from_image.features, from_h5.features)
    assert np.array_equal(from_image.coords, from_h5.coords)
    settings = GenerationSettings(max_new_tokens=12)
    q = ["What is the diagnosis?"]
    a = assistant.answer([from_image], q, None, settings, explain=True)[0]
    b = assistant.answer([from_h5], q, None, settings, explain=True)[0]
    assert a.text == b.text and a.text
    assert a.coords == b.coords

    # and through the command line: chat --image equals chat --slide
    def chat(*src):
        out = subprocess.run([sys.executable, "-m", "wsi_llava.cli", "chat", "--model", str(served.model_dir),
                              "--device", "cpu", "--precision", "fp32", *src, "--question", q[0],
                              "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert chat("--image", str(image), "--tile-weights", str(weights)) == chat("--slide", str(h5)) == a.text + "\n"


def test_unreadable_roi_names_the_file(tmp_path):
    bad = tmp_path / "roi.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(RoiError, match="roi.png"):
        roi_to_slide(bad, build_tile_encoder("vit", **TINY_VIT))
    with pytest.raises(FileNotFoundError):
        roi_to_slide(tmp_path / "absent.png", build_tile_encoder("vit", **TINY_VIT))


def test_small_roi_is_one_preprocessed_tile(tmp_path):
    from PIL import Image

    enc = build_tile_encoder("vit", **TINY_VIT)
    arr = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "small.png")
    slide = roi_to_slide(tmp_path / "small.png", enc)
    assert slide.features.shape == (1, 16) and slide.coords.tolist() == [[0.0, 0.0]]
