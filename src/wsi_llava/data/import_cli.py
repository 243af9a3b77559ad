"""`wsi-llava import {wsi-bench,slidebench,slidechat} FILES... --h5-root DIR --out manifest.csv`.

Converts public benchmark files to our manifest CSV, matching each slide to an H5 file under
``--h5-root`` (relative path, exact stem, then TCGA slide barcode: :mod:`wsi_llava.data.resolve`, see
:mod:`wsi_llava.data.importers`). Items that
cannot be imported — slide not found, ambiguous, malformed — are written to
``<out>.unmatched.csv`` with the reason and counted in the summary; none is dropped silently.
Exit status 1 when nothing matched, or with ``--strict`` when anything was left out.

Beside the manifest, ``<out>.provenance.json`` records the input files' SHA-256, per-category counts,
every item left out with its reason, and the published release size the files match (see
:mod:`wsi_llava.data.provenance`). ``--split-by case --test-fraction F --seed S`` writes ``split`` =
``test``/``train`` by case (TCGA patient = first 12 characters of the barcode; the slide id where there
is no case id), so no case is in two splits; the assignment depends only on the question files, the
fraction and the seed, not on which H5 files exist.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from dataclasses import replace

from .importers import (
    READERS,
    SlideIndex,
    _category_and_split,
    match_slides,
    skipped_path,
    write_manifest,
    write_skipped,
)
from .provenance import (
    benchmark_of,
    build_provenance,
    category_counts,
    file_record,
    release_match,
    split_by_case,
    write_provenance,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    helps = {
        "wsi-bench": "WSI-Bench (WSI-LLaVA) *_test.json files",
        "slidebench": "SlideBench-VQA CSV files (SlideChat)",
        "slidechat": "SlideChat / SlideInstruction conversation JSON",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("files", nargs="+", metavar="FILE", help="input file(s)")
        p.add_argument("--h5-root", required=True, help="folder searched (recursively) for <slide id>.h5 files")
        p.add_argument("--out", required=True, help="manifest CSV to write")
        p.add_argument("--dataset", help="dataset label for every row (default: from the input, see docs)")
        p.add_argument("--split", help="split label for every row (default: from the input file name / ids)")
        p.add_argument("--absolute", action="store_true", help="write absolute H5 paths (default: relative to --out)")
        p.add_argument("--strict", action="store_true", help="exit 1 if any item was not imported")
        p.add_argument("--split-by", choices=("case",),
                       help="assign split=test/train by case (patient), so no case is in two splits")
        p.add_argument("--test-fraction", type=float, default=0.2, help="with --split-by: share of cases in test")
        p.add_argument("--seed", type=int, default=0, help="with --split-by: seed of the case shuffle")
        if name == "slidebench":
            p.add_argument("--category-column", help="CSV column used as category (default: Narrow Category, Task, Broad Category)")


def _file_category(fmt: str, path: str) -> str:
    """Category of an item of ``path`` that could not be read (WSI-Bench: the file's category)."""
    return _category_and_split(path)[0] if fmt == "wsi-bench" else ""


def _header(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def main(args: argparse.Namespace) -> int:
    reader = READERS[args.format]
    extra = {"category_column": args.category_column} if args.format == "slidebench" else {}
    try:
        index = SlideIndex(args.h5_root)
        items, skipped, files = [], [], []
        for path in args.files:
            got, bad = reader(path, dataset=args.dataset, split=args.split, **extra)
            items += got
            skipped += bad
            files.append(file_record(path, len(got) + len(bad), args.format))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split_summary = None
    if args.split_by == "case":
        try:
            splits, split_summary = split_by_case([it.case_id or it.slide_id for it in items], args.test_fraction, args.seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        items = [replace(it, split=s) for it, s in zip(items, splits)]
    n_malformed = len(skipped)
    category_of = {(it.source, it.item): it.category for it in items}
    read_categories = [it.category for it in items] + [_file_category(args.format, s.source) for s in skipped]
    matched, unmatched = match_slides(items, index)
    dropped = [
        {"source": s.source, "item": s.item, "slide_id": s.slide_id, "reason": s.reason,
         "stage": "read" if i < n_malformed else "match",
         "category": _file_category(args.format, s.source) if i < n_malformed else category_of.get((s.source, s.item), "")}
        for i, s in enumerate(skipped + unmatched)
    ]
    skipped += unmatched
    side = skipped_path(args.out)
    if skipped:
        write_skipped(skipped, side)
    elif side.exists():
        side.unlink()  # a stale list from an earlier run would mislead
    slides = len({it.slide_id for it, _ in matched})
    print(f"read {len(items) + n_malformed} item(s) from {len(args.files)} file(s); {index.n_files} H5 file(s) under {args.h5_root}")
    if matched:
        write_manifest(matched, args.out, absolute=args.absolute)
        print(f"wrote {len(matched)} row(s) ({slides} slide(s)) to {args.out}")
        releases = _releases(args.format, files)
        record = build_provenance(files, category_counts(read_categories, [it.category for it, _ in matched], dropped),
                                  dropped, split=split_summary, releases=releases)
        if split_summary:
            record["split"]["rows_imported"] = dict(Counter(it.split for it, _ in matched))
        side_json = write_provenance(args.out, record)
        print(f"provenance (checksums, counts, {len(dropped)} dropped item(s)): {side_json}")
        for rel in releases:
            known = " / ".join(f"{n:,}" for n in rel["known"])
            print(f"{rel['benchmark']}: {rel['n']:,} item(s) in the input; published sizes {known}: "
                  + (f"matches {rel['matches']}" if rel["matches"] else "matches none"))
        if split_summary:
            print(f"split by case (seed {args.seed}): {split_summary['n_test_cases']} test / "
                  f"{split_summary['n_train_cases']} train case(s)")
    if skipped:
        missing_slides = len({s.slide_id for s in unmatched})
        print(
            f"NOT imported: {len(skipped)} item(s) — {len(unmatched)} with no/ambiguous H5 match "
            f"({missing_slides} slide(s)), {n_malformed} malformed — listed in {side}",
            file=sys.stderr,
        )
    if not matched:
        print("error: no item matched an H5 file; check --h5-root and the slide ids in " + str(side), file=sys.stderr)
        return 2
    return 1 if (args.strict and skipped) else 0


def _releases(fmt: str, files: list[dict]) -> list[dict]:
    """Published-size matches: WSI-Bench by the total over its files, SlideBench per file."""
    if fmt == "wsi-bench":
        return [release_match("WSI-Bench test", sum(int(f["n_items"]) for f in files))]
    out = []
    for f in files:
        bench = benchmark_of(fmt, _header(str(f["path"])))
        if bench:
            out.append({**release_match(bench, int(f["n_items"])), "file": f["name"]})
    return out
