"""Tissue segmentation on a slide thumbnail, the tissue fraction of tiles, and the mask as GeoJSON.

:func:`segment_tissue` (RGB thumbnail [h, w, 3] → bool mask [h, w]), fast and classical:

1. saturation ``(max − min) / max`` of each pixel, median-filtered (5 px);
2. Otsu's threshold on it, never below :data:`MIN_SATURATION` (so a blank slide is not half tissue);
   pixels above it, and not near-black (pen marks, scanner edges: value < :data:`MAX_DARK`), are tissue;
3. morphology: closing then opening with a disk of about 16 µm, specks under
   :data:`MIN_TISSUE_UM2` removed, holes under :data:`MIN_HOLE_UM2` filled; larger holes (lumens,
   tears) stay background, so tiles over them are left out.

Limits: it sees colour, not structure. Pale tissue (fat, mucin, faint IHC) with saturation near the
glass can be missed; saturated artefacts (coloured pen ink, bubbles with coloured edges, dust) are
kept as tissue; black pen and near-black regions are dropped. Resolution is the thumbnail's
(:data:`SEG_MPP`, 8 µm per pixel by default), so detail finer than a few thumbnail pixels is lost.

:func:`tile_tissue_fraction` gives, for tiles at level-0 (x, y) of side ``size0``, the share of the
tile's thumbnail pixels that are tissue. :func:`mask_to_geojson` writes the mask as a GeoJSON
``FeatureCollection`` of ``Polygon`` features (outer ring + hole rings, level-0 pixel coordinates,
QuPath annotations of class ``Tissue``).
"""

from __future__ import annotations

import numpy as np

#: µm per thumbnail pixel that segmentation runs at (8 µm ≈ 1.25×)
SEG_MPP = 8.0
#: lowest saturation threshold (0-1), whatever Otsu says
MIN_SATURATION = 0.06
#: pixels darker than this value (0-1, HSV max) are not tissue (black pen, scanner edges)
MAX_DARK = 0.12
#: closing / opening disk radius in µm
MORPH_UM = 16.0
#: connected tissue smaller than this (µm²) is dropped: ~ a 100 µm square
MIN_TISSUE_UM2 = 1e4
#: holes smaller than this (µm²) are filled: ~ a 50 µm square
MIN_HOLE_UM2 = 2.5e3
#: a tile is kept when at least this share of it is tissue (``--min-tissue``)
MIN_TISSUE_FRACTION = 0.5


def _disk(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def segment_tissue(thumb: np.ndarray, um_per_px: float) -> np.ndarray:
    """RGB uint8 thumbnail [h, w, 3] at ``um_per_px`` µm per pixel → tissue mask bool [h, w]."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = thumb.astype(np.float32) / 255.0
    vmax, vmin = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    sat = ndimage.median_filter(sat, size=5)
    thr = MIN_SATURATION
    if sat.max() > sat.min():
        thr = max(thr, float(threshold_otsu(sat)))
    mask = (sat > thr) & (ndimage.median_filter(vmax, size=5) >= MAX_DARK)
    disk = _disk(round(MORPH_UM / um_per_px))
    mask = ndimage.binary_closing(np.pad(mask, disk.shape[0]), structure=disk)[
        disk.shape[0]:-disk.shape[0], disk.shape[0]:-disk.shape[0]]
    mask = ndimage.binary_opening(mask, structure=disk)
    area = 1.0 / (um_per_px * um_per_px)
    mask = remove_small_objects(mask, max_size=max(1, int(MIN_TISSUE_UM2 * area)))
    return remove_small_holes(mask, max_size=max(1, int(MIN_HOLE_UM2 * area)))


def tile_tissue_fraction(mask: np.ndarray, downsample: float, coords: np.ndarray, size0: int) -> np.ndarray:
    """Share of tissue [N] float in each tile (level-0 top-left ``coords`` [N, 2] (x, y), side ``size0``),
    counted on the mask's pixels (``downsample`` level-0 px each) that the tile covers (at least one)."""
    if len(coords) == 0:
        return np.zeros(0, np.float64)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    c = np.asarray(coords, np.float64)
    x0 = np.clip(np.round(c[:, 0] / downsample).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(c[:, 1] / downsample).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.round((c[:, 0] + size0) / downsample).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.round((c[:, 1] + size0) / downsample).astype(np.int64), y0 + 1, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def _ring(mask: np.ndarray, downsample: float, connected: str) -> list[list[float]] | None:
    """The longest closed contour of ``mask`` (one blob) as a level-0 ring [[x, y], …], or None."""
    from skimage.measure import approximate_polygon, find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5, fully_connected=connected)
    if not contours:
        return None
    rc = approximate_polygon(max(contours, key=len), tolerance=0.5) - 1.0  # (row, col), padding removed
    if len(rc) < 4:
        return None
    xy = (rc[:, ::-1] + 0.5) * downsample  # pixel centres → level-0 pixels
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
    ring[-1] = ring[0]
    return ring


def mask_to_geojson(mask: np.ndarray, downsample: float) -> dict:
    """Tissue mask (``downsample`` level-0 px per pixel) → GeoJSON FeatureCollection of Polygons with holes,
    level-0 (x, y) coordinates, one Feature per connected piece of tissue (QuPath reads it as annotations)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)  # 4-connected tissue pieces
    features = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        piece = labels[box] == i
        filled = ndimage.binary_fill_holes(piece)
        outer = _ring(filled, downsample, "low")
        if outer is None:
            continue
        offset = np.array([box[1].start, box[0].start], np.float64) * downsample
        rings = [outer]
        holes, n_holes = ndimage.label(filled & ~piece, structure=np.ones((3, 3)))  # 8-connected background
        for j in range(1, n_holes + 1):
            hole = _ring(holes == j, downsample, "high")
            if hole is not None:
                rings.append(hole)
        rings = [[[float(x + offset[0]), float(y + offset[1])] for x, y in ring] for ring in rings]
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"},
                                        "holes": len(rings) - 1}})
    return {"type": "FeatureCollection", "features": features}
