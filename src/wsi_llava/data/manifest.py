"""Manifests → validated :class:`Record` rows.

Two input formats (``docs/architecture.md``, "Formats"):

* **CSV** with required columns ``h5_path, caption, question, answer, slide_id, dataset`` and
  optional ``choices, split, case_id, category, image_path``. ``image_path`` is an ROI image
  (PNG / JPEG / TIFF, ``ROI_SUFFIXES``) beside or instead of ``h5_path``; with an ``image_path``
  column the ``h5_path`` column may be left out. Both resolve against the manifest's folder. ``row`` is the CSV line number with the header on
  line 1 (a quoted field spanning lines counts from the line the record starts on).
* **LLaMA-Factory sharegpt JSON** (``.json`` list or ``.jsonl``, one object per line): each item has
  ``messages`` (``role``/``content``) or ``conversations`` (``from``/``value``) and ``images`` (one H5
  path, or one ROI image: a path ending in an ``ROI_SUFFIXES`` suffix becomes ``image_path``). Every user → assistant pair becomes one record; ``row`` is the item number (``.json``,
  1-based, so 0 can mean "the whole file") or the line number (``.jsonl``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import WsiLlavaError
from .choices import LETTERS, ChoiceError, choice_letter, match_choice  # noqa: F401 (choice_letter: re-exported)

#: bounds on text that enters through a manifest: a ``choices`` cell, JSON nesting, the whole file
MAX_CHOICES_CHARS = 65536
MAX_JSON_DEPTH = 32
MAX_MANIFEST_BYTES = 2**30

REQUIRED_COLUMNS = ("h5_path", "caption", "question", "answer", "slide_id", "dataset")
OPTIONAL_COLUMNS = ("choices", "split", "case_id", "category", "image_path")

#: suffixes of ROI images a manifest's ``image_path`` may name (the same list as ``infer/roi.py``)
ROI_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


#: Manifest CSV columns in the order WSI-LLaVA writes them (required ones first).
MANIFEST_COLUMNS = ("h5_path", "caption", "question", "answer", "slide_id", "dataset", "choices", "split",
                    "case_id", "category")


def write_manifest_csv(path: str | os.PathLike, rows, fields: Sequence[str] = MANIFEST_COLUMNS) -> Path:
    """Write manifest rows (dicts) as UTF-8 CSV atomically: a temporary file, then a rename, so a
    crash never leaves a half-written manifest. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


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


# --------------------------------------------------------------------------- multiple choice


