"""Manifest rows: :class:`Record` (one supervised turn), :class:`Problem` (one thing wrong with a row),
the content checks every row gets (:func:`record_problems`) and the helpers both manifest formats
share (path resolution, UTF-8 decoding, the JSON nesting bound, the split filter).

The parsers are :mod:`wsi_llava.data.manifest` (CSV, and the entry points) and
:mod:`wsi_llava.data.sharegpt` (LLaMA-Factory sharegpt JSON).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import WsiLlavaError
from .choices import LETTERS, ChoiceError, match_choice

#: most containers one JSON item may nest (a conversation needs 3)
MAX_JSON_DEPTH = 32

#: suffixes of ROI images a manifest's ``image_path`` may name (the same list as ``infer/roi.py``)
ROI_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ManifestError(WsiLlavaError, ValueError):
    """A manifest cannot be used; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest row (or with the file it points to)."""

    source: str
    """Manifest path the row came from."""
    row: int
    """CSV line number (header = 1), JSONL line number, or JSON item number (1-based); 0 = the whole file."""
    field: str
    """Column / key the problem is about (``h5_path`` for slide-file problems)."""
    message: str
    """What is wrong, naming the H5 file where one is involved."""

    def format(self) -> str:
        """``train.csv line 7 [answer]: message`` — one line, ready to print."""
        where = _where(self.source, self.row)
        return f"{where} [{self.field}]: {self.message}"


def _where(source: str, row: int) -> str:
    if row <= 0:
        return source
    unit = "item" if source.lower().endswith(".json") else "line"
    return f"{source} {unit} {row}"


@dataclass(frozen=True)
class Record:
    """One supervised turn: a slide plus its question/answer or report."""

    h5_path: str
    """Absolute path of the slide's H5 file (relative paths resolve against the manifest's folder)."""
    slide_id: str
    """Slide identifier (CSV column; for sharegpt JSON the H5 file's stem unless given)."""
    dataset: str
    """Dataset / cohort name as written."""
    question: str
    """Question text; "" for caption-only (report) rows."""
    answer: str
    """Answer as written in the file; "" for caption-only rows."""
    caption: str
    """Slide report / caption; "" if none."""
    choices: tuple[str, ...] | None
    """Multiple-choice options in order (A, B, …); None when absent or empty."""
    split: str | None
    """Split label from the ``split`` column; None if the column is absent or empty."""
    case_id: str | None
    """Patient / case identifier (for grouped splits); None if absent."""
    category: str | None
    """Free category label (for per-category metrics); None if absent."""
    source: str
    """Manifest path this record came from."""
    row: int
    """CSV line number (header = 1), JSONL line number, or JSON item number (1-based)."""
    image_path: str = ""
    """Absolute path of an ROI image (PNG / JPEG / TIFF) for this row, or "" (resolved like ``h5_path``).
    A row with an image and no ``h5_path`` is encoded by ``wsi-llava encode-roi`` or ``predict --tile-weights``."""

    @property
    def kind(self) -> str:
        """``"mc"`` (has choices), ``"vqa"`` (question + answer) or ``"report"`` (caption only)."""
        if self.choices:
            return "mc"
        if self.question:
            return "vqa"
        return "report"

    @property
    def where(self) -> str:
        """Human-readable location, e.g. ``train.csv line 7``."""
        return _where(self.source, self.row)


def record_problems(rec: Record) -> list[tuple[str, str]]:
    """Content checks of one record → ``[(field, message)]`` (empty when the row is usable)."""
    out: list[tuple[str, str]] = []
    if not rec.h5_path and not rec.image_path:
        out.append(("h5_path", "empty; every row needs a slide H5 file (or an ROI image in image_path)"))
    if rec.image_path:
        if not os.path.isfile(rec.image_path):
            out.append(("image_path", f"ROI image not found: {rec.image_path}; check the path"))
        elif not rec.image_path.lower().endswith(ROI_SUFFIXES):
            out.append(("image_path", f"{rec.image_path}: not an ROI image; use one of {', '.join(ROI_SUFFIXES)}"))
    if not rec.slide_id:
        out.append(("slide_id", "empty"))
    if rec.question and not rec.answer:
        out.append(("answer", "question has no answer"))
    if not rec.question and not rec.caption:
        if rec.answer:
            out.append(("question", "answer given without a question"))
        else:
            out.append(("question", "empty question and empty caption; nothing to train on"))
    if rec.choices:
        if not rec.question:
            out.append(("question", "choices given without a question"))
        elif rec.answer:
            try:
                match_choice(rec.answer, rec.choices)
            except ChoiceError as e:
                opts = ", ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(rec.choices))
                out.append(("answer", f"{rec.answer!r} is not among the choices ({opts}): {e}"))
    return out


def resolve_path(h5: str, base: Path) -> str:
    """A path from a manifest, absolute (``~`` expanded; relative → against ``base``); "" stays ""."""
    h5 = h5.strip()
    if not h5:
        return ""
    p = Path(os.path.expanduser(h5))
    if not p.is_absolute():
        p = base / p
    return os.path.abspath(p)


def decode_manifest(raw: bytes, source: str) -> tuple[str | None, Problem | None]:
    """The file's text (UTF-8, BOM dropped), or a :class:`Problem` naming the line and column of the first bad byte."""
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        bad = raw[e.start : e.start + 4]
        return None, Problem(
            source,
            line,
            "encoding",
            f"not UTF-8: byte {bad[:1]!r} at line {line}, column {col}; re-save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)",
        )


def optional_text(value: str | None) -> str | None:
    """Stripped text, or None when empty."""
    value = (value or "").strip()
    return value or None


def depth_ok(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests at most ``limit`` containers deep (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            if depth > limit:
                return False
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


#: the message for a JSON item nested deeper than :data:`MAX_JSON_DEPTH`
TOO_DEEP = f"JSON nested more than {MAX_JSON_DEPTH} levels deep (a conversation needs 3)"


class RowCollector:
    """Collects (split, record, problems) per row; applies the split filter at the end, because
    "no split values in the whole file" (→ keep every row) is only known after the last row."""

    def __init__(self, split: str | None):
        self.split = split
        self.rows: list[tuple[str | None, Record | None, list[Problem]]] = []

    def add(self, split: str | None, rec: Record | None, problems: list[Problem]) -> None:
        self.rows.append((split, rec, problems))

    @staticmethod
    def failed(problems: list[Problem]) -> "RowCollector":
        rows = RowCollector(None)
        rows.add(None, None, problems)
        return rows

    @property
    def splits(self) -> set[str]:
        return {s for s, _, _ in self.rows if s is not None}

    @property
    def _kept(self) -> list[tuple[str | None, Record | None, list[Problem]]]:
        if self.split is None or not self.splits:
            return self.rows
        # rows of the split, plus broken rows whose split could not be read (reported, not dropped)
        return [r for r in self.rows if r[0] == self.split or (r[0] is None and r[2])]

    @property
    def good(self) -> list[Record]:
        return [rec for _, rec, probs in self._kept if rec is not None and not probs]

    @property
    def invalid(self) -> list[Record]:
        return [rec for _, rec, probs in self._kept if rec is not None and probs]

    @property
    def problems(self) -> list[Problem]:
        return [p for _, _, probs in self._kept for p in probs]
