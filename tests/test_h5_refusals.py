"""Issue 13: every HDF5 storage trick that would read something other than written tile data is refused,
by the one check (`wsi_llava.data.h5safety`), the same way in `validate`, in loading (training, predict,
serve: `load_slide`) and in `convert-h5`; every message names the file and the reason.

Each slide file is built here with h5py (no binary fixtures). Tiny sizes except where the size is the
point (200,000 declared rows; a 1 GiB chunk), and those are sparse or written as precompressed bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import h5py
import numpy as np
import pytest

from wsi_llava.data import h5safety
from wsi_llava.data.convert import convert_file, convert_many
from wsi_llava.data.scan import scan_slide
from wsi_llava.data.slides import SlideError, load_slide, read_slide_meta
from wsi_llava.data.validate import validate_manifests

D = 8
N = 64
HEADER = "h5_path,caption,question,answer,slide_id,dataset,choices\n"


def feats_coords(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    side = max(1, int(np.ceil(np.sqrt(n))))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 256
    return feats, coords


F, C = feats_coords()


def _early_allocated(path, fill: float, write_rows: int = 0) -> None:
    """Chunked features allocated at creation (H5D_ALLOC_TIME_EARLY) with ``fill``; only
    ``write_rows`` rows ever written: every chunk exists, HDF5 cannot tell which were written."""
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((16, D))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_value(np.array(fill, dtype="f4"))
        space = h5py.h5s.create_simple((N, D))
        dsid = h5py.h5d.create(f.id, b"features", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        if write_rows:
            f["features"][:write_rows] = F[:write_rows]
        del dsid
        f["coords"] = C
    with h5py.File(path, "r") as f:  # the premise: the full chunk grid exists
        assert f["features"].id.get_num_chunks() == N // 16


def contiguous_10_of_200k(path):
    n = 200_000
    feats, coords = feats_coords(10)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(n, D), dtype="f4")  # contiguous, allocated on first write
        d[:10] = feats
        side = 500
        f["coords"] = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 256


def early_fill0(path):
    _early_allocated(path, 0.0)


def early_fill05(path):
    _early_allocated(path, 0.5, write_rows=16)  # one chunk written, three hold only the fill value


def half_written_chunks(path):
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(N, D), chunks=(4, D), dtype="f4")
        d[: N // 2] = F[: N // 2]  # 8 of 16 chunks: the extraction "crashed" half-way
        f["coords"] = C


def virtual_source_gone(path):
    src = path.with_name("source.h5")
    with h5py.File(src, "w") as f:
        f["x"] = F
    layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
    layout[:] = h5py.VirtualSource(str(src), "x", shape=(N, D))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("features", layout, fillvalue=0)
        f["coords"] = C
    src.unlink()


def external_passwd(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(N, D), dtype="f4", external=[("/etc/passwd", 0, N * D * 4)])
        f["coords"] = C


def external_short(path):
    raw = path.with_name("raw.bin")
    raw.write_bytes(F[:10].tobytes())  # 10 rows of the 64 declared
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(N, D), dtype="f4", external=[(str(raw), 0, N * D * 4)])
        f["coords"] = C


def external_four_files(path):
    """Rows spread over four raw files: the refusal names the first three and says there are more."""
    files = []
    for i, name in enumerate("abcd"):
        raw = path.with_name(f"{name}.bin")
        raw.write_bytes(F[16 * i:16 * (i + 1)].tobytes())
        files.append((str(raw), 0, 16 * D * 4))
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(N, D), dtype="f4", external=files)
        f["coords"] = C


def external_link(path):
    other = path.with_name("other.h5")
    with h5py.File(other, "w") as f:
        f["features"] = F
    with h5py.File(path, "w") as f:
        f["features"] = h5py.ExternalLink(str(other), "/features")
        f["coords"] = C


def external_link_to_fifo(path):
    fifo = path.with_name("pipe")
    os.mkfifo(fifo)
    with h5py.File(path, "w") as f:
        f["features"] = F
        f["coords"] = h5py.ExternalLink(str(fifo), "/coords")


def soft_link_through_external_group(path):
    other = path.with_name("other.h5")
    with h5py.File(other, "w") as f:
        f["features"] = F
    with h5py.File(path, "w") as f:
        f["elsewhere"] = h5py.ExternalLink(str(other), "/")
        f["features"] = h5py.SoftLink("/elsewhere/features")
        f["coords"] = C


def features_group(path):
    with h5py.File(path, "w") as f:
        f.create_group("features")
        f["coords"] = C


def dangling_soft_link(path):
    with h5py.File(path, "w") as f:
        f["features"] = h5py.SoftLink("/gone")
        f["coords"] = C


def duplicate_coords(path):
    c = C.copy()
    c[41] = c[7]
    with h5py.File(path, "w") as f:
        f["features"] = F
        f["coords"] = c


def _adler32_repeated(block: bytes, times: int) -> int:
    """adler32 of ``block * times`` (``times`` a power of two) without touching those bytes."""
    base = 65521

    def combine(a1: int, a2: int, len2: int) -> int:  # zlib's adler32_combine
        rem = len2 % base
        s1 = a1 & 0xFFFF
        s2 = rem * s1 % base
        s1 = (s1 + (a2 & 0xFFFF) + base - 1) % base
        s2 = (s2 + (a1 >> 16) + (a2 >> 16) + base - rem) % base
        return (s2 << 16) | s1

    a, length = zlib.adler32(block), len(block)
    while times > 1:
        a, length, times = combine(a, a, length), length * 2, times // 2
    return a


def huge_gzip_chunk(path):
    """One 1 GiB chunk of a constant nonzero value, gzip-compressed to ≈ 1 MB (a valid zlib stream,
    built from one compressed MiB repeated after full flushes, so the test never holds 1 GiB)."""
    rows, cols = 2**18, 1024  # 2^18 × 1024 float32 = 1 GiB
    block = np.full(2**18, 0.25, dtype="f4").tobytes()  # 1 MiB
    co = zlib.compressobj(9)
    first = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    again = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    stream = first + again * 1023 + b"\x03\x00" + struct.pack(">I", _adler32_repeated(block, 1024))
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(rows, cols), chunks=(rows, cols), dtype="f4", compression="gzip")
        d.id.write_direct_chunk((0, 0), stream)
        f["coords"] = np.stack([np.arange(rows) % 512, np.arange(rows) // 512], 1).astype(np.int64) * 256


def compression_bomb(path):
    """80 chunks of 1 MiB constant data, each compressed to ≈ 1 KB: 80 MiB declared in a ≈ 0.1 MB file."""
    rows, cols = 80 * 256, 1024
    raw = np.full((256, cols), 0.5, dtype="f4").tobytes()
    packed = zlib.compress(raw, 9)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(rows, cols), chunks=(256, cols), dtype="f4", compression="gzip")
        for i in range(80):
            d.id.write_direct_chunk((i * 256, 0), packed)
        f["coords"] = np.stack([np.arange(rows) % 256, np.arange(rows) // 256], 1).astype(np.int64) * 256


#: case → (builder, reason regex). Every case is refused by validate, load and convert-h5 alike.
CASES = {
    "contiguous_10_of_200k": (contiguous_10_of_200k, r"`features` row \d+ is all zeros"),
    "early_allocated_fill0": (early_fill0, r"`features` row \d+ is all zeros"),
    "early_allocated_fill05": (early_fill05, r"`features` row \d+ is all the fill value 0\.5"),
    "half_written_chunks": (half_written_chunks, r"`features` has storage that was never written"),
    "virtual_source_gone": (virtual_source_gone, r"`features` is a virtual dataset .*source\.h5"),
    "external_storage_passwd": (external_passwd, r"`features` uses external raw storage \('/etc/passwd'\)"),
    "external_storage_short": (external_short, r"`features` uses external raw storage .*raw\.bin"),
    "external_storage_four_files": (external_four_files,
                                    r"`features` uses external raw storage \('[^']*a\.bin', '[^']*b\.bin', '[^']*c\.bin', …\);"),
    "external_link": (external_link, r"`features` is an external link to `/features` in file .*other\.h5"),
    "external_link_to_fifo": (external_link_to_fifo, r"`coords` is an external link .*pipe.*never followed"),
    "soft_link_through_external_link": (soft_link_through_external_group, r"`features` is an external link"),
    "features_is_a_group": (features_group, r"`features` is a group, not a dataset"),
    "dangling_soft_link": (dangling_soft_link, r"`features` is a soft link to `/gone`, which does not exist"),
    "duplicate_coordinates": (duplicate_coords, r"`coords` has duplicate tile coordinates: file rows 7 and 41"),
    "huge_gzip_chunk": (huge_gzip_chunk, r"`features` has chunks of \(262144, 1024\) = 1\.0 GiB decompressed"),
    "compression_bomb": (compression_bomb, r"`features` declares 80\.0 MiB of compressed data"),
}


def build(tmp_path, case: str) -> str:
    path = tmp_path / f"{case}.h5"
    CASES[case][0](path)
    return str(path)


def _assert_names(message: str, path: str, reason: str) -> None:
    assert path in message, message
    assert re.search(reason, message), message


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_refuses(tmp_path, case):
    path = build(tmp_path, case)
    man = tmp_path / "m.csv"
    man.write_text(HEADER + f"{os.path.basename(path)},,What is it?,Tumour,s1,d,\n")
    for full in (True, False):  # the full scan and --quick
        good, problems = validate_manifests([str(man)], full_scan=full)
        assert good == [] and len(problems) == 1, problems
        (p,) = problems
        assert (p.row, p.field) == (2, "h5_path")
        _assert_names(p.message, path, CASES[case][1])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", sorted(CASES))
def test_load_refuses(tmp_path, case):
    """The training (seeded sample), predict/serve (deterministic sample) and encode (all tiles) loads."""
    path = build(tmp_path, case)
    reason = CASES[case][1]
    for k, rng in ((None, None), (32, np.random.default_rng(0)), (48, None)):
        if case == "duplicate_coordinates" and k is not None:
            continue  # a sample may miss one of the pair: the full list is checked by validate (see docs)
        with pytest.raises(SlideError) as e:
            load_slide(path, k, rng)
        _assert_names(str(e.value), path, reason)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_h5_refuses_and_writes_nothing(tmp_path, case):
    path = build(tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(SlideError) as e:
        convert_file(path, out / "x.h5")
    _assert_names(str(e.value), path, CASES[case][1])
    assert not (out / "x.h5").exists() and list(out.iterdir()) == []  # no partial or temp file left
    results = convert_many([path], out)
    assert [r.status for r in results] == ["failed"] and path in results[0].message


@pytest.mark.timeout(20)
def test_structure_checks_are_cheap_and_shared(tmp_path):
    """read_slide_meta (used to size models and check tower caches) refuses the layout problems too."""
    for case in ("virtual_source_gone", "external_storage_passwd", "external_link", "external_link_to_fifo",
                 "features_is_a_group", "dangling_soft_link", "huge_gzip_chunk", "compression_bomb"):
        path = build(tmp_path, case)
        with pytest.raises(SlideError) as e:
            read_slide_meta(path)
        _assert_names(str(e.value), path, CASES[case][1])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "folder", "dev_null"])
def test_special_files_are_never_opened(tmp_path, kind):
    """A FIFO would block an open() forever: refused from os.stat, before anything opens it."""
    if kind == "fifo":
        path = str(tmp_path / "slide.h5")
        os.mkfifo(path)
        what = r"not a regular file \(a FIFO"
    elif kind == "folder":
        path = str(tmp_path / "slide.h5")
        os.mkdir(path)
        what = r"not a regular file \(a folder"
    else:
        path = os.devnull
        what = r"not a regular file \(a character device"
    man = tmp_path / "m.csv"
    man.write_text(HEADER + f"{path},,What is it?,Tumour,s1,d,\n")
    t = time.monotonic()
    _, problems = validate_manifests([str(man)])
    _assert_names(problems[0].message, path, what)
    for call in (lambda: load_slide(path, 8), lambda: scan_slide(path), lambda: read_slide_meta(path),
                 lambda: convert_file(path, tmp_path / "out" / "x.h5")):
        with pytest.raises(SlideError) as e:
            call()
        _assert_names(str(e.value), path, what)
    assert time.monotonic() - t < 5


def test_huge_chunk_refused_fast_with_bounded_memory(tmp_path):
    """The 1 GiB chunk is refused before anything is decompressed: well under a second and without
    the process growing by anything near a GiB (measured in a fresh process)."""
    path = build(tmp_path, "huge_gzip_chunk")
    assert os.path.getsize(path) < 16 * 2**20
    code = textwrap.dedent(f"""
        import json, resource, sys, time
        from wsi_llava.data.scan import scan_slide
        from wsi_llava.data.slides import SlideError, load_slide
        from wsi_llava.data.convert import convert_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.monotonic()
        errors = []
        for call in (lambda: load_slide({path!r}, 2048), lambda: load_slide({path!r}),
                     lambda: scan_slide({path!r}), lambda: convert_file({path!r}, {str(tmp_path / 'o.h5')!r})):
            try:
                call()
            except SlideError as e:
                errors.append(str(e))
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(json.dumps({{"seconds": time.monotonic() - t, "grown": grown, "errors": errors}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["errors"]) == 4 and all("1.0 GiB decompressed" in m for m in res["errors"]), res
    assert res["seconds"] < 2.0, res
    assert res["grown"] < 128 * 2**20, res


def test_soft_link_inside_the_file_is_followed(tmp_path):
    path = str(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        f["data/feat"] = F
        f["features"] = h5py.SoftLink("/data/feat")
        f["grid"] = C
        f["coords"] = h5py.SoftLink("grid")  # relative
    s = load_slide(path)
    order = np.lexsort((C[:, 0], C[:, 1]))
    np.testing.assert_array_equal(s.features, F[order])
    assert scan_slide(path).n == N
    out = tmp_path / "out" / "s.h5"
    convert_file(path, out)
    np.testing.assert_array_equal(load_slide(str(out)).features, s.features)


def test_soft_link_loop_is_refused(tmp_path):
    path = str(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
        f["features"] = h5py.SoftLink("/a")
        f["coords"] = C
    with pytest.raises(SlideError, match=r"s\.h5: `features` is a soft link (that loops|to .* does not exist)"):
        load_slide(path)


def test_read_size_bound(tmp_path, monkeypatch):
    path = str(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        f["features"] = F
        f["coords"] = C
    monkeypatch.setattr(h5safety, "MAX_READ_BYTES", 1000)
    with pytest.raises(SlideError, match=r"s\.h5: reading 64 rows of `features` would take .* over the"):
        load_slide(path)
    load_slide(path, 16)  # 16 × 8 × 4 = 512 bytes: fine


def test_convert_keeps_other_links_as_links_without_following(tmp_path):
    """convert-h5 copies other top-level objects; an external link there (even to a FIFO) is copied as a
    link, never opened."""
    path = tmp_path / "s.h5"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with h5py.File(path, "w") as f:
        f["features"] = F
        f["coords"] = C
        f["thumb"] = h5py.ExternalLink(str(fifo), "/img")
        f["alias"] = h5py.SoftLink("/features")
    out = tmp_path / "out" / "s.h5"
    convert_file(path, out)
    with h5py.File(out, "r") as f:
        assert isinstance(f.get("thumb", getlink=True), h5py.ExternalLink)
        assert isinstance(f.get("alias", getlink=True), h5py.SoftLink)


def test_other_slide_readers_use_the_checked_open(tmp_path):
    """The tile-size rule, the synthetic-cohort lookup, encode's row order and the tower cache open slide
    files through the same check: an external link is refused, never followed."""
    from wsi_llava.data.tile_size import read_tile_size
    from wsi_llava.data.tower_cache import TowerCache, TowerCacheError, cache_file_name
    from selection_study import planted_lookup  # experiments/ (on sys.path through conftest.py)

    path = build(tmp_path, "external_link_to_fifo")
    with h5py.File(path, "a") as f:
        f["planted"] = np.zeros(N, bool)
    with pytest.raises(SlideError, match="external link"):
        read_tile_size(path)
    with pytest.raises(SlideError, match="external link"):
        planted_lookup(path)
    fifo_path = str(tmp_path / "fifo.h5")
    os.mkfifo(fifo_path)
    with pytest.raises(SlideError, match="not a regular file"):
        read_tile_size(fifo_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    with h5py.File(cache / cache_file_name("s1"), "w") as f:
        for k in ("cls_token", "cls_attention", "keys", "coords"):
            f[k] = np.zeros(2, "f4")
        f["tokens"] = h5py.ExternalLink(str(tmp_path / "pipe"), "/tokens")
    with pytest.raises(TowerCacheError, match=r"s1\.h5: `tokens` is an external link"):
        TowerCache(cache).check("s1")