def option_lines(choices: Sequence[str]) -> str:
    """``"A) first\\nB) second\\n…"`` — the option block shown in multiple-choice prompts."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}) {str(c).strip()}" for i, c in enumerate(choices))


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
    if not _depth_ok(value, 1):
        raise ValueError("nested lists; expected a flat list of option strings")
    return _choices_tuple(value)


def _depth_ok(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests at most ``limit`` containers deep (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            if depth > limit:
                return False
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


_TOO_DEEP = f"JSON nested more than {MAX_JSON_DEPTH} levels deep (a conversation needs 3)"


def _choices_tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of option strings, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"option {i} is {type(v).__name__}, expected text")
        s = str(v).strip()
        if not s:
            raise ValueError(f"option {i} is empty")
        out.append(s)
    if len(out) > len(LETTERS):
        raise ValueError(f"{len(out)} options; at most {len(LETTERS)} are supported")
    if len(out) == 1:
        raise ValueError("only one option; a multiple-choice row needs at least two")
    return tuple(out) or None


# --------------------------------------------------------------------------- row semantics


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


# --------------------------------------------------------------------------- readers


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
        rows = _read_sharegpt(raw, source, split, jsonl=suffix == ".jsonl")
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
    return _read_sharegpt(raw, path, None, jsonl=path.lower().endswith(".jsonl")).splits


def _resolve(h5: str, base: Path) -> str:
    h5 = h5.strip()
    if not h5:
        return ""
    p = Path(os.path.expanduser(h5))
    if not p.is_absolute():
        p = base / p
    return os.path.abspath(p)


def _decode(raw: bytes, source: str) -> tuple[str | None, Problem | None]:
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


def _opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _read_csv(raw: bytes, source: str, split: str | None) -> _Rows:
    text, prob = _decode(raw, source)
    if prob:
        return _Rows.failed([prob])
    base = Path(source).resolve().parent
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return _Rows.failed([Problem(source, 0, "header", "empty file; expected a header row")])
    except csv.Error as e:
        return _Rows.failed([Problem(source, 1, "header", f"malformed CSV: {e}")])
    header = [h.strip() for h in header]
    required = [c for c in REQUIRED_COLUMNS if not (c == "h5_path" and "image_path" in header)]
    missing = [c for c in required if c not in header]
    if missing:
        return _Rows.failed([
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
        return _Rows.failed([Problem(source, 1, dupes[0], f"column {dupes[0]!r} appears more than once in the header")])
    col = {h: i for i, h in enumerate(header)}
    rows = _Rows(split)
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

        split = _opt(get("split"))
        row_probs: list[tuple[str, str]] = []
        try:
            choices = parse_choices(get("choices"))
        except ValueError as e:
            choices = None
            row_probs.append(("choices", str(e)))
        h5 = get("h5_path").strip()
        rec = Record(
            h5_path=_resolve(h5, base),
            slide_id=get("slide_id").strip(),
            dataset=get("dataset").strip(),
            question=get("question").strip(),
            answer=get("answer").strip(),
            caption=get("caption").strip(),
            choices=choices,
            split=split,
            case_id=_opt(get("case_id")),
            category=_opt(get("category")),
            source=source,
            row=start,
            image_path=_resolve(get("image_path"), base),
        )
        row_probs += record_problems(rec)
        rows.add(split, rec, [Problem(source, start, f, m) for f, m in row_probs])
    return rows


_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "system": "system", "function_call": "other", "observation": "other", "tool": "other"}


def _read_sharegpt(
    raw: bytes, source: str, split: str | None, jsonl: bool
) -> _Rows:
    text, prob = _decode(raw, source)
    if prob:
        return _Rows.failed([prob])
    items: list[tuple[int, object]] = []
    rows = _Rows(split)
    if jsonl:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.add(None, None, [Problem(source, lineno, "json", f"invalid JSON: {e.msg} (column {e.colno})")])
            except RecursionError:
                rows.add(None, None, [Problem(source, lineno, "json", _TOO_DEEP)])
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return _Rows.failed([Problem(source, 0, "json", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")])
        except RecursionError:
            return _Rows.failed([Problem(source, 0, "json", _TOO_DEEP + " somewhere in the file")])
        if not isinstance(data, list):
            return _Rows.failed([Problem(source, 0, "json", f"expected a list of conversations, got {type(data).__name__}")])
        items = list(enumerate(data, start=1))
    base = Path(source).resolve().parent
    for row, item in items:
        if not _depth_ok(item):
            rows.add(None, None, [Problem(source, row, "json", _TOO_DEEP)])
            continue
        if not isinstance(item, dict):
            rows.add(None, None, [Problem(source, row, "json", f"expected an object, got {type(item).__name__}")])
            continue
        row_split = _opt(str(item["split"])) if item.get("split") is not None else None

        def bad(field: str, msg: str) -> None:
            rows.add(row_split, None, [Problem(source, row, field, msg)])

        images = item.get("images")
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            bad("images", f"expected exactly one H5 path in `images`, got {images!r}"[:200])
            continue
        key, role_key, text_key = "messages", "role", "content"
        if key not in item and "conversations" in item:
            key, role_key, text_key = "conversations", "from", "value"
        msgs = item.get(key)
        if not isinstance(msgs, list) or not msgs:
            bad("messages", "missing or empty `messages` (or `conversations`) list")
            continue
        try:
            choices = _choices_tuple(item.get("choices")) if item.get("choices") else None
        except ValueError as e:
            bad("choices", str(e))
            continue
        h5 = _resolve(images[0], base)
        image = ""
        if images[0].strip().lower().endswith(ROI_SUFFIXES):
            h5, image = "", h5
        slide_id = str(item.get("slide_id") or Path(images[0]).stem)
        pairs: list[tuple[str, str]] = []
        pending: str | None = None
        ok = True
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get(text_key), str):
                bad(f"{key}[{j}]", f"expected {{{role_key!r}: …, {text_key!r}: text}}")
                ok = False
                break
            role = _ROLE.get(str(m.get(role_key)))
            if role is None:
                bad(f"{key}[{j}]", f"unknown role {m.get(role_key)!r}")
                ok = False
                break
            if role == "user":
                pending = m[text_key].replace("<image>", "").strip()
            elif role == "assistant":
                if pending is None:
                    bad(f"{key}[{j}]", "assistant message without a preceding user message")
                    ok = False
                    break
                pairs.append((pending, m[text_key].strip()))
                pending = None
        if not ok:
            continue
        if not pairs:
            bad(key, "no user → assistant pair")
            continue
        for q, a in pairs:
            rec = Record(
                h5_path=h5, slide_id=slide_id, dataset=str(item.get("dataset") or ""),
                question=q, answer=a, caption=str(item.get("caption") or "").strip(),
                choices=choices, split=row_split,
                case_id=_opt(str(item["case_id"])) if item.get("case_id") is not None else None,
                category=_opt(str(item["category"])) if item.get("category") is not None else None,
                source=source, row=row, image_path=image,
            )
            rows.add(row_split, rec, [Problem(source, row, f, msg) for f, msg in record_problems(rec)])
    return rows


class _Rows:
    """Collects (split, record, problems) per row; applies the split filter at the end, because
    "no split values in the whole file" (→ keep every row) is only known after the last row."""

    def __init__(self, split: str | None):
        self.split = split
        self.rows: list[tuple[str | None, Record | None, list[Problem]]] = []

    def add(self, split: str | None, rec: Record | None, problems: list[Problem]) -> None:
        self.rows.append((split, rec, problems))

    @staticmethod
    def failed(problems: list[Problem]) -> "_Rows":
        rows = _Rows(None)
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
