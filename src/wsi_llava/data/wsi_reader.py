"""Raw whole-slide images (SVS, NDPI, MRXS, generic tiled TIFF …) read through OpenSlide: the one module
that opens them.

OpenSlide comes from the PyPI wheels ``openslide-python`` + ``openslide-bin`` (no system library;
``pip install 'wsi-llava[extract]'``). Everything here is in **level-0 pixels, (x, y)**:

- :func:`open_wsi` → :class:`WsiReader`: level-0 size, pyramid levels, the pixel size ``mpp`` (µm per
  level-0 pixel) and the level-0 magnification. The pixel size comes from, in this order: the mpp CSV
  (``--mpp-csv``, columns ``slide,mpp``; the slide is its file name or stem), ``openslide.mpp-x``,
  the TIFF resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` cm or inch), or the
  objective power (``openslide.objective-power``: mpp = 10 / power). A slide with none of them is a
  :class:`WsiError` naming the file and the CSV that would fix it.
- magnification = 10 / mpp (0.25 µm → 40×, 0.5 µm → 20×), rounded to a standard objective (1.25 … 80×)
  when within 10 % of it, as scanners report e.g. 0.2527 µm for 40×; the objective power itself when
  that is all the slide has.
- :meth:`WsiReader.read_tile`: a square region of ``size0`` level-0 pixels as an RGB tile of
  ``out_size`` px, read from the pyramid level whose downsample is the largest at most the one needed
  (:meth:`~WsiReader.level_for`) and resized (PIL bicubic, antialiased) only when that level does not
  give the size exactly. Transparent pixels (outside the scanned area) are white.
- :meth:`WsiReader.thumbnail`: the whole slide at a downsample, read from the best level in strips of
  bounded memory (a slide without a pyramid is read strip by strip, never whole).
- :class:`DeepZoom`: the slide as a Deep Zoom (DZI) pyramid for viewers
  (OpenSlide's ``DeepZoomGenerator``), aligned to level 0 (no bounds cropping: DZI pixel (x, y) of the
  full-size level is level-0 pixel (x, y)); needs no pixel size.

A reader holds an OpenSlide handle: open one per process (tile-reading workers open their own).
OpenSlide handles are thread-safe, so one :class:`DeepZoom` may serve tiles to several threads.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, WsiLlavaError

#: file suffixes taken from a folder given on the command line (a file named directly is tried whatever its suffix)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
#: standard objective magnifications a computed magnification is rounded to (within :data:`MAG_SNAP`)
STANDARD_MAGS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0)
MAG_SNAP = 0.10
#: most level pixels one thumbnail strip reads at once
STRIP_PIXELS = 16 * 2**20
#: a level is used for a downsample when its own downsample is at most this factor above it
#: (pyramids of odd sizes report e.g. 2.0003 for 2)
LEVEL_TOLERANCE = 1.01


class WsiError(WsiLlavaError):
    """A slide that cannot be opened or read, or whose pixel size is unknown; the message names the file."""


def _openslide():
    try:
        import openslide
    except ImportError as e:
        raise WsiLlavaError("reading slides needs OpenSlide: pip install openslide-python openslide-bin "
                            f"(or pip install 'wsi-llava[extract]'); {type(e).__name__}: {e}") from e
    return openslide


def read_mpp_csv(path: str | os.PathLike) -> dict[str, float]:
    """``--mpp-csv``: columns ``slide`` (file name or stem) and ``mpp`` (µm per level-0 pixel) → {slide: mpp}."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--mpp-csv {path}: file not found; check the path")
    out: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"slide", "mpp"} - set(reader.fieldnames or [])
        if missing:
            raise WsiError(f"{path}: missing column(s) {sorted(missing)}; expected a header `slide,mpp`")
        for row_no, row in enumerate(reader, start=2):
            try:
                mpp = float(row["mpp"])
            except (TypeError, ValueError):
                mpp = float("nan")
            if not (math.isfinite(mpp) and mpp > 0):
                raise WsiError(f"{path}: row {row_no} [mpp]: {row['mpp']!r} is not a positive number (µm per pixel)")
            out[str(row["slide"]).strip()] = mpp
    return out


