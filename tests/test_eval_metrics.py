"""Metrics against hand-computed values and direct library calls; bootstrap determinism (eval/metrics.py, rows.py, text_metrics.py, wordnet.py, stats.py)."""

import math

import numpy as np
import pytest
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from wsi_llava.eval.metrics import EvalConfig, compare_metrics, evaluate_predictions
from wsi_llava.eval.rows import EvalInputError, prepare_items
from wsi_llava.eval.stats import resample_counts, stable_seed
from wsi_llava.eval.text_metrics import (bleu_from_statistics, bleu_from_statistics_batch, bleu_statistics,
                                         meteor_scores, meteor_tokens, rouge_scores)
from wsi_llava.eval.wordnet import WordNet, _NoSynonyms, load_wordnet

DIAG = ["Adenocarcinoma", "Squamous cell carcinoma, keratinizing type",
        "Squamous cell carcinoma, non-keratinizing type", "Small cell lung carcinoma"]

HYPS = [
    "The tumour shows sheets of atypical squamous cells with keratin pearls.",
    "Poorly differentiated adenocarcinoma with glandular structures.",
    "no tumour seen",
    "Grade II invasive ductal carcinoma, Nottingham score 6.",
    "",
]
REFS = [
    "The slide shows sheets and nests of atypical squamous cells with keratin pearls.",
    "Moderately differentiated adenocarcinoma forming glandular structures.",
    "Benign lymph node without metastatic tumour.",
    "Invasive ductal carcinoma, Nottingham grade II (score 6).",
    "Chronic inflammation.",
]


def row(kind, prediction, reference, **kw):
    base = {"key": kw.pop("key", f"{kind}-{prediction}-{reference}"), "slide_id": "s1", "question": kw.pop("question", "Q?"),
            "reference": reference, "prediction": prediction, "choices": None, "kind": kind,
            "category": None, "dataset": None, "row": kw.pop("row", 2)}
    base.update(kw)
    return base


# ------------------------------------------------------------------ BLEU


def test_bleu_hand_computed():
    # hyp "the cat" vs ref "the cat sat": p1 = 2/2, p2 = 1/1, BP = exp(1 - 3/2)
    stats = bleu_statistics(["the cat"], ["the cat sat"])
    assert stats[0].tolist()[:4] == [2, 3, 2, 1]
    assert bleu_from_statistics(stats.sum(0), 1) == pytest.approx(math.exp(-0.5))
    assert bleu_from_statistics(stats.sum(0), 2) == pytest.approx(math.exp(-0.5))
    same = bleu_statistics(["a b c d e"], ["a b c d e"]).sum(0)
    assert [bleu_from_statistics(same, n) for n in (1, 2, 3, 4)] == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_matches_sacrebleu_corpus_score(order):
    stats = bleu_statistics(HYPS, REFS).sum(0)
    direct = BLEU(tokenize="13a", max_ngram_order=order).corpus_score(HYPS, [REFS]).score / 100
    assert bleu_from_statistics(stats, order) == pytest.approx(direct, abs=1e-12)


def test_bleu_batch_equals_scalar():
    rng = np.random.default_rng(0)
    total = rng.integers(0, 20, size=(300, 4))
    correct = np.minimum(total, rng.integers(0, 6, size=(300, 4))) * (rng.random((300, 4)) > 0.3)
    stats = np.concatenate([rng.integers(0, 30, (300, 1)), rng.integers(1, 30, (300, 1)), correct, total], axis=1)
    for order in (1, 2, 3, 4):
        scalar = np.array([bleu_from_statistics(s, order) for s in stats])
        np.testing.assert_allclose(bleu_from_statistics_batch(stats, order), scalar, atol=1e-12)


# ------------------------------------------------------------------ ROUGE / METEOR


def test_rouge_hand_computed_and_stemming():
    s = rouge_scores(["the cat", "running cats"], ["the cat sat", "run cat"])
    assert s["rouge_1"][0] == pytest.approx(0.8)  # P 1, R 2/3
    assert s["rouge_2"][0] == pytest.approx(2 / 3)  # P 1, R 1/2
    assert s["rouge_1"][1] == pytest.approx(1.0)  # only with stemming


