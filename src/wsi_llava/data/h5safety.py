"""The one safety check every reader of slide H5 files goes through.

A slide file is accepted only in layouts whose every byte read is known to be written data. HDF5 lets a
file say far more than "here are the rows": a dataset may be *virtual* (its rows live in other files,
and read as the fill value when those are gone), use *external raw storage* (any file on the machine,
``/etc/passwd`` included, read as numbers), sit behind an *external link* (another file, which may be a
FIFO that blocks the reader forever) or a *soft link*; chunked storage may be only partly allocated;
early-allocated chunks and contiguous storage hold the fill value where nothing was ever written, and
HDF5 records no difference; a tiny compressed file may declare gigabytes of decompressed chunks.

:mod:`wsi_llava.data.slides` (``load_slide``, ``read_slide_meta``), :mod:`wsi_llava.data.scan` (``scan_slide``; so training,
``validate``, ``predict``, ``serve``, ``encode`` and ``convert-h5``) and the tower cache use these
functions, and nothing else opens a slide file:

* :func:`open_h5` — a **regular file** only (``os.stat`` before anything opens it: a FIFO, device or
  socket is refused, never opened), non-empty, with the HDF5 signature; opened read-only, and the
  opened descriptor is checked to be that same regular file.
* :func:`get_dataset` — a dataset looked up **without leaving the file**: external links are refused
  (never followed), soft links are resolved inside the file only (a dangling one says so), and a
  group or named datatype where a dataset belongs is named as such.
* :func:`check_storage` — the layout: virtual datasets and external raw storage refused; contiguous
  storage must be allocated and lie inside the file; chunks at most :data:`MAX_CHUNK_BYTES`
  decompressed; compressed data at most :data:`MAX_COMPRESSION_RATIO` times the file size; with
  ``full=True`` every chunk of the chunk grid must exist.
* :func:`check_feature_rows` / :func:`check_unique_coords` / :func:`check_read_size` — the
  sampling-cheap content checks on the rows actually read: no NaN/Inf, no all-zero or all-fill-value
  feature row (what never-written storage reads as), no two tiles at one coordinate, and a bound on
  the memory one read may take.

Every refusal is a :class:`SlideError` whose message names the file, the dataset and the reason.
See docs/data.md ("What is accepted and refused") for what each check catches and misses.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable

import h5py
import numpy as np

from ..errors import WsiLlavaError

__all__ = [
    "SlideError", "MAX_CHUNK_BYTES", "MAX_COMPRESSION_RATIO", "MAX_READ_BYTES", "check_regular_file", "open_h5",
    "file_size", "fill_value",
    "get_dataset", "check_storage", "check_all_chunks", "check_feature_rows", "check_unique_coords",
    "check_read_size", "unwritten",
]

#: largest decompressed chunk accepted (bytes). CLAM's (32, 1536) float32 chunks are 192 KiB; a file
#: whose chunk would decompress to more is refused before anything is read.
MAX_CHUNK_BYTES = 64 * 2**20
#: compressed datasets may declare at most this many times the file's size in decompressed bytes
#: (beyond :data:`MAX_CHUNK_BYTES`): tile features compress about 1.1-2x, coordinates a few times, so
#: only a "compression bomb" (constant data) comes near.
MAX_COMPRESSION_RATIO = 64
#: most bytes one read of a slide may materialise (``load_slide``'s float32 output, one scan block)
MAX_READ_BYTES = 16 * 2**30
#: HDF5's own limit on soft-link hops in one lookup
MAX_LINK_HOPS = 16
#: HDF5 chunk cache per open file; large enough for a chunk row of any realistic layout
CHUNK_CACHE_BYTES = 64 * 2**20

_KIND = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class SlideError(WsiLlavaError, ValueError):
    """A slide file cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- the file


