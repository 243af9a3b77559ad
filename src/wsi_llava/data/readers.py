"""Rows of a slide's datasets, read by their storage layout so that ``k`` of ``N`` rows cost about
``k`` rows of I/O, never ``N``:

* **contiguous** (``convert-h5`` output, h5py default): each row is read straight from its byte
  address ``offset + i · row_bytes`` (``dset.id.get_offset()``);
* **chunked, uncompressed** (CLAM (32, D), TRIDENT (1, D)): the byte address of every chunk from the
  dataset's version-1 B-tree, parsed directly (:mod:`wsi_llava.data.h5layout`, much cheaper than
  HDF5's own walk; figures in docs/data.md), then each row from its byte address.
  Files with a newer chunk index (``libver="latest"``) use HDF5's walk (``H5Dchunk_iter``), or,
  when that would visit far more chunks than the sample touches, read the needed chunks one by one
  (``H5Dread_chunk``, straight into the output row);
* **chunked, compressed** (gzip, lzf, …): the needed chunks are read as chunk-aligned runs through
  HDF5 (each chunk decompressed once); the chunk cache holds at least one chunk row;
* anything else (compact, virtual, external storage): h5py with a sorted index.

Rows with a byte address are read with ``os.preadv`` straight into their output position (spatial
order), one system call per run of adjacent rows (:class:`~wsi_llava.data.h5layout.FileReader`).

The chunked fast path re-reads one sampled row through h5py and compares bytes; a mismatch falls
back to the plain h5py read (correct, slow) with a warning. (Contiguous rows need no such check:
their address is HDF5's own ``get_offset`` plus the row-major layout the format defines.)
"""

from __future__ import annotations

import math
import warnings

import h5py
import numpy as np

from . import h5safety
from .h5layout import FileReader, chunk_table, uses_btree_v1
from .h5safety import SlideError
from .slide_checks import read_error

#: relative cost of one ``H5Dread_chunk`` lookup vs. visiting one chunk in ``H5Dchunk_iter``
#: (measured; docs/data.md, "How rows are fetched")
_LOOKUP_VS_ITER = 15.0
#: most decompressed bytes read from a compressed dataset in one piece (then copied out and dropped)
RUN_BYTES = 64 * 2**20


def read_plan(dset: h5py.Dataset) -> str:
    """How :func:`read_rows` reads ``dset``: ``contiguous``, ``chunked``, ``compressed`` or ``h5py``."""
    pl = dset.id.get_create_plist()
    if pl.get_external_count() > 0:
        return "h5py"
    layout = pl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        return "contiguous"
    if layout == h5py.h5d.CHUNKED:
        return "chunked" if pl.get_nfilters() == 0 else "compressed"
    return "h5py"


