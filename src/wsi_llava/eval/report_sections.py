"""The sections of ``report.md`` beside the headline: exact intervals, blind baselines and the model's
margin, sentence-form yes/no answers, choice-order robustness (``circular``), paired tests of
comparison runs, and the question set's provenance. Each returns Markdown lines (empty when the
metrics hold nothing for it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .metrics import COUNT_OF
from .tables import ACCURACY, LABELS, md_table, pct, pct_ci, pts, shorten


def exact_section(metrics: Mapping[str, object], conf: int) -> list[str]:
    """Each accuracy as right/n with its Wilson, Clopper–Pearson and bootstrap intervals."""
    rows = []
    for name in ACCURACY:
        n = metrics.get(COUNT_OF[name]) or 0
        if not n or metrics.get(name) is None:
            continue
        k = int(round(float(metrics[name]) * n))
        rows.append((LABELS[name].strip(), f"{k}/{n}", pct(metrics[name]), pct_ci(metrics.get(f"{name}_wilson")),
                     pct_ci(metrics.get(f"{name}_clopper_pearson")), pct_ci(metrics.get(f"{name}_ci"))))
    if not rows:
        return []
    return ["", "## Exact intervals", ""] + md_table(
        ("metric", "right/n", "accuracy", f"Wilson {conf}%", f"Clopper–Pearson {conf}%", f"bootstrap {conf}%"), rows)


BASELINE_NOTE = (
    "Blind baselines answer without the slide: chance (1/k per k-option question, 1/2 per yes/no), the best "
    "constant letter, the longest option (ties: expected credit), the yes/no majority. The best blind "
    "baseline is the best of chance, constant letter + yes/no prior, and longest option + yes/no prior over "
    "the closed questions of the row. **The constant letter and the yes/no majority are chosen on the scored "
    "questions themselves, which is optimistic** (a blind model cannot know the test split's majority) unless "
    "`--fit-data` gave other question files. Margin = model − best blind baseline on the same questions, "
    "paired bootstrap interval over questions (the strategy is chosen once, not per resample)."
)


def baseline_cells(entry: Mapping[str, object]) -> list[str]:
    """The baseline columns of one set of questions (n closed, chance, letter, longest, prior, best)."""
    const = entry.get("constant_letter")
    longest = entry.get("longest_option")
    prior = entry.get("yes_no_prior")
    best = entry.get("best_blind")
    return [
        str(entry.get("n_closed", 0)),
        pct(entry.get("chance")),
        f"{pct(const['accuracy'])} ({const['letter']})" if const else "–",
        pct(longest["accuracy"]) if longest else "–",
        f"{pct(prior['accuracy'])} ({prior['majority']}; yes {pct(prior['yes_fraction'])})" if prior else "–",
        f"{pct(best['accuracy'])} ({best.get('label', best['strategy'])})" if best else "–",
    ]


def baseline_entries(baselines: Mapping[str, object]) -> list[tuple[str, str, Mapping[str, object]]]:
    """``(level, name, entry)`` for all questions, then each group, file and category."""
    out = [("all", "all", baselines["all"])]
    for level, title in (("group", "group"), ("source", "file"), ("category", "category")):
        for name, entry in (baselines.get(f"by_{level}") or {}).items():
            out.append((title, name, entry))
    return out


def baselines_section(baselines: Mapping[str, object] | None, conf: int, *, with_model: bool) -> list[str]:
    """The blind-baseline table (one row per set: all, each group, each file, each category)."""
    if not baselines:
        return []
    entries = [(lvl, name, e) for lvl, name, e in baseline_entries(baselines) if e.get("n_closed")]
    # a category that equals its source file (WSI-Bench) is shown once
    sources = {name for lvl, name, _ in entries if lvl == "file"}
    entries = [(lvl, n, e) for lvl, n, e in entries
               if not (lvl == "category" and any(src.startswith(f"{n}_") or src.startswith(f"{n}.") for src in sources))]
    if not entries:
        return []
    runs = sorted({r for _, _, e in entries for r in (e.get("runs") or {})})
    header = ["set", "name", "n closed", "chance", "constant letter", "longest option", "yes/no prior", "best blind"]
    if with_model:
        header += ["model", f"margin ({conf}% CI)", *runs]
    rows = []
    for lvl, name, e in entries:
        row = [lvl, name, *baseline_cells(e)]
        if with_model:
            model = e.get("model") or {}
            row += [pct(model.get("accuracy")), pts(model.get("margin"), model.get("margin_ci")),
                    *[pct((e.get("runs") or {}).get(r)) for r in runs]]
        rows.append(row)
    fit = baselines["all"].get("fit", "")
    return ["", "## Blind baselines", "", *md_table(header, rows), "", BASELINE_NOTE, f"Constant letter / yes-no prior fitted on: {fit}."]


def binary_text_lines(metrics: Mapping[str, object]) -> list[str]:
    """Prose yes/no answers of open items: gold and prediction parse counts, agreement."""
    n = metrics.get("n_binary_text") or 0
    gold_unparsed = metrics.get("n_binary_text_gold_unparsed") or 0
    if not n and not gold_unparsed:
        return []
    return ["", "## Yes/no answers written as sentences (open-ended items)", "",
            f"{n + gold_unparsed} open question(s) are yes/no or \"X or Y\" questions; the gold answer states its label "
            f"plainly in {n} and **cannot be read in {gold_unparsed}** (left out, not guessed). On the {n}: predictions "
            f"give the same label in {pct(metrics.get('binary_text_accuracy'))} (Wilson "
            f"{pct_ci(metrics.get('binary_text_accuracy_wilson'))}); {metrics.get('n_binary_text_unparsed', 0)} "
            "prediction(s) state no label and count as wrong."]


def binary_text_section(baselines: Mapping[str, object] | None) -> list[str]:
    """Sentence-form yes/no answers per set (baselines-only report)."""
    if not baselines:
        return []
    rows = [(lvl, name, b["n_questions"], b["n_parsed"], b["n_unparsed"],
             f"{b['majority']} ({pct(b['majority_share'])})" if b.get("majority") else "–", pct(b.get("yes_fraction")))
            for lvl, name, e in baseline_entries(baselines) if (b := e.get("binary_text"))]
    if not rows:
        return []
    return ["", "## Yes/no answers written as sentences", "",
            *md_table(("set", "name", "questions", "parsed", "unparsed", "majority (share)", "yes share"), rows), "",
            "Open-ended yes/no (or \"good or poor\") questions whose gold answer is a sentence: read by "
            "`wsi_llava.eval.polar.binary_label`; an answer it cannot read plainly is counted as unparsed, never guessed."]


def circular_section(circular: Mapping[str, object] | None, conf: int) -> list[str]:
    """Choice-order robustness: circular accuracy and consistency, overall and per group / category."""
    if not circular:
        return []
    lines = ["", "## Choice-order robustness (CircularEval)", ""]
    if not circular.get("n"):
        return lines + [f"No multiple-choice question was answered under all rotations ({circular.get('n_incomplete', 0)} incomplete)."]
    header = ("set", "n", "circular accuracy", f"Wilson {conf}%", "consistency", "rotation-0 accuracy", "mean over rotations")

    def row(name, c):
        return (name, c["n"], pct(c["circular_accuracy"]), pct_ci(c.get("circular_accuracy_wilson")), pct(c["consistency"]),
                pct(c["accuracy_rotation_0"]), pct(c["mean_rotation_accuracy"]))

    rows = [row("all", circular)]
    rows += [row(f"group {g}", c) for g, c in (circular.get("by_group") or {}).items()]
    rows += [row(f"category {g}", c) for g, c in (circular.get("by_category") or {}).items()]
    lines += md_table(header, rows)
    lines += ["", "Each k-option question is asked k times, its options rotated by 0 … k−1. Circular accuracy: right "
              "under every rotation; consistency: the same original option chosen under every rotation. "
              f"{circular.get('n_incomplete', 0)} question(s) lacked a rotation (not scored); "
              f"{circular.get('n_unparsed_answers', 0)} answer(s) named no option."]
    return lines


def paired_section(comparisons: Mapping[str, Mapping[str, object]], conf: int) -> list[str]:
    """Paired tests of each comparison run against the main run (McNemar, paired bootstrap)."""
    rows = []
    for name, other in comparisons.items():
        paired = other.get("paired") or {}
        closed = paired.get("closed")
        if closed:
            rows.append((name, "closed accuracy", closed["n"], pts(closed["diff"], closed.get("diff_ci")),
                         f"McNemar exact p = {closed['mcnemar_p_value']:.3g} "
                         f"(main right/other wrong {closed['main_right_other_wrong']}, "
                         f"main wrong/other right {closed['main_wrong_other_right']})"))
        opened = paired.get("open") or {}
        for metric in ("bleu_4", "rouge_l", "meteor"):
            d = opened.get(metric)
            if d:
                ci = d.get("ci")
                rows.append((name, LABELS[metric], opened["n"],
                             f"{d['diff']:+.4f}" + (f" ({ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""),
                             "paired bootstrap p = " + (f"{d['p_value']:.3g}" if d.get("p_value") is not None else "–")))
    if not rows:
        return []
    return ["", "## Paired tests", "", *md_table(("run", "metric", "n pairs", f"Δ other − main ({conf}% CI)", "test"), rows),
            "", "Items matched by manifest row (else key). Closed answers: McNemar's exact binomial test on the "
            "discordant pairs; all metrics: paired bootstrap over items (BLEU-4 recomputed as corpus BLEU per resample)."]


def provenance_section(provenance: Mapping[str, object] | None) -> list[str]:
    """Question-set record: files with checksums, release sizes, per-category counts, dropped items."""
    if not provenance:
        return []
    lines = ["", "## Question set", ""]
    files = provenance.get("files") or []
    if files:
        lines += md_table(("file", "format", "items", "sha256"),
                           [(f.get("name"), f.get("format"), f.get("n_items"), f.get("sha256")) for f in files])
        lines.append("")
    lines.append(f"{provenance.get('n_items_in_files', 0):,} item(s) in the files; {provenance.get('n_imported', 0):,} "
                 f"used; {provenance.get('n_dropped', 0):,} dropped.")
    for rel in provenance.get("releases") or []:
        known = " / ".join(f"{n:,}" for n in rel.get("known", []))
        where = f" ({rel['file']})" if rel.get("file") else ""
        match = f"matches {rel['matches']}" if rel.get("matches") else "**matches none of them**"
        lines.append(f"- {rel['benchmark']}{where}: {rel['n']:,} items; published sizes {known}: {match}.")
    split = provenance.get("split")
    if split:
        lines.append(f"- split by {split.get('by')}: {split.get('n_test_cases')} test / {split.get('n_train_cases')} train "
                     f"case(s), test fraction {split.get('test_fraction')}, seed {split.get('seed')}.")
    cats = provenance.get("categories") or {}
    if cats:
        lines += ["", *md_table(("category", "read", "used", "dropped"),
                                 [(c, v.get("read"), v.get("imported"), v.get("dropped")) for c, v in cats.items()])]
    reasons = provenance.get("dropped_by_reason") or {}
    if reasons:
        lines += ["", "Dropped, by reason:", ""] + [f"- {n} × {r}" for r, n in reasons.items()]
    dropped = provenance.get("dropped") or []
    if dropped:
        lines += ["", *md_table(("source", "item", "slide_id", "reason"),
                                 [(Path(str(d.get("source"))).name, d.get("item"), d.get("slide_id"), shorten(d.get("reason"), 160))
                                  for d in dropped[:200]])]
        if len(dropped) > 200:
            lines.append(f"… and {len(dropped) - 200} more (all in metrics.json).")
    for name, side in (provenance.get("manifests") or {}).items():
        lines += ["", f"### Import record of `{name}`"] + provenance_section(side)[2:]
    return lines
