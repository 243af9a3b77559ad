"""Turn a metrics dict (from :func:`~wsi_llava.eval.metrics.evaluate_predictions`) into files and text:
``metrics.json``, a readable ``report.md`` and a plain-text summary table for the terminal.

Sections beside the headline: exact intervals, blind baselines and the model's margin (per file /
category and per benchmark group), sentence-form yes/no answers, choice-order robustness
(``circular``), paired tests of comparison runs, and the question set's provenance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..fileio import atomic_write_text
from .metrics import COUNT_OF, HEADLINE, compare_metrics

LABELS = {
    "closed_accuracy": "Closed-ended accuracy",
    "mc_accuracy": "  multiple choice",
    "yes_no_accuracy": "  yes/no",
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "rouge_1": "ROUGE-1 F",
    "rouge_2": "ROUGE-2 F",
    "rouge_l": "ROUGE-L F",
    "meteor": "METEOR",
}
_ACCURACY = ("closed_accuracy", "mc_accuracy", "yes_no_accuracy")


def format_value(name: str, value: float | None) -> str:
    """Accuracies as percentages (1 decimal), n-gram metrics on 0–1 (4 decimals); ``–`` when absent."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if name in _ACCURACY else f"{value:.4f}"


def format_ci(name: str, ci: Sequence[float] | None) -> str:
    if not ci:
        return "–"
    if name in _ACCURACY:
        return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"
    return f"{ci[0]:.4f}–{ci[1]:.4f}"


def headline_rows(metrics: Mapping[str, object]) -> list[tuple[str, str, str, str]]:
    """``(label, value, CI, n)`` for each headline metric that has items."""
    rows = []
    for name in HEADLINE:
        n = metrics.get(COUNT_OF[name]) or 0
        if not n:
            continue
        rows.append((LABELS[name], format_value(name, metrics.get(name)), format_ci(name, metrics.get(f"{name}_ci")), str(n)))
    return rows


def judge_rows(metrics: Mapping[str, object]) -> list[tuple[str, str, str, str]]:
    """Rows for the optional LLM-judge scores (empty without a judge run)."""
    judge = metrics.get("judge")
    if not judge:
        return []
    return [
        (f"Judge {name}", format_value(name, judge.get(name)), format_ci(name, judge.get(f"{name}_ci")), str(judge.get("n_judged", 0)))
        for name in ("precision", "relevance")
    ]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns before ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def summary_table(metrics: Mapping[str, object]) -> str:
    """Plain-text headline table (what ``wsi-llava eval`` prints)."""
    conf = int(round(100 * float(metrics.get("settings", {}).get("confidence", 0.95))))
    rows = headline_rows(metrics)
    rows += judge_rows(metrics)
    text = _text_table(("metric", "value", f"{conf}% CI", "n"), rows) if rows else "(no items)"
    notes = []
    if metrics.get("n_unparsed"):
        notes.append(f"{metrics['n_unparsed']} closed answer(s) could not be parsed (counted wrong; listed in report.md)")
    if metrics.get("n_open") and not metrics.get("meteor_synonyms"):
        notes.append("METEOR computed WITHOUT WordNet synonyms (WordNet not found offline)")
    if metrics.get("n_missing"):
        notes.append(f"{metrics['n_missing']} data row(s) have no prediction (not scored; listed in report.md)")
    return text + "".join(f"\nnote: {n}" for n in notes)


def _shorten(text: object, limit: int) -> str:
    s = " ".join(("" if text is None else str(text)).split())
    return s[: limit - 1] + "…" if len(s) > limit else s


