"""Blind baselines: what a benchmark's questions give away without the slide.

Closed questions of WSI-Bench carry strong answer priors (one letter is gold for half of
``Morphology_choice``; "No" is gold for 39 of 48 ``Prognosis_TF_question`` items), so an accuracy
means little without them. For every set of questions (all, per category, per source file, per
WSI-Bench group) :func:`blind_baselines` reports

* ``chance`` — expected accuracy of a uniform guess: 1/k on a k-option question, 1/2 on yes/no;
* ``constant_letter`` — the best single letter (and which; every letter's accuracy is listed);
* ``longest_option`` — always the option with the most characters (ties: expected credit 1/t);
* ``yes_no_prior`` — always the majority answer of the yes/no questions, its share, and the share
  of "yes";
* ``binary_text`` — yes/no (or "good"/"poor") answers written as sentences in open-ended items,
  read by :func:`~wsi_llava.eval.polar.binary_label`: how many parse, how many do **not** (counted,
  never guessed), the majority label and its share;
* ``best_blind`` — the best of three blind strategies over all closed questions: chance; the
  constant letter on multiple choice + the yes/no prior; the longest option + the yes/no prior.

**The constant letter and the yes/no majority are chosen on the very questions they are scored on**
(optimistic: a blind model cannot know the test split's majority) unless fitted on other question
files (``fit``): then each is chosen on the fit questions of the same categories and applied to these.

With predictions, :func:`model_margins` gives the model's closed accuracy minus the best blind
baseline, item by item on the same questions, with a paired-bootstrap interval.

:data:`WSI_BENCH_GROUPS` is the roll-up papers report (morphology / diagnosis / treatment). Question
files are read by :mod:`wsi_llava.eval.questions`.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.choices import LETTERS, normalize_text
from .polar import binary_label, question_form
from .stats import paired_bootstrap, proportion_intervals, stable_seed

#: WSI-Bench categories (file stem without ``_test``) → the capability group papers report.
#: Closed questions: morphology = Morphology_choice (682); diagnosis = Diagnosis_choice (413) +
#: Staging_choice (145); treatment = Molecular_Subtyping_choice (48) + Prognosis_TF_question (48).
#: These denominators reproduce published accuracies exactly to one decimal (HistoSelect 94.6 /
#: 85.8 / 97.9 = 645/682, 479/558, 94/96). Open-ended files follow their task: the three
#: descriptions → morphology; key diagnostic description, histological typing, grading, staging →
#: diagnosis; molecular subtyping, prognosis, treatment planning → treatment. ``1_Report`` (report
#: generation) is its own group, ``report``.
WSI_BENCH_GROUPS: dict[str, str] = {
    "Morphology_choice": "morphology",
    "Global_Morphology_Description": "morphology",
    "Regional_Structure_Description": "morphology",
    "Specific_Feature_Description": "morphology",
    "Diagnosis_choice": "diagnosis",
    "Staging_choice": "diagnosis",
    "Key_Diagnostic_Description": "diagnosis",
    "Histological_Typing": "diagnosis",
    "Grading": "diagnosis",
    "Staging": "diagnosis",
    "Molecular_Subtyping_choice": "treatment",
    "Prognosis_TF_question": "treatment",
    "Molecular_Subtyping": "treatment",
    "Prognosis": "treatment",
    "Treatment_Planing": "treatment",
    "Treatment_Planning": "treatment",
    "1_Report": "report",
}
GROUP_ORDER = ("morphology", "diagnosis", "treatment", "report")

STRATEGIES = ("chance", "constant_letter", "longest_option")
"""The closed-question blind strategies (yes/no items: chance answers 1/2, the other two the prior)."""


@dataclass(frozen=True)
class Question:
    """One benchmark question as the blind baselines see it (no slide, no prediction)."""

    key: str
    kind: str
    """``"mc"``, ``"yes_no"`` or ``"open"``."""
    gold: str
    """Gold letter (mc), ``"yes"``/``"no"`` (yes_no) or the answer text (open)."""
    question: str = ""
    choices: tuple[str, ...] | None = None
    category: str | None = None
    dataset: str | None = None
    source: str | None = None
    """Input file name (the per-file table)."""
    group: str | None = None
    """Benchmark group (WSI-Bench capability, SlideBench broad category), if known."""


def group_of(category: str | None, explicit: str | None = None) -> str | None:
    """The benchmark group of a question: ``explicit`` if given, else from :data:`WSI_BENCH_GROUPS`."""
    if explicit:
        return explicit
    return WSI_BENCH_GROUPS.get(category or "")


def question_from_fields(key: str, kind: str, gold: str, *, question: str = "", choices=None, category=None,
                         dataset=None, source=None, group=None) -> Question:
    """A :class:`Question` from already-normalised fields (kind ``mc``/``yes_no``/``open``)."""
    return Question(key=key, kind=kind, gold=gold, question=question or "",
                    choices=tuple(choices) if choices else None, category=category or None,
                    dataset=dataset or None, source=source or None, group=group_of(category, group))


def questions_from_items(items: Iterable) -> list[Question]:
    """Questions from scored prediction items (:class:`~wsi_llava.eval.rows.Item`)."""
    return [question_from_fields(it.key, it.kind, it.reference, question=it.question, choices=it.choices,
                                 category=it.category, dataset=it.dataset) for it in items]


# --------------------------------------------------------------------------------------------------
# Per-item credits of the blind strategies


@functools.lru_cache(maxsize=1 << 16)
def _option_lengths(choices: tuple[str, ...]) -> tuple[int, ...]:
    """Characters of each option's normalised text (cached: every level of the table asks again)."""
    return tuple(len(normalize_text(c)) for c in choices)


