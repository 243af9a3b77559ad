"""Slide H5 reading: every layout's fast path equals a plain h5py reference; sampling contracts."""

from __future__ import annotations

import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from wsi_llava.data import readers as R
from wsi_llava.data.sampling import sample_chunk_indices, sample_indices
from wsi_llava.data.scan import scan_slide
from wsi_llava.data.slides import Slide, SlideError, load_slide, read_slide_meta


def make_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    # unique (x, y) on a grid, shuffled so file order != spatial order
    cells = rng.permutation(4 * n)[:n]
    xy = np.stack([cells % 97, cells // 97], 1).astype(np.int64) * 224
    return feats, xy


def write_slide(path, feats, xy, *, yx=False, fchunks=None, cchunks=None, maxshape=False,
                compression=None, dtype=None, userblock=0, cdtype=None, libver=None):
    kw = dict(userblock_size=userblock) if userblock else {}
    if libver:
        kw["libver"] = libver
    with h5py.File(path, "w", **kw) as f:
        f.create_dataset(
            "features", data=feats.astype(dtype or feats.dtype), chunks=fchunks, compression=compression,
            maxshape=(None, feats.shape[1]) if maxshape else None,
        )
        c = xy[:, ::-1] if yx else xy
        f.create_dataset(
            "coords_yx" if yx else "coords", data=c.astype(cdtype or c.dtype), chunks=cchunks,
            compression=compression if cchunks else None, maxshape=(None, 2) if maxshape else None,
        )
    return str(path)


def reference(feats, xy, idx):
    """Plain reference: index the in-memory arrays, then sort by (y, x)."""
    f, c = feats[idx].astype(np.float32), xy[idx].astype(np.float32)
    order = np.lexsort((c[:, 0], c[:, 1]))
    return f[order], c[order]


D = 24
LAYOUTS = {
    "contiguous": dict(),
    "contiguous_f16": dict(dtype="f2"),
    "contiguous_bigendian": dict(dtype=">f4"),
    "userblock": dict(userblock=1024),
    "chunks32": dict(fchunks=(32, D), cchunks=(32, 2)),
    "chunks1_trident": dict(fchunks=(1, D), cchunks=(1, 2), maxshape=True),
    "col_chunked": dict(fchunks=(8, 7), cchunks=(5, 1)),  # D=24 not a multiple of 7: ragged edge chunks
    "col_chunked_small": dict(fchunks=(2, 7), cchunks=(3, 2)),  # many chunks: per-chunk reads
    "gzip": dict(fchunks=(32, D), cchunks=(32, 2), compression="gzip"),
    "lzf_f16": dict(fchunks=(16, D), cchunks=(16, 2), compression="lzf", dtype="f2"),
    "coords_yx_float": dict(yx=True, cdtype="f4"),
    "chunks32_userblock": dict(fchunks=(32, D), cchunks=(32, 2), userblock=512),
    "chunks1_latest_index": dict(fchunks=(1, D), cchunks=(1, 2), maxshape=True, libver="latest"),
    "chunks32_latest_fixed": dict(fchunks=(32, D), cchunks=(32, 2), libver="latest"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n,k", [(300, 40), (2000, 50), (60, 100)])
def test_fast_paths_match_reference(tmp_path, layout, n, k):
    kw = dict(LAYOUTS[layout])
    feats, xy = make_data(n, D)
    if kw.get("dtype") in ("f2",):
        feats = feats.astype(np.float16).astype(np.float32)
    path = write_slide(tmp_path / "s.h5", feats, xy, **kw)
    for rng_seed in (None, 7):
        rng = None if rng_seed is None else np.random.default_rng(rng_seed)
        with _no_warning():
            slide = load_slide(path, k, rng)
        idx = sample_indices(n, k, None if rng_seed is None else np.random.default_rng(rng_seed))
        ref_f, ref_c = reference(feats, xy, idx)
        assert slide.features.dtype == np.float32 and slide.coords.dtype == np.float32
        assert slide.features.flags.c_contiguous and slide.coords.flags.c_contiguous
        np.testing.assert_array_equal(slide.features, ref_f)
        np.testing.assert_array_equal(slide.coords, ref_c)
        assert slide.n_total == n and len(slide.features) == min(n, k)


class _no_warning:
    """Fast paths must not silently fall back (the fallback warns)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_chunk_address_strategies(tmp_path, monkeypatch):
    """Default (v1 B-tree) files: the parsed index, never HDF5's walk or per-chunk reads. Newer
    indexes (libver="latest"): per-chunk reads when few rows are sampled, else one HDF5 walk."""
    feats, xy = make_data(2000, D)
    calls = {"direct": 0, "iter": 0}
    for name in calls:
        orig = getattr(R, {"direct": "_read_chunk_direct", "iter": "_iter_chunk_table"}[name])
        monkeypatch.setattr(R, orig.__name__, lambda *a, _o=orig, _n=name: calls.__setitem__(_n, calls[_n] + 1)
                            or _o(*a))
    old = write_slide(tmp_path / "a.h5", feats, xy, fchunks=(1, D), cchunks=(1, 2), maxshape=True)
    for k in (50, 1500):
        load_slide(old, k, np.random.default_rng(0))
    assert calls == {"direct": 0, "iter": 0}
    new = write_slide(tmp_path / "b.h5", feats, xy, fchunks=(1, D), cchunks=(1, 2), maxshape=True, libver="latest")
    load_slide(new, 50, np.random.default_rng(0))
    assert calls == {"direct": 2, "iter": 0}  # features and coords
    load_slide(new, 1500, np.random.default_rng(0))
    assert calls == {"direct": 2, "iter": 2}


def test_spatial_order_and_coords_yx_swap(tmp_path):
    feats, xy = make_data(500, D)
    a = load_slide(write_slide(tmp_path / "a.h5", feats, xy), 100, np.random.default_rng(1))
    b = load_slide(write_slide(tmp_path / "b.h5", feats, xy, yx=True), 100, np.random.default_rng(1))
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.features, b.features)
    keys = a.coords[:, 1] * 1e6 + a.coords[:, 0]
    assert (np.diff(keys) > 0).all()  # sorted by y, then x


def test_eval_deterministic_train_random(tmp_path):
    feats, xy = make_data(1000, D)
    path = write_slide(tmp_path / "s.h5", feats, xy, fchunks=(32, D), cchunks=(32, 2))
    e1, e2 = load_slide(path, 64), load_slide(path, 64)
    np.testing.assert_array_equal(e1.features, e2.features)
    t1 = load_slide(path, 64, np.random.default_rng(1))
    t1b = load_slide(path, 64, np.random.default_rng(1))
    t2 = load_slide(path, 64, np.random.default_rng(2))
    np.testing.assert_array_equal(t1.features, t1b.features)
    assert not np.array_equal(t1.coords, t2.coords)
    full = load_slide(path)
    assert full.features.shape == (1000, D)


def test_sample_indices_contract():
    assert sample_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(10, 4).tolist() == [1, 3, 6, 8]  # floor((i + .5) * 10 / 4)
    with pytest.raises(ValueError, match="positive"):
        sample_indices(10, 0)
    s = sample_indices(1000, 100, np.random.default_rng(0))
    assert len(s) == 100 and len(np.unique(s)) == 100 and (np.diff(s) > 0).all()


def test_uniform_sampling_marginals():
    """Every tile equally likely (k/N) — the seed's distribution — within sampling error."""
    n, k, draws = 50, 10, 4000
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    for _ in range(draws):
        counts[sample_indices(n, k, rng)] += 1
    p = counts / draws
    assert np.abs(p - k / n).max() < 0.03  # sd ≈ 0.0063; 0.03 ≈ 4.7 sd


def test_chunk_sampling_contract():
    rng = np.random.default_rng(0)
    for n, k, cr in [(1000, 100, 32), (1000, 96, 32), (70, 40, 32), (1000, 100, 1)]:
        s = sample_chunk_indices(n, k, cr, rng)
        assert len(s) == min(n, k) and len(np.unique(s)) == len(s) and (np.diff(s) > 0).all()
        assert s.max() < n
    s = sample_chunk_indices(1000, 96, 32, rng)  # 3 whole chunks
    assert len(np.unique(s // 32)) == 3 and (np.bincount(s // 32)[np.unique(s // 32)] == 32).all()
    e1, e2 = sample_chunk_indices(1000, 100, 32), sample_chunk_indices(1000, 100, 32)
    np.testing.assert_array_equal(e1, e2)
    counts = np.zeros(320)
    for _ in range(3000):  # marginals stay uniform for full chunks
        counts[sample_chunk_indices(320, 64, 32, rng)] += 1
    assert np.abs(counts / 3000 - 0.2).max() < 0.04


def test_chunks_mode_only_changes_compressed_files(tmp_path):
    feats, xy = make_data(640, D)
    gz = write_slide(tmp_path / "g.h5", feats, xy, fchunks=(32, D), cchunks=(32, 2), compression="gzip")
    plain = write_slide(tmp_path / "p.h5", feats, xy, fchunks=(32, D), cchunks=(32, 2))
    a = load_slide(gz, 64, np.random.default_rng(3), sampling="chunks")
    idx = sample_chunk_indices(640, 64, 32, np.random.default_rng(3))
    ref_f, ref_c = reference(feats, xy, idx)
    np.testing.assert_array_equal(a.features, ref_f)
    np.testing.assert_array_equal(a.coords, ref_c)
    b = load_slide(plain, 64, np.random.default_rng(3), sampling="chunks")
    c = load_slide(plain, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(b.features, c.features)
    with pytest.raises(ValueError, match="sampling must be one of"):
        load_slide(plain, 64, sampling="blocks")


def test_slide_pickles_and_meta(tmp_path):
    feats, xy = make_data(100, D)
    path = write_slide(tmp_path / "s.h5", feats, xy, fchunks=(1, D), cchunks=(1, 2))
    s = load_slide(path, 10)
    s2 = pickle.loads(pickle.dumps(s))
    assert isinstance(s2, Slide) and np.array_equal(s2.features, s.features) and s2.path == path
    assert read_slide_meta(path) == (100, D)
    info = scan_slide(path, expected_dim=D)
    assert (info.n, info.dim, info.coords_key, info.layout) == (100, D, "coords", f"chunked(1, {D})")


def test_file_handle_not_kept_open(tmp_path):
    """Nothing h5py survives the call: the file can be replaced/removed right away."""
    feats, xy = make_data(100, D)
    path = write_slide(tmp_path / "s.h5", feats, xy)
    load_slide(path, 10)
    h5py.File(path, "w").close()  # would fail with a lock error if a handle were still open
    with pytest.raises(SlideError, match="no `features` dataset"):
        load_slide(path, 10)


def test_spawned_worker_reads(tmp_path):
    """Reading in a fresh (spawned) interpreter works and agrees (no shared handles)."""
    feats, xy = make_data(200, D)
    path = write_slide(tmp_path / "s.h5", feats, xy, fchunks=(32, D), cchunks=(32, 2))
    code = (
        "import pickle,sys; from wsi_llava.data.slides import load_slide; "
        f"sys.stdout.buffer.write(pickle.dumps(load_slide({path!r}, 20)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    np.testing.assert_array_equal(pickle.loads(out).features, load_slide(path, 20).features)


def test_unwritten_chunks_are_an_error_not_zeros(tmp_path):
    feats, xy = make_data(320, D)
    path = str(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(320, D), chunks=(32, D), dtype="f4")
        d[:160] = feats[:160]  # extraction "crashed" half-way
        f.create_dataset("coords", data=xy)
    with pytest.raises(SlideError, match=r"never written \(rows 160–191 and 4 more chunk row"):
        load_slide(path)
    with pytest.raises(SlideError, match=r"never written \(only 5 of 10 chunks exist"):
        scan_slide(path)


def test_unwritten_contiguous_and_trident_chunks(tmp_path):
    p1 = str(tmp_path / "a.h5")
    with h5py.File(p1, "w") as f:
        f.create_dataset("features", shape=(50, D), dtype="f4")
        f.create_dataset("coords", data=np.zeros((50, 2), np.int64))
    with pytest.raises(SlideError, match="never written"):
        load_slide(p1, 10)
    p2 = str(tmp_path / "b.h5")
    with h5py.File(p2, "w") as f:
        d = f.create_dataset("features", shape=(2000, D), chunks=(1, D), dtype="f4")
        d[:10] = 1.0
        f.create_dataset("coords", data=np.arange(4000, dtype=np.int64).reshape(2000, 2))  # distinct tiles
    with pytest.raises(SlideError, match=r"never written \(rows \d+–\d+"):
        load_slide(p2, 20, np.random.default_rng(0))  # per-chunk path


# --------------------------------------------------------------------------- convert-h5


def test_convert_h5_contiguous_roundtrip(tmp_path, capsys):
    from wsi_llava import cli

    feats, xy = make_data(500, D)
    (tmp_path / "in").mkdir()
    src = write_slide(tmp_path / "in" / "s.h5", feats, xy, yx=True, fchunks=(1, D), cchunks=(1, 2), maxshape=True)
    with h5py.File(src, "a") as f:
        f.attrs["patch_size"] = 256
        f["features"].attrs["encoder"] = "gigapath"
        f.create_dataset("annots", data=np.arange(3))
    out = tmp_path / "out"
    assert cli.main(["convert-h5", str(tmp_path / "in"), "--out", str(out)]) == 0
    dst = str(out / "s.h5")
    with h5py.File(dst, "r") as f:
        assert f["features"].chunks is None and f["features"].dtype == np.float32
        assert f["coords_yx"].chunks is None and "coords" not in f
        assert f.attrs["patch_size"] == 256 and f["features"].attrs["encoder"] == "gigapath"
        assert f["annots"][()].tolist() == [0, 1, 2]
    for rng in (None, 5):
        a = load_slide(src, 64, None if rng is None else np.random.default_rng(rng))
        b = load_slide(dst, 64, None if rng is None else np.random.default_rng(rng))
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
    assert "written" in capsys.readouterr().out
    # second run skips the existing output; --overwrite rewrites it
    assert cli.main(["convert-h5", src, "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert cli.main(["convert-h5", src, "--out", str(out), "--overwrite", "--float16"]) == 0
    with h5py.File(dst, "r") as f:
        assert f["features"].dtype == np.float16
        np.testing.assert_array_equal(f["features"][()], feats.astype(np.float16))


def test_convert_h5_float64_in_float32_out(tmp_path):
    from wsi_llava.data.convert import convert_file

    feats, xy = make_data(40, D)
    src = write_slide(tmp_path / "s.h5", feats.astype(np.float64), xy)
    with pytest.raises(SlideError, match="float64"):
        load_slide(src)
    msg = convert_file(src, tmp_path / "o" / "s.h5")
    assert "contiguous float64 → contiguous float32" in msg
    np.testing.assert_array_equal(load_slide(tmp_path / "o" / "s.h5").features, reference(feats, xy, np.arange(40))[0])


def test_convert_h5_bad_input_leaves_nothing(tmp_path, capsys):
    from wsi_llava import cli
    from wsi_llava.data.convert import convert_file

    feats, xy = make_data(100, D)
    feats[70, 3] = np.nan
    src = write_slide(tmp_path / "s.h5", feats, xy, fchunks=(16, D), cchunks=(16, 2))
    out = tmp_path / "out"
    with pytest.raises(SlideError, match=r"contains NaN \(file row 70"):
        convert_file(src, out / "s.h5", block_rows=16)  # fails after a few blocks were written
    assert list(out.iterdir()) == []  # no partial output, no temp file
    assert cli.main(["convert-h5", src, "--out", str(out)]) == 1
    assert "failed" in capsys.readouterr().err
    with pytest.raises(SlideError, match="overwrite the input"):
        convert_file(src, src)
    big = make_data(10, D)[0] * 1e5
    src2 = write_slide(tmp_path / "big.h5", big, make_data(10, D)[1])
    with pytest.raises(SlideError, match="overflows float16"):
        convert_file(src2, out / "big.h5", float16=True)
    assert list(out.iterdir()) == []


def test_bench_script_runs_small(tmp_path):
    """bench/h5_sampling.py stays runnable (tiny sizes; no timing asserted) and cleans up."""
    import pathlib

    bench = pathlib.Path(__file__).resolve().parents[1] / "bench" / "h5_sampling.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--n", "400", "--d", "16", "--k", "64", "--repeats", "1", "--tmp", str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "chunks (1,D)" in out and "seed/ours" in out and "seed/rows" in out and "targets (wall-clock):" in out
    assert list(tmp_path.iterdir()) == []  # temp files deleted


def test_wrong_parsed_chunk_addresses_are_caught_by_the_probe(tmp_path, monkeypatch):
    """If the parsed chunk index were wrong, the one-row HDF5 cross-check notices, warns and falls
    back to HDF5's own read: the result is still the right tiles."""
    feats, xy = make_data(640, D)
    path = write_slide(tmp_path / "s.h5", feats, xy, fchunks=(32, D), cchunks=(32, 2))
    real = R.chunk_table

    def shifted(f, name, dset, fr):
        table = real(f, name, dset, fr)
        return None if table is None else np.roll(table, 1, axis=0)  # every chunk at its neighbour's address

    monkeypatch.setattr(R, "chunk_table", shifted)
    with pytest.warns(RuntimeWarning, match="disagreed with HDF5"):
        slide = load_slide(path, 100, np.random.default_rng(3))
    ref_f, ref_c = reference(feats, xy, sample_indices(640, 100, np.random.default_rng(3)))
    np.testing.assert_array_equal(slide.features, ref_f)
    np.testing.assert_array_equal(slide.coords, ref_c)
