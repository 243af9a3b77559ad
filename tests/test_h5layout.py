"""The v1 B-tree chunk-index parser and the memory-map gather, against HDF5's own answers."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from wsi_llava.data.h5layout import FileReader, chunk_table


def hdf5_table(dset: h5py.Dataset) -> np.ndarray:
    """Chunk addresses as HDF5 reports them (-1: not written)."""
    cr, cc = dset.chunks
    grid = (-(-dset.shape[0] // cr), -(-dset.shape[1] // cc))
    table = np.full(grid, -1, dtype=np.int64)
    for i in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(i)
        table[info.chunk_offset[0] // cr, info.chunk_offset[1] // cc] = info.byte_offset
    return table


CASES = {
    "clam (32, D)": dict(shape=(1000, 24), chunks=(32, 24)),
    "trident (1, D), 3-level tree": dict(shape=(6000, 8), chunks=(1, 8), maxshape=(None, 8)),
    "column chunks, ragged edges": dict(shape=(50, 24), chunks=(8, 7)),
    "float16": dict(shape=(300, 16), chunks=(16, 16), dtype="f2"),
    "userblock": dict(shape=(500, 16), chunks=(32, 16), userblock=1024),
    "half written": dict(shape=(640, 16), chunks=(32, 16), rows=200),
    "many attributes (continuation block)": dict(shape=(200, 16), chunks=(32, 16), attrs=40),
}


def write(path, shape, chunks, maxshape=None, dtype="f4", userblock=0, rows=None, attrs=0, libver=None):
    kw = {"userblock_size": userblock} if userblock else {}
    if libver:
        kw["libver"] = libver
    data = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    with h5py.File(path, "w", **kw) as f:
        f.create_dataset("other", data=np.arange(10))
        d = f.create_dataset("features", shape=shape, chunks=chunks, maxshape=maxshape, dtype=dtype)
        d[: rows if rows is not None else shape[0]] = data[: rows if rows is not None else shape[0]]
        for i in range(attrs):
            d.attrs[f"attribute_{i}"] = np.arange(20)
    return str(path), data


@pytest.mark.parametrize("case", sorted(CASES))
def test_parsed_table_equals_hdf5(tmp_path, case):
    path, data = write(tmp_path / "s.h5", **CASES[case])
    with h5py.File(path, "r") as f, FileReader(path) as fr:
        d = f["features"]
        table = chunk_table(f, "features", d, fr)
        assert table is not None
        np.testing.assert_array_equal(table, hdf5_table(d))
        # and the bytes at those addresses are the rows
        cr, cc = d.chunks
        rows = np.arange(0, min(d.shape[0], 200 if "half" in case else d.shape[0]), 7)
        width = min(cc, d.shape[1]) * d.dtype.itemsize
        got = fr.gather(table[rows // cr, 0] + (rows % cr) * cc * d.dtype.itemsize, width).view(d.dtype)
        np.testing.assert_array_equal(got, data[rows, : min(cc, d.shape[1])])


@pytest.mark.parametrize("libver", ["latest"])
def test_newer_chunk_indexes_are_declined(tmp_path, libver):
    for maxshape in (None, (None, 16)):  # fixed array, extensible array
        path, _ = write(tmp_path / f"s{maxshape is None}.h5", (100, 16), (8, 16), maxshape=maxshape, libver=libver)
        with h5py.File(path, "r") as f, FileReader(path) as fr:
            assert chunk_table(f, "features", f["features"], fr) is None


def test_corrupt_node_is_declined_not_trusted(tmp_path):
    path, _ = write(tmp_path / "s.h5", (1000, 16), (32, 16))
    bad = str(tmp_path / "bad.h5")
    shutil.copy(path, bad)
    raw = bytearray(open(bad, "rb").read())
    first = raw.find(b"TREE\x01")  # a raw-data chunk node (type 1), not the group tree
    raw[first: first + 4] = b"XREE"
    open(bad, "wb").write(bytes(raw))
    with h5py.File(path, "r") as f, FileReader(bad) as fr:  # the good file's metadata, the bad file's bytes
        assert chunk_table(f, "features", f["features"], fr) is None
    # a node claiming a chunk of the wrong size
    raw = bytearray(open(path, "rb").read())
    leaf = raw.find(b"TREE\x01")
    raw[leaf + 24: leaf + 28] = (12345).to_bytes(4, "little")
    open(bad, "wb").write(bytes(raw))
    with h5py.File(path, "r") as f, FileReader(bad) as fr:
        assert chunk_table(f, "features", f["features"], fr) is None


def test_gather_any_addresses_and_bounds(tmp_path):
    p = tmp_path / "b.bin"
    blob = np.arange(1000, dtype=np.uint8)
    p.write_bytes(blob.tobytes())
    with FileReader(str(p)) as fr:
        addrs = np.array([990, 0, 3, 501, 3])
        want = np.stack([blob[a: a + 10] for a in addrs])
        np.testing.assert_array_equal(fr.gather(addrs, 10), want)
        np.testing.assert_array_equal(fr.gather(addrs, 10), want)  # out of file order
        np.testing.assert_array_equal(fr.gather(np.sort(addrs), 10), want[np.argsort(addrs, kind="stable")])
        spread = np.array([900, 10, 450])  # rows far apart: one read per row, not one span
        np.testing.assert_array_equal(fr.gather(spread, 3), np.stack([blob[a: a + 3] for a in spread]))
        assert fr.gather(np.array([], dtype=np.int64), 10).shape == (0, 10)
        with pytest.raises(ValueError, match="beyond the file"):
            fr.gather(np.array([991]), 10)
        with pytest.raises(ValueError, match="beyond the file"):
            fr.gather(np.array([-1]), 10)
    p.write_bytes(b"")
    with FileReader(str(p)) as fr:
        assert fr.size == 0


@pytest.mark.parametrize("chunk_rows", [1, 32])
def test_clam_style_appends_interleaving_two_datasets(tmp_path, chunk_rows):
    """CLAM/TRIDENT write batch by batch: resize, append features, append coords. The chunks of the
    two datasets interleave in the file and the B-trees split as they grow; the parsed tables still
    equal HDF5's, and rows read at those addresses are the tiles."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "s.h5")
    feats = rng.standard_normal((3000, 12)).astype("f4")
    coords = rng.integers(0, 10_000, (3000, 2))
    with h5py.File(path, "w") as f:
        fd = f.create_dataset("features", shape=(0, 12), maxshape=(None, 12), chunks=(chunk_rows, 12), dtype="f4")
        cd = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), chunks=(chunk_rows, 2), dtype="i8")
        for start in range(0, 3000, 256):
            batch = slice(start, min(3000, start + 256))
            n = batch.stop
            fd.resize(n, axis=0)
            fd[batch] = feats[batch]
            cd.resize(n, axis=0)
            cd[batch] = coords[batch]
    rows = np.sort(rng.choice(3000, 300, replace=False))
    with h5py.File(path, "r") as f, FileReader(path) as fr:
        for name, data in (("features", feats), ("coords", coords)):
            d = f[name]
            table = chunk_table(f, name, d, fr)
            assert table is not None
            np.testing.assert_array_equal(table, hdf5_table(d))
            row_bytes = d.shape[1] * d.dtype.itemsize
            got = fr.gather(table[rows // chunk_rows, 0] + (rows % chunk_rows) * row_bytes, row_bytes).view(d.dtype)
            np.testing.assert_array_equal(got, data[rows])


def test_gather_picks_a_read_method_by_density_and_all_agree(tmp_path, monkeypatch):
    """Sparse big rows: preadv; dense big rows: memory map; small rows packed close: one span read.
    Each is exercised here and returns the same bytes."""
    import wsi_llava.data.h5layout as HL

    p = tmp_path / "big.bin"
    blob = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8)
    p.write_bytes(blob.tobytes())
    used = []
    for name in ("_gather_mapped", "_read_into"):
        orig = getattr(HL.FileReader, name)
        monkeypatch.setattr(HL.FileReader, name, lambda self, *a, _o=orig, _n=name: used.append(_n) or _o(self, *a))
    cases = {
        "sparse": (np.array([1_900_000, 5, 700_000, 1_200_000, 5 + 5000]), 5000),  # adjacent pair → one preadv run
        "dense": (np.array([30_000, 0, 12_000, 6000]), 5000),
        "small": (np.array([900, 10, 450, 10]), 16),
    }
    for label, (addrs, width) in cases.items():
        used.clear()
        with HL.FileReader(str(p)) as fr:
            got = fr.gather(addrs, width)
        np.testing.assert_array_equal(got, np.stack([blob[a: a + width] for a in addrs]), err_msg=label)
        if label == "dense":
            assert used == ["_gather_mapped"]
        elif label == "small":
            assert used == ["_read_into"]  # the one span read
        else:
            assert "_gather_mapped" not in used and used.count("_read_into") == 1  # single rows skip the helper
