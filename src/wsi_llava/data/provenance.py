"""Versioned question sets: what a manifest was built from, and what was left out.

Public benchmarks drift between releases (the WSI-LLaVA README counts 4,119 test VQA pairs while its
public ``dataset/*_test.json`` files hold 4,173; SlideBench-VQA (TCGA) has been published with 7,827,
3,176 and 1,473 questions), so a number means little without the exact question files. Every import
writes a sidecar ``<manifest>.provenance.json`` (:func:`provenance_path`, written atomically) with

* ``files`` — each input file's path, size, SHA-256 and item count (and which published release size
  it matches, :data:`KNOWN_SIZES`);
* ``categories`` — per category: items read, imported, dropped;
* ``dropped`` — every item that did not become a manifest row, with its reason;
* ``split`` — how ``--split-by case`` assigned cases (fraction, seed, case and row counts).

``wsi-llava eval`` shows it in ``report.md`` (and computes the same record itself for
``--baselines-only`` on raw question files).

:func:`split_by_case` assigns whole cases (patients) to test or train, so no case is in two splits.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..fileio import atomic_write_text, sha256_file

PROVENANCE_VERSION = 1

#: Published sizes of benchmark question sets: ``{benchmark: {size: where that size is published}}``.
KNOWN_SIZES: dict[str, dict[int, str]] = {
    "WSI-Bench test": {
        4119: "WSI-LLaVA README (208 WSIs, 4,119 VQA pairs)",
        4173: "the 16 public dataset/*_test.json files of the WSI-LLaVA repository",
    },
    "SlideBench-VQA (TCGA)": {
        7827: "the SlideChat paper's SlideBench-VQA (TCGA) (81.17 % reported there)",
        3176: "the re-reviewed SlideBench-VQA-TCGA.csv, 31 cancer types (SlideChat issues #16, #34: 74.1 % for the released model)",
        1473: "the smaller SlideBench-VQA (TCGA) release (SlideChat issue #27 counts 1,494 rows in one download)",
    },
    "SlideBench-VQA (BCNB)": {
        7274: "SlideBench-VQA-BCNB.csv as released (SlideChat issue #32)",
    },
}


def provenance_path(manifest: str | os.PathLike) -> Path:
    """``manifest.csv`` → ``manifest.csv.provenance.json``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".provenance.json")


def release_match(benchmark: str, n: int) -> dict[str, object]:
    """Which published size of ``benchmark`` an item count equals: ``{"benchmark", "n", "matches",
    "known"}`` (``matches`` None when it equals none of them)."""
    known = KNOWN_SIZES.get(benchmark, {})
    return {"benchmark": benchmark, "n": int(n), "matches": known.get(int(n)), "known": sorted(known, reverse=True)}


def benchmark_of(fmt: str, header: Sequence[str] = ()) -> str | None:
    """The :data:`KNOWN_SIZES` entry a file of this format belongs to (SlideBench: the TCGA file has
    a ``Tumor`` column, the BCNB file a ``Task`` column)."""
    if fmt == "wsi-bench":
        return "WSI-Bench test"
    if fmt == "slidebench":
        norm = {h.strip().lower() for h in header}
        if "tumor" in norm:
            return "SlideBench-VQA (TCGA)"
        return "SlideBench-VQA (BCNB)" if "task" in norm else None
    return None


def file_record(path: str | os.PathLike, n_items: int, fmt: str) -> dict[str, object]:
    """Path, bytes, SHA-256, item count and format of one input file."""
    p = Path(path)
    return {"path": str(p), "name": p.name, "format": fmt, "bytes": p.stat().st_size, "sha256": sha256_file(p),
            "n_items": int(n_items)}


def category_counts(
    read: Iterable[str], imported: Iterable[str], dropped: Sequence[dict[str, object]]
) -> dict[str, dict[str, int]]:
    """Per category: items ``read`` from the files (malformed ones included), ``imported`` as rows,
    ``dropped`` (an empty category is reported as ``(none)``)."""
    n_read, n_imported = Counter(read), Counter(imported)
    n_dropped = Counter(str(d.get("category") or "") for d in dropped)
    return {
        c or "(none)": {"read": n_read[c], "imported": n_imported[c], "dropped": n_dropped[c]}
        for c in sorted(set(n_read) | set(n_imported) | set(n_dropped))
    }


def build_provenance(
    files: Sequence[dict[str, object]],
    categories: dict[str, dict[str, int]],
    dropped: Sequence[dict[str, object]],
    *,
    split: dict[str, object] | None = None,
    releases: Sequence[dict[str, object]] = (),
) -> dict[str, object]:
    """The sidecar record: ``files`` (:func:`file_record`), ``categories``
    (:func:`category_counts`), every ``dropped`` item (``{"source", "item", "slide_id", "category",
    "reason"}``), the ``split`` summary and the ``releases`` matched (:func:`release_match`)."""
    reasons = Counter(_reason_kind(str(d.get("reason", ""))) for d in dropped)
    return {
        "version": PROVENANCE_VERSION,
        "files": list(files),
        "n_items_in_files": int(sum(int(f.get("n_items", 0)) for f in files)),
        "n_imported": int(sum(c["imported"] for c in categories.values())),
        "n_dropped": len(dropped),
        "dropped_by_reason": dict(reasons.most_common()),
        "categories": categories,
        "releases": list(releases),
        "split": split,
        "dropped": list(dropped),
    }


def _reason_kind(reason: str) -> str:
    """A reason without its particulars (quoted values, lists, paths, numbers), for counting."""
    t = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]", "…", reason)
    t = re.sub(r"\S*/\S*", "…", t)
    t = re.sub(r"\b\d+\b", "#", t)
    t = re.sub(r"\s+", " ", t).strip(" :")
    return t[:80] or "unspecified"


def write_provenance(manifest: str | os.PathLike, record: dict[str, object]) -> Path:
    """Write ``record`` to :func:`provenance_path` of ``manifest`` atomically."""
    path = provenance_path(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_provenance(manifest: str | os.PathLike) -> dict[str, object] | None:
    """The sidecar of ``manifest``, or None when there is none (or it cannot be read)."""
    path = provenance_path(manifest)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def split_by_case(case_ids: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], dict[str, object]]:
    """Assign each item to ``"test"``/``"train"`` by its case, so a case is never in two splits.

    The distinct cases are sorted, shuffled with ``random.Random(seed)``, and the first
    ``round(test_fraction · n_cases)`` (at least 1 and at most n_cases − 1 when there are two or more
    cases and 0 < fraction < 1) go to test. The same cases, fraction and seed give the same split,
    whatever the item order. Returns (split per item, summary).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    cases = sorted(set(case_ids))
    order = cases[:]
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * len(cases))
    if len(cases) >= 2:
        n_test = min(max(n_test, 1), len(cases) - 1)
    test = set(order[:n_test])
    splits = ["test" if c in test else "train" for c in case_ids]
    counts = Counter(splits)
    summary = {
        "by": "case", "test_fraction": test_fraction, "seed": seed,
        "n_cases": len(cases), "n_test_cases": len(test), "n_train_cases": len(cases) - len(test),
        "n_test_rows": counts["test"], "n_train_rows": counts["train"],
    }
    return splits, summary
