"""Choice-order robustness (CircularEval): rotations, scoring, and `eval --model … --circular` through the
real predict path with the tiny model fixtures (eval/circular.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from wsi_llava.cli import main as cli
from wsi_llava.data.manifest import load_manifest
from wsi_llava.data.subset import SubsetError
from wsi_llava.eval.circular import circular_metrics, rotate, rotate_records
from wsi_llava.infer.engine import Answer, SlideAssistant
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration

pytestmark = pytest.mark.timeout(300)

OPTS = ["adenocarcinoma", "squamous cell carcinoma", "small cell carcinoma", "benign tissue"]


def test_rotate_and_rotated_records(cohort):
    assert rotate(OPTS, 1) == OPTS[1:] + OPTS[:1] and rotate(OPTS, 4) == OPTS
    records = load_manifest(cohort.test_csv)
    mc = [r for r in records if r.choices]
    rotated = rotate_records(records)
    assert sorted(rotated) == [1, 2, 3] and all(len(v) == len(mc) for v in rotated.values())
    for rows in rotated.values():
        for orig, rot in zip(mc, rows):
            gold_text = orig.choices["ABCD".index(orig.answer)]
            assert rot.choices["ABCD".index(rot.answer)] == gold_text  # same gold option, another letter
            assert rot.row == orig.row and rot.question == orig.question


def _rows(picker, gold_index, n_questions=5):
    """Prediction rows of every rotation for questions whose gold is OPTS[gold_index[q]]."""
    by_r = {}
    for r in range(4):
        rows = []
        for q in range(n_questions):
            shown = rotate(OPTS, r)
            g = shown.index(OPTS[gold_index[q]])
            rows.append({"key": f"q{q}", "row": q + 2, "kind": "mc", "choices": shown, "reference": "ABCD"[g],
                         "prediction": picker(shown, g), "category": "Diagnosis_choice"})
        by_r[r] = rows
    return by_r


def test_always_a_gets_zero_circular_accuracy_and_zero_consistency():
    m = circular_metrics(_rows(lambda shown, g: "A", [0, 1, 2, 3, 0]))
    assert m["n"] == 5 and m["circular_accuracy"] == 0.0 and m["consistency"] == 0.0
    assert m["accuracy_rotation_0"] == pytest.approx(2 / 5)  # gold A in rotation 0 for two questions
    assert m["mean_rotation_accuracy"] == pytest.approx(0.25)
    assert m["by_group"]["diagnosis"]["n"] == 5


def test_position_independent_answers_are_consistent():
    right = circular_metrics(_rows(lambda shown, g: f"The answer is {shown[g]}", [0, 1, 2, 3, 1]))
    assert right["circular_accuracy"] == 1.0 and right["consistency"] == 1.0
    assert right["circular_accuracy_wilson"][1] == 1.0
    longest = circular_metrics(_rows(lambda shown, g: max(shown, key=len), [0, 1, 2, 3, 1]))
    assert longest["consistency"] == 1.0 and longest["circular_accuracy"] == pytest.approx(2 / 5)
    # right except under one rotation: not circularly right, and not consistent
    once_wrong = _rows(lambda shown, g: shown[g], [0, 1, 2, 3, 1])
    once_wrong[2][0]["prediction"] = "D"
    m = circular_metrics(once_wrong)
    assert m["circular_accuracy"] == pytest.approx(4 / 5) and m["consistency"] == pytest.approx(4 / 5)
    # a missing rotation → not scored, counted
    del once_wrong[3][1]
    assert circular_metrics(once_wrong)["n_incomplete"] == 1


@pytest.fixture(scope="module")
def blind_model(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("blind")
    model, tok = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, vision_mode="none", mm_hidden_size=16,
                                                           image_seq_length=5, vision_feature_select_mode="random_sample")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _options_in(prompt: str) -> list[str]:
    return re.findall(r"^[A-Z]\) (.*)$", prompt, flags=re.M)


def test_eval_model_circular_always_a(blind_model, cohort, tmp_path, monkeypatch):
    def always_a(self, slides, questions, *args, **kwargs):
        return [Answer("A", 0, 1) for _ in questions]

    monkeypatch.setattr(SlideAssistant, "answer", always_a)
    out = tmp_path / "ev"
    assert cli(["eval", "--model", str(blind_model), "--data", str(cohort.test_csv), "--out", str(out), "--circular",
                "--ablate", "zero", "--bootstrap", "20", "--max-new-tokens", "2"]) == 0
    for r in (1, 2, 3):
        rows = [json.loads(x) for x in (out / f"predictions_rotation{r}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(row["kind"] == "mc" for row in rows)
    m = json.loads((out / "metrics.json").read_text())
    c = m["circular"]
    assert c["n"] == 4 and c["circular_accuracy"] == 0.0 and c["consistency"] == 0.0
    assert c["rotations"] == [0, 1, 2, 3]
    # the ablation sits beside the blind baselines; the report has the circular section
    assert "ablate_zero" in m["baselines"]["all"]["runs"]
    report = (out / "report.md").read_text()
    assert "## Choice-order robustness (CircularEval)" in report and "ablate_zero" in report


def test_eval_model_circular_longest_option_subset(blind_model, cohort, tmp_path, monkeypatch):
    def longest(self, slides, questions, *args, **kwargs):
        out = []
        for q in questions:
            opts = _options_in(q)
            out.append(Answer("ABCD"[opts.index(max(opts, key=len))] if opts else "Yes", 0, 1))
        return out

    monkeypatch.setattr(SlideAssistant, "answer", longest)
    out = tmp_path / "ev"
    assert cli(["eval", "--model", str(blind_model), "--data", str(cohort.test_csv), "--out", str(out), "--circular",
                "--category", "diagnosis_choice", "--limit", "3", "--bootstrap", "0"]) == 0
    main = (out / "predictions.jsonl").read_text().splitlines()
    assert len(main) == 3  # --category/--limit reach predict
    c = json.loads((out / "metrics.json").read_text())["circular"]
    assert c["n"] == 3 and c["consistency"] == 1.0
    gold = [r for r in load_manifest(cohort.test_csv) if r.choices][:3]
    squamous = sum(r.choices["ABCD".index(r.answer)] == "squamous cell carcinoma" for r in gold)
    assert c["circular_accuracy"] == pytest.approx(squamous / 3)


def test_predict_category_and_limit(blind_model, cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SlideAssistant, "answer", lambda self, slides, qs, *a, **k: [Answer("x", 0, 1) for _ in qs])
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--model", str(blind_model), "--data", str(cohort.test_csv), "--out", str(out),
                "--category", "report", "--limit", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and {r["category"] for r in rows} == {"report"}
    capsys.readouterr()
    try:  # a user error: the dispatcher prints it and exits non-zero
        rc = cli(["predict", "--model", str(blind_model), "--data", str(cohort.test_csv), "--out", str(out),
                  "--category", "nope"])
        message = capsys.readouterr().err
    except SubsetError as e:
        rc, message = 1, str(e)
    assert rc != 0 and "categories present: diagnosis_choice" in message


def test_circular_needs_model(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"key": "k", "reference": "A", "prediction": "A", "kind": "mc", "choices": ["x", "y"]}) + "\n")
    assert cli(["eval", "--predictions", str(p), "--out", str(tmp_path / "o"), "--circular"]) == 2
    assert "--circular needs --model" in capsys.readouterr().err
