"""Synthetic raw slides for tests and benches: pyramidal tiled TIFFs (OpenSlide's generic-TIFF format)
with drawn tissue whose exact mask is known.

:func:`draw_tissue` paints stained-looking blobs (pink/purple with texture, optional holes) on a
near-white background; :func:`write_pyramid_tiff` writes an image as tiled levels, each the 2 × 2 mean
of the one above, the pixel size in the TIFF resolution tags (``mpp`` µm at level 0), so
OpenSlide reports ``openslide.mpp-x``. Needs ``tifffile`` (``pip install 'wsi-llava[extract]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def draw_tissue(height: int, width: int, blobs: list[tuple[float, float, float, float]],
                holes: list[tuple[float, float, float]] = (), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [height, width, 3] and its tissue mask bool [height, width].

    ``blobs``: ellipses (cx, cy, rx, ry) in pixels; ``holes``: circles (cx, cy, r) cut out of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:height, 0:width]
    mask = np.zeros((height, width), bool)
    for cx, cy, rx, ry in blobs:
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    for cx, cy, r in holes:
        mask &= (xx - cx) ** 2 + (yy - cy) ** 2 > r * r
    noise = rng.integers(-10, 11, (height, width, 1), dtype=np.int16)
    background = np.int16(238) + noise // 3
    # eosin-pink stroma with haematoxylin-purple "nuclei" texture
    tissue = np.array([222, 150, 190], np.int16) + noise
    nuclei = rng.random((height, width), dtype=np.float32) < 0.04
    tissue = np.where(nuclei[..., None], np.array([120, 70, 160], np.int16), tissue)
    image = np.where(mask[..., None], tissue, background)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def downsample2(image: np.ndarray) -> np.ndarray:
    """The 2 × 2 mean of an RGB image (odd last row / column dropped), rounded to uint8."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_pyramid_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None = 0.25, levels: int = 3,
                       tile: int = 256, compression: str | None = None) -> Path:
    """Write ``image`` (RGB uint8 [H, W, 3], level 0) as a tiled pyramidal TIFF of ``levels`` levels
    (``compression``: None, or a tifffile codec such as ``"zlib"``)."""
    import tifffile

    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        level, ds = image, 1
        for i in range(levels):
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)  # pixels per centimetre
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(tile, tile), photometric="rgb", compression=compression, subfiletype=1 if i else 0,
                     metadata=None, **extra)
            if min(level.shape[:2]) < 2 * tile:
                break
            level, ds = downsample2(level), ds * 2
    return path
