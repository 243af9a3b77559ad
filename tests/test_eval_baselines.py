"""Blind baselines, WSI-Bench groups, sentence-form yes/no answers, question-set provenance and
subsets (eval/baselines.py, eval/questions.py, eval/polar.py, data/provenance.py, data/subset.py, `eval --baselines-only`).

The question files are small synthetic files in the public formats, built here."""

import csv
import hashlib
import json
import time

import pytest

from wsi_llava.cli import main as cli_main
from wsi_llava.eval.baselines import WSI_BENCH_GROUPS, Question, baseline_table, blind_baselines
from wsi_llava.eval.questions import load_questions
from wsi_llava.eval.metrics import evaluate_predictions
from wsi_llava.eval.polar import binary_label, question_form

S1 = "TCGA-21-1083-01Z-00-DX1.8288ca92-b611-4acf-986e-0b8a3f620b94"
S2 = "TCGA-OL-A5S0-01Z-00-DX1.49A7AC9D-C186-406C-BA67-2D73DE82E13B"


def conv(image, human, gpt):
    return {"id": "x", "image": image, "conversations": [{"from": "human", "value": "<image>\n" + human},
                                                         {"from": "gpt", "value": gpt}]}


def mc_question(stem, options):
    return stem + " " + " ".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(options))


OPTS = ["Short.", "A much longer option text here.", "Mid length one.", "Tiny."]


@pytest.fixture()
def bench(tmp_path):
    """WSI-Bench-format files: 10 morphology MC (gold B ×6 = the longest, C ×4), 5 diagnosis MC
    (gold C ×3, A ×2), 4 staging MC (gold A ×3, D), 8 prognosis yes/no (no ×6, yes ×2), 6 open
    polar questions with sentence answers, 2 report items; plus one malformed item."""
    d = tmp_path / "wsi-bench"
    d.mkdir()
    morph = [conv(f"TCGA-LUSC/{S1}.pt", mc_question("Which pattern?", OPTS), g) for g in "BBBBBBCCCC"]
    diag = [conv(f"TCGA-BRCA/{S2}.pt", mc_question("Which type?", OPTS), g) for g in "CCCAA"]
    diag.append(conv(f"TCGA-BRCA/{S2}.pt", mc_question("Which grade?", ["1", "2"]), "E"))  # gold not an option
    staging = [conv(f"TCGA-LUSC/{S1}.pt", mc_question("Which stage?", OPTS), g) for g in "AAAD"]
    prog = [conv(f"TCGA-MESO/{S1}.pt", "Given the diagnosis, is the prognosis poor?", g) for g in ["No"] * 6 + ["Yes"] * 2]
    feat = [
        conv(f"TCGA-LUSC/{S1}.pt", "Is there significant nuclear atypia?", "Yes, significant nuclear atypia is present."),
        conv(f"TCGA-LUSC/{S1}.pt", "Are keratin pearls present?", "Indeed, keratin pearls are seen."),
        conv(f"TCGA-LUSC/{S1}.pt", "Is there vascular invasion?", "No, there is no vascular invasion."),
        conv(f"TCGA-LUSC/{S1}.pt", "Is perineural invasion present?", "Perineural invasion is absent in this tissue."),
        conv(f"TCGA-LUSC/{S1}.pt", "Is nuclear pleomorphism observed?", "Moderate nuclear pleomorphism with variable nuclei."),
        conv(f"TCGA-LUSC/{S1}.pt", "How are the cells arranged?", "In sheets."),
    ]
    prognosis_open = [
        conv(f"TCGA-BRCA/{S2}.pt", "Given the diagnosis, is the prognosis good or poor?", "The prognosis is relatively poor. Because…"),
        conv(f"TCGA-BRCA/{S2}.pt", "Given the diagnosis, is the prognosis good or poor?", "The prognosis is generally good."),
        conv(f"TCGA-BRCA/{S2}.pt", "Given the diagnosis, is the prognosis good or poor?", "The prognosis is intermediate."),
    ]
    report = [conv(f"TCGA-LUSC/{S1}.pt", "Describe the slide.", "Sheets of atypical squamous cells.")] * 2
    files = {"Morphology_choice_test.json": morph, "Diagnosis_choice_test.json": diag,
             "Staging_choice_test.json": staging, "Prognosis_TF_question_test.json": prog,
             "Specific_Feature_Description_test.json": feat, "Prognosis_test.json": prognosis_open,
             "1_Report_test.json": report}
    paths = []
    for name, data in files.items():
        (d / name).write_text(json.dumps(data), encoding="utf-8")
        paths.append(str(d / name))
    return sorted(paths)


