"""The one slide-name resolver (issue #16): relative path, stem, slide barcode, patient barcode."""

from __future__ import annotations

import pytest

from wsi_llava.data.resolve import AmbiguousSlideError, SlideNotFoundError, SlideResolver
from wsi_llava.errors import WsiLlavaError

NAMES = ("TCGA-A1-A0SB-01Z-00-DX1.7a3c.h5", "TCGA-B2-0002-01Z-00-DX1.aa.h5", "TCGA-B2-0002-01Z-00-DX2.bb.h5",
         "a/slide7.h5", "b/slide7.hdf5", "c/other.h5", "notes.txt")


@pytest.fixture
def root(tmp_path):
    for name in NAMES:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return tmp_path


def test_stem_barcode_and_relative_path(root):
    r = SlideResolver(root)
    assert len(r) == 6  # notes.txt is not a slide file
    want = root / "TCGA-A1-A0SB-01Z-00-DX1.7a3c.h5"
    assert r.resolve("TCGA-A1-A0SB-01Z-00-DX1.7a3c") == want  # stem
    assert r.resolve("TCGA-A1-A0SB-01Z-00-DX1") == want  # slide barcode
    assert r.resolve("tcga-a1-a0sb-01z-00-dx1.other-uuid") == want  # barcode of a name with another uuid
    assert r.resolve("TCGA-A1-A0SB") == want  # patient barcode: the patient's one slide
    assert r.resolve("a/slide7.h5") == root / "a" / "slide7.h5"  # relative path
    assert r.resolve("b/slide7") == root / "b" / "slide7.hdf5"  # relative path without the suffix
    assert r.resolve("other") == root / "c" / "other.h5"


def test_ambiguity_lists_every_candidate(root):
    r = SlideResolver(root)
    with pytest.raises(AmbiguousSlideError, match="ambiguous") as e:
        r.resolve("slide7")
    assert isinstance(e.value, WsiLlavaError)
    assert str(root / "a" / "slide7.h5") in str(e.value) and str(root / "b" / "slide7.hdf5") in str(e.value)
    assert len(e.value.candidates) == 2
    with pytest.raises(AmbiguousSlideError) as e:  # two slides of one patient
        r.resolve("TCGA-B2-0002")
    assert "DX1.aa.h5" in str(e.value) and "DX2.bb.h5" in str(e.value)


def test_a_slide_barcode_never_matches_another_slide_of_the_patient(root):
    r = SlideResolver(root)
    with pytest.raises(SlideNotFoundError):
        r.resolve("TCGA-A1-A0SB-01Z-00-DX2")
    with pytest.raises(SlideNotFoundError):  # patient step off (import)
        SlideResolver(root, patient_barcode=False).resolve("TCGA-A1-A0SB")


def test_not_found_suggests_close_names(root):
    with pytest.raises(SlideNotFoundError, match="no H5 file") as e:
        SlideResolver(root).resolve("TCGA-A1-A0SC-01Z-00-DX1")  # a typo in the patient
    assert "did you mean" in str(e.value) and "'TCGA-A1-A0SB-01Z-00-DX1.7a3c'" in str(e.value)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, WsiLlavaError)
    with pytest.raises(SlideNotFoundError) as e:
        SlideResolver(root).resolve("zzzzzzzz")
    assert "did you mean" not in str(e.value) and e.value.suggestions == []


def test_list_of_files_and_missing_folder(root, tmp_path):
    files = [root / "a" / "slide7.h5", root / "c" / "other.h5"]
    r = SlideResolver(files)
    assert r.resolve("slide7") == files[0]
    assert r.resolve(str(files[1])) == files[1]  # the path as given
    with pytest.raises(WsiLlavaError, match="not a folder"):
        SlideResolver(tmp_path / "missing")
