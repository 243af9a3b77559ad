"""Benchmark question files → blind-baseline questions (:class:`~wsi_llava.eval.baselines.Question`), no slides needed.

Any supported format: WSI-Bench, SlideBench and SlideChat question files (through
:mod:`wsi_llava.data.importers`) and our own manifests (CSV / sharegpt JSON). :func:`load_questions`
also returns the question set's provenance record (checksums, per-category counts, every item that
could not be read and why, published-size matches) for the report (``eval --baselines-only``,
``--fit-data``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..data.choices import choice_letter
from .baselines import Question, question_from_fields
from .extract import yes_no_label


def _wsi_bench_or_slidechat(path: str) -> str:
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    first = next((x for x in data if isinstance(x, dict)), {}) if isinstance(data, list) else {}
    if "conversations" in first and isinstance(first.get("image"), list):
        return "slidechat"
    if "conversations" in first and isinstance(first.get("image"), str):
        return "wsi-bench"
    return "manifest"


def detect_format(path: str) -> str:
    """``wsi-bench``, ``slidebench``, ``slidechat`` or ``manifest`` (our CSV / sharegpt JSON), from the
    file's content."""
    import csv

    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
        if "h5_path" in header:
            return "manifest"
        if {"slide", "question", "answer"} <= set(header):
            return "slidebench"
        raise ValueError(f"{path}: a CSV that is neither our manifest (h5_path, …) nor SlideBench "
                         f"(Slide, Question, A, B, …, Answer); header: {header}")
    if suffix == ".json":
        return _wsi_bench_or_slidechat(path)
    if suffix == ".jsonl":
        return "manifest"
    raise ValueError(f"{path}: unknown question file type {suffix!r} (.json, .jsonl or .csv)")


def _from_import_item(it, fmt: str) -> Question:
    name = Path(it.source).name
    key = f"{name}#{it.item}"
    if it.choices:
        return question_from_fields(key, "mc", it.answer, question=it.question, choices=it.choices,
                                    category=it.category, dataset=it.dataset, source=name, group=getattr(it, "group", None))
    if not it.question:  # report row
        return question_from_fields(key, "open", it.caption, category=it.category, dataset=it.dataset, source=name)
    label = yes_no_label(it.answer)
    return question_from_fields(key, "yes_no" if label else "open", label or it.answer, question=it.question,
                                category=it.category, dataset=it.dataset, source=name, group=getattr(it, "group", None))


def _from_record(rec) -> Question:
    name = Path(rec.source).name
    key = f"{name}#{rec.row}"
    if rec.kind == "mc":
        return question_from_fields(key, "mc", choice_letter(rec.answer, rec.choices) or rec.answer,
                                    question=rec.question, choices=rec.choices, category=rec.category,
                                    dataset=rec.dataset, source=name)
    if rec.kind == "report":
        return question_from_fields(key, "open", rec.caption, category=rec.category, dataset=rec.dataset, source=name)
    label = yes_no_label(rec.answer)
    return question_from_fields(key, "yes_no" if label else "open", label or rec.answer, question=rec.question,
                                category=rec.category, dataset=rec.dataset, source=name)


def load_questions(paths: Sequence[str], split: str | None = None) -> tuple[list[Question], dict[str, object]]:
    """Read question files of any supported format (slides are not needed and not looked for).

    Returns the questions and a provenance record (:mod:`wsi_llava.data.provenance`: checksums,
    per-category counts, every item that could not be read with its reason, published-size matches;
    a manifest's own ``.provenance.json`` sidecar is included under ``manifests``).
    """
    from ..data import importers
    from ..data.manifest import load_manifest
    from ..data.provenance import (benchmark_of, build_provenance, category_counts, file_record, read_provenance,
                                   release_match)

    questions: list[Question] = []
    files, dropped, read_cats, sidecars, releases = [], [], [], {}, []
    wsi_bench_total = 0
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: file not found")
        fmt = detect_format(path)
        if fmt == "manifest":
            records = load_manifest(path, split=split)
            got = [_from_record(r) for r in records]
            side = read_provenance(path)
            if side is not None:
                sidecars[Path(path).name] = side
            files.append(file_record(path, len(got), fmt))
        else:
            reader = importers.READERS[fmt]
            items, bad = reader(path)
            got = [_from_import_item(it, fmt) for it in items]
            cat = importers._category_and_split(path)[0] if fmt == "wsi-bench" else ""
            for s in bad:
                dropped.append({"source": s.source, "item": s.item, "slide_id": s.slide_id, "reason": s.reason,
                                "stage": "read", "category": cat})
                read_cats.append(cat)
            files.append(file_record(path, len(items) + len(bad), fmt))
            if fmt == "wsi-bench":
                wsi_bench_total += len(items) + len(bad)
            else:
                import csv

                with open(path, encoding="utf-8-sig", newline="") as f:
                    bench = benchmark_of(fmt, next(csv.reader(f), []))
                if bench:
                    releases.append({**release_match(bench, len(items) + len(bad)), "file": Path(path).name})
        read_cats += [q.category or "" for q in got]
        questions += got
    if wsi_bench_total:
        releases.insert(0, release_match("WSI-Bench test", wsi_bench_total))
    record = build_provenance(files, category_counts(read_cats, [q.category or "" for q in questions], dropped),
                              dropped, releases=releases)
    if sidecars:
        record["manifests"] = sidecars
    return questions, record