def test_polar_questions_and_sentence_answers():
    assert question_form("Is there significant nuclear atypia?") == ("polar", None)
    assert question_form("Given X, is the prognosis good or poor?") == ("alternative", ("good", "poor"))
    assert question_form("Can you describe the pattern of infiltration?") is None  # a request
    assert question_form("What is the grade?") is None
    cases = [
        ("Is there atypia?", "Yes, there is marked atypia.", "yes"),
        ("Is there atypia?", "Correct, the cells are atypical.", "yes"),
        ("Is there atypia?", "Indeed, atypia is present.", "yes"),
        ("Is there atypia?", "No, there is no atypia.", "no"),
        ("Is there vascular invasion?", "There is no evidence of vascular invasion.", "no"),
        ("Is vascular invasion present?", "Vascular invasion is absent in this tissue.", "no"),
        ("Is lymphovascular invasion evident?", "Lymphovascular invasion is prominently evident.", "yes"),
        ("Is there atypia?", "Moderate atypia with enlarged nuclei.", None),  # unparsed, not guessed
        ("Given X, is the prognosis poor?", "The prognosis is generally poor.", "yes"),
        ("Given X, is the prognosis poor?", "The prognosis is generally good, given the stage.", "no"),
        ("Given X, is the prognosis poor?", "The prognosis is not poor.", "no"),
        ("Given X, is the prognosis good or poor?", "The prognosis is relatively poor. However, good…", "poor"),
        ("Given X, is the prognosis good or poor?", "The prognosis is moderately favorable.", "good"),
        ("Given X, is the prognosis good or poor?", "The prognosis is intermediate.", None),
        ("Given X, is the prognosis good or poor?", "The prognosis is not good.", None),
        ("What is the grade?", "Yes.", None),
    ]
    for q, a, expected in cases:
        assert binary_label(q, a) == expected, (q, a)


def test_blind_baselines_values_on_hand_built_questions():
    qs = [Question(f"m{i}", "mc", g, "Which?", tuple(OPTS), "Morphology_choice") for i, g in enumerate("BBBBBBCCCC")]
    qs += [Question(f"y{i}", "yes_no", g, "is the prognosis poor?", None, "Prognosis_TF_question")
           for i, g in enumerate(["no"] * 6 + ["yes"] * 2)]
    b = blind_baselines(qs)
    assert b["constant_letter"]["letter"] == "B" and b["constant_letter"]["accuracy"] == pytest.approx(0.6)
    assert b["constant_letter"]["by_letter"] == pytest.approx({"A": 0.0, "B": 0.6, "C": 0.4, "D": 0.0})
    assert b["longest_option"]["accuracy"] == pytest.approx(0.6)  # option B is the longest
    assert b["yes_no_prior"] == {"majority": "no", "accuracy": 0.75, "yes_fraction": 0.25, "n": 8}
    assert b["chance"] == pytest.approx((10 * 0.25 + 8 * 0.5) / 18)
    assert b["best_blind"]["accuracy"] == pytest.approx((6 + 6) / 18)
    assert b["best_blind"]["label"] == "constant letter + yes/no prior"
    assert "optimistic" in b["fit"]
    # ties among longest options give expected credit 1/t
    tie = [Question("t", "mc", "A", "q", ("xx", "yy", "z"))]
    assert blind_baselines(tie)["longest_option"] == {"accuracy": 0.5, "n_ties": 1}
    # fitted on other questions of the same category: the letter comes from there
    fit = [Question(f"f{i}", "mc", "C", "Which?", tuple(OPTS), "Morphology_choice") for i in range(3)]
    fitted = blind_baselines(qs, fit=fit)
    assert fitted["constant_letter"]["letter"] == "C" and fitted["constant_letter"]["accuracy"] == pytest.approx(0.4)
    assert "fit questions" in fitted["fit"]