def magnification_for(mpp: float) -> float:
    """Level-0 magnification of a pixel size: 10 / mpp, rounded to a standard objective within 10 %."""
    mag = 10.0 / mpp
    near = min(STANDARD_MAGS, key=lambda m: abs(m - mag) / m)
    return near if abs(near - mag) / near <= MAG_SNAP else mag


def _tiff_mpp(props) -> float | None:
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        res = float(props.get("tiff.XResolution", "nan"))
    except ValueError:
        return None
    if um_per_unit is None or not (math.isfinite(res) and res > 0):
        return None
    return um_per_unit / res


def _prop_float(props, key: str) -> float | None:
    try:
        v = float(props.get(key, "nan"))
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def _open(path: Path):
    """``openslide.OpenSlide`` of ``path``; :class:`MissingFileError` / :class:`WsiError` naming the file."""
    openslide = _openslide()
    if not path.exists():
        raise MissingFileError(f"slide not found: {path}; check the path")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise WsiError(f"{path}: cannot open the slide ({type(e).__name__}: {e})") from e


class _OpenSlideHandle:
    """Owns ``self._slide`` (an ``openslide.OpenSlide``): ``close()`` and ``with``."""

    _slide = None

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WsiReader(_OpenSlideHandle):
    """One open slide. ``width``/``height``: level-0 size; ``mpp``: µm per level-0 pixel;
    ``magnification``: level-0 objective; ``downsamples``: per pyramid level."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = Path(path)
        self._slide = _open(self.path)
        self.width, self.height = (int(v) for v in self._slide.dimensions)
        self.downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        self.mpp_source = "--mpp-csv"
        power = _prop_float(props, "openslide.objective-power")
        if mpp is None:
            for source, value in (("openslide.mpp-x", _prop_float(props, "openslide.mpp-x")),
                                  ("tiff resolution", _tiff_mpp(props)),
                                  ("objective power", 10.0 / power if power else None)):
                if value is not None:
                    mpp, self.mpp_source = value, source
                    break
        if mpp is None:
            self.close()
            raise WsiError(f"{self.path}: the slide records neither its pixel size (openslide.mpp-x, TIFF "
                           "resolution) nor its objective power; give it in --mpp-csv (columns slide,mpp; "
                           f"e.g. `{self.path.name},0.25` for 40x)")
        self.mpp = float(mpp)
        self.magnification = power if self.mpp_source == "objective power" else magnification_for(self.mpp)

    @property
    def slide_id(self) -> str:
        return self.path.stem

    def level_for(self, downsample: float) -> int:
        """The pyramid level with the largest downsample at most ``downsample`` (level 0 if none)."""
        ok = [i for i, d in enumerate(self.downsamples) if d <= downsample * LEVEL_TOLERANCE]
        return max(ok, key=lambda i: self.downsamples[i]) if ok else 0

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] at ``level`` whose top-left is level-0 (x, y); transparent → white."""
        try:
            rgba = np.asarray(self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height))))
        except Exception as e:  # noqa: BLE001 - OpenSlideError, OSError, PIL errors of a damaged slide
            raise WsiError(f"{self.path}: cannot read level {level} at ({x}, {y}) "
                           f"({type(e).__name__}: {e})") from e
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def read_tile(self, x: int, y: int, size0: int, out_size: int) -> np.ndarray:
        """The level-0 square (x, y, ``size0``) as RGB uint8 [out_size, out_size, 3] (best level, resized)."""
        level = self.level_for(size0 / out_size)
        side = max(1, int(round(size0 / self.downsamples[level])))
        tile = self.read_region(x, y, level, side, side)
        if side != out_size:
            from PIL import Image

            tile = np.asarray(Image.fromarray(tile).resize((out_size, out_size), Image.BICUBIC))
        return tile

    def thumbnail(self, downsample: float) -> np.ndarray:
        """The slide at ``downsample`` (≥ 1) as RGB uint8 [ceil(H / ds), ceil(W / ds), 3]."""
        from PIL import Image

        tw, th = math.ceil(self.width / downsample), math.ceil(self.height / downsample)
        level = self.level_for(downsample)
        lds = self.downsamples[level]
        lw = max(1, int(round(self.width / lds)))
        rows_per_strip = max(1, int(STRIP_PIXELS / (lw * max(1.0, downsample / lds))))
        out = np.empty((th, tw, 3), np.uint8)
        for r0 in range(0, th, rows_per_strip):
            r1 = min(th, r0 + rows_per_strip)
            y0 = int(round(r0 * downsample))
            lh = max(1, int(round((min(self.height, r1 * downsample) - y0) / lds)))
            strip = self.read_region(0, y0, level, lw, lh)
            out[r0:r1] = np.asarray(Image.fromarray(strip).resize((tw, r1 - r0), Image.BOX))
        return out