def test_rouge_matches_library():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ours = rouge_scores(HYPS, REFS)
    for i, (h, r) in enumerate(zip(HYPS, REFS)):
        direct = scorer.score(r, h)
        assert ours["rouge_1"][i] == pytest.approx(direct["rouge1"].fmeasure)
        assert ours["rouge_2"][i] == pytest.approx(direct["rouge2"].fmeasure)
        assert ours["rouge_l"][i] == pytest.approx(direct["rougeL"].fmeasure)


def test_meteor_hand_computed_identical_sentence():
    # all 4 unigrams match in one chunk: Fmean 1, penalty 0.5 * (1/4)^3
    nosyn = WordNet(_NoSynonyms(), False, "test")
    assert meteor_scores(["a b c d"], ["a b c d"], nosyn)[0] == pytest.approx(1 - 0.5 * 0.25 ** 3)
    assert meteor_scores([""], ["a b"], nosyn)[0] == 0.0


def test_meteor_matches_nltk_with_same_wordnet():
    wn = load_wordnet()
    ours = meteor_scores(HYPS, REFS, wn)
    for i, (h, r) in enumerate(zip(HYPS, REFS)):
        assert ours[i] == pytest.approx(meteor_score([meteor_tokens(r)], meteor_tokens(h), wordnet=wn.reader))


def test_wordnet_offline_synonyms_or_flagged():
    wn = load_wordnet()
    nosyn = WordNet(_NoSynonyms(), False, "test")
    with_syn = meteor_scores(["the neoplasm is big"], ["the tumour is large"], wn)[0]
    without = meteor_scores(["the neoplasm is big"], ["the tumour is large"], nosyn)[0]
    if wn.available:  # Debian wordnet-base (or nltk_data) present: synonyms are used
        assert "tumour" in {l for s in wn.reader.synsets("neoplasm") for l in s.lemma_names()}
        assert with_syn > without
    else:
        assert with_syn == without and "without synonyms" in wn.source


def test_wordnet_explicit_bad_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_wordnet(str(tmp_path))


# ------------------------------------------------------------------ closed accuracy, validation


def test_closed_accuracy_and_unparsed():
    rows = [
        row("mc", "B", "B", choices=DIAG, key="k1", category="dx"),
        row("mc", "The answer is C", "C", choices=DIAG, key="k2", category="dx"),
        row("mc", "Adenocarcinoma", "D", choices=DIAG, key="k3", category="dx"),  # wrong
        row("mc", "I cannot tell", "A", choices=DIAG, key="k4", category="dx"),  # unparsed → wrong
        row("vqa", "Yes, it is poor.", "Yes", key="k5", category="prog"),
        row("vqa", "maybe", "No", key="k6", category="prog"),  # unparsed
    ]
    m = evaluate_predictions(rows, bootstrap=200, seed=0)
    assert m["n_closed"] == 6 and m["n_mc"] == 4 and m["n_yes_no"] == 2 and m["n_open"] == 0
    assert m["closed_accuracy"] == pytest.approx(3 / 6)
    assert m["mc_accuracy"] == pytest.approx(2 / 4)
    assert m["yes_no_accuracy"] == pytest.approx(1 / 2)
    assert m["n_unparsed"] == 2
    assert {u["key"] for u in m["unparsed"]} == {"k4", "k6"}
    assert m["bleu_1"] is None and m["bleu_1_ci"] is None
    assert set(m["by_category"]) == {"dx", "prog"}
    assert m["by_category"]["dx"]["closed_accuracy"] == pytest.approx(0.5)
    assert m["by_category"]["prog"]["n_closed"] == 2
    assert "by_dataset" not in m  # no row has a dataset


