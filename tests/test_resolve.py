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


@pytest.fixture(scope="module")
def model_dir(tiny_llm, tmp_path_factory):
    import torch

    from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration

    torch.manual_seed(0)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, vision_mode="none", mm_hidden_size=16,
                                                           image_seq_length=4, vision_feature_select_mode="prompt_topk")
    out = tmp_path_factory.mktemp("resolve_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.timeout(300)
def test_chat_and_predict_name_slides_through_the_resolver(model_dir, cohort, tmp_path, capsys):
    import csv
    import json

    from wsi_llava.cli import main as cli

    slide = cohort.slides[0]
    common = ["--model", str(model_dir), "--device", "cpu", "--precision", "fp32", "--max-new-tokens", "3"]
    q = ["--question", "What is the diagnosis?"]
    assert cli(["chat", *common, "--slide", str(slide), *q]) == 0
    by_path = capsys.readouterr().out
    assert cli(["chat", *common, "--slide", slide.stem, "--slide-root", str(slide.parent), *q]) == 0
    assert capsys.readouterr().out == by_path
    assert cli(["chat", *common, "--slide", slide.stem + "x", "--slide-root", str(slide.parent), *q]) == 2
    assert f"did you mean '{slide.stem}'" in capsys.readouterr().err

    # predict --slide-root: h5_path from another machine; rows found by slide_id instead
    with open(cohort.test_csv, newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    moved = tmp_path / "moved.csv"
    with open(moved, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "h5_path": "/elsewhere/" + r["h5_path"]})
        w.writerow({**rows[0], "h5_path": "/elsewhere/x.h5", "slide_id": rows[0]["slide_id"] + "-typo"})
    p_ref, p_moved = tmp_path / "ref.jsonl", tmp_path / "moved.jsonl"
    with open(tmp_path / "ref.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "h5_path": str(cohort.root / r["h5_path"])} for r in rows)
    assert cli(["predict", *common, "--data", str(tmp_path / "ref.csv"), "--out", str(p_ref)]) == 0
    assert cli(["predict", *common, "--data", str(moved), "--out", str(p_moved), "--slide-root",
                str(cohort.root)]) == 1  # the typo row is an error line
    ref = [json.loads(line)["prediction"] for line in p_ref.read_text().splitlines()]
    got = [json.loads(line)["prediction"] for line in p_moved.read_text().splitlines()]
    assert got == ref
    errors = [json.loads(line) for line in (tmp_path / "moved.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "did you mean" in errors[0]["error"] and rows[0]["slide_id"] in errors[0]["error"]