def longest_credit(q: Question) -> float:
    """Expected credit of "pick the longest option" (uniform among tied longest options)."""
    lengths = _option_lengths(tuple(q.choices or ()))
    top = max(lengths)
    tied = [LETTERS[i] for i, n in enumerate(lengths) if n == top]
    return 1.0 / len(tied) if q.gold in tied else 0.0


def _fit_letter(questions: Sequence[Question]) -> tuple[str | None, dict[str, float]]:
    """Best constant letter on multiple-choice ``questions`` (ties → the earliest letter) and every
    letter's accuracy."""
    mc = [q for q in questions if q.kind == "mc"]
    if not mc:
        return None, {}
    k_max = max(len(q.choices or ()) for q in mc)
    gold = Counter(q.gold for q in mc)
    by_letter = {LETTERS[i]: gold[LETTERS[i]] / len(mc) for i in range(k_max)}
    best = max(by_letter, key=lambda letter: (by_letter[letter], -LETTERS.index(letter)))
    return best, by_letter


def _fit_majority(labels: Sequence[str]) -> str | None:
    """Majority label (ties → alphabetical first)."""
    if not labels:
        return None
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def strategy_credits(questions: Sequence[Question], letter: str | None, majority: str | None) -> dict[str, np.ndarray]:
    """Per closed question, each strategy's (expected) credit: ``{strategy: [n_closed]}``."""
    out = {name: [] for name in STRATEGIES}
    for q in questions:
        if q.kind == "mc":
            out["chance"].append(1.0 / len(q.choices or ("",)))
            out["constant_letter"].append(float(q.gold == letter))
            out["longest_option"].append(longest_credit(q))
        elif q.kind == "yes_no":
            prior = float(q.gold == majority)
            out["chance"].append(0.5)
            out["constant_letter"].append(prior)
            out["longest_option"].append(prior)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def strategy_label(strategy: str, has_mc: bool, has_yes_no: bool) -> str:
    """What a strategy does on this set, in words ("longest option + yes/no prior", "yes/no prior", …)."""
    if strategy == "chance":
        return "chance"
    mc_part = strategy.replace("_", " ")
    if has_mc and has_yes_no:
        return f"{mc_part} + yes/no prior"
    return mc_part if has_mc else "yes/no prior"


# --------------------------------------------------------------------------------------------------
# Baselines of one set of questions


