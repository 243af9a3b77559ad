"""One tile-size rule (issue #16): H5 attributes, else the most common coordinate spacing, else an error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from wsi_llava.data.tile_size import TileSizeError, read_tile_size, spacing_tile_size, tile_size_rule


def _h5(path, coords, coord_attrs=None, file_attrs=None, yx=False):
    with h5py.File(path, "w") as f:
        c = np.asarray(coords, dtype=np.int64)
        f.create_dataset("features", data=np.zeros((len(c), 4), np.float32))
        d = f.create_dataset("coords_yx" if yx else "coords", data=c[:, ::-1] if yx else c)
        d.attrs.update(coord_attrs or {})
        f.attrs.update(file_attrs or {})
    return path


# a 512-px CLAM grid with holes: every other column of the row below is empty
GRID = [[x, 0] for x in range(0, 512 * 6, 512)] + [[x, 512] for x in range(0, 512 * 6, 1024)]


def test_attributes(tmp_path):
    t = read_tile_size(_h5(tmp_path / "a.h5", GRID, coord_attrs={"patch_size": 512, "patch_level": 0}))
    assert (t.size, t.source) == (512, "attribute patch_size (coords)")
    t = read_tile_size(_h5(tmp_path / "b.h5", GRID, file_attrs={"patch_size_level0": 512}))
    assert (t.size, t.source) == (512, "attribute patch_size_level0 (file)")
    clam = {"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])}
    t = read_tile_size(_h5(tmp_path / "c.h5", GRID, coord_attrs=clam))
    assert t.size == 512 and "downsample 2" in t.source and "patch_level 1" in t.source


def test_spacing_only(tmp_path):
    t = read_tile_size(_h5(tmp_path / "s.h5", GRID))  # no attributes: the viewer's and heatmap's answer agree
    assert t.size == 512 and t.source.startswith("coordinate spacing")
    t = read_tile_size(_h5(tmp_path / "yx.h5", GRID, yx=True))
    assert t.size == 512
    # patch_size at a level > 0 with no downsample: its level-0 size is unknown, so the spacing decides
    t = read_tile_size(_h5(tmp_path / "l1.h5", GRID, coord_attrs={"patch_size": 256, "patch_level": 1}))
    assert t.size == 512 and "spacing" in t.source
    # the most common gap, not the smallest: one stray tile 64 px off the grid does not decide
    coords = np.array(GRID + [[64, 1024]])
    assert spacing_tile_size(coords).size == 512


def test_attribute_wins_when_they_disagree(tmp_path):
    # tissue every other column: spacing says 1024, the attribute 512 (coords) and 256 (file: coords first)
    sparse = [[x, y] for x in range(0, 8192, 1024) for y in range(0, 4096, 1024)]
    assert spacing_tile_size(np.array(sparse)).size == 1024
    t = read_tile_size(_h5(tmp_path / "d.h5", sparse, coord_attrs={"patch_size": 512}, file_attrs={"patch_size": 256}))
    assert (t.size, t.source) == (512, "attribute patch_size (coords)")


def test_no_size_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(TileSizeError, match="one.h5.*no tile size"):
        read_tile_size(_h5(tmp_path / "one.h5", [[100, 200]]))
    with pytest.raises(TileSizeError, match="bad.h5.*patch_size"):
        read_tile_size(_h5(tmp_path / "bad.h5", GRID, file_attrs={"patch_size": 0}))
    with pytest.raises(TileSizeError, match="x.h5"):
        tile_size_rule([], None, "x.h5")


def test_malformed_patch_level_is_a_tile_size_error():
    from wsi_llava.data.tile_size import TileSizeError, attribute_tile_size

    for bad in ("two", np.array([]), -1):
        with pytest.raises(TileSizeError, match="patch_level"):
            attribute_tile_size([("coords", {"patch_size": 256, "patch_level": bad})], "x.h5")
