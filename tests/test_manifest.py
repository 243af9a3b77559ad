"""Manifest CSV / sharegpt JSON → Records; multiple-choice normalisation."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from wsi_llava.data.choices import choice_letter, option_lines
from wsi_llava.data.manifest import ManifestError, Record, load_manifest, parse_choices, read_manifest

HEADER = "h5_path,caption,question,answer,slide_id,dataset"


def write(tmp_path, text: str, name: str = "m.csv", encoding: str = "utf-8") -> str:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return str(p)


def test_csv_kinds_paths_and_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    p = write(
        tmp_path,
        HEADER + ",choices,split,case_id,category\n"
        "sub/a.h5,,What grade?,Grade 2,s1,tcga,,train,c1,grading\n"
        'b.h5,"Invasive carcinoma,\nsecond line",,,s2,tcga,,train,,\n'
        "/abs/c.h5,,Which?,B,s3,tcga,\"['x', 'y']\",test,,\n",
    )
    recs = load_manifest(p)
    assert [r.kind for r in recs] == ["vqa", "report", "mc"]
    assert [r.row for r in recs] == [2, 3, 5]  # quoted newline: row 3 spans lines 3-4
    assert recs[0].h5_path == os.path.join(str(tmp_path), "sub", "a.h5")
    assert recs[2].h5_path == "/abs/c.h5"
    assert recs[0].case_id == "c1" and recs[0].category == "grading" and recs[1].case_id is None
    assert recs[1].caption == "Invasive carcinoma,\nsecond line" and recs[1].question == ""
    assert recs[2].choices == ("x", "y") and recs[2].split == "test"
    assert recs[0].source == p
    assert pickle.loads(pickle.dumps(recs[0])) == recs[0]


def test_utf8_sig_and_optional_columns_absent(tmp_path):
    p = write(tmp_path, "\ufeff" + HEADER + "\na.h5,Tumour é,,,s1,d\n")
    (r,) = load_manifest(p)
    assert r.caption == "Tumour é" and r.choices is None and r.split is None and r.kind == "report"


def test_split_filters_this_file_only(tmp_path):
    p = write(tmp_path, HEADER + ",split\na.h5,,Q1,A1,s1,d,train\nb.h5,,Q2,A2,s2,d,test\nc.h5,,Q3,A3,s3,d,train\n")
    assert [r.slide_id for r in load_manifest(p, split="train")] == ["s1", "s3"]
    assert [r.slide_id for r in load_manifest(p, split="test")] == ["s2"]
    with pytest.raises(ManifestError, match=r"no rows with split='val' \(splits present: test, train\)"):
        load_manifest(p, split="val")
    # a manifest without split values is itself the split: kept whole
    q = write(tmp_path, HEADER + "\na.h5,,Q1,A1,s1,d\n", name="eval.csv")
    assert len(load_manifest(q, split="test")) == 1


def test_split_filter_ignores_bad_rows_of_other_splits(tmp_path):
    p = write(tmp_path, HEADER + ",split\na.h5,,Q1,A1,s1,d,train\nb.h5,,Q2,,s2,d,test\n")
    assert len(load_manifest(p, split="train")) == 1
    with pytest.raises(ManifestError, match=r"line 3 \[answer\]"):
        load_manifest(p, split="test")


def test_missing_columns_named(tmp_path):
    p = write(tmp_path, "h5_path,question,answer,slide_id\na.h5,Q,A,s1\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert "required column 'caption' missing" in msg and "required column 'dataset' missing" in msg
    assert p in msg and "line 1" in msg


def test_row_errors_name_file_row_field(tmp_path):
    p = write(
        tmp_path,
        HEADER + ",choices\n"
        "a.h5,,,,s1,d,\n"                      # line 2: nothing to train on
        "b.h5,,Q?,,s2,d,\n"                    # line 3: question without answer
        "c.h5,,Q?,Z,s3,d,\"[\"\"x\"\",\"\"y\"\"]\"\n"  # line 4: answer not among choices
        "d.h5,,Q?,A,s4,d,[oops\n"              # line 5: unparseable choices
        "e.h5,,Q?,A,s5\n",                     # line 6: too few fields
    )
    recs, probs = read_manifest(p)
    assert recs == []
    got = {(pr.row, pr.field) for pr in probs}
    assert got == {(2, "question"), (3, "answer"), (4, "answer"), (5, "choices"), (6, "csv")}
    text = {pr.row: pr.format() for pr in probs}
    assert text[2] == f"{p} line 2 [question]: empty question and empty caption; nothing to train on"
    assert "'Z' is not among the choices (A) x, B) y)" in text[4]
    with pytest.raises(ManifestError, match="5 problem"):
        load_manifest(p)


def test_non_utf8_names_line(tmp_path):
    p = write(tmp_path, HEADER + "\na.h5,,Qu'est-ce,Réponse,s1,d\n", encoding="latin-1")
    with pytest.raises(ManifestError, match=r"line 2 \[encoding\]: not UTF-8: byte b'\\xe9' at line 2"):
        load_manifest(p)


def test_sharegpt_json_and_jsonl(tmp_path):
    items = [
        {"messages": [{"role": "user", "content": "<image>What organ?"}, {"role": "assistant", "content": "Lung"},
                      {"role": "user", "content": "Grade?"}, {"role": "assistant", "content": "2"}],
         "images": ["slides/x1.h5"]},
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>\nQ"},
                           {"from": "gpt", "value": "A"}],
         "images": ["/abs/y.h5"], "split": "train", "choices": ["A", "B"]},
    ]
    p = write(tmp_path, json.dumps(items), name="d.json")
    recs = load_manifest(p)
    assert [(r.slide_id, r.question, r.answer, r.row) for r in recs] == [
        ("x1", "What organ?", "Lung", 1), ("x1", "Grade?", "2", 1), ("y", "Q", "A", 2)]
    assert recs[0].h5_path == os.path.join(str(tmp_path), "slides", "x1.h5")
    assert recs[2].kind == "mc" and recs[0].kind == "vqa"
    q = write(tmp_path, "\n".join(json.dumps(i) for i in items) + "\n{bad\n", name="d.jsonl")
    recs, probs = read_manifest(q)
    assert len(recs) == 3 and [(pr.row, pr.field) for pr in probs] == [(3, "json")]
    assert probs[0].format().startswith(f"{q} line 3 [json]")


def test_sharegpt_bad_items(tmp_path):
    items = [
        {"messages": [{"role": "user", "content": "Q"}], "images": ["a.h5"]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "images": []},
        {"messages": [{"role": "robot", "content": "Q"}], "images": ["a.h5"]},
    ]
    p = write(tmp_path, json.dumps(items), name="d.json")
    recs, probs = read_manifest(p)
    assert recs == [] and [(pr.row, pr.field) for pr in probs] == [(1, "messages"), (2, "images"), (3, "messages[0]")]
    assert probs[0].format().startswith(f"{p} item 1 [messages]")


@pytest.mark.parametrize(
    "answer,expected",
    [("B", "B"), ("b", "B"), ("B)", "B"), ("(B)", "B"), ("B.", "B"), ("B. Adenocarcinoma", "B"),
     ("b) adenocarcinoma", "B"), ("adenocarcinoma", "B"), ("  ADENOCARCINOMA. ", "B"),
     ("Squamous-cell carcinoma", "A"), ("squamous cell, carcinoma", "A"), ("E", None), ("lymphoma", None),
     ("A. Adenocarcinoma", None), ("", None), ("C: whatever", "C")],
)
def test_choice_letter(answer, expected):
    choices = ["Squamous cell carcinoma", "Adenocarcinoma", "Normal", "Other"]
    assert choice_letter(answer, choices) == expected


def test_choice_letter_text_wins_and_ambiguity():
    assert choice_letter("b", ["a", "b"]) == "B"
    assert choice_letter("a", ["b", "a"]) == "B"  # the option text "a" is option B
    assert choice_letter("same", ["Same", "same."]) is None  # two options normalise alike
    assert choice_letter("A cat", ["A dog", "A cat"]) == "B"


def test_option_lines_and_parse_choices():
    assert option_lines(["first", "second"]) == "A) first\nB) second"
    assert parse_choices('["a", "b"]') == ("a", "b")
    assert parse_choices("('a', 'b')") == ("a", "b")
    assert parse_choices("") is None and parse_choices("[]") is None
    with pytest.raises(ValueError, match="only one option"):
        parse_choices('["a"]')
    with pytest.raises(ValueError, match="cannot parse"):
        parse_choices("a, b")


def test_record_kind_property():
    base = dict(h5_path="/x.h5", slide_id="s", dataset="d", caption="", choices=None, split=None,
                case_id=None, category=None, source="m.csv", row=2)
    assert Record(question="Q", answer="A", **base).kind == "vqa"
    assert Record(question="", answer="", **{**base, "caption": "c"}).kind == "report"
    assert Record(question="Q", answer="B", **{**base, "choices": ("x", "y")}).kind == "mc"


def test_image_path_beside_or_instead_of_h5(tmp_path):
    """``image_path`` resolves like ``h5_path``; with the column the ``h5_path`` column may be left out;
    a missing image is a problem naming file, row and field; ``validate`` opens the image."""
    import numpy as np
    from PIL import Image

    from wsi_llava.data.validate import validate_records

    (tmp_path / "roi").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "roi" / "a.png")
    (tmp_path / "roi" / "broken.png").write_bytes(b"not an image")
    path = write(tmp_path, "image_path,caption,question,answer,slide_id,dataset\n"
                           "roi/a.png,,Q?,A,a,d\nroi/gone.png,,Q?,A,b,d\nroi/broken.png,,Q?,A,c,d\n")
    good, problems = read_manifest(path)
    assert [r.image_path for r in good] == [str(tmp_path / "roi" / "a.png"), str(tmp_path / "roi" / "broken.png")]
    assert good[0].h5_path == ""
    [p] = problems
    assert (p.row, p.field) == (3, "image_path") and "gone.png" in p.message and "m.csv line 3 [image_path]" in p.format()
    with pytest.raises(ManifestError, match=r"line 3 \[image_path\]: ROI image not found"):
        load_manifest(path)
    [bad] = validate_records(good)
    assert (bad.row, bad.field) == (4, "image_path") and "broken.png" in bad.message
    # beside h5_path; a row with neither is still refused
    both = write(tmp_path, HEADER + ",image_path\nx.h5,,Q?,A,a,d,roi/a.png\n,,Q?,A,b,d,\n", name="both.csv")
    good, problems = read_manifest(both)
    assert good[0].h5_path == str(tmp_path / "x.h5") and good[0].image_path.endswith("a.png")
    assert [(p.row, p.field) for p in problems] == [(3, "h5_path")]
    # sharegpt: an image in `images` becomes image_path
    sg = tmp_path / "sg.jsonl"
    sg.write_text(json.dumps({"images": ["roi/a.png"], "messages": [{"role": "user", "content": "<image>Q?"},
                                                                    {"role": "assistant", "content": "A"}]}) + "\n")
    [rec] = load_manifest(sg)
    assert (rec.h5_path, rec.image_path, rec.slide_id) == ("", str(tmp_path / "roi" / "a.png"), "a")


def test_write_manifest_csv_is_atomic_and_round_trips(tmp_path):
    """Written through fileio.atomic_write_text: the file reads back as the same rows, and a failed write
    (a row with a column the header lacks) leaves the previous file as it was and no temporary file."""
    from wsi_llava.data.manifest_writer import MANIFEST_COLUMNS, write_manifest_csv

    row = {"h5_path": "a.h5", "caption": "", "question": "Which?", "answer": "B", "slide_id": "s1", "dataset": "d",
           "choices": '["x", "y"]', "split": "test", "case_id": "c1", "category": "cat"}
    out = write_manifest_csv(tmp_path / "sub" / "m.csv", [row])
    assert out == tmp_path / "sub" / "m.csv"
    assert out.read_text(encoding="utf-8").splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    (rec,) = load_manifest(out)
    assert (rec.question, rec.answer, rec.choices, rec.split, rec.case_id) == ("Which?", "B", ("x", "y"), "test", "c1")
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_manifest_csv(out, [row, {**row, "extra": "?"}])
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.csv"]
