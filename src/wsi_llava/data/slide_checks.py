"""What a slide H5 file must hold, checked before any tile is read.

File format (``docs/architecture.md``, "Formats"): ``features`` [N, D] float16/float32 plus
``coords_yx`` [N, 2] (y, x) or ``coords`` [N, 2] (x, y), level-0 pixels. :func:`slide_datasets` finds
both and checks their shapes, dtypes, compression filters and storage (through
:mod:`~wsi_llava.data.h5safety`); :func:`check_coords` checks the coordinates read. The readers
(:mod:`~wsi_llava.data.slides`, :mod:`~wsi_llava.data.scan`) call these; nothing here reads tiles.
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np

from . import h5safety
from .h5safety import SlideError

FEATURES_KEY = "features"
#: coordinate dataset names, in order of preference, and whether they are stored (y, x)
COORD_KEYS: tuple[tuple[str, bool], ...] = (("coords_yx", True), ("coords", False))
#: coordinates at or beyond this many level-0 pixels are rejected (2**24: float32 stays exact; the
#: largest scanned slides are ~2·10^5 px wide)
MAX_COORD = 2**24


def _filters(dset: h5py.Dataset) -> list[tuple[int, str]]:
    pl = dset.id.get_create_plist()
    out = []
    for i in range(pl.get_nfilters()):
        code, _flags, _vals, name = pl.get_filter(i)
        out.append((int(code), name.decode(errors="replace") if isinstance(name, bytes) else str(name)))
    return out


def _check_filters(path: str, key: str, dset: h5py.Dataset) -> None:
    for code, name in _filters(dset):
        if not h5py.h5z.filter_avail(code):
            raise SlideError(
                f"{path}: `{key}` uses compression filter {code} ({name or 'unnamed'}) that this "
                "HDF5/h5py build cannot decode; install its plugin (e.g. `pip install hdf5plugin` and "
                "`import hdf5plugin`) or rewrite the file uncompressed with `h5repack`"
            )


def describe_layout(dset: h5py.Dataset) -> str:
    """``contiguous``, ``chunked(32, 1536)``, ``chunked(1, 1536)+gzip``, ``compact``, …"""
    pl = dset.id.get_create_plist()
    layout = pl.get_layout()
    if pl.get_external_count() > 0:
        return "external"
    if layout == h5py.h5d.CONTIGUOUS:
        return "contiguous"
    if layout == h5py.h5d.CHUNKED:
        names = "+".join(name or str(code) for code, name in _filters(dset))
        return f"chunked{tuple(dset.chunks)}" + (f"+{names}" if names else "")
    if layout == h5py.h5d.COMPACT:
        return "compact"
    return "virtual"


def slide_datasets(
    f: h5py.File, path: str, allow_float64: bool = False
) -> tuple[h5py.Dataset, h5py.Dataset, str, bool]:
    """Find and shape-check ``features`` and the coordinate dataset → ``(features, coords,
    coords_key, coords_are_yx)``. No tile data is read. ``allow_float64``: for ``convert-h5``."""
    feats = h5safety.get_dataset(f, path, FEATURES_KEY)
    if feats is None:
        keys = ", ".join(sorted(f.keys())) or "nothing"
        raise SlideError(f"{path}: no `{FEATURES_KEY}` dataset (file has: {keys})")
    coords_key, yx, coords = None, False, None
    for key, is_yx in COORD_KEYS:
        coords = h5safety.get_dataset(f, path, key)
        if coords is not None:
            coords_key, yx = key, is_yx
            break
    if coords_key is None:
        keys = ", ".join(sorted(f.keys()))
        raise SlideError(
            f"{path}: no coordinates: expected `coords_yx` [N, 2] (y, x) or `coords` [N, 2] (x, y) "
            f"(file has: {keys})"
        )
    if feats.ndim != 2:
        raise SlideError(
            f"{path}: `{FEATURES_KEY}` is {feats.ndim}-D with shape {feats.shape}; expected [N, D]"
        )
    n = feats.shape[0]
    if n == 0:
        raise SlideError(f"{path}: slide has no tiles (N = 0, e.g. TRIDENT's output for an empty slide)")
    if feats.shape[1] == 0:
        raise SlideError(f"{path}: `{FEATURES_KEY}` has width D = 0")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideError(f"{path}: `{coords_key}` has shape {coords.shape}; expected [N, 2]")
    if coords.shape[0] != n:
        raise SlideError(
            f"{path}: length mismatch: `{FEATURES_KEY}` has {n} rows but `{coords_key}` has {coords.shape[0]}"
        )
    dt = feats.dtype
    if dt.kind != "f":
        raise SlideError(f"{path}: `{FEATURES_KEY}` dtype is {dt}; expected float16 or float32")
    if dt.itemsize not in (2, 4) and not (allow_float64 and dt.itemsize == 8):
        raise SlideError(
            f"{path}: `{FEATURES_KEY}` dtype is {dt}; expected float16 or float32 "
            "(rewrite with `wsi-llava convert-h5`, which stores float32, or --float16)"
        )
    if coords.dtype.kind not in "iuf":
        raise SlideError(f"{path}: `{coords_key}` dtype is {coords.dtype}; expected numbers")
    _check_filters(path, FEATURES_KEY, feats)
    _check_filters(path, coords_key, coords)
    size = h5safety.file_size(f)  # the layout: no virtual/external storage, allocated, inside the file, bounded
    h5safety.check_storage(path, FEATURES_KEY, feats, size)
    h5safety.check_storage(path, coords_key, coords, size)
    return feats, coords, coords_key, yx


def check_dim(path: str, d: int, expected_dim: int | None) -> None:
    """Feature width ``d`` is ``expected_dim`` (None: any)."""
    if expected_dim is not None and d != expected_dim:
        raise SlideError(f"{path}: feature width D = {d}, expected {expected_dim}")


def check_coords(path: str, coords: np.ndarray, rows: np.ndarray, coords_key: str) -> None:
    """Coordinates [K, 2] finite and within ``0 ≤ value < MAX_COORD`` (as stored, before any swap);
    ``rows[r]`` is the file row of ``coords[r]``."""
    checks = [(coords < 0, "negative"), (coords >= MAX_COORD, "implausibly large")]
    if coords.dtype.kind == "f":
        checks.insert(0, (~np.isfinite(coords), "NaN/Inf"))
    for bad, what in checks:
        if bad.any():
            p = int(np.flatnonzero(bad.any(axis=1))[0])
            raise SlideError(
                f"{path}: `{coords_key}` has {what} coordinates (file row {int(rows[p])}: "
                f"{coords[p].tolist()}; allowed 0 ≤ value < {MAX_COORD} px)"
            )


def read_error(path: str, key: str, e: Exception) -> SlideError:
    """The error for a dataset read that HDF5 failed."""
    return SlideError(f"{path}: cannot read `{key}` (corrupt or truncated file?): {e}")


@contextlib.contextmanager
def corrupt_as_slide_error(path: str):
    """HDF5 metadata that is damaged can surface as almost any exception from h5py; name the file."""
    try:
        yield
    except SlideError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError) as e:
        raise SlideError(f"{path}: corrupt or unreadable HDF5 file ({type(e).__name__}: {e})") from None
