"""Public benchmark question files → our manifest rows, with slides matched to H5 files.

Readers (each returns ``(items, problems)``; a malformed item becomes a :class:`Skipped` with the
reason, never a silent drop):

* :func:`read_wsi_bench` — WSI-Bench (WSI-LLaVA) ``*_test.json``: LLaVA conversation JSON; ``image`` is
  ``<project>/<slide id>.pt``; multiple-choice options inline as ``A) … B) …`` in the human turn and a
  letter as the answer; ``Yes``/``No`` items; free-text items; ``1_Report*`` files → caption rows.
* :func:`read_slidebench` — SlideBench-VQA CSV (SlideChat): columns ``Slide``, ``Question``, option
  columns ``A``…``D`` (empty trailing options allowed), ``Answer`` (letter or option text), and
  ``Tumor``/``Broad Category``/``Narrow Category`` (TCGA) or ``Task`` (BCNB).
* :func:`read_slidechat` — SlideChat / SlideInstruction training JSON: LLaVA conversation JSON whose
  ``image`` is a list holding one per-slide feature file (``<slide id>.csv``); ``<image>`` may sit
  anywhere in the human turn.

Slide matching (:class:`SlideIndex`, the project's one resolver :class:`~wsi_llava.data.resolve.SlideResolver`):
every ``*.h5``/``*.hdf5`` under ``--h5-root`` (recursively) is indexed. A slide id matches (0) the file at
that relative path; else (1) the file whose stem equals it exactly; else (2) for TCGA ids, the file whose
*slide barcode* — the part before the first ``.``, e.g. ``TCGA-21-1083-01Z-00-DX1`` — equals the id's
barcode (case-insensitive), so ``TCGA-21-1083-01Z-00-DX1`` matches
``TCGA-21-1083-01Z-00-DX1.8288ca92-….h5`` and vice versa. Never coarser (two slides of one patient never
match each other; the patient-barcode step is off here). Several candidate files at the same step →
ambiguous → not matched. Unmatched items are listed with the reason (close names suggested).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingFileError
from .choices import LETTERS, choice_letter, parse_inline_options
from .manifest_writer import write_manifest_csv
from .resolve import H5_SUFFIXES, AmbiguousSlideError, SlideNotFoundError, SlideResolver, tcga_barcode

SKIPPED_COLUMNS = ("source", "item", "slide_id", "reason", "question")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_SPLIT_SUFFIX = re.compile(r"_(test|train|val|valid|validation|dev)$", re.IGNORECASE)


@dataclass
class Item:
    """One benchmark question (or report) before its slide is matched to an H5 file."""

    slide_id: str
    """Slide identifier as the benchmark names it."""
    question: str
    """Question without ``<image>`` and without inline options; "" for report rows."""
    answer: str
    """Gold answer; the option letter for multiple choice; "" for report rows."""
    caption: str
    """Report text for caption rows; "" otherwise."""
    choices: list[str] | None
    """Multiple-choice options in order, or None."""
    dataset: str
    """Dataset / cohort label."""
    split: str
    """Split label ("test", "train", …)."""
    case_id: str
    """Patient / case id ("" when unknown)."""
    category: str
    """Question category ("" when none)."""
    source: str
    """Input file."""
    item: str
    """Position in the input: JSON item index (+ turn) or CSV line."""
    group: str = ""
    """Benchmark group where the input has one (SlideBench: ``Broad Category``); not a manifest column."""


@dataclass
class Skipped:
    """An input item that did not become a manifest row, and why."""

    source: str
    item: str
    slide_id: str
    reason: str
    question: str = ""


def _clean_turn(text: str) -> str:
    return _IMAGE_TAG.sub(" ", text or "").strip()


def tcga_case(slide_id: str) -> str:
    """TCGA patient id (first three barcode fields, ``TCGA-21-1083``), or "" for other ids."""
    barcode = tcga_barcode(slide_id)
    return "-".join(barcode.split("-")[:3]) if barcode else ""


def _pairs(conversations, where: str) -> tuple[list[tuple[str, str]], str | None]:
    """Human/gpt turn pairs of a LLaVA conversation list; an error message if malformed."""
    if not isinstance(conversations, list) or not conversations:
        return [], f"{where}: 'conversations' must be a non-empty list"
    pairs, pending = [], None
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return [], f"{where}: each turn needs 'from' and a string 'value'"
        role = str(turn.get("from", "")).lower()
        if role in ("human", "user"):
            if pending is not None:
                return [], f"{where}: two human turns in a row"
            pending = turn["value"]
        elif role in ("gpt", "assistant"):
            if pending is None:
                return [], f"{where}: a gpt turn without a question before it"
            pairs.append((pending, turn["value"]))
            pending = None
        elif role == "system":
            continue
        else:
            return [], f"{where}: unknown turn role {turn.get('from')!r}"
    if pending is not None:
        return [], f"{where}: the last human turn has no answer"
    return pairs, None


def _load_json_list(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _category_and_split(path: str) -> tuple[str, str]:
    """``…/Diagnosis_choice_test.json`` → ``("Diagnosis_choice", "test")``."""
    stem = Path(path).stem
    m = _SPLIT_SUFFIX.search(stem)
    if m:
        return stem[: m.start()], m.group(1).lower()
    return stem, ""


def read_wsi_bench(path: str, *, dataset: str | None = None, split: str | None = None) -> tuple[list[Item], list[Skipped]]:
    """Read one WSI-Bench JSON file. Category = file stem without ``_test``; split from that suffix
    (override with ``split``); dataset = the image's folder (TCGA project, e.g. ``TCGA-LUSC``) unless
    ``dataset`` is given. Files whose stem starts with ``1_Report`` become caption (report) rows."""
    data = _load_json_list(path)
    category, file_split = _category_and_split(path)
    is_report = Path(path).stem.lower().startswith("1_report")
    items, skipped = [], []
    for i, entry in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            skipped.append(Skipped(path, str(i), "", "item needs a string 'image'"))
            continue
        image = entry["image"]
        slide_id = Path(image).stem
        folder = Path(image).parent.name
        pairs, err = _pairs(entry.get("conversations"), where)
        if err:
            skipped.append(Skipped(path, str(i), slide_id, err))
            continue
        for t, (human, gpt) in enumerate(pairs):
            tag = str(i) if len(pairs) == 1 else f"{i}.{t}"
            base = dict(
                slide_id=slide_id, dataset=dataset or folder or "WSI-Bench", split=split or file_split or "test",
                case_id=tcga_case(slide_id), category=category, source=path, item=tag,
            )
            question, answer = _clean_turn(human), gpt.strip()
            if not answer:
                skipped.append(Skipped(path, tag, slide_id, "empty answer", question))
                continue
            if is_report:
                items.append(Item(question="", answer="", caption=answer, choices=None, **base))
                continue
            parsed = parse_inline_options(question)
            if parsed is not None:
                stem, options = parsed
                letter = choice_letter(answer, options)
                if letter is None:
                    skipped.append(Skipped(path, tag, slide_id, f"answer {answer!r} is not one of the options {options}", question))
                    continue
                items.append(Item(question=stem, answer=letter, caption="", choices=options, **base))
            elif "choice" in category.lower():
                skipped.append(Skipped(path, tag, slide_id, "multiple-choice file but no 'A) … B) …' options found", question))
            else:
                items.append(Item(question=question, answer=answer, caption="", choices=None, **base))
    return items, skipped


def _column(header: Sequence[str], *names: str) -> int | None:
    """Index of the first header cell equal to one of ``names`` (case, spaces, _ and - ignored)."""
    norm = lambda s: re.sub(r"[\s_\-]+", "", s).lower()  # noqa: E731
    wanted = [norm(n) for n in names]
    for want in wanted:
        for i, h in enumerate(header):
            if norm(h) == want:
                return i
    return None


def read_slidebench(
    path: str, *, dataset: str | None = None, split: str | None = None, category_column: str | None = None
) -> tuple[list[Item], list[Skipped]]:
    """Read a SlideBench-VQA CSV. Category = ``category_column`` if given, else ``Narrow Category``,
    ``Task`` or ``Broad Category`` (first present); dataset = ``TCGA-<Tumor>`` when a ``Tumor`` column
    exists, else the file stem, unless ``dataset`` is given."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file") from None
        rows = list(reader)
    cols = {name: _column(header, name) for name in ("Slide", "Question", "Answer", "Tumor", "Broad Category")}
    missing = [n for n in ("Slide", "Question", "Answer") if cols[n] is None]
    if missing:
        raise ValueError(f"{path}: required column(s) {missing} missing (header: {header})")
    option_cols = []
    for letter in LETTERS:
        idx = _column(header, letter)
        if idx is None:
            break
        option_cols.append(idx)
    if len(option_cols) < 2:
        raise ValueError(f"{path}: option columns 'A' and 'B' are required (header: {header})")
    if category_column:
        cat_idx = _column(header, category_column)
        if cat_idx is None:
            raise ValueError(f"{path}: category column {category_column!r} not in header {header}")
    else:
        cat_idx = next((i for i in (_column(header, n) for n in ("Narrow Category", "Task", "Broad Category")) if i is not None), None)
    items, skipped = [], []
    for lineno, values in enumerate(rows, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        tag = f"line {lineno}"
        if len(values) != len(header):
            skipped.append(Skipped(path, tag, "", f"{len(values)} fields but the header has {len(header)}"))
            continue
        get = lambda i: values[i].strip() if i is not None else ""  # noqa: E731
        slide_id, question, answer = get(cols["Slide"]), get(cols["Question"]), get(cols["Answer"])
        if not slide_id or not question:
            skipped.append(Skipped(path, tag, slide_id, "empty Slide or Question", question))
            continue
        options = [get(i) for i in option_cols]
        while options and not options[-1]:
            options.pop()
        if len(options) < 2 or any(not o for o in options):
            skipped.append(Skipped(path, tag, slide_id, f"options must be at least two non-empty, in order: {options}", question))
            continue
        letter = choice_letter(answer, options)
        if letter is None:
            skipped.append(Skipped(path, tag, slide_id, f"Answer {answer!r} is not one of the options {options}", question))
            continue
        tumor = get(cols["Tumor"])
        ds = dataset or ((tumor if tumor.upper().startswith("TCGA") else f"TCGA-{tumor}") if tumor else Path(path).stem)
        items.append(Item(
            slide_id=slide_id, question=question, answer=letter, caption="", choices=options, dataset=ds,
            split=split or "test", case_id=tcga_case(slide_id) or (slide_id if not tumor else ""),
            category=get(cat_idx), source=path, item=tag, group=get(cols["Broad Category"]),
        ))
    return items, skipped


def read_slidechat(path: str, *, dataset: str | None = None, split: str | None = None) -> tuple[list[Item], list[Skipped]]:
    """Read SlideChat / SlideInstruction conversation JSON: one row per human/gpt pair.

    The slide id is the stem of the single entry of ``image`` (a string is accepted too); split from
    the ``id`` prefix (``train::0`` → ``train``) unless given; dataset defaults to ``SlideInstruction``.
    """
    data = _load_json_list(path)
    items, skipped = [], []
    for i, entry in enumerate(data):
        where = f"{path} item {i}"
        image = entry.get("image") if isinstance(entry, dict) else None
        if isinstance(image, str):
            image = [image]
        if not isinstance(image, list) or len(image) != 1 or not isinstance(image[0], str):
            skipped.append(Skipped(path, str(i), "", f"'image' must name exactly one slide file, got {image!r}"))
            continue
        slide_id = Path(image[0]).stem
        pairs, err = _pairs(entry.get("conversations"), where)
        if err:
            skipped.append(Skipped(path, str(i), slide_id, err))
            continue
        prefix = str(entry.get("id", "")).split("::", 1)[0].lower()
        row_split = split or (prefix if prefix in ("train", "test", "val") else "train")
        for t, (human, gpt) in enumerate(pairs):
            tag = str(i) if len(pairs) == 1 else f"{i}.{t}"
            question, answer = _clean_turn(human), gpt.strip()
            if not question or not answer:
                skipped.append(Skipped(path, tag, slide_id, "empty question or answer", question))
                continue
            items.append(Item(
                slide_id=slide_id, question=question, answer=answer, caption="", choices=None,
                dataset=dataset or "SlideInstruction", split=row_split, case_id=tcga_case(slide_id),
                category="", source=path, item=tag,
            ))
    return items, skipped


class SlideIndex:
    """H5 files under a folder, looked up by slide id: the import's view of a
    :class:`~wsi_llava.data.resolve.SlideResolver` (relative path, exact stem, then TCGA slide barcode;
    never the patient barcode, so two slides of one patient never match each other)."""

    def __init__(self, root: str | os.PathLike, suffixes: Iterable[str] = H5_SUFFIXES):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"--h5-root {self.root}: not a folder; give the folder holding the slide H5 files")
        self.resolver = SlideResolver(self.root, suffixes, patient_barcode=False)
        self.n_files = self.resolver.n_files

    def match(self, slide_id: str) -> tuple[str | None, str]:
        """``(path, "")`` when exactly one file matches, else ``(None, reason)``."""
        try:
            return str(self.resolver.resolve(slide_id, suggest=False)), ""  # thousands of ids: no scan each
        except (AmbiguousSlideError, SlideNotFoundError) as e:
            return None, str(e)


