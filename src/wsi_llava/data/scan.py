"""The full check of a slide file: every chunk, every tile, every coordinate (``validate``,
training start-up, ``convert-h5``), read once in bounded-memory blocks.

:func:`~wsi_llava.data.slides.load_slide` checks only the tiles it samples; :func:`scan_slide`
checks them all and :func:`iter_blocks` hands the checked blocks to a writer (``convert-h5``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from . import h5safety
from .readers import RUN_BYTES
from .slide_checks import (FEATURES_KEY, check_coords, check_dim, corrupt_as_slide_error, describe_layout,
                           read_error, slide_datasets)
from .slides import open_slide


@dataclass(frozen=True)
class SlideInfo:
    """What a full check of a slide file found (see :func:`scan_slide`)."""

    path: str
    """The H5 file."""
    n: int
    """Number of tiles N."""
    dim: int
    """Feature width D."""
    dtype: str
    """Stored feature dtype (``float16`` / ``float32``)."""
    coords_key: str
    """Coordinate dataset used (``coords_yx`` or ``coords``)."""
    layout: str
    """Storage of ``features``, e.g. ``contiguous``, ``chunked(32, 1536)``, ``chunked(1, 1536)+gzip``."""


def scan_slide(
    path: str | os.PathLike, expected_dim: int | None = None, block_rows: int = 8192
) -> SlideInfo:
    """Full check of one slide file: structure and layout, every chunk present, every tile finite and
    not all zero / all fill value, every coordinate in range and distinct.

    Reads the whole file once, in chunk-aligned blocks of about ``block_rows`` rows (bounded
    memory). Raises :class:`SlideError` on the first problem.
    """
    path = os.fspath(path)
    with open_slide(path) as f, corrupt_as_slide_error(path):
        feats_ds, coords_ds, coords_key, _ = slide_datasets(f, path)
        n, d = feats_ds.shape
        check_dim(path, d, expected_dim)
        for _ in iter_blocks(path, feats_ds, coords_ds, coords_key, block_rows):
            pass
        return SlideInfo(path, int(n), int(d), str(feats_ds.dtype), coords_key, describe_layout(feats_ds))


def iter_blocks(
    path: str, feats_ds: h5py.Dataset, coords_ds: h5py.Dataset, coords_key: str, block_rows: int = 8192
):
    """Yield checked ``(first_row, features[b, D] float32, coords[b, 2] as stored)`` over the whole
    file in file order, in blocks aligned to the features' chunk rows (bounded memory).

    The full check (what ``validate`` and ``convert-h5`` rely on): every chunk of both datasets exists;
    all coordinates are read first (N × 2 numbers) and checked for range and duplicates; then every
    feature row for NaN/Inf and all-zero / all-fill-value rows."""
    n, d = feats_ds.shape
    for key, ds in ((FEATURES_KEY, feats_ds), (coords_key, coords_ds)):
        h5safety.check_all_chunks(path, key, ds)
    h5safety.check_read_size(path, coords_key, n, 2 * coords_ds.dtype.itemsize)
    try:
        coords_all = coords_ds[()]
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        raise read_error(path, coords_key, e) from None
    rows = np.arange(n)
    check_coords(path, coords_all, rows, coords_key)
    order = np.lexsort((coords_all[:, 1], coords_all[:, 0]))
    h5safety.check_unique_coords(path, coords_key, coords_all[order], order)
    del order
    fill = h5safety.fill_value(feats_ds)
    row_bytes = max(1, d * max(4, feats_ds.dtype.itemsize))
    step = max(1, min(block_rows, RUN_BYTES // row_bytes))
    if feats_ds.chunks:
        cr = feats_ds.chunks[0]
        step = max(cr, (step // cr) * cr)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        try:
            feats = np.asarray(feats_ds[r0:r1], dtype=np.float32)
        except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
            raise read_error(path, FEATURES_KEY, e) from None
        h5safety.check_feature_rows(path, FEATURES_KEY, feats, rows[r0:r1], fill)
        yield r0, feats, coords_all[r0:r1]
