"""`wsi-llava import`: the provenance sidecar (checksums, counts, dropped items, release sizes) and
`--split-by case` (data/provenance.py, data/import_cli.py); reports show the sidecar."""

import csv
import hashlib
import json

import pytest

from wsi_llava.cli import main as cli_main
from wsi_llava.data.manifest import load_manifest
from wsi_llava.data.provenance import provenance_path, split_by_case

CASES = ["TCGA-21-1083", "TCGA-OL-A5S0", "TCGA-3H-AB3M", "TCGA-A7-A0CJ", "TCGA-E8-A44M", "TCGA-XE-AAO6"]


def slide(case, n):
    return f"{case}-01Z-00-DX{n}.0000aaaa-{n}"


def conv(image, human, gpt):
    return {"id": "x", "image": image, "conversations": [{"from": "human", "value": "<image>\n" + human},
                                                         {"from": "gpt", "value": gpt}]}


@pytest.fixture()
def files(tmp_path):
    d = tmp_path / "wsi-bench"
    d.mkdir()
    h5 = tmp_path / "h5"
    h5.mkdir()
    mc, tf = [], []
    for i, case in enumerate(CASES):
        for n in (1, 2):  # two slides per case
            sid = slide(case, n)
            (h5 / f"{sid}.h5").write_bytes(b"")
            mc.append(conv(f"TCGA-X/{sid}.pt", "Which? A) one B) two C) three", "ABC"[i % 3]))
            tf.append(conv(f"TCGA-X/{sid}.pt", "Is the prognosis poor?", "Yes" if i % 2 else "No"))
    mc.append(conv("TCGA-X/TCGA-ZZ-0000-01Z-00-DX1.pt", "Which? A) one B) two", "B"))  # no H5 file
    mc.append(conv(f"TCGA-X/{slide(CASES[0], 1)}.pt", "Which? A) one B) two", "E"))  # gold not an option
    (d / "Diagnosis_choice_test.json").write_text(json.dumps(mc))
    (d / "Prognosis_TF_question_test.json").write_text(json.dumps(tf))
    return tmp_path, sorted(str(p) for p in d.iterdir())


def test_import_writes_provenance_sidecar(files, capsys):
    root, paths = files
    out = root / "m.csv"
    assert cli_main(["import", "wsi-bench", *paths, "--h5-root", str(root / "h5"), "--out", str(out)]) == 0
    side = provenance_path(out)
    assert side.name == "m.csv.provenance.json"
    rec = json.loads(side.read_text())
    by_name = {f["name"]: f for f in rec["files"]}
    for p in paths:
        name = p.rsplit("/", 1)[1]
        assert by_name[name]["sha256"] == hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert by_name["Diagnosis_choice_test.json"]["n_items"] == 14
    assert rec["n_items_in_files"] == 26 and rec["n_imported"] == 24 and rec["n_dropped"] == 2
    assert rec["categories"]["Diagnosis_choice"] == {"read": 14, "imported": 12, "dropped": 2}
    assert rec["categories"]["Prognosis_TF_question"] == {"read": 12, "imported": 12, "dropped": 0}
    reasons = {d["stage"]: d["reason"] for d in rec["dropped"]}
    assert "not one of the options" in reasons["read"] and "no H5 file" in reasons["match"]
    assert rec["releases"][0]["benchmark"] == "WSI-Bench test" and rec["releases"][0]["matches"] is None
    assert "provenance" in capsys.readouterr().out
    # eval --data shows the sidecar in its report
    rows = load_manifest(out)
    preds = root / "p.jsonl"
    preds.write_text("".join(json.dumps({"key": str(r.row), "question": r.question, "reference": r.answer,
                                         "prediction": r.answer, "choices": list(r.choices) if r.choices else None,
                                         "kind": r.kind, "row": r.row}) + "\n" for r in rows))
    ev = root / "ev"
    assert cli_main(["eval", "--predictions", str(preds), "--data", str(out), "--out", str(ev), "--bootstrap", "0"]) == 0
    report = (ev / "report.md").read_text()
    assert "## Question set" in report and by_name["Diagnosis_choice_test.json"]["sha256"] in report
    assert json.loads((ev / "metrics.json").read_text())["provenance"]["n_dropped"] == 2


def test_split_by_case_keeps_cases_whole(files):
    root, paths = files
    out = root / "split.csv"
    args = ["import", "wsi-bench", *paths, "--h5-root", str(root / "h5"), "--out", str(out),
            "--split-by", "case", "--test-fraction", "0.34", "--seed", "3"]
    assert cli_main(args) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    splits: dict[str, set] = {}
    for r in rows:
        assert r["case_id"] == r["slide_id"][:12]  # TCGA case = first 12 characters of the barcode
        splits.setdefault(r["case_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())  # no case in two splits
    test_cases = {c for c, s in splits.items() if s == {"test"}}
    assert len(test_cases) == 2  # round(0.34 * 6)
    rec = json.loads(provenance_path(out).read_text())
    assert rec["split"]["n_test_cases"] == 2 and rec["split"]["seed"] == 3
    first = out.read_text()
    assert cli_main(args) == 0 and out.read_text() == first  # same seed, same split
    assert cli_main(args[:-1] + ["4"]) == 0
    with open(out, newline="") as f:
        other = {r["case_id"] for r in csv.DictReader(f) if r["split"] == "test"}
    assert len(other) == 2


def test_split_by_case_function():
    cases = ["a", "a", "b", "c", "c", "c", "d"]
    splits, summary = split_by_case(cases, 0.5, seed=0)
    assert {c: s for c, s in zip(cases, splits)} == {c: s for c, s in zip(reversed(cases), reversed(splits))}
    assert summary["n_cases"] == 4 and summary["n_test_cases"] == 2
    again, _ = split_by_case(list(reversed(cases)), 0.5, seed=0)
    assert again == list(reversed(splits))  # depends on the cases, not their order
    assert split_by_case(["only"], 0.5, 0)[1]["n_test_cases"] in (0, 1)
    with pytest.raises(ValueError):
        split_by_case(cases, 1.0, 0)
