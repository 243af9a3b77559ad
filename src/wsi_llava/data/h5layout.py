"""Byte addresses of HDF5 dataset rows, and positioned reads of rows from a file.

Two helpers behind the fast tile reader (:mod:`wsi_llava.data.readers`):

* :func:`chunk_table` — the file address of every chunk of a chunked dataset, read straight from the
  dataset's **version-1 B-tree** (the chunk index h5py and the HDF5 library write by default, so
  every CLAM and TRIDENT file). HDF5's own walk pays per chunk (``H5Dchunk_iter`` with its Python
  callback, or a full read of a small chunked dataset); reading the tree's nodes directly pays per node
  of up to 64 chunks (one read each, parsed vectorised; figures in docs/data.md). Anything else (version-2 object headers, layout
  message ≠ 3, the newer chunk indexes of ``libver="latest"`` files, 4-byte addresses) returns
  ``None`` and the caller asks HDF5 instead. The parser trusts nothing: every node's signature,
  type, level and bounds are checked, and the leaves must tile the chunk grid exactly once with
  uncompressed, full-size chunks, else ``None`` again.
* :class:`FileReader` — fixed-size rows from arbitrary byte addresses of a file into one array:
  ``os.preadv`` straight into each row's output position for sparse rows, a memory-map gather for
  dense ones, one read of the whole span for small rows packed close (coordinates).

Shapes: ``R`` row chunks × ``C`` column chunks; ``M`` rows gathered.
File format reference: the HDF5 File Format Specification, version 3 (object header v1 §IV.A.1.a,
data layout message v3 §IV.A.2.i, version-1 B-tree §III.A.1).
"""

from __future__ import annotations

import mmap
import os
import struct

import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["FileReader", "chunk_table", "uses_btree_v1"]

_OH_LAYOUT, _OH_CONTINUATION = 0x0008, 0x0010
_MAX_TREE_DEPTH = 64


#: most buffers one ``preadv`` call may take (IOV_MAX is 1024 on Linux and macOS)
_IOV_MAX = 1024
#: small rows (< a page): read the whole span of the wanted rows at once when it is at most this many
#: bytes per row (one system call costs about as much as copying ~16 KB from the page cache)
_SPAN_BYTES_PER_ROW = 16384
_PAGE = 4096
#: rows this dense or denser are gathered from a memory map: a page fault maps up to 16 pages (64 KiB)
#: around it, so each fault then serves at least one wanted row on average
_MAPPED_BYTES_PER_ROW = 65536


def _take(buffer, width: int, addrs: np.ndarray) -> np.ndarray:
    """[M, width] uint8 copy of ``buffer[a : a + width]`` for each a in ``addrs`` (no view survives)."""
    return sliding_window_view(np.frombuffer(buffer, dtype=np.uint8), width)[addrs]


def _seek_and_read(fd: int, buffers: list, at: int) -> int:
    """``os.preadv`` for platforms without it (Windows)."""
    os.lseek(fd, at, os.SEEK_SET)
    return sum(os.readv(fd, [b]) for b in buffers)


_preadv = getattr(os, "preadv", _seek_and_read)