def mpp_override(path: str | os.PathLike, mpp_table: dict[str, float] | None) -> float | None:
    """The pixel size ``mpp_table`` (:func:`read_mpp_csv`) gives ``path``, by file name or stem; None if unlisted."""
    p = Path(path)
    table = mpp_table or {}
    return table.get(p.name, table.get(p.stem))


def open_wsi(path: str | os.PathLike, mpp_table: dict[str, float] | None = None) -> WsiReader:
    """Open ``path``; its pixel size from ``mpp_table`` (:func:`mpp_override`) if listed."""
    return WsiReader(Path(path), mpp_override(path, mpp_table))


def is_raw_slide(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a raw slide by its suffix (:data:`SLIDE_SUFFIXES`), e.g. rather than a slide H5 file."""
    return os.fspath(path).lower().endswith(SLIDE_SUFFIXES)


class TileAddressError(WsiError):
    """A Deep Zoom level or tile (column, row) that the slide's pyramid does not have."""


class DeepZoom(_OpenSlideHandle):
    """One slide as a Deep Zoom (DZI) pyramid: ``levels`` levels, level ``levels - 1`` the full level-0
    size, each level half the next (rounded up); square tiles of ``tile_size`` px plus ``overlap`` px on
    each side that has a neighbour. Transparent pixels become the slide's background colour (white when
    it records none)."""

    def __init__(self, path: str | os.PathLike, tile_size: int = 254, overlap: int = 1):
        from openslide.deepzoom import DeepZoomGenerator

        self.path = Path(path)
        self._slide = _open(self.path)
        self.width, self.height = (int(v) for v in self._slide.dimensions)
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self._dz = DeepZoomGenerator(self._slide, self.tile_size, self.overlap, limit_bounds=False)
        self.levels = int(self._dz.level_count)
        self.tile_grid = tuple((int(c), int(r)) for c, r in self._dz.level_tiles)
        """(columns, rows) of each level."""

    def dzi(self, fmt: str = "jpeg") -> str:
        """The DZI descriptor (XML) for tiles in ``fmt`` (``jpeg`` or ``png``)."""
        return self._dz.get_dzi(fmt)

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """Tile (``col``, ``row``) of ``level`` as RGB uint8 [h, w, 3] (edge tiles are smaller);
        :class:`TileAddressError` when the pyramid has no such tile."""
        cols, rows = self.tile_grid[level] if 0 <= level < self.levels else (0, 0)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileAddressError(f"{self.path}: no Deep Zoom tile ({col}, {row}) at level {level} "
                                   f"(levels 0-{self.levels - 1})")
        try:
            return np.asarray(self._dz.get_tile(level, (col, row)))
        except Exception as e:  # noqa: BLE001 - OpenSlideError, OSError, PIL errors of a damaged slide
            raise WsiError(f"{self.path}: cannot read Deep Zoom tile ({col}, {row}) of level {level} "
                           f"({type(e).__name__}: {e})") from e

    def tile_jpeg(self, level: int, col: int, row: int, quality: int = 75) -> bytes:
        """:meth:`tile` encoded as a JPEG."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.tile(level, col, row)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def find_slides(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files named directly, and the files with a :data:`SLIDE_SUFFIXES` suffix directly inside each
    folder named (sorted); a path that does not exist is a :class:`MissingFileError`."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in SLIDE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise MissingFileError(f"{p}: no such slide file or folder")
    return list(dict.fromkeys(out))