def test_mc_choices_parsed_from_question_and_text_reference():
    q = "Which type? A) Adenocarcinoma B) Squamous cell carcinoma C) Small cell carcinoma"
    m = evaluate_predictions([row("mc", "B)", "Squamous cell carcinoma", question=q)], bootstrap=0)
    assert m["closed_accuracy"] == 1.0 and m["closed_accuracy_ci"] is None


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prediction": None}, "field 'prediction' is missing"),
        ({"kind": "essay"}, "field 'kind'"),
        ({"reference": "  "}, "field 'reference' is empty"),
        ({"kind": "mc", "choices": DIAG, "reference": "E"}, "field 'reference'"),
        ({"kind": "mc", "choices": None}, "no inline"),
        ({"choices": "A,B"}, "field 'choices'"),
    ],
)
def test_bad_rows_name_line_and_field(bad, match):
    r = row("vqa", "text", "ref")
    r.update(bad)
    r["_line"] = 7
    with pytest.raises(EvalInputError, match=match) as e:
        prepare_items([r], "preds.jsonl")
    assert "preds.jsonl, line 7" in str(e.value)


# ------------------------------------------------------------------ open-ended aggregate + bootstrap


def open_rows():
    return [row("report" if i % 2 else "vqa", h, r, key=f"o{i}", dataset=f"d{i % 2}") for i, (h, r) in enumerate(zip(HYPS, REFS))]


def test_open_metrics_equal_library_aggregates():
    m = evaluate_predictions(open_rows(), bootstrap=0)
    assert m["n_open"] == 5 and m["n_closed"] == 0 and m["closed_accuracy"] is None
    for n in (1, 2, 3, 4):
        assert m[f"bleu_{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(HYPS, [REFS]).score / 100)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert m["rouge_l"] == pytest.approx(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]))
    assert set(m["by_dataset"]) == {"d0", "d1"} and m["by_dataset"]["d0"]["n_open"] == 3


def test_bleu_ci_is_resample_and_recompute():
    """Each bootstrap value equals sacrebleu's corpus BLEU of that resample, recomputed from scratch."""
    b = 30
    m = evaluate_predictions(open_rows(), config=EvalConfig(bootstrap=b, seed=3))
    rng = np.random.default_rng(stable_seed(3, "__all__", "bleu"))
    counts = np.concatenate(list(resample_counts(len(HYPS), b, rng)))
    values = []
    for c in counts.astype(int):
        idx = np.repeat(np.arange(len(HYPS)), c)
        values.append(BLEU(max_ngram_order=4).corpus_score([HYPS[i] for i in idx], [[REFS[i] for i in idx]]).score / 100)
    assert m["bleu_4_ci"] == pytest.approx(np.percentile(values, [2.5, 97.5]).tolist(), abs=1e-9)


def test_bootstrap_deterministic_and_seed_dependent():
    rows = [row("mc", "A" if i % 3 else "B", "A", choices=DIAG, key=f"k{i}") for i in range(40)] + open_rows()
    a = evaluate_predictions(rows, bootstrap=300, seed=0)
    b = evaluate_predictions(rows, bootstrap=300, seed=0)
    c = evaluate_predictions(rows, bootstrap=300, seed=1)
    assert a == b
    assert a["closed_accuracy_ci"] != c["closed_accuracy_ci"]
    lo, hi = a["closed_accuracy_ci"]
    assert lo <= a["closed_accuracy"] <= hi and hi - lo > 0.05
    for name in ("bleu_1", "rouge_1", "meteor"):
        lo, hi = a[f"{name}_ci"]
        assert lo <= a[name] + 1e-12 and a[name] <= hi + 1e-12


def test_constant_scores_give_degenerate_ci():
    rows = [row("mc", "A", "A", choices=DIAG, key=f"k{i}") for i in range(10)]
    m = evaluate_predictions(rows, bootstrap=100)
    assert m["closed_accuracy"] == 1.0 and m["closed_accuracy_ci"] == [1.0, 1.0]


def test_resample_counts_rows_sum_to_n():
    blocks = list(resample_counts(7, 600, np.random.default_rng(0), block=256))
    assert [b.shape for b in blocks] == [(256, 7), (256, 7), (88, 7)]
    assert all((b.sum(1) == 7).all() for b in blocks)


def test_compare_metrics_gap():
    gap = compare_metrics({"closed_accuracy": 0.8, "bleu_1": 0.5, "meteor": None}, {"closed_accuracy": 0.55, "bleu_1": 0.2})
    assert gap["closed_accuracy"] == pytest.approx(-0.25)
    assert gap["bleu_1"] == pytest.approx(-0.3)
    assert gap["meteor"] is None