def match_slides(items: Sequence[Item], index: SlideIndex) -> tuple[list[tuple[Item, str]], list[Skipped]]:
    """Pair items with their H5 file; the unmatched come back as :class:`Skipped` (with the reason)."""
    cache: dict[str, tuple[str | None, str]] = {}
    matched, unmatched = [], []
    for it in items:
        if it.slide_id not in cache:
            cache[it.slide_id] = index.match(it.slide_id)
        path, reason = cache[it.slide_id]
        if path is None:
            unmatched.append(Skipped(it.source, it.item, it.slide_id, reason, it.question or "(report)"))
        else:
            matched.append((it, path))
    return matched, unmatched


def manifest_row(item: Item, h5_path: str) -> dict[str, str]:
    """One manifest CSV row (``choices`` as a JSON list)."""
    return {
        "h5_path": h5_path, "caption": item.caption, "question": item.question, "answer": item.answer,
        "slide_id": item.slide_id, "dataset": item.dataset,
        "choices": json.dumps(item.choices, ensure_ascii=False) if item.choices else "",
        "split": item.split, "case_id": item.case_id, "category": item.category,
    }


def write_manifest(matched: Sequence[tuple[Item, str]], out: str | os.PathLike, *, absolute: bool = False) -> int:
    """Write the manifest CSV; H5 paths relative to the CSV's folder unless ``absolute``. Returns rows."""
    out = Path(out)
    base = out.resolve().parent
    rows = []
    for item, path in matched:
        full = os.path.abspath(path)
        rows.append(manifest_row(item, full if absolute else os.path.relpath(full, base)))
    write_manifest_csv(out, rows)
    return len(matched)


def write_skipped(skipped: Sequence[Skipped], path: str | os.PathLike) -> None:
    """The list of items not imported (source, item, slide_id, reason, question) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SKIPPED_COLUMNS)
        for s in skipped:
            writer.writerow([s.source, s.item, s.slide_id, s.reason, s.question])


def skipped_path(out: str | os.PathLike) -> Path:
    """``manifest.csv`` → ``manifest.unmatched.csv`` (the list of items not imported)."""
    out = Path(out)
    return out.with_name(out.stem + ".unmatched.csv")


READERS = {"wsi-bench": read_wsi_bench, "slidebench": read_slidebench, "slidechat": read_slidechat}
