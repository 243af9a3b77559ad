"""Manifests → validated :class:`Record` rows.

Two input formats (``docs/architecture.md``, "Formats"):

* **CSV** with required columns ``h5_path, caption, question, answer, slide_id, dataset`` and
  optional ``choices, split, case_id, category, image_path``. ``image_path`` is an ROI image
  (PNG / JPEG / TIFF, ``ROI_SUFFIXES``) beside or instead of ``h5_path``; with an ``image_path``
  column the ``h5_path`` column may be left out. Both resolve against the manifest's folder. ``row`` is the CSV line number with the header on
  line 1 (a quoted field spanning lines counts from the line the record starts on).
* **LLaMA-Factory sharegpt JSON** (``.json`` list or ``.jsonl``): read by :mod:`wsi_llava.data.sharegpt`.

Each row becomes a :class:`Record`, each bad row a :class:`Problem` (both defined in
:mod:`wsi_llava.data.records`); the option letters follow :mod:`wsi_llava.data.choices`, and
manifests are written by :mod:`wsi_llava.data.manifest_writer`.

:func:`read_manifest` is lenient: it returns the good records *and* a :class:`Problem` for every bad
row (``wsi-llava validate`` and ``skip_invalid`` training use it). :func:`load_manifest` is strict:
any problem raises :class:`ManifestError` naming file, row and field.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
from pathlib import Path

from .choices import options_tuple
from .records import (MAX_JSON_DEPTH, ManifestError, Problem, Record, RowCollector, decode_manifest, depth_ok,
                      optional_text, record_problems, resolve_path)
from .sharegpt import read_sharegpt

#: bounds on text that enters through a manifest: a ``choices`` cell, the whole file (JSON nesting:
#: :data:`~wsi_llava.data.records.MAX_JSON_DEPTH`)
MAX_CHOICES_CHARS = 65536
MAX_MANIFEST_BYTES = 2**30

REQUIRED_COLUMNS = ("h5_path", "caption", "question", "answer", "slide_id", "dataset")
OPTIONAL_COLUMNS = ("choices", "split", "case_id", "category", "image_path")


def parse_choices(text: str) -> tuple[str, ...] | None:
    """Parse a ``choices`` cell: a JSON list or a Python-literal list/tuple of strings.

    Empty cell or empty list → None. Raises ValueError with a short reason otherwise.
    """
    text = (text or "").strip()
    if not text:
        return None
    if len(text) > MAX_CHOICES_CHARS:
        raise ValueError(f"the cell is {len(text):,} characters long; at most {MAX_CHOICES_CHARS:,} are accepted")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep; expected a flat list of strings") from None
    except (json.JSONDecodeError, ValueError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(
                f"cannot parse {text[:60]!r} as a JSON or Python list of strings"
            ) from None
    if not depth_ok(value, 1):
        raise ValueError("nested lists; expected a flat list of option strings")
    return options_tuple(value)


def read_manifest(path: str | os.PathLike, split: str | None = None) -> tuple[list[Record], list[Problem]]:
    """Read a manifest leniently: ``(good records, problems)``.

    File-level problems (unreadable file, bad encoding, bad JSON: ``row=0`` or the offending line;
    missing header columns: ``row=1``, one Problem per column) come back with no records. ``split`` keeps only rows whose ``split`` equals it
    (this manifest only; rows of other splits are neither returned nor checked). When the file has
    no split values at all, every row is kept: the file itself is the split.
    """
    good, problems, _ = read_manifest_rows(path, split)
    return good, problems


def read_manifest_rows(
    path: str | os.PathLike, split: str | None = None
) -> tuple[list[Record], list[Problem], list[Record]]:
    """Like :func:`read_manifest`, plus the records of rows that parsed but failed a content check
    (so ``validate`` can still check the slide files those rows name): ``(good, problems, invalid)``."""
    path = os.fspath(path)
    source = path
    if not os.path.exists(path):
        return [], [Problem(source, 0, "path", f"manifest not found: {path}")], []
    if not os.path.isfile(path):  # a FIFO or device would block or never end: never opened
        return [], [Problem(source, 0, "path", f"not a regular file: {path}")], []
    if os.path.getsize(path) > MAX_MANIFEST_BYTES:
        return [], [Problem(source, 0, "path", f"{os.path.getsize(path):,} bytes; manifests may be at most "
                                               f"{MAX_MANIFEST_BYTES:,} bytes (split it)")], []
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        return [], [Problem(source, 0, "path", f"cannot read manifest: {e}")], []
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(raw, source, split)
    elif suffix in (".json", ".jsonl"):
        rows = read_sharegpt(raw, source, split, jsonl=suffix == ".jsonl")
    else:
        return [], [Problem(source, 0, "path", f"unknown manifest type {suffix!r}; use .csv, .json or .jsonl")], []
    return rows.good, rows.problems, rows.invalid


def load_manifest(path: str | os.PathLike, split: str | None = None) -> list[Record]:
    """Read a manifest strictly: every row must be valid, else :class:`ManifestError`.

    The error lists every problem (file, row, field). With ``split`` only rows of that split are
    returned (and checked); asking for a split with no rows is an error naming the splits present.
    """
    path = os.fspath(path)
    records, problems = read_manifest(path, split)
    if problems:
        head = "\n  ".join(p.format() for p in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestError(
            f"{path}: {len(problems)} problem(s) (run `wsi-llava validate` for all checks):\n  {head}{more}"
        )
    if not records:
        if split is not None:
            present = sorted(manifest_splits(path))
            raise ManifestError(
                f"{path}: no rows with split={split!r} "
                f"(splits present: {', '.join(present) if present else 'none; the file has no split values'})"
            )
        raise ManifestError(f"{path}: no rows")
    return records


def manifest_splits(path: str | os.PathLike) -> set[str]:
    """The distinct non-empty ``split`` values of a manifest (every parsed row)."""
    path = os.fspath(path)
    raw = Path(path).read_bytes()
    if Path(path).suffix.lower() == ".csv":
        return _read_csv(raw, path, None).splits
    return read_sharegpt(raw, path, None, jsonl=path.lower().endswith(".jsonl")).splits


def _read_csv(raw: bytes, source: str, split: str | None) -> RowCollector:
    text, prob = decode_manifest(raw, source)
    if prob:
        return RowCollector.failed([prob])
    base = Path(source).resolve().parent
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return RowCollector.failed([Problem(source, 0, "header", "empty file; expected a header row")])
    except csv.Error as e:
        return RowCollector.failed([Problem(source, 1, "header", f"malformed CSV: {e}")])
    header = [h.strip() for h in header]
    required = [c for c in REQUIRED_COLUMNS if not (c == "h5_path" and "image_path" in header)]
    missing = [c for c in required if c not in header]
    if missing:
        return RowCollector.failed([
            Problem(
                source,
                1,
                c,
                f"required column {c!r} missing (header has: {', '.join(header) or 'nothing'})",
            )
            for c in missing
        ])
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        return RowCollector.failed([Problem(source, 1, dupes[0], f"column {dupes[0]!r} appears more than once in the header")])
    col = {h: i for i, h in enumerate(header)}
    rows = RowCollector(split)
    prev_end = reader.line_num
    while True:
        start = prev_end + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.add(None, None, [Problem(source, start, "csv", f"malformed CSV: {e}")])
            break
        prev_end = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            rows.add(None, None, [
                Problem(source, start, "csv", f"{len(values)} fields but the header has {len(header)}")
            ])
            continue

        def get(name: str) -> str:
            i = col.get(name)
            return values[i] if i is not None else ""

        split = optional_text(get("split"))
        row_probs: list[tuple[str, str]] = []
        try:
            choices = parse_choices(get("choices"))
        except ValueError as e:
            choices = None
            row_probs.append(("choices", str(e)))
        h5 = get("h5_path").strip()
        rec = Record(
            h5_path=resolve_path(h5, base),
            slide_id=get("slide_id").strip(),
            dataset=get("dataset").strip(),
            question=get("question").strip(),
            answer=get("answer").strip(),
            caption=get("caption").strip(),
            choices=choices,
            split=split,
            case_id=optional_text(get("case_id")),
            category=optional_text(get("category")),
            source=source,
            row=start,
            image_path=resolve_path(get("image_path"), base),
        )
        row_probs += record_problems(rec)
        rows.add(split, rec, [Problem(source, start, f, m) for f, m in row_probs])
    return rows
