"""ROI images in serve (issue #15): an ``image_url`` part (data URL or a file under the slides root) is
tiled and encoded by the tile encoder, answers like ``chat --image``, is cached by content hash, and
every problem is a clear 400."""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.infer.generation import GenerationSettings
from wsi_llava.infer.roi import RoiError, roi_to_slide
from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights
from wsi_llava.serve.app import create_app
from wsi_llava.serve.errors import ApiError
from wsi_llava.serve.images import decode_image, image_bytes
from wsi_llava.serve.security import real_root

from serve_helpers import MODEL, one_thread, openai_error, running, serve_config, tiny_serving_cached

pytestmark = pytest.mark.timeout(300)

# a tiny ViT giving 16-d features, the width of the tiny served model (as in test_roi.py)
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, init_values=1e-5)
QUESTION = "What is the diagnosis?"


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The shared tiny model, a private slides root with ``rois/roi.png`` (2 × 3 tiles of 32 px) and
    tiny tile encoder weights (16-d) plus weights of the wrong width (8-d)."""
    shared = tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")
    base = tmp_path_factory.mktemp("serve_images")
    root = base / "slides"
    shutil.copytree(shared.slides_root, root)
    torch.manual_seed(0)
    encoder = build_tile_encoder("vit", **TINY_VIT).eval()
    save_tile_weights(encoder, base / "tile.safetensors")
    save_tile_weights(build_tile_encoder("vit", **{**TINY_VIT, "embed_dim": 8}), base / "tile8.safetensors")
    arr = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    (root / "rois").mkdir()
    (root / "rois" / "roi.png").write_bytes(_png(arr))
    return dataclasses.replace(shared, slides_root=root), base, encoder, arr


@pytest.fixture(scope="module")
def assistant(setup):
    return SlideAssistant.from_pretrained(setup[0].model_dir)


@pytest.fixture(scope="module")
def server(setup, assistant):
    tiny, base, _, _ = setup
    app = create_app(serve_config(tiny, max_body_bytes=200_000, tile_weights=str(base / "tile.safetensors"),
                                  max_image_pixels=200 * 200), assistant)
    with running(app) as url:
        yield url, app


def _ask(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _post(url: str, messages: list[dict], **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 12, **kw},
                      timeout=120)


# ------------------------------------------------------------------------------ answers


def test_an_image_answers_like_chat_image_and_is_cached(server, setup, assistant):
    url, app = server
    tiny, _, encoder, arr = setup
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    data = _data_url(_png(arr))
    r = client.chat.completions.create(model=MODEL, messages=_ask(data), max_tokens=12, extra_body={"explain": True})
    with one_thread():
        roi = roi_to_slide(tiny.slides_root / "rois" / "roi.png", encoder, assistant.patches_per_wsi)
        ref = assistant.answer([roi], [QUESTION], settings=GenerationSettings(max_new_tokens=12))[0]
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens
    ex = r.explain
    assert ex["slide"].startswith("sha256:") and ex["n_tiles"] == 6
    assert ex["coords"] == [[float(x), float(y)] for x, y in roi.coords[ex["tile_indices"]]]
    # the same image as a file under the slides root: the same content hash, so a cache hit
    images = app.state.server.images
    hits = images.cache.stats()["hits"]
    by_path = _post(url, _ask("rois/roi.png"), explain=True)
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["choices"][0]["message"]["content"] == ref.text
    assert by_path.json()["explain"]["slide"] == ex["slide"]
    assert images.cache.stats()["hits"] == hits + 1 and len(images.cache) == 1
    assert httpx.get(url + "/health").json()["image_cache"]["items"] == 1
    # JPEG data URLs are accepted too; streaming works as for slides
    jpeg = _post(url, _ask(_data_url(_png(arr, "JPEG"), "image/jpeg")), stream=True)
    assert jpeg.status_code == 200 and jpeg.text.rstrip().endswith("data: [DONE]"), jpeg.text


# ----------------------------------------------------------------------------- refusals


def test_image_problems_are_clear_400s(server, setup):
    url, _ = server
    _, _, _, arr = setup
    param = "messages[0].content[0].image_url.url"
    bad = [
        (_data_url(b"not an image"), 400, "invalid_image"),
        ("data:image/png;base64,***", 400, "invalid_image"),
        ("data:image/gif;base64,R0lGODlh", 400, "invalid_image"),
        (_data_url(_png(np.zeros((300, 300, 3), np.uint8))), 400, "image_too_large"),  # over 200 × 200
        ("https://example.org/roi.png", 400, "unsupported_image_url"),
        ("../secret.png", 400, "invalid_image"),
        ("rois/missing.png", 404, "image_not_found"),
        ("rois/roi", 404, "image_not_found"),  # images need their suffix
        ("notes.h5", 404, "image_not_found"),
    ]
    for image, status, code in bad:
        err = openai_error(_post(url, _ask(image)), status, code)
        assert err["param"] == param, (image, err)
    # an image and a slide in one conversation
    mixed = _ask(_data_url(_png(arr)))
    err = openai_error(_post(url, mixed, slide="SYN-0000-0000"), 400, "invalid_value")
    assert err["param"] == param
    # image parts belong in user messages
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}
    err = openai_error(_post(url, [system, {"role": "user", "content": "hi"}]), 400, "invalid_value")
    assert err["param"] == "messages[0].content[0].type"


def test_images_need_a_tile_encoder(setup, assistant):
    tiny, base, _, arr = setup
    with running(create_app(serve_config(tiny, max_body_bytes=200_000), assistant)) as url:
        err = openai_error(_post(url, _ask(_data_url(_png(arr)))), 400, "images_not_enabled")
        assert "--tile-weights" in err["message"] and err["param"] == "messages[0].content[0].image_url.url"
    with pytest.raises(RoiError, match="16-d"):
        create_app(serve_config(tiny, tile_weights=str(base / "tile8.safetensors")), assistant)


def test_image_helpers(tmp_path):
    root = real_root(tmp_path)
    arr = np.full((10, 20, 3), 7, np.uint8)
    data = _png(arr)
    assert image_bytes(_data_url(data), root, 10_000, "p") == data
    (tmp_path / "a.tif").write_bytes(_png(arr, "TIFF"))
    assert np.array_equal(decode_image(image_bytes("a.tif", root, 10_000, "p"), 200, "p"), arr)
    with pytest.raises(ApiError, match="at most 100 are accepted"):
        decode_image(data, 100, "p")  # 200 pixels
    with pytest.raises(ApiError) as err:
        image_bytes(_data_url(data), root, 10, "p")  # more bytes than allowed
    assert err.value.code == "image_too_large"
    with pytest.raises(ApiError) as err:
        image_bytes("a.tif", root, 10, "p")
    assert err.value.code == "image_too_large"
    with pytest.raises(ApiError) as err:
        image_bytes("file:///etc/passwd", root, 10_000, "p")
    assert err.value.code == "unsupported_image_url"
