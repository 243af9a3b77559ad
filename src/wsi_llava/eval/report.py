"""Turn a metrics dict (from :func:`~wsi_llava.eval.metrics.evaluate_predictions`) into files and text:
``metrics.json``, a readable ``report.md`` and a plain-text summary table for the terminal.

Sections beside the headline: exact intervals, blind baselines and the model's margin (per file /
category and per benchmark group), sentence-form yes/no answers, choice-order robustness
(``circular``), paired tests of comparison runs, and the question set's provenance
(:mod:`wsi_llava.eval.report_sections`; formats: :mod:`wsi_llava.eval.tables`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..fileio import atomic_write_text
from .metrics import COUNT_OF, HEADLINE, compare_metrics
from .report_sections import (baseline_cells, baseline_entries, baselines_section, binary_text_lines,
                              binary_text_section, circular_section, exact_section, paired_section,
                              provenance_section)
from .tables import ACCURACY, LABELS, format_ci, format_value, md_table, shorten, text_table


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


def summary_table(metrics: Mapping[str, object]) -> str:
    """Plain-text headline table (what ``wsi-llava eval`` prints)."""
    conf = int(round(100 * float(metrics.get("settings", {}).get("confidence", 0.95))))
    rows = headline_rows(metrics)
    rows += judge_rows(metrics)
    text = text_table(("metric", "value", f"{conf}% CI", "n"), rows) if rows else "(no items)"
    notes = []
    if metrics.get("n_unparsed"):
        notes.append(f"{metrics['n_unparsed']} closed answer(s) could not be parsed (counted wrong; listed in report.md)")
    if metrics.get("n_open") and not metrics.get("meteor_synonyms"):
        notes.append("METEOR computed WITHOUT WordNet synonyms (WordNet not found offline)")
    if metrics.get("n_missing"):
        notes.append(f"{metrics['n_missing']} data row(s) have no prediction (not scored; listed in report.md)")
    return text + "".join(f"\nnote: {n}" for n in notes)


def _group_tables(name: str, groups: Mapping[str, Mapping[str, object]], conf: int) -> list[str]:
    lines: list[str] = []
    closed = [(g, m) for g, m in groups.items() if m.get("n_closed")]
    open_ = [(g, m) for g, m in groups.items() if m.get("n_open")]
    if closed:
        lines += ["", f"### Closed-ended accuracy by {name}", ""]
        lines += md_table(
            (name, "n", "accuracy", f"{conf}% CI", "unparsed"),
            [(g, m["n_closed"], format_value("closed_accuracy", m["closed_accuracy"]),
              format_ci("closed_accuracy", m.get("closed_accuracy_ci")), m.get("n_unparsed", 0)) for g, m in closed],
        )
    if open_:
        lines += ["", f"### Open-ended metrics by {name}", ""]
        cols = ("bleu_1", "bleu_4", "rouge_l", "meteor")
        lines += md_table(
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
    lines += md_table(("metric", "value", f"{conf}% CI", "n"), rows) if rows else ["(no items)"]
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
        lines += md_table(("metric", "value", f"{conf}% CI", "n"), judge_rows(metrics))
        lines += [
            "",
            f"Judge `{judge.get('model')}` at `{judge.get('url')}`; precision = share of the answer's claims the "
            "reference supports, relevance = share of the reference's key findings the answer addresses. "
            f"{judge.get('n_failed', 0)} item(s) not judged (failed request or unreadable reply; not counted).",
        ]
        for f in judge.get("failures", [])[:50]:
            lines.append(f"- `{shorten(f.get('key'), 80)}` (row {f.get('row')}): {shorten(f.get('error'), 200)}")

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
        lines += md_table(header, table)
        lines += ["", "Δ = comparison run − main run (a large drop with zeroed or shuffled slides means the model uses the slide)."]

    lines += exact_section(metrics, conf)
    lines += baselines_section(metrics.get("baselines"), conf, with_model=True)
    lines += binary_text_lines(metrics)
    lines += circular_section(metrics.get("circular"), conf)
    if comparisons:
        lines += paired_section(comparisons, conf)
    for group in ("group", "category", "dataset"):
        groups = metrics.get(f"by_{group}")
        if groups:
            lines += ["", f"## By {group}"]
            lines += _group_tables(group, groups, conf)

    unparsed = metrics.get("unparsed") or []
    lines += ["", f"## Unparseable closed answers ({len(unparsed)})", ""]
    if unparsed:
        lines += md_table(
            ("key", "row", "category", "gold", "options", "prediction"),
            [(shorten(u.get("key"), 80), u.get("row"), u.get("category") or "", u.get("reference"),
              shorten("; ".join(u.get("choices") or []), 120), shorten(u.get("prediction"), 200)) for u in unparsed],
        )
    else:
        lines.append("None.")

    missing = metrics.get("missing") or []
    if missing:
        lines += ["", f"## Data rows without a prediction ({len(missing)})", ""]
        lines += md_table(("row", "slide_id", "question"), [(m.get("row"), m.get("slide_id"), shorten(m.get("question"), 120)) for m in missing])
    lines += provenance_section(metrics.get("provenance"))
    return "\n".join(lines) + "\n"


def _format_gap(name: str, gap: float | None) -> str:
    if gap is None:
        return "–"
    return f"{100 * gap:+.1f} pts" if name in ACCURACY else f"{gap:+.4f}"


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
    rows = [[lvl, name, *baseline_cells(e)] for lvl, name, e in baseline_entries(baselines)
            if e.get("n_closed") and lvl != "category"]
    if not rows:
        return "(no closed questions)"
    text = text_table(("set", "name", "n", "chance", "letter", "longest", "yes/no prior", "best blind"), rows, left=2)
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