def check_regular_file(path: str) -> os.stat_result:
    """``os.stat`` of ``path`` (following symlinks); refuses anything but a non-empty regular file
    without opening it (opening a FIFO blocks until a writer appears)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SlideError(f"{path}: file not found") from None
    except OSError as e:
        raise SlideError(f"{path}: cannot access file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KIND.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise SlideError(f"{path}: not a regular file ({kind}); refusing to open it")
    if st.st_size == 0:
        raise SlideError(f"{path}: zero-byte file (an interrupted copy or feature extraction?)")
    return st


def open_h5(path: str) -> h5py.File:
    """Open a slide H5 file read-only after :func:`check_regular_file` and the signature check.

    Raises :class:`SlideError` for a missing, special, empty, non-HDF5, truncated or corrupt file.
    """
    st = check_regular_file(path)
    try:
        ok = h5py.is_hdf5(path)
    except OSError as e:
        raise SlideError(f"{path}: cannot read file ({e})") from None
    if not ok:
        raise SlideError(f"{path}: not an HDF5 file (no HDF5 signature)")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
    except OSError as e:
        msg = str(e)
        if "truncated" in msg:
            raise SlideError(f"{path}: truncated HDF5 file ({msg})") from None
        raise SlideError(f"{path}: corrupt or unreadable HDF5 file ({msg})") from None
    except Exception as e:  # noqa: BLE001 - a damaged superblock can surface as any error
        raise SlideError(f"{path}: corrupt or unreadable HDF5 file ({type(e).__name__}: {e})") from None
    try:  # the file HDF5 opened is the regular file we checked (not swapped in between)
        fst = os.fstat(f.id.get_vfd_handle())
        same = stat.S_ISREG(fst.st_mode) and (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)
    except (OSError, TypeError, ValueError, RuntimeError):
        same = True  # a driver without a file descriptor: the path check above stands
    if not same:
        f.close()
        raise SlideError(f"{path}: the file changed while being opened; refusing it")
    return f


def file_size(f: h5py.File) -> int:
    """Size in bytes of the open file ``f`` (from its descriptor, else its path)."""
    try:
        return os.fstat(f.id.get_vfd_handle()).st_size
    except (OSError, TypeError, ValueError, RuntimeError):
        return os.path.getsize(f.filename)


# --------------------------------------------------------------------------- links


def _describe(obj) -> str:
    if isinstance(obj, h5py.Group):
        return "a group"
    if isinstance(obj, h5py.Datatype):
        return "a named datatype"
    return f"a {type(obj).__name__}"


def get_dataset(f: h5py.File, path: str, name: str) -> h5py.Dataset | None:
    """``f[name]`` as a dataset, resolved without leaving the file; None when no link ``name`` exists.

    Raises :class:`SlideError` (naming ``path``) when the link is external (never followed), a soft
    link that dangles or loops, or leads to a group or named datatype rather than a dataset.
    """
    obj = _resolve(f, path, name, name, hops=0)
    if obj is None:
        return None
    if not isinstance(obj, h5py.Dataset):
        raise SlideError(f"{path}: `{name}` is {_describe(obj)}, not a dataset")
    return obj


def _resolve(f: h5py.File, path: str, name: str, target: str, hops: int, start: h5py.Group | None = None):
    """Walk ``target`` (absolute, or relative to ``start``) one link at a time; ``name`` is what the
    caller asked for (for messages). None when the first link does not exist."""
    group = f if target.startswith("/") or start is None else start
    parts = [p for p in target.split("/") if p and p != "."]
    if not parts:
        return f
    obj = group
    for i, part in enumerate(parts):
        if not isinstance(obj, h5py.Group):
            return _dangling(path, name, target, hops)
        key = part.encode("utf-8", "surrogateescape")
        try:  # the link itself, one component at a time (H5Lexists/H5Lget_info traverse nothing)
            links = obj.id.links
            kind = links.get_info(key).type if links.exists(key) else None
            value = links.get_val(key) if kind in (h5py.h5l.TYPE_SOFT, h5py.h5l.TYPE_EXTERNAL) else None
        except (KeyError, ValueError, OSError, RuntimeError, TypeError) as e:
            raise SlideError(f"{path}: cannot read the link `{name}` (corrupt file?): {e}") from None
        if kind is None:
            return None if hops == 0 and i == 0 else _dangling(path, name, target, hops)
        if kind == h5py.h5l.TYPE_EXTERNAL:
            other, inside = (v.decode("utf-8", "replace") for v in value)
            raise SlideError(
                f"{path}: `{name}` is an external link to `{inside}` in file {other!r}; external "
                "links are refused (never followed): copy that dataset into this file"
            )
        if kind == h5py.h5l.TYPE_SOFT:
            if hops + 1 > MAX_LINK_HOPS:
                raise SlideError(f"{path}: `{name}` is a soft link that loops (more than {MAX_LINK_HOPS} hops)")
            soft = value.decode("utf-8", "surrogateescape")
            nxt = _resolve(f, path, name, soft, hops + 1, start=obj)
            if nxt is None:
                return _dangling(path, name, soft, hops + 1)
            obj = nxt
            continue
        if kind != h5py.h5l.TYPE_HARD:
            raise SlideError(f"{path}: `{name}` is a link of unsupported type ({kind}); refused")
        try:
            obj = obj[part]
        except (KeyError, ValueError, OSError, RuntimeError, TypeError) as e:
            raise SlideError(f"{path}: cannot open `{name}` (corrupt file?): {e}") from None
    return obj


def _dangling(path: str, name: str, target: str, hops: int):
    if hops == 0:
        return None
    raise SlideError(f"{path}: `{name}` is a soft link to `{target}`, which does not exist in the file (dangling link)")


# --------------------------------------------------------------------------- storage layout


def unwritten(path: str, key: str, detail: str) -> SlideError:
    """The error for storage that was never written."""
    return SlideError(
        f"{path}: `{key}` has storage that was never written ({detail}; an interrupted feature "
        "extraction?); refusing to read fill values as tiles"
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def _listed(names: Callable[[], list[str]], lead: str = "") -> str:
    """`` (<lead>a, b, c, …)``: the first three of ``names()`` for an error message; "" when there are
    none or they cannot be read (the message must not fail)."""
    try:
        shown = names()
    except Exception:  # noqa: BLE001 - the message only
        return ""
    return f" ({lead}{', '.join(shown[:3])}{', …' if len(shown) > 3 else ''})" if shown else ""


def check_storage(path: str, key: str, dset: h5py.Dataset, file_size: int, *, full: bool = False) -> None:
    """Refuse layouts whose bytes are not known to be written data of this file (see module doc).

    Cheap (no data read); ``full=True`` adds :func:`check_all_chunks` (HDF5 visits the chunk index).
    """
    try:
        pl = dset.id.get_create_plist()
        layout = pl.get_layout()
        n_external = pl.get_external_count()
    except (OSError, RuntimeError, ValueError) as e:
        raise SlideError(f"{path}: cannot read the storage layout of `{key}` (corrupt file?): {e}") from None
    if layout == h5py.h5d.VIRTUAL:
        shown = _listed(lambda: sorted({f"{m.file_name}:{m.dset_name}" for m in dset.virtual_sources()}), "mapped from ")
        raise SlideError(
            f"{path}: `{key}` is a virtual dataset{shown}; virtual datasets are refused (rows whose source "
            "is missing read as the fill value): store the data in this file"
        )
    if n_external > 0:
        shown = _listed(lambda: [repr(str(e[0])) for e in dset.external or []])
        raise SlideError(
            f"{path}: `{key}` uses external raw storage{shown}; external storage is refused (any file's bytes "
            "would be read as tile data, and a short one as fill values): store the data in this file"
        )
    itemsize = dset.dtype.itemsize
    nbytes = math.prod(int(s) for s in dset.shape) * itemsize
    if layout == h5py.h5d.CONTIGUOUS:
        if nbytes == 0:
            return
        offset = dset.id.get_offset()
        if offset is None:
            raise unwritten(path, key, "no data allocated")
        if offset + nbytes > file_size:
            raise SlideError(f"{path}: truncated file: `{key}` data runs past the end of the file")
    elif layout == h5py.h5d.CHUNKED:
        chunks = dset.chunks
        chunk_bytes = math.prod(int(c) for c in chunks) * itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise SlideError(
                f"{path}: `{key}` has chunks of {tuple(chunks)} = {_mib(chunk_bytes)} decompressed, over the "
                f"{_mib(MAX_CHUNK_BYTES)} limit; rewrite it with smaller chunks (e.g. `h5repack -l "
                f"{key}:CHUNK=32x{dset.shape[-1] if dset.ndim else 1}`)"
            )
        if pl.get_nfilters() > 0 and nbytes > max(MAX_COMPRESSION_RATIO * file_size, MAX_CHUNK_BYTES):
            raise SlideError(
                f"{path}: `{key}` declares {_mib(nbytes)} of compressed data in a {_mib(file_size)} file (over "
                f"{MAX_COMPRESSION_RATIO}:1; real tile data compresses about 2:1); refusing to decompress it"
            )
        if full:
            check_all_chunks(path, key, dset)
    elif layout != h5py.h5d.COMPACT:
        raise SlideError(f"{path}: `{key}` has an unknown storage layout ({layout}); refused")


def check_all_chunks(path: str, key: str, dset: h5py.Dataset) -> None:
    """Every chunk of a chunked dataset's grid exists (HDF5 records allocation, not writes)."""
    if dset.chunks is None:
        return
    grid = math.prod(math.ceil(int(s) / int(c)) for s, c in zip(dset.shape, dset.chunks))
    try:
        have = dset.id.get_num_chunks()
    except (OSError, RuntimeError, ValueError) as e:
        raise SlideError(f"{path}: cannot read the chunk index of `{key}` (corrupt file?): {e}") from None
    if have < grid:
        raise unwritten(path, key, f"only {have} of {grid} chunks exist")


