"""`wsi-llava encode-roi --data M.csv --tile-weights W --out DIR`: ROI images → slide H5 files + a manifest.

Every distinct ``image_path`` of the manifest is tiled and encoded once by the frozen tile encoder
(:func:`~wsi_llava.infer.roi.roi_to_slide`, all whole tiles, spatial order) and written as a slide H5
file ``DIR/<image stem>-<8 hex>.h5`` (``features`` float32 [N, D], ``coords`` (x, y) px; the hex is
from the image's absolute path, so two ``a.png`` in different folders do not collide).
``DIR/manifest.csv`` is the input manifest with ``h5_path`` pointing at those files (relative to
``DIR``) and no ``image_path`` column, so ROI training and prediction run the H5 pipeline unchanged,
never rerun the ViT each epoch and do not need the images (``DIR`` can be copied alone; each H5 file
names its image in its ``source_image`` attribute). Rows without an image are copied with their
``h5_path``.

Resumable: an existing file is skipped when it opens, holds ``features`` and ``coords`` and records
the same image contents (SHA-256) and the same tile encoder (its name and the SHA-256 of its weights
file); any other existing file is replaced. Files are written to a temporary name and renamed, so an
interrupted run leaves only complete files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from ..data.manifest import Record, load_manifest
from ..data.manifest_writer import MANIFEST_COLUMNS, write_manifest_csv
from ..errors import MissingFileError, WsiLlavaError
from ..fileio import sha256_file

COLUMNS = MANIFEST_COLUMNS


def h5_name(image_path: str) -> str:
    """``<stem>-<8 hex of the absolute path>.h5``: one file per distinct image."""
    return f"{Path(image_path).stem}-{hashlib.sha256(image_path.encode()).hexdigest()[:8]}.h5"


def is_complete(path: Path, image_sha: str, encoder_id: str) -> bool:
    """Whether ``path`` is a finished file of this image by this tile encoder."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return ("features" in f and "coords" in f and f["features"].shape[0] == f["coords"].shape[0]
                    and f.attrs.get("source_sha256") == image_sha and f.attrs.get("tile_encoder") == encoder_id)
    except (OSError, ValueError):
        return False


def manifest_row(rec: Record, h5_path: str) -> dict:
    return {"h5_path": h5_path, "caption": rec.caption, "question": rec.question, "answer": rec.answer,
            "slide_id": rec.slide_id, "dataset": rec.dataset,
            "choices": json.dumps(list(rec.choices)) if rec.choices else "", "split": rec.split or "",
            "case_id": rec.case_id or "", "category": rec.category or ""}


def encode_rois(records: list[Record], weights: str | Path, out: str | Path, encoder_name: str | None = None,
                batch_size: int = 32, progress: bool = True) -> dict:
    """Encode every distinct ROI image of ``records`` into ``out`` and write ``out/manifest.csv``.

    Returns counts ``{"encoded", "skipped", "rows", "manifest"}``."""
    from tqdm import tqdm

    from ..model.tile_encoder import load_tile_encoder
    from .roi import roi_to_slide, write_roi_h5

    if not Path(weights).is_file():
        raise MissingFileError(f"--tile-weights {weights}: file not found; check the path")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = list(dict.fromkeys(r.image_path for r in records if r.image_path))
    encoder = None
    encoder_id = f"{encoder_name or ''}:{sha256_file(weights)}"
    counts = {"encoded": 0, "skipped": 0}
    where = {r.image_path: r.where for r in reversed(records) if r.image_path}
    for image in tqdm(images, desc="encode-roi", unit="image", disable=not progress):
        target = out / h5_name(image)
        image_sha = sha256_file(image)
        if target.exists() and is_complete(target, image_sha, encoder_id):
            counts["skipped"] += 1
            continue
        if encoder is None:
            encoder = load_tile_encoder(weights, encoder_name).eval()
            encoder.requires_grad_(False)
        try:
            slide = roi_to_slide(image, encoder, None, batch_size)
        except WsiLlavaError as e:
            raise type(e)(f"{where[image]} [image_path]: {e}") from e
        write_roi_h5(slide, target, encoder_id, attrs={"source_sha256": image_sha})
        counts["encoded"] += 1
    rows = [manifest_row(r, h5_name(r.image_path) if r.image_path else r.h5_path) for r in records]
    counts["manifest"] = str(write_manifest_csv(out / "manifest.csv", rows, COLUMNS))
    counts["rows"] = len(rows)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="manifest (CSV or sharegpt JSON) whose rows have image_path")
    parser.add_argument("--tile-weights", required=True, help="tile encoder weights (.safetensors / .bin), local only")
    parser.add_argument("--tile-encoder", help="gigapath | uni | vit | timm:<arch> (default: the name in "
                                               "--tile-weights' safetensors metadata)")
    parser.add_argument("--out", required=True, help="folder for the slide H5 files and manifest.csv")
    parser.add_argument("--split", help="only rows with this split value")
    parser.add_argument("--batch-size", type=int, default=32, help="tiles per tile-encoder forward")


def main(args: argparse.Namespace) -> int:
    records = load_manifest(args.data, split=args.split)
    if not any(r.image_path for r in records):
        raise WsiLlavaError(f"{args.data}: no row has an image_path; nothing to encode")
    counts = encode_rois(records, args.tile_weights, args.out, args.tile_encoder, args.batch_size)
    print(f"encoded {counts['encoded']} ROI image(s), skipped {counts['skipped']} already complete; "
          f"{counts['rows']} row(s) in {counts['manifest']}")
    return 0
