"""Writing manifest CSVs (``synth``, ``import``, ``encode-roi``, the selection study): the columns in
WSI-LLaVA's order, written atomically so a crash never leaves a half-written manifest."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..fileio import atomic_write_text

#: Manifest CSV columns in the order WSI-LLaVA writes them (required ones first).
MANIFEST_COLUMNS = ("h5_path", "caption", "question", "answer", "slide_id", "dataset", "choices", "split",
                    "case_id", "category")


def write_manifest_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, object]], fields: Sequence[str] = MANIFEST_COLUMNS
) -> Path:
    """Write manifest rows (dicts keyed by ``fields``) as UTF-8 CSV with a header, atomically
    (:func:`~wsi_llava.fileio.atomic_write_text`). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