def check_read_size(path: str, key: str, rows: int, row_bytes: int) -> None:
    """Refuse a read that would materialise more than :data:`MAX_READ_BYTES`."""
    need = int(rows) * int(row_bytes)
    if need > MAX_READ_BYTES:
        raise SlideError(
            f"{path}: reading {rows:,} rows of `{key}` would take {_mib(need)} of memory, over the "
            f"{_mib(MAX_READ_BYTES)} limit per read; sample fewer tiles (patches_per_wsi)"
        )


# --------------------------------------------------------------------------- content of the rows read


def fill_value(dset: h5py.Dataset) -> float:
    """The dataset's fill value as a float (0.0 when it cannot be read)."""
    try:
        v = float(np.asarray(dset.fillvalue).reshape(-1)[0])
    except (TypeError, ValueError, IndexError, OSError, RuntimeError):
        return 0.0
    return v


def check_feature_rows(path: str, key: str, feats: np.ndarray, rows: np.ndarray, fill: float = 0.0) -> None:
    """The rows read, ``feats`` [K, D] float32 (``rows[r]``: file row of ``feats[r]``), hold real data:
    no NaN/Inf, and no row that is all zeros or all the fill value ``fill`` (what never-written storage
    reads as; a feature extractor's output is never constant across all D values).

    Fast path: one vectorised row sum (``einsum``'s plain float32 sum; its cost: docs/data.md).
    A NaN or Inf makes its row's sum non-finite; an all-zero row sums to exactly 0 and an all-``fill``
    row to about D·fill, so only rows with such sums are looked at exactly.
    """
    if feats.ndim != 2 or feats.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.einsum("ij->i", feats)
    if not np.isfinite(sums).all():
        bad = np.flatnonzero(~np.isfinite(sums))
        bad = bad[~np.isfinite(feats[bad]).all(axis=1)]  # a finite row can overflow its sum
        if len(bad):
            kind = "NaN" if np.isnan(feats[bad[0]]).any() else "Inf"
            raise SlideError(
                f"{path}: `{key}` contains {kind} (file row {int(rows[bad[0]])}; "
                f"{len(bad)} bad row(s) among the {len(feats)} read)"
            )
    cand = np.flatnonzero(sums == 0)
    zero = cand[~feats[cand].any(axis=1)] if len(cand) else cand
    if len(zero):
        raise SlideError(
            f"{path}: `{key}` row {int(rows[zero[0]])} is all zeros ({len(zero)} such row(s) among the "
            f"{len(feats)} read): storage never written (an interrupted extraction, or a dataset allocated "
            "but only partly filled) reads as zeros, and real tile features are never all zero"
        )
    if fill != 0.0 and math.isfinite(fill):
        target = fill * feats.shape[1]
        with np.errstate(over="ignore", invalid="ignore"):
            cand = np.flatnonzero(np.abs(sums - target) <= 1e-3 * abs(target) + 1e-30)
        f32 = np.float32(fill)
        same = cand[(feats[cand] == f32).all(axis=1)] if len(cand) else cand
        if len(same):
            raise SlideError(
                f"{path}: `{key}` row {int(rows[same[0]])} is all the fill value {fill:g} ({len(same)} such "
                f"row(s) among the {len(feats)} read): storage that was allocated but never written"
            )


def check_unique_coords(path: str, key: str, coords_sorted: np.ndarray, rows_sorted: np.ndarray) -> None:
    """No two tiles at one coordinate. ``coords_sorted`` [K, 2] must be sorted so that equal rows are
    adjacent (the readers' spatial order); ``rows_sorted[r]`` is the file row of ``coords_sorted[r]``."""
    if len(coords_sorted) < 2:
        return
    a, b = coords_sorted[1:], coords_sorted[:-1]
    dup = np.flatnonzero((a[:, 0] == b[:, 0]) & (a[:, 1] == b[:, 1]))
    if len(dup):
        i = int(dup[0])
        r1, r2 = sorted((int(rows_sorted[i]), int(rows_sorted[i + 1])))
        raise SlideError(
            f"{path}: `{key}` has duplicate tile coordinates: file rows {r1} and {r2} are both at "
            f"{coords_sorted[i].tolist()} ({len(dup)} duplicate(s) among the {len(coords_sorted)} read; "
            "never-written coordinates read as the fill value)"
        )