def _md_cell(text: object) -> str:
    """One table cell: on one line, ``|`` escaped."""
    s = " ".join(("" if text is None else str(text)).split())
    return s.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _group_tables(name: str, groups: Mapping[str, Mapping[str, object]], conf: int) -> list[str]:
    lines: list[str] = []
    closed = [(g, m) for g, m in groups.items() if m.get("n_closed")]
    open_ = [(g, m) for g, m in groups.items() if m.get("n_open")]
    if closed:
        lines += ["", f"### Closed-ended accuracy by {name}", ""]
        lines += _md_table(
            (name, "n", "accuracy", f"{conf}% CI", "unparsed"),
            [(g, m["n_closed"], format_value("closed_accuracy", m["closed_accuracy"]),
              format_ci("closed_accuracy", m.get("closed_accuracy_ci")), m.get("n_unparsed", 0)) for g, m in closed],
        )
    if open_:
        lines += ["", f"### Open-ended metrics by {name}", ""]
        cols = ("bleu_1", "bleu_4", "rouge_l", "meteor")
        lines += _md_table(
            (name, "n", *(f"{LABELS[c]} ({conf}% CI)" for c in cols)),
            [(g, m["n_open"], *(f"{format_value(c, m[c])} ({format_ci(c, m.get(f'{c}_ci'))})" for c in cols))
             for g, m in open_],
        )
    return lines


