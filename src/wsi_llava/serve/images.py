"""ROI images in chat requests (issue #15): an ``image_url`` content part → a :class:`Slide`.

The URL is a ``data:image/png;base64,…`` (or ``image/jpeg``, ``image/tiff``) URL, or the path of a
PNG/JPEG/TIFF file under the slides root (the same safety rules as slides: relative, inside the
root's real path). Remote URLs are never fetched. The image is decoded (at most
``max_image_pixels`` pixels, ``max_image_bytes`` encoded bytes), tiled and encoded by the tile
encoder exactly as ``wsi-llava chat --image`` does (:func:`wsi_llava.infer.roi.encode_roi`), and
the resulting tiles are cached by the SHA-256 of the image bytes. Every problem is an ApiError 400
naming the content part. Blocking functions: call them off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading

import numpy as np

from ..data.records import ROI_SUFFIXES
from ..data.slides import Slide
from ..infer.roi import RoiError, RoiSlides, encode_roi
from .caches import LRUCache
from .errors import ApiError
from .security import resolve_file

#: media types accepted in ``data:`` URLs
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/tiff")
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)


def _bad(message: str, param: str, code: str = "invalid_image") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def image_bytes(url: str, root: str, max_bytes: int, param: str) -> bytes:
    """The encoded image of an ``image_url``: a ``data:`` URL's payload or a file under ``root``."""
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        media = m.group(1).strip().lower() if m else ""
        if media not in DATA_URL_TYPES or ";base64" not in m.group(2).lower():
            raise _bad(f"{param}: a data URL must be data:<{'|'.join(DATA_URL_TYPES)}>;base64,<data>, got "
                       f"{url[:40]!r}…", param)
        if len(m.group(3)) > (max_bytes + 2) // 3 * 4 + 4:
            raise _bad(f"{param}: the image is larger than {max_bytes} bytes", param, "image_too_large")
        try:
            return base64.b64decode(m.group(3), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{param}: the data URL's payload is not valid base64", param) from None
    if "://" in url or url.lower().startswith("file:"):
        raise _bad(f"{param}: image URLs are not fetched; send the image as a data URL "
                   "(data:image/png;base64,…) or a path under the slides root", param, "unsupported_image_url")
    ref = resolve_file(root, url, ROI_SUFFIXES, what="image", param=param)
    size = os.path.getsize(ref.path)
    if size > max_bytes:
        raise _bad(f"{param}: image {ref.id!r} has {size} bytes; at most {max_bytes} are accepted", param,
                   "image_too_large")
    with open(ref.path, "rb") as f:
        return f.read()


def decode_image(data: bytes, max_pixels: int, param: str) -> np.ndarray:
    """Encoded image bytes → RGB uint8 [H, W, 3]; the size is checked before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _bad(f"{param}: the image has {w} × {h} = {w * h} pixels; at most {max_pixels} are accepted",
                           param, "image_too_large")
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError:
        raise _bad(f"{param}: the image has more than {max_pixels} pixels", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _bad(f"{param}: the image cannot be decoded ({type(e).__name__}); send a PNG, JPEG or TIFF image",
                   param) from None


def image_digest(data: bytes) -> str:
    """The cache key of an image: the SHA-256 of its encoded bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


class ImageSlides:
    """The tile encoder of a server and the ROI images it encoded (LRU by the image's SHA-256).

    ``expected_dim``: the model's tile feature width (a mismatch is a :class:`RoiError` at start-up).
    The encoder runs on ``device`` in float32, one image at a time."""

    def __init__(self, weights: str, name: str | None, patches_per_wsi: int | None, expected_dim: int, device,
                 max_pixels: int, cache: LRUCache[Slide]):
        rois = RoiSlides(weights, name, patches_per_wsi, expected_dim, device=device)
        self.encoder = rois.encoder
        self.patches_per_wsi = rois.patches_per_wsi
        self.batch_size = rois.batch_size
        self.max_pixels = max_pixels
        self.cache = cache
        self._lock = threading.Lock()

    def encode(self, data: bytes, digest: str, param: str) -> Slide:
        """Decode and encode one image (not cached here): tiles [K, D] as a :class:`Slide` whose
        ``path`` is ``sha256:<digest>``."""
        image = decode_image(data, self.max_pixels, param)
        where = f"image sha256:{digest[:12]}"
        try:
            with self._lock:
                feats, coords, n = encode_roi(image, self.encoder, self.patches_per_wsi, self.batch_size, where=where)
        except RoiError as e:
            raise _bad(f"{param}: {e}", param) from None
        return Slide(features=feats, coords=coords, path=f"sha256:{digest}", n_total=n)
