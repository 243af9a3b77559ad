"""`wsi-llava eval`: metrics.json, report.md, summary table, --data join, --compare (eval/report.py, eval/cli.py)."""

import csv
import json

import pytest

from wsi_llava.cli import main as cli_main
from wsi_llava.eval.cli import load_prediction_rows
from wsi_llava.eval.metrics import evaluate_predictions
from wsi_llava.eval.rows import EvalInputError
from wsi_llava.eval.report import render_markdown, summary_table

DIAG = ["Adenocarcinoma", "Squamous cell carcinoma, keratinizing type",
        "Squamous cell carcinoma, non-keratinizing type", "Small cell lung carcinoma"]


def preds(zeroed=False):
    rows = [
        {"key": "s1\tWhich type?", "slide_id": "s1", "question": "Which type?", "reference": "C",
         "prediction": "A" if zeroed else "The answer is C", "choices": DIAG, "kind": "mc",
         "category": "Diagnosis", "dataset": "TCGA-LUSC", "row": 2},
        {"key": "s2\tWhich type?", "slide_id": "s2", "question": "Which type?", "reference": "A",
         "prediction": "Both A and C | maybe", "choices": DIAG, "kind": "mc",
         "category": "Diagnosis", "dataset": "TCGA-LUAD", "row": 3},
        {"key": "s1\tIs the prognosis poor?", "slide_id": "s1", "question": "Is the prognosis poor?",
         "reference": "Yes", "prediction": "No" if zeroed else "Yes.", "choices": None, "kind": "vqa",
         "category": "Prognosis", "dataset": "TCGA-LUSC", "row": 4},
        {"key": "s2\treport", "slide_id": "s2", "question": "", "reference": "Adenocarcinoma with acinar pattern.",
         "prediction": "Normal lung." if zeroed else "Acinar adenocarcinoma.", "choices": None, "kind": "report",
         "category": None, "dataset": "TCGA-LUAD", "row": 5},
    ]
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_command_writes_json_report_and_table(tmp_path, capsys):
    p = write_jsonl(tmp_path / "preds.jsonl", preds())
    out = tmp_path / "ev"
    assert cli_main(["eval", "--predictions", str(p), "--out", str(out), "--bootstrap", "200", "--seed", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_closed"] == 3 and m["n_open"] == 1
    assert m["closed_accuracy"] == pytest.approx(2 / 3)
    assert len(m["closed_accuracy_ci"]) == 2 and m["n_unparsed"] == 1
    assert m["unparsed"][0]["key"] == "s2\tWhich type?"
    assert set(m["by_category"]) == {"Diagnosis", "Prognosis", "(none)"}
    assert set(m["by_dataset"]) == {"TCGA-LUSC", "TCGA-LUAD"}
    assert m["settings"]["seed"] == 0 and m["settings"]["bootstrap"] == 200
    report = (out / "report.md").read_text()
    assert "## Unparseable closed answers (1)" in report
    assert "Both A and C \\| maybe" in report  # pipe escaped in the markdown table
    assert "Closed-ended accuracy | 66.7%" in report
    printed = capsys.readouterr().out
    assert "Closed-ended accuracy" in printed and "METEOR" in printed and "95% CI" in printed


def test_eval_compare_reports_gap(tmp_path):
    p = write_jsonl(tmp_path / "preds.jsonl", preds())
    z = write_jsonl(tmp_path / "zero.jsonl", preds(zeroed=True))
    out = tmp_path / "ev"
    rc = cli_main(["eval", "--predictions", str(p), "--out", str(out), "--bootstrap", "50", "--compare", f"zeroed={z}"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["comparisons"]["zeroed"]["metrics"]["closed_accuracy"] == 0.0
    assert m["comparisons"]["zeroed"]["gap"]["closed_accuracy"] == pytest.approx(-2 / 3)
    report = (out / "report.md").read_text()
    assert "## Comparison runs" in report and "-66.7 pts" in report


def test_eval_data_join_fills_labels_and_lists_missing(tmp_path):
    manifest = tmp_path / "test.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["h5_path", "caption", "question", "answer", "slide_id", "dataset", "choices", "category"])
        w.writerow(["s1.h5", "", "Which type?", "C", "s1", "TCGA-LUSC", json.dumps(DIAG), "Diagnosis"])  # line 2
        w.writerow(["s2.h5", "", "Which type?", "A", "s2", "TCGA-LUAD", json.dumps(DIAG), "Diagnosis"])  # line 3
        w.writerow(["s1.h5", "", "Is the prognosis poor?", "Yes", "s1", "TCGA-LUSC", "", "Prognosis"])  # line 4
    rows = preds()[:1]
    rows[0]["category"] = None
    p = write_jsonl(tmp_path / "preds.jsonl", rows)
    out = tmp_path / "ev"
    assert cli_main(["eval", "--predictions", str(p), "--data", str(manifest), "--out", str(out), "--bootstrap", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["by_category"] == {"Diagnosis": m["by_category"]["Diagnosis"]}  # filled from the manifest
    assert m["n_missing"] == 2 and [x["row"] for x in m["missing"]] == [3, 4]
    assert "Data rows without a prediction (2)" in (out / "report.md").read_text()


def test_eval_rejects_repeated_keys_and_bad_json(tmp_path, capsys):
    p = tmp_path / "preds.jsonl"
    rows = preds()
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    assert cli_main(["eval", "--predictions", str(p), "--out", str(tmp_path / "ev")]) == 2
    assert "line 2" in capsys.readouterr().err
    p.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(EvalInputError, match="line 2: invalid JSON"):
        load_prediction_rows(p)


def test_summary_and_markdown_flag_missing_synonyms():
    m = evaluate_predictions(preds(), bootstrap=0)
    m["meteor_synonyms"] = False
    m["settings"]["wordnet"] = "none found"
    assert "WITHOUT WordNet synonyms" in summary_table(m)
    assert "**METEOR was computed without WordNet synonyms**" in render_markdown(m)
    m["meteor_synonyms"] = True
    assert "WITHOUT" not in summary_table(m)