class FileReader:
    """Positioned reads of fixed-size rows from one file: ``with FileReader(path) as fr: fr.gather(…)``.

    Three ways, chosen by how densely the wanted rows lie (the measurements behind the choice:
    docs/data.md, "How rows are fetched"):

    * sparse rows (less than one per 64 KiB, e.g. 2,048 of 50,000 tiles): ``os.preadv`` straight into
      the output array, one system call per run of adjacent rows. A memory map costs a page fault per
      row there and was up to twice as slow when the page cache had been filled by random reads, as
      in training;
    * denser rows (e.g. 2,048 of 4,096 tiles): one gather from a read-only memory map, where each
      fault maps 64 KiB around it and so serves several rows (faster than ``preadv`` there);
    * small rows packed close (coordinates): one read of their whole span.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self._fd).st_size

    def gather(self, addrs: np.ndarray, width: int) -> np.ndarray:
        """``out[p] = file[addrs[p] : addrs[p] + width]`` → [M, width] uint8.

        ``addrs`` [M] int64 absolute byte addresses in any order; raises ``ValueError`` when a row
        leaves the file or a read comes back short.
        """
        addrs = np.asarray(addrs, dtype=np.int64)
        m = len(addrs)
        if m == 0 or width <= 0:
            return np.empty((m, max(width, 0)), dtype=np.uint8)
        first, end = int(addrs.min()), int(addrs.max()) + width
        if first < 0 or end > self.size:
            raise ValueError(f"{self.path}: rows of {width} bytes at addresses beyond the file's {self.size} bytes")
        span = end - first
        if width < _PAGE and span <= m * _SPAN_BYTES_PER_ROW:  # small rows packed close (coordinates): one read
            buf = np.empty(span, dtype=np.uint8)
            self._read_into([memoryview(buf)], first)
            return sliding_window_view(buf, width)[addrs - first]
        if span <= m * _MAPPED_BYTES_PER_ROW:  # at least one wanted row per page-fault window: map
            return self._gather_mapped(addrs, width)
        out = np.empty((m, width), dtype=np.uint8)
        by_addr = np.argsort(addrs, kind="stable")
        a = addrs[by_addr]
        view = memoryview(out).cast("B")
        bufs = [view[o: o + width] for o in (by_addr * width).tolist()]  # in file order
        starts = [0, *(np.flatnonzero(np.diff(a) != width) + 1).tolist(), m]  # runs of adjacent rows
        at = a.tolist()
        read, fd = _preadv, self._fd
        for s, e in zip(starts[:-1], starts[1:]):
            if e - s == 1:  # a row on its own (most rows of a sparse sample): no helper call
                if read(fd, [bufs[s]], at[s]) != width:
                    raise ValueError(f"{self.path}: short read at byte {at[s]}: truncated file?")
                continue
            for s2 in range(s, e, _IOV_MAX):
                self._read_into(bufs[s2: min(e, s2 + _IOV_MAX)], at[s2])
        return out

    def _gather_mapped(self, addrs: np.ndarray, width: int) -> np.ndarray:
        region = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        try:
            return _take(region, width, addrs)
        finally:
            try:
                region.close()
            except BufferError:  # a view outlived an error; the map goes when it is collected
                pass

    def _read_into(self, buffers: list, at: int) -> None:
        want = sum(len(b) for b in buffers)
        got = _preadv(self._fd, buffers, at)
        if got != want:
            raise ValueError(f"{self.path}: short read at byte {at} ({got} of {want} bytes): truncated file?")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_table(f: h5py.File, name: str, dset: h5py.Dataset, fr: FileReader) -> np.ndarray | None:
    """[R, C] int64 absolute file address of every chunk (``-1``: never written), or ``None`` when
    the dataset's chunk index is not a version-1 B-tree this parser accepts (see module doc).

    ``dset = f[name]``: a chunked, unfiltered, 2-D dataset linked from the root group; ``fr``: a
    reader of the same file.
    """
    try:
        if tuple(f.id.get_create_plist().get_sizes()) != (8, 8) or dset.ndim != 2:
            return None
        link = f.id.links.get_info(name.encode())  # the object header address (H5Oget_info would walk the index)
        if link.type != h5py.h5l.TYPE_HARD:
            return None
        base = int(f.userblock_size)
        found = _layout_v3_chunked(fr, base, int(link.u))
        if found is None:
            return None
        root, dims = found
        itemsize = dset.dtype.itemsize
        if tuple(dims) != (*dset.chunks, itemsize):
            return None
        return _walk_tree(fr, base, root, dset.shape, dset.chunks, itemsize)
    except (ValueError, TypeError, struct.error, IndexError, OverflowError, KeyError):
        return None  # malformed or unexpected bytes: let HDF5 answer


def uses_btree_v1(f: h5py.File, name: str, fr: FileReader) -> bool:
    """Whether ``f[name]`` (linked from the root group) is chunked with a version-1 B-tree index, the
    index :func:`chunk_table` parses. When it does and :func:`chunk_table` still declined, the tree
    broke one of the format's invariants: HDF5's own lookups may then miss chunks its walk lists (and
    read them as fill values), so the caller reads chunk by chunk through HDF5's lookup instead."""
    try:
        if tuple(f.id.get_create_plist().get_sizes()) != (8, 8):
            return False
        link = f.id.links.get_info(name.encode())
        if link.type != h5py.h5l.TYPE_HARD:
            return False
        return _layout_v3_chunked(fr, int(f.userblock_size), int(link.u)) is not None
    except (ValueError, TypeError, struct.error, IndexError, OverflowError, KeyError):
        return False


def _read(fr: FileReader, at: int, n: int) -> bytes:
    return fr.gather(np.array([at]), n)[0].tobytes()