def _binary_text(questions: Sequence[Question]) -> dict[str, object] | None:
    """Sentence-form binary answers among open questions: parsed / unparsed counts and the prior."""
    labels, unparsed, forms = [], 0, Counter()
    for q in questions:
        if q.kind != "open":
            continue
        form = question_form(q.question)
        if form is None:
            continue
        forms[form[0]] += 1
        label = binary_label(q.question, q.gold)
        if label is None:
            unparsed += 1
        else:
            labels.append(label)
    n = len(labels) + unparsed
    if not n:
        return None
    majority = _fit_majority(labels)
    counts = Counter(labels)
    return {
        "n_questions": n, "n_polar": forms["polar"], "n_alternative": forms["alternative"],
        "n_parsed": len(labels), "n_unparsed": unparsed, "label_counts": dict(counts.most_common()),
        "majority": majority, "majority_share": counts[majority] / len(labels) if labels else None,
        "yes_fraction": counts["yes"] / len(labels) if labels and forms["polar"] else None,
    }


def blind_baselines(
    questions: Sequence[Question], confidence: float = 0.95, fit: Sequence[Question] | None = None
) -> dict[str, object]:
    """The blind baselines of one set of questions (see the module docstring)."""
    mc = [q for q in questions if q.kind == "mc"]
    yn = [q for q in questions if q.kind == "yes_no"]
    closed = [q for q in questions if q.kind in ("mc", "yes_no")]
    out: dict[str, object] = {"n_items": len(questions), "n_closed": len(closed), "n_mc": len(mc), "n_yes_no": len(yn)}
    fit_source = "test (optimistic: chosen on the scored questions)"
    fit_set: Sequence[Question] = questions
    if fit is not None:
        cats = {q.category for q in questions}
        chosen = [q for q in fit if q.category in cats]
        if chosen:
            fit_set, fit_source = chosen, f"fit questions of the same categories ({len(chosen)})"
    letter, by_letter_fit = _fit_letter(fit_set)
    if letter is None and fit_set is not questions:  # fit files had no mc of these categories
        letter, by_letter_fit = _fit_letter(questions)
    majority = _fit_majority([q.gold for q in fit_set if q.kind == "yes_no"]) or _fit_majority([q.gold for q in yn])
    out["fit"] = fit_source
    credits = strategy_credits(questions, letter, majority)
    if mc:
        k = [len(q.choices or ()) for q in mc]
        gold = Counter(q.gold for q in mc)
        out["options"] = {"min": min(k), "max": max(k), "mean": float(np.mean(k))}
        out["chance_mc"] = float(np.mean([1.0 / x for x in k]))
        by_letter = {LETTERS[i]: gold[LETTERS[i]] / len(mc) for i in range(max(k))}
        out["constant_letter"] = {"letter": letter, "accuracy": by_letter.get(letter, 0.0), "by_letter": by_letter,
                                  **({"fit_accuracy": by_letter_fit.get(letter)} if fit_set is not questions else {})}
        ties = 0
        longest = []
        for q in mc:
            lengths = _option_lengths(tuple(q.choices or ()))
            ties += sum(n == max(lengths) for n in lengths) > 1
            longest.append(longest_credit(q))
        out["longest_option"] = {"accuracy": float(np.mean(longest)), "n_ties": int(ties)}
    if yn:
        counts = Counter(q.gold for q in yn)
        out["yes_no_prior"] = {"majority": majority, "accuracy": counts[majority] / len(yn),
                               "yes_fraction": counts["yes"] / len(yn), "n": len(yn)}
    text = _binary_text(questions)
    if text:
        out["binary_text"] = text
    if closed:
        accs = {name: float(credits[name].mean()) for name in STRATEGIES}
        out["chance"] = accs["chance"]
        out["strategies"] = accs
        best = max(STRATEGIES, key=lambda s: (accs[s], -STRATEGIES.index(s)))
        out["best_blind"] = {"strategy": best, "label": strategy_label(best, bool(mc), bool(yn)), "accuracy": accs[best],
                             **proportion_intervals(credits[best], confidence)}
        out["_credits"] = credits  # per closed item, in question order (dropped before writing)
    return out


def _members(questions: Sequence[Question], field: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        label = getattr(q, field)
        if label is not None:
            groups[label].append(i)
    return groups


def _ordered(names: Iterable[str], field: str) -> list[str]:
    if field == "group":
        return sorted(names, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g))
    return sorted(names)


