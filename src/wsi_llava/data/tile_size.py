"""One rule for a slide's tile side in level-0 pixels (heatmap, GeoJSON, the web viewer).

:func:`read_tile_size` (a slide H5 file) and :func:`tile_size_rule` (attributes + coordinates already in
memory) return a :class:`TileSize`: the size **and where it came from**. The rule, first that applies:

1. attribute ``patch_size_level0`` (TRIDENT), on the coordinate dataset, then on the file;
2. attribute ``patch_size`` (CLAM / TRIDENT), coordinate dataset then file: as is at ``patch_level`` 0 (or
   no ``patch_level``); at ``patch_level`` > 0 multiplied by the ``downsample`` attribute when there is
   one (CLAM writes it), else skipped (its level-0 size is unknown);
3. the most common positive spacing of the coordinates: over both axes, the gaps between consecutive
   distinct x values and between consecutive distinct y values; the most frequent gap (ties: the
   smallest). Tiles that overlap (a stride below the tile size) give the stride;
4. else (one tile, or all tiles on one point) :class:`TileSizeError`.

Attributes win over the spacing when they disagree: a 256-px tile grid whose tissue leaves every other
column empty has spacing 512, its ``patch_size`` says 256.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import WsiLlavaError

__all__ = ["TileSize", "TileSizeError", "attribute_tile_size", "read_tile_size", "spacing_tile_size", "tile_size_rule"]


class TileSizeError(WsiLlavaError, ValueError):
    """No tile size can be found (no attribute, no spacing) or an attribute is not a positive number."""


@dataclass(frozen=True)
class TileSize:
    """A tile side in level-0 pixels and where it came from."""

    size: int
    """Tile side in level-0 pixels (> 0)."""
    source: str
    """Where it came from, for people: ``attribute patch_size_level0 (coords)``, ``coordinate spacing …``."""


def _number(value, where: str, name: str, minimum_exclusive: bool = True) -> float:
    """The attribute as a finite number > 0 (``minimum_exclusive=False``: >= 0), else :class:`TileSizeError`."""
    try:
        v = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        v = math.nan
    if not (math.isfinite(v) and (v > 0 or (v == 0 and not minimum_exclusive))):
        kind = "a positive number" if minimum_exclusive else "a number >= 0"
        raise TileSizeError(f"{where}: attribute {name!r} must be {kind}, got {value!r}")
    return v


def spacing_tile_size(coords: np.ndarray) -> TileSize | None:
    """Step 3 of the rule: the most common positive spacing of ``coords`` [N, 2] (x, y), or None."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    gaps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    gaps = np.round(np.concatenate(gaps), 3)
    gaps = gaps[gaps > 0]
    if not len(gaps):
        return None
    values, counts = np.unique(gaps, return_counts=True)
    best = int(np.argmax(counts))  # np.unique sorts: the first maximum is the smallest gap
    size = int(round(float(values[best])))
    if size < 1:
        return None
    return TileSize(size, f"coordinate spacing (most common gap, {int(counts[best])} of {len(gaps)} gaps)")


def attribute_tile_size(attrs: Sequence[tuple[str, Mapping]], where: str) -> TileSize | None:
    """Steps 1–2 of the rule on ``attrs``: ``(label, attribute mapping)`` in lookup order (coordinate
    dataset, then file), or None when no attribute gives a level-0 size; ``where`` names the file."""
    for label, a in attrs:
        if "patch_size_level0" in a:
            size = _number(a["patch_size_level0"], where, "patch_size_level0")
            return TileSize(int(round(size)), f"attribute patch_size_level0 ({label})")
    for label, a in attrs:
        if "patch_size" not in a:
            continue
        size = _number(a["patch_size"], where, "patch_size")
        level = int(_number(a["patch_level"], where, "patch_level", minimum_exclusive=False)) if "patch_level" in a else 0
        if level <= 0:
            return TileSize(int(round(size)), f"attribute patch_size ({label})")
        if "downsample" in a:
            down = _number(a["downsample"], where, "downsample")
            return TileSize(int(round(size * down)),
                            f"attribute patch_size {size:g} × downsample {down:g} of patch_level {level} ({label})")
    return None


def _no_size(where: str) -> TileSizeError:
    return TileSizeError(f"{where}: no tile size: no patch_size_level0 / patch_size attribute and no two tiles "
                         f"to measure the coordinate spacing from; give the tile side (e.g. --patch-size)")


def tile_size_rule(attrs: Sequence[tuple[str, Mapping]], coords: np.ndarray | None, where: str) -> TileSize:
    """The rule (module doc) on ``attrs`` (as :func:`attribute_tile_size`) and ``coords`` [N, 2] (x, y)
    level-0 (None: none known)."""
    found = attribute_tile_size(attrs, where)
    if found is None and coords is not None and len(coords):
        found = spacing_tile_size(coords)
    if found is None:
        raise _no_size(where)
    return found


def read_tile_size(path: str | os.PathLike) -> TileSize:
    """The rule (module doc) for the slide H5 file at ``path``: attributes of the coordinate dataset
    (``coords`` or ``coords_yx``) and the file, then all its coordinates (read only when needed)."""
    from . import h5safety
    from .slide_checks import slide_datasets
    from .slides import open_slide

    where = os.fspath(path)
    with open_slide(path) as f:  # checked: a regular file; links resolved inside the file only
        _, ds, key, yx = slide_datasets(f, where)  # the slide readers' own layout and storage checks
        size = attribute_tile_size([(key, dict(ds.attrs)), ("file", dict(f.attrs))], where)
        if size is not None:
            return size
        h5safety.check_read_size(where, key, ds.shape[0], 2 * ds.dtype.itemsize)
        coords = np.asarray(ds[()], dtype=np.float64)
    return tile_size_rule([], coords[:, ::-1] if yx else coords, where)