def render_markdown(
    metrics: Mapping[str, object],
    *,
    title: str = "Evaluation report",
    source: str | None = None,
    comparisons: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """The readable report: headline table with CIs and counts, breakdowns, comparisons (e.g. a
    zeroed-slide run: its numbers and the gap), and every unparseable closed answer."""
    settings = metrics.get("settings", {})
    conf = int(round(100 * float(settings.get("confidence", 0.95))))
    lines = [f"# {title}", ""]
    if source:
        lines += [f"Predictions: `{source}`", ""]
    lines.append(
        f"{metrics.get('n_items', 0)} items: {metrics.get('n_closed', 0)} closed-ended "
        f"({metrics.get('n_mc', 0)} multiple choice, {metrics.get('n_yes_no', 0)} yes/no), "
        f"{metrics.get('n_open', 0)} open-ended."
    )
    if metrics.get("n_missing"):
        lines.append(f"**{metrics['n_missing']} row(s) of the data file have no prediction** and are not scored (listed below).")
    lines += ["", "## Headline", ""]
    rows = headline_rows(metrics)
    lines += _md_table(("metric", "value", f"{conf}% CI", "n"), rows) if rows else ["(no items)"]
    lines += [
        "",
        f"CIs: percentile bootstrap over items, {settings.get('bootstrap')} resamples, seed {settings.get('seed')}. "
        "Unparseable closed answers count as wrong.",
    ]
    if metrics.get("n_open"):
        lines += [
            f"BLEU: {settings.get('bleu')}. ROUGE: {settings.get('rouge')}. METEOR: {settings.get('meteor')}.",
        ]
        if metrics.get("meteor_synonyms"):
            lines.append(f"WordNet: {settings.get('wordnet')}.")
        else:
            lines.append(
                f"**METEOR was computed without WordNet synonyms** (exact and stem matches only): {settings.get('wordnet')}."
            )

    judge = metrics.get("judge")
    if judge:
        lines += ["", "## LLM judge", ""]
        lines += _md_table(("metric", "value", f"{conf}% CI", "n"), judge_rows(metrics))
        lines += [
            "",
            f"Judge `{judge.get('model')}` at `{judge.get('url')}`; precision = share of the answer's claims the "
            "reference supports, relevance = share of the reference's key findings the answer addresses. "
            f"{judge.get('n_failed', 0)} item(s) not judged (failed request or unreadable reply; not counted).",
        ]
        for f in judge.get("failures", [])[:50]:
            lines.append(f"- `{_shorten(f.get('key'), 80)}` (row {f.get('row')}): {_shorten(f.get('error'), 200)}")

    if comparisons:
        lines += ["", "## Comparison runs", ""]
        names = list(comparisons)
        header = ["metric", "main", *[f"{n}" for n in names], *[f"Δ {n}" for n in names]]
        gaps = {n: compare_metrics(metrics, comparisons[n]) for n in names}
        table = []
        for m in HEADLINE:
            if not metrics.get(COUNT_OF[m]):
                continue
            table.append(
                [LABELS[m].strip(), format_value(m, metrics.get(m)),
                 *[format_value(m, comparisons[n].get(m)) for n in names],
                 *[_format_gap(m, gaps[n][m]) for n in names]]
            )
        lines += _md_table(header, table)
        lines += ["", "Δ = comparison run − main run (a large drop with zeroed or shuffled slides means the model uses the slide)."]

    lines += _exact_section(metrics, conf)
    lines += baselines_section(metrics.get("baselines"), conf, with_model=True)
    lines += _binary_text_lines(metrics)
    lines += _circular_section(metrics.get("circular"), conf)
    if comparisons:
        lines += _paired_section(comparisons, conf)
    for group in ("group", "category", "dataset"):
        groups = metrics.get(f"by_{group}")
        if groups:
            lines += ["", f"## By {group}"]
            lines += _group_tables(group, groups, conf)

    unparsed = metrics.get("unparsed") or []
    lines += ["", f"## Unparseable closed answers ({len(unparsed)})", ""]
    if unparsed:
        lines += _md_table(
            ("key", "row", "category", "gold", "options", "prediction"),
            [(_shorten(u.get("key"), 80), u.get("row"), u.get("category") or "", u.get("reference"),
              _shorten("; ".join(u.get("choices") or []), 120), _shorten(u.get("prediction"), 200)) for u in unparsed],
        )
    else:
        lines.append("None.")

    missing = metrics.get("missing") or []
    if missing:
        lines += ["", f"## Data rows without a prediction ({len(missing)})", ""]
        lines += _md_table(("row", "slide_id", "question"), [(m.get("row"), m.get("slide_id"), _shorten(m.get("question"), 120)) for m in missing])
    lines += provenance_section(metrics.get("provenance"))
    return "\n".join(lines) + "\n"


def _format_gap(name: str, gap: float | None) -> str:
    if gap is None:
        return "–"
    return f"{100 * gap:+.1f} pts" if name in _ACCURACY else f"{gap:+.4f}"


def write_outputs(
    metrics: Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    source: str | None = None,
    comparisons: Mapping[str, Mapping[str, object]] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.json`` (comparison runs under ``"comparisons"``, with their gaps) and
    ``out_dir/report.md``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(metrics)
    if comparisons:
        payload["comparisons"] = {
            name: {"metrics": dict(other), "gap": compare_metrics(metrics, other)} for name, other in comparisons.items()
        }
    json_path, md_path = out / "metrics.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, render_markdown(metrics, source=source, comparisons=comparisons))
    return json_path, md_path


# --------------------------------------------------------------------------------------------------
# Exact intervals, blind baselines, binary answers in prose, circular evaluation, paired tests, provenance


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _pct_ci(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _pts(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:+.1f} pts"
    return text + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def _exact_section(metrics: Mapping[str, object], conf: int) -> list[str]:
    rows = []
    for name in _ACCURACY:
        n = metrics.get(COUNT_OF[name]) or 0
        if not n or metrics.get(name) is None:
            continue
        k = int(round(float(metrics[name]) * n))
        rows.append((LABELS[name].strip(), f"{k}/{n}", _pct(metrics[name]), _pct_ci(metrics.get(f"{name}_wilson")),
                     _pct_ci(metrics.get(f"{name}_clopper_pearson")), _pct_ci(metrics.get(f"{name}_ci"))))
    if not rows:
        return []
    return ["", "## Exact intervals", ""] + _md_table(
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


def _baseline_cells(entry: Mapping[str, object]) -> list[str]:
    const = entry.get("constant_letter")
    longest = entry.get("longest_option")
    prior = entry.get("yes_no_prior")
    best = entry.get("best_blind")
    return [
        str(entry.get("n_closed", 0)),
        _pct(entry.get("chance")),
        f"{_pct(const['accuracy'])} ({const['letter']})" if const else "–",
        _pct(longest["accuracy"]) if longest else "–",
        f"{_pct(prior['accuracy'])} ({prior['majority']}; yes {_pct(prior['yes_fraction'])})" if prior else "–",
        f"{_pct(best['accuracy'])} ({best.get('label', best['strategy'])})" if best else "–",
    ]


def _baseline_entries(baselines: Mapping[str, object]) -> list[tuple[str, str, Mapping[str, object]]]:
    out = [("all", "all", baselines["all"])]
    for level, title in (("group", "group"), ("source", "file"), ("category", "category")):
        for name, entry in (baselines.get(f"by_{level}") or {}).items():
            out.append((title, name, entry))
    return out


def baselines_section(baselines: Mapping[str, object] | None, conf: int, *, with_model: bool) -> list[str]:
    """The blind-baseline table (one row per set: all, each group, each file, each category)."""
    if not baselines:
        return []
    entries = [(lvl, name, e) for lvl, name, e in _baseline_entries(baselines) if e.get("n_closed")]
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
        row = [lvl, name, *_baseline_cells(e)]
        if with_model:
            model = e.get("model") or {}
            row += [_pct(model.get("accuracy")), _pts(model.get("margin"), model.get("margin_ci")),
                    *[_pct((e.get("runs") or {}).get(r)) for r in runs]]
        rows.append(row)
    fit = baselines["all"].get("fit", "")
    return ["", "## Blind baselines", "", *_md_table(header, rows), "", BASELINE_NOTE, f"Constant letter / yes-no prior fitted on: {fit}."]


def _binary_text_lines(metrics: Mapping[str, object]) -> list[str]:
    """Prose yes/no answers of open items: gold and prediction parse counts, agreement."""
    n = metrics.get("n_binary_text") or 0
    gold_unparsed = metrics.get("n_binary_text_gold_unparsed") or 0
    if not n and not gold_unparsed:
        return []
    return ["", "## Yes/no answers written as sentences (open-ended items)", "",
            f"{n + gold_unparsed} open question(s) are yes/no or \"X or Y\" questions; the gold answer states its label "
            f"plainly in {n} and **cannot be read in {gold_unparsed}** (left out, not guessed). On the {n}: predictions "
            f"give the same label in {_pct(metrics.get('binary_text_accuracy'))} (Wilson "
            f"{_pct_ci(metrics.get('binary_text_accuracy_wilson'))}); {metrics.get('n_binary_text_unparsed', 0)} "
            "prediction(s) state no label and count as wrong."]


def binary_text_section(baselines: Mapping[str, object] | None) -> list[str]:
    """Sentence-form yes/no answers per set (baselines-only report)."""
    if not baselines:
        return []
    rows = [(lvl, name, b["n_questions"], b["n_parsed"], b["n_unparsed"],
             f"{b['majority']} ({_pct(b['majority_share'])})" if b.get("majority") else "–", _pct(b.get("yes_fraction")))
            for lvl, name, e in _baseline_entries(baselines) if (b := e.get("binary_text"))]
    if not rows:
        return []
    return ["", "## Yes/no answers written as sentences", "",
            *_md_table(("set", "name", "questions", "parsed", "unparsed", "majority (share)", "yes share"), rows), "",
            "Open-ended yes/no (or \"good or poor\") questions whose gold answer is a sentence: read by "
            "`wsi_llava.eval.polar.binary_label`; an answer it cannot read plainly is counted as unparsed, never guessed."]


def _circular_section(circular: Mapping[str, object] | None, conf: int) -> list[str]:
    if not circular:
        return []
    lines = ["", "## Choice-order robustness (CircularEval)", ""]
    if not circular.get("n"):
        return lines + [f"No multiple-choice question was answered under all rotations ({circular.get('n_incomplete', 0)} incomplete)."]
    header = ("set", "n", "circular accuracy", f"Wilson {conf}%", "consistency", "rotation-0 accuracy", "mean over rotations")

    def row(name, c):
        return (name, c["n"], _pct(c["circular_accuracy"]), _pct_ci(c.get("circular_accuracy_wilson")), _pct(c["consistency"]),
                _pct(c["accuracy_rotation_0"]), _pct(c["mean_rotation_accuracy"]))

    rows = [row("all", circular)]
    rows += [row(f"group {g}", c) for g, c in (circular.get("by_group") or {}).items()]
    rows += [row(f"category {g}", c) for g, c in (circular.get("by_category") or {}).items()]
    lines += _md_table(header, rows)
    lines += ["", "Each k-option question is asked k times, its options rotated by 0 … k−1. Circular accuracy: right "
              "under every rotation; consistency: the same original option chosen under every rotation. "
              f"{circular.get('n_incomplete', 0)} question(s) lacked a rotation (not scored); "
              f"{circular.get('n_unparsed_answers', 0)} answer(s) named no option."]
    return lines


def _paired_section(comparisons: Mapping[str, Mapping[str, object]], conf: int) -> list[str]:
    rows = []
    for name, other in comparisons.items():
        paired = other.get("paired") or {}
        closed = paired.get("closed")
        if closed:
            rows.append((name, "closed accuracy", closed["n"], _pts(closed["diff"], closed.get("diff_ci")),
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
    return ["", "## Paired tests", "", *_md_table(("run", "metric", "n pairs", f"Δ other − main ({conf}% CI)", "test"), rows),
            "", "Items matched by manifest row (else key). Closed answers: McNemar's exact binomial test on the "
            "discordant pairs; all metrics: paired bootstrap over items (BLEU-4 recomputed as corpus BLEU per resample)."]


def provenance_section(provenance: Mapping[str, object] | None) -> list[str]:
    """Question-set record: files with checksums, release sizes, per-category counts, dropped items."""
    if not provenance:
        return []
    lines = ["", "## Question set", ""]
    files = provenance.get("files") or []
    if files:
        lines += _md_table(("file", "format", "items", "sha256"),
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
        lines += ["", *_md_table(("category", "read", "used", "dropped"),
                                 [(c, v.get("read"), v.get("imported"), v.get("dropped")) for c, v in cats.items()])]
    reasons = provenance.get("dropped_by_reason") or {}
    if reasons:
        lines += ["", "Dropped, by reason:", ""] + [f"- {n} × {r}" for r, n in reasons.items()]
    dropped = provenance.get("dropped") or []
    if dropped:
        lines += ["", *_md_table(("source", "item", "slide_id", "reason"),
                                 [(Path(str(d.get("source"))).name, d.get("item"), d.get("slide_id"), _shorten(d.get("reason"), 160))
                                  for d in dropped[:200]])]
        if len(dropped) > 200:
            lines.append(f"… and {len(dropped) - 200} more (all in metrics.json).")
    for name, side in (provenance.get("manifests") or {}).items():
        lines += ["", f"### Import record of `{name}`"] + provenance_section(side)[2:]
    return lines


def render_baselines_markdown(metrics: Mapping[str, object], title: str = "Blind baselines") -> str:
    """The ``--baselines-only`` report."""
    conf = int(round(100 * float(metrics.get("settings", {}).get("confidence", 0.95))))
    data = metrics.get("settings", {}).get("data") or []
    lines = [f"# {title}", "", f"Question files: {len(data)}.", "",
             f"{metrics.get('n_items', 0):,} items: {metrics.get('n_closed', 0):,} closed "
             f"({metrics.get('n_mc', 0):,} multiple choice, {metrics.get('n_yes_no', 0):,} yes/no), "
             f"{metrics.get('n_open', 0):,} open-ended. No model and no slide was used."]
    lines += baselines_section(metrics.get("baselines"), conf, with_model=False)
    lines += binary_text_section(metrics.get("baselines"))
    lines += provenance_section(metrics.get("provenance"))
    return "\n".join(lines) + "\n"


def baselines_summary(metrics: Mapping[str, object]) -> str:
    """Plain-text baseline table for the terminal (all, groups, files)."""
    baselines = metrics.get("baselines") or {}
    rows = [[lvl, name, *_baseline_cells(e)] for lvl, name, e in _baseline_entries(baselines)
            if e.get("n_closed") and lvl != "category"]
    if not rows:
        return "(no closed questions)"
    text = _text_table(("set", "name", "n", "chance", "letter", "longest", "yes/no prior", "best blind"), rows, left=2)
    notes = [f"{rel['benchmark']}: {rel['n']:,} items; "
             + (f"matches {rel['matches']}" if rel.get("matches") else "matches no published size")
             for rel in (metrics.get("provenance") or {}).get("releases") or []]
    notes.append("constant letter / yes-no majority chosen on these questions (optimistic) unless --fit-data")
    return text + "".join(f"\nnote: {n}" for n in notes)


def write_baselines_outputs(metrics: Mapping[str, object], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``--baselines-only``: ``out_dir/metrics.json`` and ``out_dir/report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, render_baselines_markdown(metrics))
    return json_path, md_path