def test_baseline_table_levels_and_groups(bench):
    qs, prov = load_questions(bench)
    table = baseline_table(qs)
    assert set(table["by_group"]) == {"morphology", "diagnosis", "treatment", "report"}
    assert list(table["by_group"])[:3] == ["morphology", "diagnosis", "treatment"]
    diag = table["by_group"]["diagnosis"]  # Diagnosis_choice (CCCAA) + Staging_choice (AAAD)
    assert diag["n_mc"] == 9 and diag["constant_letter"]["letter"] == "A"
    assert diag["constant_letter"]["accuracy"] == pytest.approx(5 / 9)
    treat = table["by_group"]["treatment"]
    assert treat["yes_no_prior"]["majority"] == "no" and treat["n_closed"] == 8
    assert treat["binary_text"]["label_counts"] == {"poor": 1, "good": 1}
    assert treat["binary_text"]["n_unparsed"] == 1
    feat = table["by_category"]["Specific_Feature_Description"]["binary_text"]
    assert feat["n_parsed"] == 4 and feat["n_unparsed"] == 1 and feat["yes_fraction"] == pytest.approx(0.5)
    assert set(table["by_source"]) == {p.rsplit("/", 1)[1] for p in bench}
    assert WSI_BENCH_GROUPS["Staging_choice"] == "diagnosis"
    # provenance: checksums, counts, the malformed item with its reason
    files = {f["name"]: f for f in prov["files"]}
    raw = open(bench[1], "rb").read()
    assert files["Diagnosis_choice_test.json"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert files["Diagnosis_choice_test.json"]["n_items"] == 6
    assert prov["n_items_in_files"] == 39 and prov["n_dropped"] == 1
    assert prov["categories"]["Diagnosis_choice"] == {"read": 6, "imported": 5, "dropped": 1}
    assert "not one of the options" in prov["dropped"][0]["reason"]
    assert prov["releases"][0]["benchmark"] == "WSI-Bench test" and prov["releases"][0]["matches"] is None


def test_eval_baselines_only_command(bench, tmp_path, capsys):
    out = tmp_path / "bl"
    t0 = time.perf_counter()
    assert cli_main(["eval", "--baselines-only", "--data", *bench, "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 30
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "baselines-only" and m["n_items"] == 38 and m["n_closed"] == 27
    morph = m["baselines"]["by_source"]["Morphology_choice_test.json"]
    assert morph["constant_letter"]["letter"] == "B" and morph["longest_option"]["accuracy"] == pytest.approx(0.6)
    assert "_credits" not in m["baselines"]["all"] and "_index" not in morph
    report = (out / "report.md").read_text()
    for text in ("## Blind baselines", "| group | morphology |", "| file | Staging_choice_test.json |",
                 "optimistic", "## Yes/no answers written as sentences", "## Question set",
                 "matches none of them", "not one of the options"):
        assert text in report, text
    printed = capsys.readouterr().out
    assert "morphology" in printed and "longest" in printed
    # subsets: one category, first N
    sub = tmp_path / "sub"
    assert cli_main(["eval", "--baselines-only", "--data", *bench, "--out", str(sub), "--category",
                     "Morphology_choice", "--limit", "4"]) == 0
    m = json.loads((sub / "metrics.json").read_text())
    assert m["n_items"] == 4 and m["baselines"]["all"]["constant_letter"]["accuracy"] == 1.0
    assert cli_main(["eval", "--baselines-only", "--data", *bench, "--out", str(sub), "--category", "Nope"]) == 2
    assert "categories present" in capsys.readouterr().err


def write_slidebench(path, n, tumor=True):
    header = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"] if tumor \
        else ["ID", "Slide", "Task", "Question", "A", "B", "C", "D", "Answer"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(n):
            gold = "ABCD"[i % 4] if i % 3 else "B"
            if tumor:
                broad = "Microscopy" if i % 2 else "Diagnosis"
                w.writerow([i, f"TCGA-A7-A0CJ-01Z-00-DX{i % 9}", "BRCA", broad, "Tumor grade", "Which grade?",
                            "Grade 1", "Grade 2 and more", "Grade 3", "Grade 4", gold])
            else:
                w.writerow([i, f"{i}", "HER2", "HER2 status?", "Positive", "Negative", "", "", "AB"[i % 2]])
    return path


def test_slidebench_baselines_and_published_sizes(tmp_path):
    tcga = write_slidebench(tmp_path / "SlideBench-VQA-TCGA.csv", 1473)
    bcnb = write_slidebench(tmp_path / "SlideBench-VQA-BCNB.csv", 10, tumor=False)
    out = tmp_path / "bl"
    assert cli_main(["eval", "--baselines-only", "--data", str(tcga), str(bcnb), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    tcga_rel, bcnb_rel = m["provenance"]["releases"]
    assert tcga_rel["benchmark"] == "SlideBench-VQA (TCGA)" and tcga_rel["n"] == 1473
    assert tcga_rel["known"] == [7827, 3176, 1473] and tcga_rel["file"] == "SlideBench-VQA-TCGA.csv"
    assert "smaller SlideBench-VQA (TCGA) release" in tcga_rel["matches"]
    assert bcnb_rel["benchmark"] == "SlideBench-VQA (BCNB)" and bcnb_rel["matches"] is None
    assert set(m["baselines"]["by_group"]) == {"Microscopy", "Diagnosis"}
    bc = m["baselines"]["by_source"]["SlideBench-VQA-BCNB.csv"]
    assert bc["options"] == {"min": 2, "max": 2, "mean": 2.0} and bc["chance"] == 0.5
    assert "1,473 items; published sizes 7,827 / 3,176 / 1,473: matches" in (out / "report.md").read_text()
    write_slidebench(tcga, 1000)
    assert cli_main(["eval", "--baselines-only", "--data", str(tcga), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["provenance"]["releases"][0]["matches"] is None


def test_baselines_only_reads_a_manifest_without_slides(tmp_path):
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["h5_path", "caption", "question", "answer", "slide_id", "dataset", "choices", "category"])
        for i, g in enumerate("AABA"):
            w.writerow([f"missing/{i}.h5", "", "Which?", g, f"s{i}", "d", json.dumps(["x", "yy", "z"]), "Diagnosis_choice"])
        w.writerow(["missing/9.h5", "", "Is it malignant?", "Yes", "s9", "d", "", "Prognosis_TF_question"])
    fit = tmp_path / "fit.csv"
    man_text = man.read_text().replace(",A,s0", ",C,s0").replace(",A,s1", ",C,s1").replace(",A,s3", ",C,s3")
    fit.write_text(man_text)
    out = tmp_path / "bl"
    assert cli_main(["eval", "--baselines-only", "--data", str(man), "--out", str(out), "--fit-data", str(fit)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    allq = m["baselines"]["all"]
    assert allq["n_mc"] == 4 and allq["n_yes_no"] == 1
    assert allq["constant_letter"]["letter"] == "C" and allq["constant_letter"]["accuracy"] == 0.0  # fitted elsewhere
    assert allq["longest_option"]["accuracy"] == pytest.approx(0.25)  # "yy" = B is the longest
    assert m["baselines"]["by_group"]["diagnosis"]["n_mc"] == 4


def preds_rows():
    opts = ["x", "yy", "a longer option", "w"]
    rows = []
    for i, (gold, pred) in enumerate([("B", "B"), ("B", "B"), ("B", "A"), ("C", "C"), ("B", "B"), ("A", "A")]):
        rows.append({"key": f"k{i}", "slide_id": "s", "question": "Which?", "reference": gold, "prediction": pred,
                     "choices": opts, "kind": "mc", "category": "Morphology_choice", "row": i + 2})
    rows.append({"key": "p", "slide_id": "s", "question": "Given X, is the prognosis poor?", "reference": "Yes",
                 "prediction": "The prognosis is generally poor.", "kind": "vqa", "category": "Prognosis_TF_question", "row": 20})
    rows.append({"key": "q", "slide_id": "s", "question": "Given X, is the prognosis good?", "reference": "No",
                 "prediction": "The prognosis is rather unclear.", "kind": "vqa", "category": "Prognosis_TF_question", "row": 21})
    rows.append({"key": "r", "slide_id": "s", "question": "Is there atypia?", "reference": "Yes, marked atypia.",
                 "prediction": "No, none.", "kind": "vqa", "category": "Specific_Feature_Description", "row": 22})
    rows.append({"key": "t", "slide_id": "s", "question": "Is there necrosis?", "reference": "Necrosis is focal.",
                 "prediction": "Yes.", "kind": "vqa", "category": "Specific_Feature_Description", "row": 23})
    return rows


def test_report_margin_over_best_blind_and_sentence_yes_no():
    m = evaluate_predictions(preds_rows(), bootstrap=200, seed=0)
    # "The prognosis is generally poor." answers "is the prognosis poor?" with yes; the unclear one is unparsed
    assert m["n_yes_no"] == 2 and m["yes_no_accuracy"] == 0.5 and m["n_unparsed"] == 1
    b = m["baselines"]["all"]
    best = b["best_blind"]
    assert best["label"] == "constant letter + yes/no prior"  # B: 4/6; yes/no prior: a 1–1 tie → "no"
    assert b["longest_option"]["accuracy"] == pytest.approx(1 / 6)
    assert best["accuracy"] == pytest.approx((4 + 1) / 8)
    assert b["model"]["accuracy"] == pytest.approx(6 / 8)
    assert b["model"]["margin"] == pytest.approx(6 / 8 - 5 / 8)
    assert b["model"]["margin_ci"][0] <= b["model"]["margin"] <= b["model"]["margin_ci"][1]
    assert set(m["by_group"]) == {"morphology", "treatment"}
    assert m["baselines"]["by_group"]["morphology"]["model"]["accuracy"] == pytest.approx(5 / 6)
    # open yes/no in prose: gold of row 22 parsed (yes), prediction says no; row 23's gold cannot be read
    assert m["n_binary_text"] == 1 and m["binary_text_accuracy"] == 0.0 and m["n_binary_text_gold_unparsed"] == 1


def test_eval_predictions_category_and_limit(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in preds_rows()))
    out = tmp_path / "ev"
    assert cli_main(["eval", "--predictions", str(p), "--out", str(out), "--category", "Morphology_choice",
                     "--limit", "3", "--bootstrap", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_items"] == 3 and m["closed_accuracy"] == pytest.approx(2 / 3)
    assert "## Blind baselines" in (out / "report.md").read_text()
