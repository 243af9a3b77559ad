"""Check manifests and their slide files in one pass: ``wsi-llava validate``.

Every row, every H5 file and every ROI image (``image_path``: it must open as an image) is checked; each file is opened once however many rows share it.
Every problem is reported with manifest row, file and field (:class:`Problem`); the command exits 1
if there is any. Training uses :func:`validate_records` to refuse invalid data (or, with
``skip_invalid``, to skip the rows it names).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from .choices import option_lines
from .manifest import Problem, Record, read_manifest_rows
from .records import record_problems
from .scan import scan_slide
from .slides import SlideError, load_slide, read_slide_meta

__all__ = ["Problem", "item_key", "validate_records", "validate_manifests", "estimate_words", "add_arguments", "main"]


def estimate_words(rec: Record) -> tuple[int, int]:
    """Whitespace-word counts ``(prompt, answer)`` of a record's text.

    A heuristic *lower bound* on the token count for subword tokenizers (every word costs at least
    one token; chat-template and system-prompt tokens are not counted). The exact check happens
    when prompts are built with the real tokenizer.
    """
    prompt = rec.question
    if rec.choices:
        prompt += "\n" + option_lines(rec.choices)
    answer = rec.answer if rec.question else rec.caption
    return len(prompt.split()), len(answer.split())


def validate_records(
    records: Sequence[Record],
    expected_dim: int | None = None,
    *,
    patches_per_wsi: int | None = None,
    cutoff_len: int | None = None,
    image_tokens: int = 0,
    full_scan: bool = True,
    progress: bool = False,
    files_only: Sequence[Record] = (),
) -> list[Problem]:
    """Every problem with these records and their slide files (empty list: all good).

    Args:
        records: rows from :func:`~wsi_llava.data.manifest.load_manifest` / ``read_manifest``.
        expected_dim: required feature width D. None: files must agree with each other (the
            most common D wins; files that differ are reported).
        patches_per_wsi: also load each slide the way training and eval do (a seeded random and
            the deterministic sample of this many tiles) through the fast reader.
        cutoff_len: flag rows whose text is longer than this, by the word heuristic of
            :func:`estimate_words` plus ``image_tokens``.
        image_tokens: visual tokens the prompt will hold (``image_seq_length`` (+1 for CLS)).
        full_scan: read every tile and coordinate of every file (NaN/Inf anywhere, unwritten
            chunks); False: structure plus the sampled tiles only (fast).
        progress: show a progress bar over files on stderr.
        files_only: more records whose slide files are checked (file problems reported on their
            rows) without row checks — rows that already failed manifest checks.

    Duplicate items (same slide, kind, question and options: :func:`item_key`) are looked for within
    each manifest (question and options compared case- and space-insensitively). Problems from one file are repeated for every row that uses it (``field="h5_path"``), so a
    caller can skip exactly the affected rows.
    """
    problems: list[Problem] = []
    seen: dict[tuple, Record] = {}
    by_file: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        for field, msg in record_problems(rec):
            problems.append(Problem(rec.source, rec.row, field, msg))
        key = item_key(rec)
        first = seen.get(key)
        if first is not None and (first.source, first.row) != (rec.source, rec.row):
            what = f"question {rec.question!r}" if rec.question else "report (caption-only) row"
            same = "same kind and options" if rec.choices else f"same kind ({rec.kind})"
            problems.append(
                Problem(rec.source, rec.row, "question",
                        f"duplicate (slide_id, question): slide {rec.slide_id!r}, {what} already at {first.where} "
                        f"({same})")
            )
        else:
            seen.setdefault(key, rec)
        if cutoff_len is not None:
            problems += _length_problems(rec, cutoff_len, image_tokens)
        if rec.h5_path:
            by_file[rec.h5_path].append(rec)
    for rec in files_only:
        if rec.h5_path:
            by_file[rec.h5_path].append(rec)

    dims: dict[str, int] = {}
    files = list(by_file)
    bar = None
    if progress and files:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="slide files", unit="file", file=sys.stderr)
    for path in files:
        try:
            dims[path] = _check_file(path, expected_dim, patches_per_wsi, full_scan)
        except SlideError as e:
            problems += [Problem(r.source, r.row, "h5_path", str(e)) for r in by_file[path]]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    images: dict[str, list[Record]] = defaultdict(list)
    for rec in [*records, *files_only]:
        if rec.image_path and os.path.isfile(rec.image_path):
            images[rec.image_path].append(rec)
    for path, recs in images.items():
        msg = _check_image(path)
        if msg:
            problems += [Problem(r.source, r.row, "image_path", msg) for r in recs]

    if expected_dim is None and len(set(dims.values())) > 1:
        common, n_common = Counter(dims.values()).most_common(1)[0]
        for path, d in dims.items():
            if d != common:
                msg = (f"{path}: feature width D = {d}, but {n_common} other file(s) have D = {common} "
                       "(mixed feature extractors?)")
                problems += [Problem(r.source, r.row, "h5_path", msg) for r in by_file[path]]
    problems.sort(key=lambda p: (p.source, p.row))
    return problems


def _check_image(path: str) -> str | None:
    """Why the ROI image at ``path`` cannot be used, or None when it opens as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{path}: does not open as an image ({type(e).__name__}: {e}); use PNG, JPEG or TIFF"
    return None


