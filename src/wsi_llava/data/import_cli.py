"""`wsi-llava import {wsi-bench,slidebench,slidechat} FILES... --h5-root DIR --out manifest.csv`.

Converts public benchmark files to our manifest CSV, matching each slide to an H5 file under
``--h5-root`` (exact stem, then TCGA slide barcode; see :mod:`wsi_llava.data.importers`). Items that
cannot be imported — slide not found, ambiguous, malformed — are written to
``<out>.unmatched.csv`` with the reason and counted in the summary; none is dropped silently.
Exit status 1 when nothing matched, or with ``--strict`` when anything was left out.
"""

from __future__ import annotations

import argparse
import sys

from .importers import READERS, SlideIndex, match_slides, skipped_path, write_manifest, write_skipped


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
        if name == "slidebench":
            p.add_argument("--category-column", help="CSV column used as category (default: Narrow Category, Task, Broad Category)")


def main(args: argparse.Namespace) -> int:
    reader = READERS[args.format]
    extra = {"category_column": args.category_column} if args.format == "slidebench" else {}
    try:
        index = SlideIndex(args.h5_root)
        items, skipped = [], []
        for path in args.files:
            got, bad = reader(path, dataset=args.dataset, split=args.split, **extra)
            items += got
            skipped += bad
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_malformed = len(skipped)
    matched, unmatched = match_slides(items, index)
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
    if skipped:
        missing_slides = len({s.slide_id for s in unmatched})
        print(
            f"NOT imported: {len(skipped)} item(s) — {len(unmatched)} with no/ambiguous H5 match "
            f"({missing_slides} slide(s)), {n_malformed} malformed — listed in {side}",
            file=sys.stderr,
        )
    if not matched:
        print("error: no item matched an H5 file; check --h5-root and the slide ids in " + str(side), file=sys.stderr)
        return 1
    return 1 if (args.strict and skipped) else 0
