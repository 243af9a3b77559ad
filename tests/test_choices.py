"""One rule for multiple-choice gold answers (data/choices.py), shared by the training target
(manifest → prompt) and the evaluation (gold letter an answer is scored against)."""

import json

import pytest

from wsi_llava.data.choices import ChoiceError, choice_letter, match_choice
from wsi_llava.data.manifest import read_manifest
from wsi_llava.data.manifest_writer import write_manifest_csv
from wsi_llava.data.prompts import record_turn
from wsi_llava.eval.rows import EvalInputError, prepare_items

DIAG = [
    "Adenocarcinoma",
    "Squamous cell carcinoma, keratinizing type",
    "Squamous cell carcinoma, non-keratinizing type",
    "Small cell lung carcinoma",
]
HPV = ["HPV+", "HPV-", "EBV-associated", "MSS"]
MORPH = [
    "Tumor cells have perineural invasion only, with no vascular or stromal involvement.",
    "Tumor cells infiltrate the surrounding stroma and adjacent structures, but without vascular invasion.",
]
SIMPLE = ["Squamous cell carcinoma", "Adenocarcinoma", "Normal", "Other"]


@pytest.mark.parametrize(
    "answer,choices,expected",
    [
        # letter forms
        ("B", SIMPLE, "B"),
        ("b", SIMPLE, "B"),
        ("(B)", SIMPLE, "B"),
        ("B)", SIMPLE, "B"),
        ("b.", SIMPLE, "B"),
        ("[c]", SIMPLE, "C"),
        ('B "', MORPH, "B"),  # a real WSI-Bench gold answer (Morphology_choice item 578)
        # letter and text
        ("B) Adenocarcinoma", SIMPLE, "B"),
        ("b) adenocarcinoma", SIMPLE, "B"),
        ("B. Adenocarcinoma", SIMPLE, "B"),
        ("(B) Adenocarcinoma", SIMPLE, "B"),
        ("C: whatever the slide shows", SIMPLE, "C"),  # an explanation after the letter is allowed
        ("B) Squamous cell carcinoma, keratinizing type", DIAG, "B"),
        # option text: exact (case, whitespace, trailing period ignored), then punctuation ignored
        ("Adenocarcinoma", SIMPLE, "B"),
        ("  ADENOCARCINOMA. ", SIMPLE, "B"),
        ("squamous   cell\ncarcinoma", SIMPLE, "A"),
        ("Squamous-cell carcinoma", SIMPLE, "A"),
        ("squamous cell, carcinoma", SIMPLE, "A"),
        ("HPV-", HPV, "B"),  # symbols count when they tell options apart
        ("**Adenocarcinoma**", SIMPLE, "B"),  # markdown emphasis dropped
        # an option that carries its own letter
        ("Adenocarcinoma", ["A) Squamous", "B) Adenocarcinoma"], "B"),
        # where the two old rules disagreed: option text wins over a bare-letter reading
        ("a", ["x", "a"], "B"),
        ("A", ["x", "a"], "B"),
        ("b", ["b", "a"], "A"),
        ("a", ["b", "a"], "B"),
        ("A cat", ["A dog", "A cat"], "B"),
        ("(A)", ["x", "y"], "A"),
    ],
)
def test_match_choice(answer, choices, expected):
    assert match_choice(answer, choices) == expected
    assert choice_letter(answer, choices) == expected


@pytest.mark.parametrize(
    "answer,choices,reason",
    [
        ("E", SIMPLE, "letter E is past the last option (4 options: A–D)"),
        ("E) something", SIMPLE, "letter E is past the last option"),
        ("lymphoma", SIMPLE, "neither an option letter (A–D) nor the text of an option"),
        ("carcinoma", DIAG, "neither an option letter"),
        ("", SIMPLE, "empty"),
        ("same", ["Same", "same."], "text of options A and B (they read the same)"),
        ("hpv", HPV, "text of options A and B"),
        ("A. Adenocarcinoma", SIMPLE, "letter A but the text after it is the text of option B"),
        ("B) Adenocarcinoma", DIAG, "letter B but the text after it is the text of option A"),
    ],
)
def test_match_choice_errors_say_why(answer, choices, reason):
    with pytest.raises(ChoiceError) as e:
        match_choice(answer, choices)
    assert reason in str(e.value)
    assert choice_letter(answer, choices) is None


def test_choice_letter_without_choices():
    assert choice_letter("A", None) is None and choice_letter("A", []) is None


def _manifest(tmp_path, answer, choices):
    row = {"h5_path": "a.h5", "caption": "", "question": "Which one?", "answer": answer, "slide_id": "s1",
           "dataset": "d", "choices": json.dumps(choices)}
    return write_manifest_csv(tmp_path / "m.csv", [row], fields=list(row))


def _eval_row(reference, choices):
    return {"kind": "mc", "reference": reference, "prediction": "A", "choices": choices, "question": "Which one?",
            "slide_id": "s1", "key": "k", "_line": 3}


@pytest.mark.parametrize("answer,choices", [("a", ["x", "a"]), ("b", ["b", "a"]), ("(B)", SIMPLE),
                                            ("squamous cell, carcinoma", SIMPLE), ("HPV-", HPV)])
def test_training_target_and_eval_gold_agree(tmp_path, answer, choices):
    recs, probs = read_manifest(_manifest(tmp_path, answer, choices))
    assert probs == []
    _, target, _ = record_turn(recs[0])
    (item,) = prepare_items([_eval_row(answer, choices)], "preds.jsonl")
    assert target == item.reference == match_choice(answer, choices)


@pytest.mark.parametrize("answer,choices,why", [("same", ["Same", "same."], "options A and B"),
                                                ("lymphoma", SIMPLE, "neither an option letter")])
def test_bad_gold_answer_names_the_row(tmp_path, answer, choices, why):
    path = _manifest(tmp_path, answer, choices)
    _, probs = read_manifest(path)
    (prob,) = probs
    assert (prob.row, prob.field) == (2, "answer")
    assert prob.format().startswith(f"{path} line 2 [answer]: {answer!r} is not among the choices")
    assert why in prob.message
    with pytest.raises(EvalInputError, match="field 'reference'") as e:
        prepare_items([_eval_row(answer, choices)], "preds.jsonl")
    assert "preds.jsonl, line 3" in str(e.value) and why in str(e.value)
