"""Benchmark importers: WSI-Bench JSON, SlideBench-VQA CSV, SlideChat JSON → manifest (data/importers.py)."""

import csv
import json

import pytest

from wsi_llava.cli import main as cli_main
from wsi_llava.data.importers import SlideIndex, read_slidebench, read_slidechat, read_wsi_bench, tcga_barcode
from wsi_llava.data.manifest import load_manifest

S1 = "TCGA-21-1083-01Z-00-DX1.8288ca92-b611-4acf-986e-0b8a3f620b94"
S2 = "TCGA-OL-A5S0-01Z-00-DX1.49A7AC9D-C186-406C-BA67-2D73DE82E13B"
S3 = "TCGA-3H-AB3M-01Z-00-DX1.9CD8A3B1-0F0F-418C-B54F-CBA22BB19469"
MISSING = "TCGA-XX-0000-01Z-00-DX1.00000000-0000-0000-0000-000000000000"


def conv(image, human, gpt, id_="x-1"):
    return {"id": id_, "image": image, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


@pytest.fixture()
def bench(tmp_path):
    """Small WSI-Bench-format files (wording from the public test split) and an H5 folder."""
    d = tmp_path / "wsi-bench"
    d.mkdir()
    files = {
        "Diagnosis_choice_test.json": [
            conv(f"TCGA-LUSC/{S1}.pt", "<image>\nBased on the observed features, what do you think is the correct "
                 "histological classification of the tumor? A) Adenocarcinoma B) Squamous cell carcinoma, keratinizing "
                 "type C) Squamous cell carcinoma, non-keratinizing type D) Small cell lung carcinoma", "C"),
            conv(f"TCGA-BRCA/{S2}.pt", "<image>\nWhat is the molecular subtype of this breast cancer? "
                 "A) Luminal A   B) Luminal B   C) HER2-enriched   D) Basal", 'B "'),
            conv(f"TCGA-BRCA/{S2}.pt", "<image>\nWhich grade? A) 1 B) 2", "E"),  # gold not an option → skipped
            conv(f"TCGA-XX/{MISSING}.pt", "<image>\nWhich? A) x B) y", "A"),  # slide has no H5 → unmatched
        ],
        "Prognosis_TF_question_test.json": [
            conv(f"TCGA-MESO/{S3}.pt", "<image>\nGiven the patient\u2019s diagnosis of malignant epithelioid "
                 "mesothelioma, is the prognosis poor?", "Yes"),
        ],
        "Grading_test.json": [
            conv(f"TCGA-LUSC/{S1}.pt", "<image>\nWhat is the grading for this squamous cell carcinoma?",
                 "This squamous cell carcinoma is graded as Grade III."),
        ],
        "1_Report_test.json": [
            conv(f"TCGA-LUSC/{S1}.pt", "<image>\nWhat are the main observations in the whole slide histopathology image?",
                 "Sheets and nests of atypical squamous cells."),
        ],
    }
    for name, data in files.items():
        (d / name).write_text(json.dumps(data), encoding="utf-8")
    h5 = tmp_path / "h5" / "nested"
    h5.mkdir(parents=True)
    (h5 / f"{S1}.h5").write_bytes(b"")  # full id
    (h5 / f"{S2.split('.')[0]}.h5").write_bytes(b"")  # barcode only
    (h5 / f"{S3}.h5").write_bytes(b"")
    return tmp_path, sorted(str(p) for p in d.iterdir())


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_import_wsi_bench_command(bench, capsys):
    root, files = bench
    out = root / "out" / "manifest.csv"
    assert cli_main(["import", "wsi-bench", *files, "--h5-root", str(root / "h5"), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["h5_path", "caption", "question", "answer", "slide_id", "dataset", "choices", "split", "case_id", "category"]
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    assert set(by_cat) == {"Diagnosis_choice", "Prognosis_TF_question", "Grading", "1_Report"}
    dx = by_cat["Diagnosis_choice"]
    assert [r["answer"] for r in dx] == ["C", "B"]
    assert json.loads(dx[0]["choices"])[2] == "Squamous cell carcinoma, non-keratinizing type"
    assert dx[0]["question"].startswith("Based on the observed features") and "A)" not in dx[0]["question"]
    assert json.loads(dx[1]["choices"]) == ["Luminal A", "Luminal B", "HER2-enriched", "Basal"]
    assert dx[1]["h5_path"] == "../h5/nested/TCGA-OL-A5S0-01Z-00-DX1.h5"  # matched by barcode, relative path
    assert dx[0]["dataset"] == "TCGA-LUSC" and dx[0]["split"] == "test" and dx[0]["case_id"] == "TCGA-21-1083"
    tf = by_cat["Prognosis_TF_question"][0]
    assert tf["answer"] == "Yes" and tf["choices"] == "" and "<image>" not in tf["question"]
    rep = by_cat["1_Report"][0]
    assert rep["caption"].startswith("Sheets") and rep["question"] == "" and rep["answer"] == ""
    # not imported: listed with reasons, and counted in the summary
    skipped = read_csv(root / "out" / "manifest.unmatched.csv")
    reasons = {r["slide_id"]: r["reason"] for r in skipped}
    assert len(skipped) == 2
    assert "'E' is not one of the options" in reasons[S2]
    assert "no H5 file" in reasons[MISSING]
    assert "NOT imported: 2 item(s)" in capsys.readouterr().err
    # the manifest loads with the project's loader, kinds as intended
    kinds = sorted(r.kind for r in load_manifest(out))
    assert kinds == ["mc", "mc", "report", "vqa", "vqa"]
    assert cli_main(["import", "wsi-bench", *files, "--h5-root", str(root / "h5"), "--out", str(out), "--strict"]) == 1


def test_import_fails_when_nothing_matches(bench, tmp_path, capsys):
    root, files = bench
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "none.csv"
    assert cli_main(["import", "wsi-bench", *files, "--h5-root", str(empty), "--out", str(out)]) == 2
    assert not out.exists() and (tmp_path / "none.unmatched.csv").exists()
    assert "no item matched" in capsys.readouterr().err


def test_slide_index_rules(tmp_path):
    for name in ("TCGA-AA-0001-01Z-00-DX1.abc.h5", "TCGA-AA-0002-01Z-00-DX1.h5", "a/slide7.h5", "b/slide7.h5",
                 "TCGA-AA-0003-01Z-00-DX1.u1.h5", "TCGA-AA-0003-01Z-00-DX1.u2.hdf5", "notes.txt"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    idx = SlideIndex(tmp_path)
    assert idx.n_files == 6
    assert idx.match("TCGA-AA-0001-01Z-00-DX1.abc")[0].endswith("DX1.abc.h5")  # exact
    assert idx.match("TCGA-AA-0001-01Z-00-DX1")[0].endswith("DX1.abc.h5")  # barcode → file with uuid
    assert idx.match("TCGA-AA-0002-01Z-00-DX1.zzz")[0].endswith("0002-01Z-00-DX1.h5")  # id with uuid → barcode file
    assert idx.match("TCGA-AA-0001-01Z-00-DX2")[0] is None  # another slide of the patient never matches
    assert "ambiguous" in idx.match("slide7")[1]
    assert "ambiguous" in idx.match("TCGA-AA-0003-01Z-00-DX1")[1]
    assert "no H5 file" in idx.match("slide8")[1]
    assert tcga_barcode("tcga-aa-0001-01z-00-dx1.x") == "TCGA-AA-0001-01Z-00-DX1" and tcga_barcode("17") is None


SLIDEBENCH_TCGA = """ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer
0,TCGA-A7-A0CJ-01Z-00-DX2,BRCA,Microscopy,Tissue Architecture,What is the predominant growth pattern?,Solid sheets,Glandular,Papillary,Cribriform,B
1,TCGA-A7-A0CJ-01Z-00-DX2,BRCA,Diagnosis,Disease Classification,Which diagnosis fits best?,Invasive ductal carcinoma,Invasive lobular carcinoma,,,Invasive lobular carcinoma
2,TCGA-ZZ-9999-01Z-00-DX1,LUAD,Diagnosis,Staging,What is the T stage?,T1,T2,T3,T4,C
3,TCGA-A7-A0CJ-01Z-00-DX2,BRCA,Diagnosis,Grading,Which grade?,Grade 1,Grade 2,Grade 3,,D
"""

SLIDEBENCH_BCNB = """ID,Slide,Task,Question,A,B,C,D,Answer
0,1,ER Status Classification,What is the ER status of this tumor?,Positive,Negative,,,A
1,2,HER2 Status Classification,What is the HER2 status?,HER2 0,HER2 1+,HER2 2+,HER2 3+,D
"""


def test_slidebench_reader_tcga_and_bcnb(tmp_path):
    tcga = tmp_path / "SlideBench-VQA-TCGA.csv"
    tcga.write_text(SLIDEBENCH_TCGA, encoding="utf-8")
    items, skipped = read_slidebench(str(tcga))
    assert [i.answer for i in items] == ["B", "B", "C"]
    assert items[1].choices == ["Invasive ductal carcinoma", "Invasive lobular carcinoma"]  # empty C/D dropped
    assert items[0].category == "Tissue Architecture" and items[0].dataset == "TCGA-BRCA"
    assert items[0].case_id == "TCGA-A7-A0CJ" and items[0].split == "test"
    assert len(skipped) == 1 and "line 5" == skipped[0].item and "'D' is not one of the options" in skipped[0].reason
    bcnb = tmp_path / "SlideBench-VQA-BCNB.csv"
    bcnb.write_text(SLIDEBENCH_BCNB, encoding="utf-8")
    items, skipped = read_slidebench(str(bcnb))
    assert not skipped and [i.category for i in items] == ["ER Status Classification", "HER2 Status Classification"]
    assert items[0].dataset == "SlideBench-VQA-BCNB" and items[0].case_id == "1" and items[0].choices == ["Positive", "Negative"]
    items, _ = read_slidebench(str(tcga), category_column="Broad Category", dataset="X")
    assert items[0].category == "Microscopy" and items[0].dataset == "X"
    bad = tmp_path / "bad.csv"
    bad.write_text("Slide,Question,A,B\n1,q,x,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Answer"):
        read_slidebench(str(bad))


def test_import_slidebench_command(tmp_path):
    tcga = tmp_path / "sb.csv"
    tcga.write_text(SLIDEBENCH_TCGA, encoding="utf-8")
    (tmp_path / "h5").mkdir()
    (tmp_path / "h5" / "TCGA-A7-A0CJ-01Z-00-DX2.5b1b2d7c-1111.h5").write_bytes(b"")
    out = tmp_path / "m.csv"
    assert cli_main(["import", "slidebench", str(tcga), "--h5-root", str(tmp_path / "h5"), "--out", str(out), "--absolute"]) == 0
    rows = read_csv(out)
    assert len(rows) == 2 and rows[0]["h5_path"] == str(tmp_path / "h5" / "TCGA-A7-A0CJ-01Z-00-DX2.5b1b2d7c-1111.h5")
    recs = load_manifest(out)
    assert [r.kind for r in recs] == ["mc", "mc"] and recs[1].choices == ("Invasive ductal carcinoma", "Invasive lobular carcinoma")
    skipped = read_csv(tmp_path / "m.unmatched.csv")
    assert {s["slide_id"] for s in skipped} == {"TCGA-ZZ-9999-01Z-00-DX1", "TCGA-A7-A0CJ-01Z-00-DX2"}


def test_slidechat_json(tmp_path):
    data = [
        {"id": "train::0", "image": ["TCGA-A7-A0CJ-01Z-00-DX2.csv"], "conversations": [
            {"from": "human", "value": "How does vascular invasion influence prognosis?\n<image>"},
            {"from": "gpt", "value": "It is an adverse prognostic factor. "},
            {"from": "human", "value": "What grade is it?"},
            {"from": "gpt", "value": "Nottingham grade II."}]},
        {"id": "train::1", "image": ["a.csv", "b.csv"], "conversations": []},
    ]
    path = tmp_path / "train_data_example.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    items, skipped = read_slidechat(str(path))
    assert [(i.question, i.answer) for i in items] == [
        ("How does vascular invasion influence prognosis?", "It is an adverse prognostic factor."),
        ("What grade is it?", "Nottingham grade II."),
    ]
    assert items[0].split == "train" and items[0].dataset == "SlideInstruction" and items[0].item == "0.0"
    assert len(skipped) == 1 and "exactly one slide" in skipped[0].reason
    (tmp_path / "h5").mkdir()
    (tmp_path / "h5" / "TCGA-A7-A0CJ-01Z-00-DX2.h5").write_bytes(b"")
    out = tmp_path / "m.csv"
    assert cli_main(["import", "slidechat", str(path), "--h5-root", str(tmp_path / "h5"), "--out", str(out)]) == 0
    assert [r.kind for r in load_manifest(out)] == ["vqa", "vqa"]


def test_wsi_bench_malformed_items_are_reported(tmp_path):
    path = tmp_path / "Staging_choice_test.json"
    path.write_text(json.dumps([
        {"id": "1", "image": "TCGA-THCA/s.pt", "conversations": [{"from": "human", "value": "<image>\nWhat stage?"},
                                                                {"from": "gpt", "value": "B"}]},
        {"id": "2", "image": 5, "conversations": []},
        {"id": "3", "image": "TCGA-THCA/s.pt", "conversations": [{"from": "gpt", "value": "B"}]},
    ]), encoding="utf-8")
    items, skipped = read_wsi_bench(str(path))
    assert items == [] and len(skipped) == 3
    assert "no 'A) … B) …' options" in skipped[0].reason
    assert "string 'image'" in skipped[1].reason and "without a question" in skipped[2].reason
    (tmp_path / "x.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_wsi_bench(str(tmp_path / "x.json"))
