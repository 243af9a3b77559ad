"""Exact intervals, McNemar and the paired bootstrap (eval/stats.py); paired tests of --compare (eval/paired.py)."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from wsi_llava.cli import main as cli_main
from wsi_llava.eval.metrics import EvalConfig, evaluate_items_with_scores
from wsi_llava.eval.rows import prepare_items
from wsi_llava.eval.paired import paired_tests
from wsi_llava.eval.stats import clopper_pearson_interval, mcnemar_exact, paired_bootstrap, wilson_interval

# Newcombe (1998), Statistics in Medicine 17:857-872, Table I: Wilson score (method 3) and exact
# Clopper-Pearson (method 5) 95% intervals.
NEWCOMBE = [
    ((81, 263), (0.2553, 0.3662), (0.2527, 0.3676)),
    ((15, 148), (0.0624, 0.1605), (0.0578, 0.1617)),
    ((0, 20), (0.0000, 0.1611), (0.0000, 0.1684)),
    ((1, 29), (0.0061, 0.1718), (0.0009, 0.1776)),
]


@pytest.mark.parametrize("kn,wilson,exact", NEWCOMBE)
def test_intervals_match_textbook_values(kn, wilson, exact):
    k, n = kn
    assert wilson_interval(k, n) == pytest.approx(wilson, abs=6e-5)
    assert clopper_pearson_interval(k, n) == pytest.approx(exact, abs=6e-5)


@pytest.mark.parametrize("k,n", [(3, 10), (17, 40), (1, 7), (48, 48), (0, 5)])
def test_clopper_pearson_bounds_are_the_binomial_tail_points(k, n):
    lo, hi = clopper_pearson_interval(k, n, 0.9)
    if k > 0:  # P(X >= k | lo) = alpha/2
        assert binom.sf(k - 1, n, lo) == pytest.approx(0.05, rel=1e-6)
    else:
        assert lo == 0.0
    if k < n:  # P(X <= k | hi) = alpha/2
        assert binom.cdf(k, n, hi) == pytest.approx(0.05, rel=1e-6)
    else:
        assert hi == 1.0


def test_wilson_closed_form_and_edge_cases():
    z = 1.959963984540054
    k, n = 7, 12
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx([center - half, center + half])
    assert wilson_interval(0, 0) is None and clopper_pearson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


@pytest.mark.parametrize("b,c", [(10, 2), (0, 7), (25, 31), (3, 3)])
def test_mcnemar_exact_equals_binomial_test(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    assert mcnemar_exact(b, c) == pytest.approx(mcnemar_exact(c, b))


def test_mcnemar_hand_computed():
    # b=10, c=2: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_bootstrap_mean_difference():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.7).astype(float)
    b = a.copy()
    b[:40] = 1 - b[:40]
    res = paired_bootstrap(a, b, bootstrap=500, confidence=0.95, rng=np.random.default_rng(1))
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert res["ci"][0] <= res["diff"] <= res["ci"][1]
    same = paired_bootstrap(a, a, bootstrap=200, confidence=0.95, rng=np.random.default_rng(1))
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    assert paired_bootstrap(a, b, bootstrap=0, confidence=0.95, rng=np.random.default_rng(1))["ci"] is None


DIAG = ["Adenocarcinoma", "Squamous cell carcinoma", "Small cell carcinoma", "Benign"]


def rows(answers, open_answers=()):
    out = []
    for i, (gold, pred) in enumerate(answers):
        out.append({"key": f"s{i}\tq", "slide_id": f"s{i}", "question": "Which type?", "reference": gold,
                    "prediction": pred, "choices": DIAG, "kind": "mc", "category": "Diagnosis_choice", "row": i + 2})
    for j, (ref, pred) in enumerate(open_answers):
        out.append({"key": f"o{j}\tq", "slide_id": f"o{j}", "question": "Describe the slide.", "reference": ref,
                    "prediction": pred, "choices": None, "kind": "vqa", "category": "Grading", "row": 100 + j})
    return out


def test_paired_tests_count_discordant_pairs_and_match_by_row():
    golds = "ABCDABCDABCD"
    main = rows([(g, g) for g in golds[:10]] + [(g, "A" if g != "A" else "B") for g in golds[10:]])
    other = rows([(g, "A") for g in golds])
    other.reverse()  # order does not matter: matched by row
    cfg = EvalConfig(bootstrap=200, seed=0)
    mi, ms = prepare_items(main), None
    _, ms = evaluate_items_with_scores(mi, cfg)
    oi = prepare_items(other)
    _, os_ = evaluate_items_with_scores(oi, cfg)
    res = paired_tests(mi, ms, oi, os_, cfg, "zero")
    closed = res["closed"]
    a = np.array([g == g for g in golds[:10]] + [False, False], dtype=float)  # main right on the first 10
    b = np.array([g == "A" for g in golds], dtype=float)
    assert res["n_matched"] == 12 and res["n_only_main"] == 0
    assert closed["main_right_other_wrong"] == int(((a == 1) & (b == 0)).sum()) == 7
    assert closed["main_wrong_other_right"] == int(((a == 0) & (b == 1)).sum()) == 0
    assert closed["mcnemar_p_value"] == pytest.approx(binomtest(7, 7, 0.5).pvalue)
    assert closed["diff"] == pytest.approx(b.mean() - a.mean())


def test_eval_compare_writes_paired_tests(tmp_path):
    opens = [("The tumor is poorly differentiated with necrosis.", "The tumor is poorly differentiated."),
             ("Glands are well formed.", "Glands are well formed.")] * 3
    main = rows([(g, g) for g in "ABCDAB"], opens)
    other = rows([(g, "C") for g in "ABCDAB"], [(r, "Nothing.") for r, _ in opens])
    p, q = tmp_path / "main.jsonl", tmp_path / "other.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in main))
    q.write_text("".join(json.dumps(r) + "\n" for r in other))
    out = tmp_path / "ev"
    assert cli_main(["eval", "--predictions", str(p), "--compare", f"zeroed={q}", "--out", str(out),
                     "--bootstrap", "100"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    paired = m["comparisons"]["zeroed"]["metrics"]["paired"]
    assert paired["closed"]["main_right_other_wrong"] == 5 and paired["closed"]["main_wrong_other_right"] == 0
    assert paired["closed"]["mcnemar_p_value"] == pytest.approx(2 / 32)
    assert paired["open"]["rouge_l"]["diff"] < 0 and len(paired["open"]["bleu_4"]["ci"]) == 2
    gap = m["comparisons"]["zeroed"]["gap"]
    assert paired["open"]["rouge_l"]["diff"] == pytest.approx(gap["rouge_l"])
    assert paired["open"]["bleu_4"]["diff"] == pytest.approx(gap["bleu_4"])
    report = (out / "report.md").read_text()
    assert "## Paired tests" in report and "McNemar exact p = 0.0625" in report
    assert "## Exact intervals" in report and "Clopper–Pearson" in report
    assert m["closed_accuracy_wilson"] == pytest.approx(wilson_interval(6, 6))
    assert m["closed_accuracy_clopper_pearson"] == pytest.approx(clopper_pearson_interval(6, 6))