def read_rows(
    path: str, f: h5py.File, fr: FileReader, dset: h5py.Dataset, key: str, idx: np.ndarray,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of a 2-D dataset ``f[key]`` in the stored dtype: ``out[r] = dset[idx[order[r]]]``.

    ``idx`` is sorted and unique; ``order`` (a permutation, default identity) is the output order,
    e.g. spatial. Byte-address layouts read each row straight into its output position through
    ``fr``, a reader of the same file.
    """
    m = len(idx)
    if order is None:
        order = np.arange(m)
    plan = read_plan(dset)
    try:
        if plan == "contiguous":
            out = _read_contiguous(path, fr, dset, key, idx[order])
        elif plan == "chunked":
            out = _read_chunked(path, f, fr, dset, key, idx, order)
        elif plan == "compressed":
            out = _read_chunk_runs(path, dset, key, idx)[order]
        else:
            out = _read_h5py(dset, idx)[order]
    except SlideError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise read_error(path, key, e) from None
    if plan == "chunked" and m:  # addresses from our own index parsing: cross-check one row with HDF5
        probe = m // 2
        try:
            ref = np.asarray(dset[int(idx[order[probe]])])
        except (OSError, RuntimeError) as e:
            raise read_error(path, key, e) from None
        if ref.tobytes() != out[probe].tobytes():
            warnings.warn(
                f"{path}: fast read of `{key}` disagreed with HDF5 ({plan}); using the slow path",
                RuntimeWarning,
                stacklevel=3,
            )
            return _read_h5py(dset, idx)[order]
    return out


def _read_h5py(dset: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    if len(idx) == dset.shape[0]:
        return dset[()]
    return dset[idx]


def _read_contiguous(path: str, fr: FileReader, dset: h5py.Dataset, key: str, rows: np.ndarray) -> np.ndarray:
    """Contiguous dataset: row i lies at ``offset + i · row_bytes``; ``out[p] = dset[rows[p]]``."""
    offset = dset.id.get_offset()
    if offset is None:
        raise h5safety.unwritten(path, key, "no data allocated")
    n, c = dset.shape
    row_bytes = c * dset.dtype.itemsize
    if offset + n * row_bytes > fr.size:
        raise SlideError(f"{path}: truncated file: `{key}` data runs past the end of the file")
    return fr.gather(offset + rows * row_bytes, row_bytes).view(dset.dtype)


def _iter_chunk_table(dset: h5py.Dataset) -> np.ndarray | None:
    """[R, C] chunk addresses (-1: never written) from one ``H5Dchunk_iter`` walk (HDF5 ≥ 1.14);
    None when a chunk has an unexpected size."""
    n, c = dset.shape
    cr, cc = dset.chunks
    chunk_bytes = cr * cc * dset.dtype.itemsize
    table = np.full((math.ceil(n / cr), math.ceil(c / cc)), -1, dtype=np.int64)
    odd_size = []

    def visit(info) -> None:
        r, col = info.chunk_offset
        table[r // cr, col // cc] = info.byte_offset
        if info.size != chunk_bytes:
            odd_size.append(info.chunk_offset)

    dset.id.chunk_iter(visit)
    return None if odd_size else table


def _read_chunked(
    path: str, f: h5py.File, fr: FileReader, dset: h5py.Dataset, key: str, idx: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Uncompressed chunked dataset: the byte address of each needed chunk, then rows from there.

    Addresses come from the parsed v1 B-tree (:func:`~wsi_llava.data.h5layout.chunk_table`), else
    from HDF5's index walk; when that walk would visit far more chunks than the sample needs (or
    HDF5 < 1.14 lacks it), the needed chunks are read one by one instead. A v1 B-tree the parser
    declined is damaged (HDF5's walk may list chunks its lookups cannot find, and a plain read then
    returns fill values): its chunks are read one by one through HDF5's lookup, and a chunk the lookup
    cannot find is an error.
    """
    n, c = dset.shape
    cr, cc = dset.chunks
    chunk_of = idx // cr  # idx is sorted, so its distinct chunks are where the chunk changes
    need = chunk_of[np.r_[True, chunk_of[1:] != chunk_of[:-1]]] if len(idx) else chunk_of
    table = chunk_table(f, key, dset, fr)  # the v1 B-tree, parsed (every h5py-default file)
    if table is None and uses_btree_v1(f, key, fr):  # a v1 B-tree the parser declined: damaged
        if not hasattr(dset.id, "chunk_iter") or _iter_chunk_table(dset) is None:
            raise SlideError(f"{path}: `{key}` has a damaged chunk index (entries of the wrong size for "
                             "uncompressed chunks); re-extract the features")
        # HDF5's walk may list chunks its lookups cannot find (a plain read then returns fill values):
        # read every needed chunk through the lookup, where a chunk it cannot find is an error
        dest = np.empty(len(idx), dtype=np.int64)
        dest[order] = np.arange(len(idx))
        return _read_chunk_direct(path, dset, key, idx, need, dest)
    if table is None and hasattr(dset.id, "chunk_iter") and math.ceil(n / cr) <= _LOOKUP_VS_ITER * len(need):
        table = _iter_chunk_table(dset)  # a newer index: HDF5's walk, unless few chunks are needed
        if table is None:  # chunks of unexpected sizes: let HDF5 read them
            return _read_h5py(dset, idx)[order]
    if table is None:
        dest = np.empty(len(idx), dtype=np.int64)
        dest[order] = np.arange(len(idx))
        if hasattr(dset.id, "read_direct_chunk"):  # HDF5's lookup per chunk: a chunk it cannot find is an error
            return _read_chunk_direct(path, dset, key, idx, need, dest)
        return _read_h5py(dset, idx)[order]
    missing = np.flatnonzero((table < 0).any(axis=1))  # the whole index is at hand: every chunk must exist
    if len(missing):
        r0 = int(missing[0]) * cr
        more = f" and {len(missing) - 1} more chunk row(s)" if len(missing) > 1 else ""
        raise h5safety.unwritten(path, key, f"rows {r0}–{min(n, r0 + cr) - 1}{more}")
    itemsize = dset.dtype.itemsize
    rows = idx[order]
    chunk_row, within = np.divmod(rows, cr)
    within *= cc * itemsize  # row offset inside its chunk
    if cc >= c:  # one chunk across (CLAM, TRIDENT): a row is contiguous in the file
        return fr.gather(table[chunk_row, 0] + within, c * itemsize).view(dset.dtype)
    out = np.empty((len(rows), c * itemsize), dtype=np.uint8)
    for j in range(table.shape[1]):
        width = min(cc, c - j * cc) * itemsize
        out[:, j * cc * itemsize: j * cc * itemsize + width] = fr.gather(table[chunk_row, j] + within, width)
    return out.view(dset.dtype)


def _read_chunk_direct(
    path: str, dset: h5py.Dataset, key: str, idx: np.ndarray, need: np.ndarray, dest: np.ndarray
) -> np.ndarray:
    """Uncompressed chunked dataset, few chunks needed: read just those (``H5Dread_chunk``).

    Only for chunk indexes whose entries are known to be full-size: newer indexes store no size for
    unfiltered chunks, and a version-1 B-tree comes here only after HDF5's walk checked every entry's
    size (``H5Dread_chunk`` trusts the stored size; a damaged one overruns the buffer)."""
    n, c = dset.shape
    cr, cc = dset.chunks
    dtype = dset.dtype
    did = dset.id
    out = np.empty((len(idx), c), dtype=dtype)

    def read(coord: tuple[int, int], buf: np.ndarray) -> None:
        try:
            did.read_direct_chunk(coord, out=buf)
        except RuntimeError as err:
            if "not allocated" in str(err):
                r0 = coord[0]
                raise h5safety.unwritten(path, key, f"rows {r0}–{min(n, r0 + cr) - 1}") from None
            raise

    if cr == 1 and cc == c:  # TRIDENT/CLAM (1, D): a chunk is one output row, read in place
        target = out.view(np.uint8).reshape(len(idx), c * dtype.itemsize)
        for i, r in zip(idx.tolist(), dest.tolist()):
            read((i, 0), target[r])
        return out
    raw = np.empty(cr * cc * dtype.itemsize, dtype=np.uint8)
    block = raw.view(dtype).reshape(cr, cc)
    chunk_of = idx // cr
    starts = np.searchsorted(chunk_of, need, side="left")
    ends = np.searchsorted(chunk_of, need, side="right")
    for ci, s, e in zip(need.tolist(), starts.tolist(), ends.tolist()):
        local = idx[s:e] - ci * cr
        for j in range(math.ceil(c / cc)):
            read((ci * cr, j * cc), raw)
            width = min(cc, c - j * cc)
            out[dest[s:e], j * cc : j * cc + width] = block[local, :width]
    return out


def _read_chunk_runs(path: str, dset: h5py.Dataset, key: str, idx: np.ndarray) -> np.ndarray:
    """Compressed chunked dataset: the needed chunks as chunk-aligned runs (each decompressed once)."""
    n, c = dset.shape
    cr, cc = dset.chunks
    h5safety.check_all_chunks(path, key, dset)
    if len(idx) == n:
        return dset[()]
    need = np.unique(idx // cr)
    # runs of adjacent needed chunk rows, each at most RUN_BYTES decompressed (bounded memory)
    per_run = max(1, RUN_BYTES // (cr * c * dset.dtype.itemsize))
    breaks = np.flatnonzero((np.diff(need) > 1) | (np.arange(1, len(need)) % per_run == 0)) + 1
    out = np.empty((len(idx), c), dtype=dset.dtype)
    pos = 0
    for run in np.split(need, breaks):
        r0, r1 = int(run[0]) * cr, min(n, (int(run[-1]) + 1) * cr)
        block = dset[r0:r1]
        e = int(np.searchsorted(idx, r1, side="left"))
        out[pos:e] = block[idx[pos:e] - r0]
        pos = e
    return out


def as_float32(x: np.ndarray) -> np.ndarray:
    """x [K, D] float16/float32 (any byte order) → float32. Native float16 goes through torch, whose
    vectorised conversion is many times faster than numpy's (figures in docs/data.md)."""
    if x.dtype == np.float32:
        return x
    if x.dtype == np.float16 and x.flags.c_contiguous:
        import torch  # lazy: only float16 slides need it here (training imports it anyway)

        return torch.from_numpy(x).float().numpy()
    return x.astype(np.float32)