LEVELS = ("source", "category", "group")


def baseline_table(questions: Sequence[Question], confidence: float = 0.95,
                   fit: Sequence[Question] | None = None) -> dict[str, object]:
    """:func:`blind_baselines` for all questions and per source file, category and group:
    ``{"all": …, "by_source": {…}, "by_category": {…}, "by_group": {…}}`` (levels with no labels are
    left out). Internal per-item credits are kept under ``_credits`` / ``_index`` for
    :func:`model_margins`; :func:`public` drops them."""
    table: dict[str, object] = {"all": {**blind_baselines(questions, confidence, fit), "_index": list(range(len(questions)))}}
    for level in LEVELS:
        members = _members(questions, level)
        if not members:
            continue
        table[f"by_{level}"] = {
            name: {**blind_baselines([questions[i] for i in members[name]], confidence, fit), "_index": members[name]}
            for name in _ordered(members, level)
        }
    return table


def model_margins(table: dict[str, object], questions: Sequence[Question], correct: np.ndarray, *,
                  bootstrap: int, confidence: float, rng_for: Callable[[str], np.random.Generator],
                  label: str = "model") -> None:
    """Add ``table[...][label]`` = the model's closed accuracy (with exact intervals) and its margin
    over the best blind baseline of the same questions (paired bootstrap over items). ``correct`` is
    per question (NaN for open ones)."""
    for level_name, entry in _entries(table):
        idx = [i for i in entry["_index"] if questions[i].kind in ("mc", "yes_no")]
        if not idx or "best_blind" not in entry:
            continue
        model = np.asarray(correct, dtype=np.float64)[idx]
        base = entry["_credits"][entry["best_blind"]["strategy"]]
        diff = paired_bootstrap(model, base, bootstrap=bootstrap, confidence=confidence, rng=rng_for(level_name))
        entry[label] = {"accuracy": float(model.mean()), "n": len(idx), **proportion_intervals(model, confidence),
                        "margin": diff["diff"], "margin_ci": diff["ci"], "margin_p_value": diff["p_value"]}


def add_comparison_accuracy(table: dict[str, object], questions: Sequence[Question], correct_by_name: Mapping[str, np.ndarray]) -> None:
    """Closed accuracy of other runs (e.g. the zeroed / shuffled slide ablations) on the same
    questions, beside the baselines (``runs``; NaN entries = question missing from that run)."""
    for _, entry in _entries(table):
        idx = [i for i in entry["_index"] if questions[i].kind in ("mc", "yes_no")]
        if not idx:
            continue
        runs = {}
        for name, c in correct_by_name.items():
            values = np.asarray(c, dtype=np.float64)[idx]
            runs[name] = float(np.nanmean(values)) if np.isfinite(values).any() else None
        entry["runs"] = runs


def baselines_with_model(items: Sequence, correct: np.ndarray, *, bootstrap: int, confidence: float, seed: int,
                         runs: Mapping[str, np.ndarray] | None = None,
                         fit: Sequence[Question] | None = None) -> dict[str, object]:
    """The public baseline table of scored items, with the model's margin (and other runs' accuracy)."""
    questions = questions_from_items(items)
    table = baseline_table(questions, confidence, fit)
    model_margins(table, questions, correct, bootstrap=bootstrap, confidence=confidence,
                  rng_for=lambda label: np.random.default_rng(stable_seed(seed, label, "margin")))
    if runs:
        add_comparison_accuracy(table, questions, runs)
    return public(table)


def _entries(table: Mapping[str, object]):
    yield "all", table["all"]
    for level in LEVELS:
        for name, entry in (table.get(f"by_{level}") or {}).items():
            yield f"{level}={name}", entry


def public(table: Mapping[str, object]) -> dict[str, object]:
    """The table without its internal per-item fields (what goes into metrics.json)."""
    def clean(entry):
        return {k: v for k, v in entry.items() if not k.startswith("_")}

    out: dict[str, object] = {"all": clean(table["all"])}
    for level in LEVELS:
        if f"by_{level}" in table:
            out[f"by_{level}"] = {name: clean(e) for name, e in table[f"by_{level}"].items()}
    return out
