"""Number formats and table layout shared by the evaluation reports (:mod:`wsi_llava.eval.report`,
:mod:`wsi_llava.eval.report_sections`): accuracies as percentages, n-gram metrics on 0–1, Markdown and
plain-text tables."""

from __future__ import annotations

from collections.abc import Sequence

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
ACCURACY = ("closed_accuracy", "mc_accuracy", "yes_no_accuracy")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns before ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def shorten(text: object, limit: int) -> str:
    """On one line, at most ``limit`` characters (``…`` when cut)."""
    s = " ".join(("" if text is None else str(text)).split())
    return s[: limit - 1] + "…" if len(s) > limit else s


def md_cell(text: object) -> str:
    """One table cell: on one line, ``|`` escaped."""
    s = " ".join(("" if text is None else str(text)).split())
    return s.replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table, one line per row."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return out


def pct(value: float | None) -> str:
    """A share as a percentage (1 decimal); ``–`` when absent."""
    return "–" if value is None else f"{100 * value:.1f}%"


def pct_ci(ci: Sequence[float] | None) -> str:
    """An interval of shares in percent; ``–`` when absent."""
    return "–" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def pts(value: float | None, ci: Sequence[float] | None = None) -> str:
    """A difference of shares in percentage points, with its interval if given; ``–`` when absent."""
    if value is None:
        return "–"
    text = f"{100 * value:+.1f} pts"
    return text + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def format_value(name: str, value: float | None) -> str:
    """Accuracies as percentages (1 decimal), n-gram metrics on 0–1 (4 decimals); ``–`` when absent."""
    if name in ACCURACY or value is None:
        return pct(value)
    return f"{value:.4f}"


def format_ci(name: str, ci: Sequence[float] | None) -> str:
    """An interval in the format of :func:`format_value`; ``–`` when absent."""
    if name in ACCURACY or not ci:
        return pct_ci(ci)
    return f"{ci[0]:.4f}–{ci[1]:.4f}"