def item_key(rec: Record) -> tuple:
    """What makes a manifest item distinct within one manifest: (manifest, slide, kind, question, options),
    question and options compared case- and space-insensitively. A multiple-choice item and an open
    item with the same wording on one slide (WSI-Bench's ``Morphology_choice`` vs
    ``Regional_Structure_Description``, ``Staging_choice`` vs ``Staging``) are different items; two
    multiple-choice items differ when their options do."""
    def norm(text: str) -> str:
        return " ".join(str(text).casefold().split())

    choices = tuple(norm(c) for c in rec.choices) if rec.choices else ()
    return (rec.source, rec.slide_id, rec.kind, norm(rec.question), choices)


def _check_file(path: str, expected_dim: int | None, patches_per_wsi: int | None, full_scan: bool) -> int:
    if full_scan:
        dim = scan_slide(path, expected_dim).dim
    else:
        _, dim = read_slide_meta(path)
        load_slide(path, patches_per_wsi or 256, None, expected_dim)
    if patches_per_wsi is not None:
        load_slide(path, patches_per_wsi, np.random.default_rng(0), expected_dim)
        load_slide(path, patches_per_wsi, None, expected_dim)
    return dim


def _length_problems(rec: Record, cutoff_len: int, image_tokens: int) -> list[Problem]:
    prompt, answer = estimate_words(rec)
    field = "question" if rec.question else "caption"
    if prompt + image_tokens >= cutoff_len:
        return [Problem(rec.source, rec.row, field,
                        f"prompt alone is at least ~{prompt} words + {image_tokens} visual tokens "
                        f"≥ cutoff_len {cutoff_len} (word-count heuristic); the row cannot be used")]
    if prompt + image_tokens + answer > cutoff_len:
        target = "answer" if rec.question else "caption"
        return [Problem(rec.source, rec.row, target,
                        f"text is at least ~{prompt + answer} words + {image_tokens} visual tokens "
                        f"> cutoff_len {cutoff_len} (word-count heuristic); the {target} would be truncated")]
    return []


def validate_manifests(
    paths: Sequence[str | os.PathLike], split: str | None = None, **kwargs
) -> tuple[list[Record], list[Problem]]:
    """Read manifests leniently and validate what they hold: ``(good records, all problems)``.

    Keyword arguments go to :func:`validate_records`.
    """
    records: list[Record] = []
    invalid: list[Record] = []
    problems: list[Problem] = []
    for path in paths:
        recs, probs, bad = read_manifest_rows(path, split)
        if not recs and not bad and not probs:  # a header-only CSV or an empty list is not "OK"
            what = f"no rows with split={split!r}" if split is not None else "no rows (only a header, or an empty list)"
            probs = [Problem(os.fspath(path), 0, "rows", f"{what}; nothing to train or evaluate on")]
        records += recs
        invalid += bad
        problems += probs
    problems += validate_records(records, files_only=invalid, **kwargs)
    problems.sort(key=lambda p: (p.source, p.row))
    bad = {(p.source, p.row) for p in problems}
    good = [r for r in records if (r.source, r.row) not in bad]
    return good, problems


def format_problems(problems: Sequence[Problem]) -> list[str]:
    """Printable lines; identical messages on several rows of one file are folded into one line."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for p in problems:
        groups[(p.source, p.field, p.message)].append(p.row)
    lines = []
    for (source, field, message), rows in groups.items():
        if len(rows) == 1:
            lines.append(Problem(source, rows[0], field, message).format())
        else:
            unit = "items" if source.lower().endswith(".json") else "lines"
            shown = ", ".join(str(r) for r in rows[:20]) + (f", … ({len(rows)} rows)" if len(rows) > 20 else "")
            lines.append(f"{source} {unit} {shown} [{field}]: {message}")
    return lines


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest CSV / sharegpt JSON(L) file(s)")
    parser.add_argument("--split", default=None, help="check only rows of this split")
    parser.add_argument("--feature-dim", type=int, default=None, help="required feature width D")
    parser.add_argument("--patches-per-wsi", type=int, default=None,
                        help="also load each slide as training/eval will, sampling this many tiles")
    parser.add_argument("--cutoff-len", type=int, default=None,
                        help="flag rows whose text exceeds this many tokens (word-count heuristic)")
    parser.add_argument("--image-tokens", type=int, default=0,
                        help="visual tokens in each prompt, counted against --cutoff-len")
    parser.add_argument("--quick", action="store_true",
                        help="check file structure and a sample of tiles instead of every tile")


def main(args: argparse.Namespace) -> int:
    good, problems = validate_manifests(
        args.manifests,
        split=args.split,
        expected_dim=args.feature_dim,
        patches_per_wsi=args.patches_per_wsi,
        cutoff_len=args.cutoff_len,
        image_tokens=args.image_tokens,
        full_scan=not args.quick,
        progress=sys.stderr.isatty(),
    )
    for line in format_problems(problems):
        print(line)
    rows = {(p.source, p.row) for p in problems}
    files = len({r.h5_path for r in good})
    if problems:
        print(f"\n{len(problems)} problem(s) in {len(rows)} row(s); {len(good)} row(s) OK.", file=sys.stderr)
        return 1
    print(f"OK: {len(good)} row(s), {files} slide file(s) checked.")
    return 0
