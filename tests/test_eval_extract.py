"""Answer extraction: option letters and yes/no from free text (eval/extract.py)."""

import pytest

from wsi_llava.data.choices import parse_inline_options
from wsi_llava.eval.extract import extract_choice, extract_yes_no, yes_no_label

# Options as they appear in WSI-Bench (dataset/*_choice_test.json of the public WSI-LLaVA repository).
DIAG = [
    "Adenocarcinoma",
    "Squamous cell carcinoma, keratinizing type",
    "Squamous cell carcinoma, non-keratinizing type",
    "Small cell lung carcinoma",
]
GRADE = ["Well differentiated", "Moderately differentiated", "Slightly to moderately differentiated", "Poorly differentiated"]
TESTIS = ["Seminoma", "Non-seminoma", "Yolk sac tumor", "Leydig cell tumor"]
HPV = ["HPV+", "HPV-", "EBV-associated", "MSS"]
LUMINAL = ["Luminal A", "Luminal B", "HER2-enriched", "Basal"]
STAGE = ["T1a N0 M0", "T1b N0 M0", "T1c N0 M0", "Tis N0 M0"]
MORPH = [
    "Tumor cells have perineural invasion only, with no vascular or stromal involvement.",
    "Tumor cells infiltrate the surrounding stroma and adjacent structures, but without vascular invasion.",
    "Tumor cells are confined to the primary site with no evidence of stromal or vascular invasion.",
    "Tumor cells show extensive vascular invasion with infiltration within blood vessels.",
]

CHOICE_CASES = [
    # bare letters and markers
    ("B", DIAG, "B"),
    ("b", DIAG, "B"),
    ("(b)", DIAG, "B"),
    ("B)", DIAG, "B"),
    ("[C]", DIAG, "C"),
    ("**C**", DIAG, "C"),
    ("D.", DIAG, "D"),
    ("C. Squamous cell carcinoma, non-keratinizing type", DIAG, "C"),
    ("(A) Adenocarcinoma", DIAG, "A"),
    ("B: keratinizing", DIAG, "B"),
    ("B, because the tumour shows keratin pearls", DIAG, "B"),
    # explicit cues
    ("The answer is B", DIAG, "B"),
    ("Answer: b", DIAG, "B"),
    ("Answer - C", DIAG, "C"),
    ("The correct answer is C) Squamous cell carcinoma, non-keratinizing type", DIAG, "C"),
    ("Option D.", DIAG, "D"),
    ("I choose (d)", DIAG, "D"),
    ("Between A and B, I'd pick B", DIAG, "B"),
    ("I think it's A.", DIAG, "A"),
    # option text itself, case / punctuation variations
    ("Squamous cell carcinoma, non-keratinizing type", DIAG, "C"),
    ("squamous cell carcinoma non keratinizing type.", DIAG, "C"),
    ("SQUAMOUS CELL CARCINOMA, KERATINIZING TYPE", DIAG, "B"),
    ("Answer: Adenocarcinoma", DIAG, "A"),
    ("The answer is a squamous cell carcinoma, non-keratinizing type", DIAG, "C"),
    ("The molecular subtype is Luminal A.", LUMINAL, "A"),
    ("Luminal B", LUMINAL, "B"),
    ("T1b N0 M0", STAGE, "B"),
    ("Tumor cells infiltrate the surrounding stroma and adjacent structures, but without vascular invasion.", MORPH, "B"),
    # an option's text inside another option's text: the longer one wins
    ("Slightly to moderately differentiated", GRADE, "C"),
    ("The tumour is moderately differentiated.", GRADE, "B"),
    ("Non-seminoma", TESTIS, "B"),
    ("Seminoma", TESTIS, "A"),
    ("HPV-", HPV, "B"),
    ("The subtype is HPV+.", HPV, "A"),
    # leading marker wins over a later mention
    ("A) Adenocarcinoma, but B is wrong", DIAG, "A"),
    # conflicting, none, or out of range → None
    ("I cannot tell", DIAG, None),
    ("Both A and C", DIAG, None),
    ("The answer is B or C", DIAG, None),
    ("The answer is not B", DIAG, None),
    ("C) Squamous cell carcinoma, keratinizing type", DIAG, None),  # letter and text disagree
    ("Adenocarcinoma (B)", DIAG, None),  # text and bracketed letter disagree
    ("It is adenocarcinoma, not small cell lung carcinoma", DIAG, None),  # two options named
    ("A squamous cell carcinoma", DIAG, None),  # article "A", and the text fits two options
    ("E", DIAG, None),
    ("The answer is E", DIAG, None),
    ("hpv", HPV, None),  # fits HPV+ and HPV- equally
    ("", DIAG, None),
    (None, DIAG, None),
    ("   ", DIAG, None),
]


@pytest.mark.parametrize("text,choices,expected", CHOICE_CASES)
def test_extract_choice(text, choices, expected):
    assert extract_choice(text, choices) == expected


def test_enough_choice_cases():
    assert len(CHOICE_CASES) >= 30


def test_options_carrying_their_own_letters():
    opts = [f"{l}) {o}" for l, o in zip("ABCD", DIAG)]
    assert extract_choice("Small cell lung carcinoma", opts) == "D"
    assert extract_choice("The answer is B", opts) == "B"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, the prognosis is poor.", "yes"),
        ("No, there is no lymphovascular invasion.", "no"),
        ("True", "yes"),
        ("The answer is no", "no"),
        ("Poor prognosis. No.", "no"),
        ("I cannot tell", None),
        ("Not sure. Yes or no?", None),
        ("The prognosis is poor.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


def test_yes_no_label():
    assert yes_no_label("Yes") == "yes"
    assert yes_no_label(" NO. ") == "no"
    assert yes_no_label("Yes, it is") is None
    assert yes_no_label(None) is None


def test_parse_inline_options_real_wsi_bench_wording():
    q = ("<image>\nWith immunohistochemical results showing weak expression of ER in 30% of invasive tumor nuclei, "
         "no PR expression, a 50% Ki-67 proliferation rate, and amplified Her2/neu antigen, what is the molecular "
         "subtype of this breast cancer? A) Luminal A   B) Luminal B   C) HER2-enriched   D) Basal")
    stem, options = parse_inline_options(q)
    assert stem.startswith("<image>\nWith immunohistochemical") and stem.endswith("breast cancer?")
    assert options == LUMINAL


def test_parse_inline_options_sentences_and_instruction_line():
    q = "How would you describe the pattern of tumor infiltration in this slide? " + " ".join(
        f"{l}) {o}" for l, o in zip("ABCD", MORPH)) + "\nAnswer with the letter."
    stem, options = parse_inline_options(q)
    assert stem == "How would you describe the pattern of tumor infiltration in this slide?"
    assert options == MORPH


def test_parse_inline_options_none_without_two_markers():
    assert parse_inline_options("What is the grade? A) Grade 1") is None
    assert parse_inline_options("Describe the slide.") is None
