"""Slide H5 files → tile features and (x, y) coordinates, sampled fast and checked: the entry points.

File format (``docs/architecture.md``, "Formats"): ``features`` [N, D] float16/float32 plus
``coords_yx`` [N, 2] (y, x) or ``coords`` [N, 2] (x, y), level-0 pixels. Coordinates always come out
as **(x, y)**.

:func:`load_slide` reads (a sample of) one slide: which rows (:mod:`~wsi_llava.data.sampling`), the
file's structure (:mod:`~wsi_llava.data.slide_checks`, :mod:`~wsi_llava.data.h5safety`), the rows
themselves by storage layout, so that sampling ``k`` of ``N`` tiles costs about ``k`` rows of I/O
(:mod:`~wsi_llava.data.readers`). The full check of every tile is :func:`~wsi_llava.data.scan.scan_slide`.
See docs/data.md for the sampling guarantees.

Files are opened per call and closed before returning, so nothing h5py crosses a fork and
:class:`Slide` pickles (spawned DataLoader workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from . import h5safety
from .h5layout import FileReader
from .h5safety import SlideError, open_h5
from .readers import as_float32, read_plan, read_rows
from .sampling import SAMPLING_MODES, sample_chunk_indices, sample_indices
from .slide_checks import FEATURES_KEY, check_coords, check_dim, corrupt_as_slide_error, slide_datasets

__all__ = ["Slide", "SlideError", "load_slide", "open_slide", "read_slide_meta", "slide_dataset"]


@dataclass
class Slide:
    """Tiles of one slide, in spatial (row-major: y, then x) order."""

    features: np.ndarray
    """[N, D] float32 tile features (N ≤ patches_per_wsi)."""
    coords: np.ndarray
    """[N, 2] float32 (x, y) level-0 pixel coordinates of each tile's top-left corner."""
    path: str
    """The H5 file the tiles came from."""
    n_total: int
    """Tiles in the file before sampling."""


def open_slide(path: str | os.PathLike) -> h5py.File:
    """Open a slide H5 file read-only, checked (:func:`~wsi_llava.data.h5safety.open_h5`: a regular,
    non-empty HDF5 file; special files are refused before anything opens them). The one way code opens
    a slide file; look datasets up with :func:`slide_dataset`."""
    return open_h5(os.fspath(path))


def slide_dataset(f: h5py.File, name: str) -> h5py.Dataset | None:
    """``f[name]`` resolved inside the file only (external links refused, soft links checked), or None
    when absent (:func:`~wsi_llava.data.h5safety.get_dataset`). The storage layout is not checked: for
    small side datasets and attributes; tiles go through :func:`load_slide` /
    :func:`~wsi_llava.data.scan.scan_slide`."""
    return h5safety.get_dataset(f, f.filename, name)


def read_slide_meta(path: str | os.PathLike) -> tuple[int, int]:
    """``(N, D)`` of a slide file without reading features (structure is checked)."""
    path = os.fspath(path)
    with open_slide(path) as f:
        feats, _, _, _ = slide_datasets(f, path)
        return int(feats.shape[0]), int(feats.shape[1])


def load_slide(
    path: str | os.PathLike,
    patches_per_wsi: int | None = None,
    rng: np.random.Generator | None = None,
    expected_dim: int | None = None,
    *,
    sampling: str = "uniform",
) -> Slide:
    """Read (a sample of) one slide's tiles, in spatial order, checked.

    Args:
        path: slide H5 file.
        patches_per_wsi: keep at most this many tiles; None keeps all.
        rng: training: a generator seeded per epoch and sample → random sample. None (eval) →
            deterministic sample, the same tiles on every call.
        expected_dim: required feature width D (None: any).
        sampling: ``"uniform"`` — ``k`` tiles uniformly without replacement (default; the seed's
            distribution). ``"chunks"`` — on *compressed* files only, whole storage chunks are
            sampled (much faster, tiles of a chunk come together; see docs/data.md); other
            layouts sample uniformly either way.

    Returns:
        :class:`Slide` with ``features`` [K, D] float32 and ``coords`` [K, 2] float32 (x, y), rows
        sorted by (y, x); ``K = min(N, patches_per_wsi)``.

    Raises:
        SlideError: missing/zero-byte/non-HDF5/truncated file or a special file (FIFO, device); no
            ``features`` or coordinates; a group or dangling link in their place; external links,
            virtual datasets or external raw storage; wrong shapes or dtype; N = 0; length mismatch;
            unavailable compression filter; oversized chunks or decompressed data; unwritten storage;
            NaN/Inf, all-zero or all-fill-value rows among the tiles read; duplicate, negative,
            non-finite or huge coordinates among them; D ≠ ``expected_dim``; a read over
            :data:`~wsi_llava.data.h5safety.MAX_READ_BYTES`. See docs/data.md.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    path = os.fspath(path)
    with open_slide(path) as f, corrupt_as_slide_error(path), FileReader(path) as fr:
        feats_ds, coords_ds, coords_key, yx = slide_datasets(f, path)
        n, d = feats_ds.shape
        check_dim(path, d, expected_dim)
        if sampling == "chunks" and read_plan(feats_ds) == "compressed":
            idx = sample_chunk_indices(n, patches_per_wsi, feats_ds.chunks[0], rng)
        else:
            idx = sample_indices(n, patches_per_wsi, rng)
        h5safety.check_read_size(path, FEATURES_KEY, len(idx), d * 4)
        coords = read_rows(path, f, fr, coords_ds, coords_key, idx)
        check_coords(path, coords, idx, coords_key)
        coords = coords.astype(np.float32)
        if yx:
            coords = np.ascontiguousarray(coords[:, ::-1])
        order = np.lexsort((coords[:, 0], coords[:, 1]))  # row-major: by y, then x
        feats = read_rows(path, f, fr, feats_ds, FEATURES_KEY, idx, order)  # straight into spatial order
        fill = h5safety.fill_value(feats_ds)
    feats = as_float32(feats)
    h5safety.check_feature_rows(path, FEATURES_KEY, feats, idx[order], fill)
    coords = coords[order]
    h5safety.check_unique_coords(path, coords_key, coords, idx[order])  # in spatial order duplicates are adjacent
    return Slide(features=feats, coords=coords, path=path, n_total=int(n))