def _layout_v3_chunked(fr: FileReader, base: int, header: int) -> tuple[int, tuple[int, ...]] | None:
    """(B-tree address, chunk dims incl. element size) from a v1 object header's layout message."""
    prefix = _read(fr, base + header, 16)
    if prefix[0] != 1:  # version-1 object header (version 2 starts with "OHDR")
        return None
    n_messages, _refcount, block_size = struct.unpack_from("<HII", prefix, 2)
    blocks = [(base + header + 16, block_size)]
    seen = 0
    while blocks and seen < n_messages:
        start, length = blocks.pop(0)
        block = _read(fr, start, length)
        p = 0
        while p + 8 <= length and seen < n_messages:
            mtype, msize = struct.unpack_from("<HH", block, p)
            data = p + 8
            if data + msize > length:
                return None
            seen += 1
            if mtype == _OH_CONTINUATION:
                addr, clen = struct.unpack_from("<qq", block, data)
                blocks.append((base + addr, clen))
            elif mtype == _OH_LAYOUT:
                version, klass, ndims = block[data], block[data + 1], block[data + 2]
                if version != 3 or klass != 2:
                    return None
                (tree,) = struct.unpack_from("<q", block, data + 3)
                return tree, struct.unpack_from(f"<{ndims}I", block, data + 11)
            p = data + msize
    return None


#: a v1 B-tree node header: signature, node type, level, entries used, left and right sibling
_NODE_DTYPE = np.dtype([("sig", "S4"), ("type", "u1"), ("level", "u1"), ("used", "<u2"), ("left", "<i8"),
                        ("right", "<i8")])
#: one (key, child) record of a 2-D raw-data node: chunk bytes (low 32 bits) and filter mask (high
#: 32 bits), offset in rows, offset in columns, offset 0 (the element dimension), child address
_RECORD_WORDS = 5
_RECORD_BYTES = 8 * _RECORD_WORDS
#: entries of a node with HDF5's default chunk B-tree rank (K = 32, 2K entries per node)
_DEFAULT_ENTRIES = 64


def _walk_tree(fr: FileReader, base: int, root: int, shape, chunks, itemsize: int) -> np.ndarray | None:
    """Leaves of a v1 B-tree of a 2-D dataset → [R, C] chunk addresses (see :func:`chunk_table`).

    One level at a time, every node of the level in one gather (one read per node).
    """
    grid = (-(-int(shape[0]) // int(chunks[0])), -(-int(shape[1]) // int(chunks[1])))
    expected = grid[0] * grid[1]
    nodes, level = np.array([root], dtype=np.int64), None
    for _ in range(_MAX_TREE_DEPTH):
        # one read per node: header + the records of a default-size node (2K = 64 entries) ...
        raw = fr.gather(nodes + base, _NODE_DTYPE.itemsize + _DEFAULT_ENTRIES * _RECORD_BYTES)
        heads = raw[:, : _NODE_DTYPE.itemsize].copy().view(_NODE_DTYPE)[:, 0]
        if (heads["sig"] != b"TREE").any() or (heads["type"] != 1).any():
            return None
        low, high = int(heads["level"].min()), int(heads["level"].max())
        if low != high or (level is not None and low != level):
            return None
        level = low
        used = heads["used"].astype(np.int64)
        if int(used.max()) > _DEFAULT_ENTRIES:  # ... and again for all records when nodes are bigger
            width = int(used.max()) * _RECORD_BYTES
            body = fr.gather(nodes + base + _NODE_DTYPE.itemsize, width)
        else:
            width = _DEFAULT_ENTRIES * _RECORD_BYTES
            body = raw[:, _NODE_DTYPE.itemsize:]
        recs = np.ascontiguousarray(body).view("<i8").reshape(-1, _RECORD_WORDS)
        per_node = width // _RECORD_BYTES
        keep = (np.arange(len(recs)) % per_node) < np.repeat(used, per_node)
        cols = [np.compress(keep, recs[:, j]) for j in range(_RECORD_WORDS)]  # 1-D compress: fast
        if level == 0:
            break
        nodes = cols[4]
        if len(nodes) > expected:
            return None
        level -= 1
    else:
        return None
    chunk_bytes = int(chunks[0]) * int(chunks[1]) * itemsize
    size_mask, row_off, col_off, elem_off, addr = cols
    if (size_mask != chunk_bytes).any() or elem_off.any():  # full-size chunks, filter mask 0
        return None
    cells = []
    for off, step, n in ((row_off, int(chunks[0]), grid[0]), (col_off, int(chunks[1]), grid[1])):
        if n == 1:  # one chunk along this axis (e.g. CLAM/TRIDENT columns): offsets must be 0
            if off.any():
                return None
            cells.append(np.zeros_like(off))
            continue
        cell, rest = np.divmod(off, step)
        if rest.any() or (cell < 0).any() or (cell >= n).any():
            return None
        cells.append(cell)
    addr = addr + base
    if (addr < 0).any() or (addr + chunk_bytes > fr.size).any():
        return None
    out = np.full(expected, -1, dtype=np.int64)
    flat = cells[0] * grid[1] + cells[1]
    out[flat] = addr
    if np.count_nonzero(out >= 0) != len(flat):  # a chunk listed twice
        return None
    return out.reshape(grid)
