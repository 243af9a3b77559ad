"""`wsi-llava extract SLIDES_OR_DIRS --out DIR --weights W`: tile features from the user's own slides.

Each slide (a file, or every slide file directly inside a folder: :func:`~wsi_llava.data.wsi_reader.find_slides`)
is opened through OpenSlide, its tissue segmented on a thumbnail, tiled at ``--magnification`` /
``--tile-size`` and encoded by the frozen tile encoder (:mod:`.extract_slide`). Output in ``DIR``:

- ``features/<slide_id>.h5`` — TRIDENT's layout: ``features`` [N, D] float32, ``coords`` [N, 2] int64
  (x, y, level-0 pixels) carrying ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``; read by
  :func:`~wsi_llava.data.slides.load_slide` and by ``wsi-llava import --h5-root DIR``;
- ``tissue/<slide_id>.geojson`` — the tissue mask (QuPath annotations, level-0 coordinates);
- ``thumbnails/<slide_id>.png`` — the thumbnail with the tissue outline and the tiles drawn;
- ``slides.csv`` — one row per extracted slide (:data:`COLUMNS`);
- ``errors.jsonl`` — one object per slide that could not be extracted (``slide``, ``slide_id``, ``error``).

Resumable: every file is written under a temporary name and renamed; the H5 file is written last, so a
slide whose H5 exists, is complete and records the same settings (:func:`extraction_key`: encoder and
weights SHA-256, magnification, tile size, tissue threshold, slide size) is skipped. An unreadable or
corrupt slide is listed in ``errors.jsonl`` and the cohort goes on; the exit code is then 1.

Sharded under ``torchrun`` / ``accelerate launch`` (:mod:`.shard`): the slides are shared out by level-0
area (:func:`~.shard.slide_areas`); each rank writes its own slides' files and its own tables
(``slides.rank{r}-of-{w}.csv``, ``errors.rank{r}-of-{w}.jsonl``); after a barrier rank 0 merges them
(:func:`merge_tables`) into the tables one process writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.tissue import MIN_TISSUE_FRACTION
from ..data.wsi_reader import WsiError, find_slides, mpp_override, read_mpp_csv
from ..errors import MissingFileError, WsiLlavaError
from ..fileio import atomic_write_text, sha256_file
from ..precision import Precision, add_precision_arguments, resolve_precision
from . import shard

#: the cohort tables in the output folder: one row per extracted slide, one line per failed slide
TABLES = ("slides.csv", "errors.jsonl")
COLUMNS = ("slide_id", "slide_path", "h5_path", "n_tiles", "mpp", "level0_magnification", "target_magnification",
           "patch_size", "patch_size_level0", "level0_width", "level0_height", "geojson_path", "thumbnail_path")


@dataclass(frozen=True)
class ExtractSettings:
    """What decides the tiles and their features (``encoder_id``: encoder name + weights SHA-256)."""

    encoder_id: str
    magnification: float = 20.0
    tile_size: int = 256
    min_tissue: float = MIN_TISSUE_FRACTION
    batch_size: int = 64
    workers: int = 1


def extraction_key(settings: ExtractSettings, slide: Path, mpp_table: dict[str, float] | None = None) -> str:
    """The identity of one slide's extraction (with its ``--mpp-csv`` pixel size, which moves the tiles); a
    finished H5 holding another key is redone."""
    return json.dumps({"encoder": settings.encoder_id, "magnification": settings.magnification,
                       "tile_size": settings.tile_size, "min_tissue": settings.min_tissue,
                       "mpp": mpp_override(slide, mpp_table),
                       "slide": str(slide.resolve()), "slide_bytes": slide.stat().st_size}, sort_keys=True)


def finished_row(h5: Path, key: str | None, out: Path) -> dict | None:
    """The ``slides.csv`` row of a complete H5 file (made with ``key`` unless None), else None."""
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            if "features" not in f or "coords" not in f or f["features"].shape[0] != f["coords"].shape[0]:
                return None
            if key is not None and f.attrs.get("extraction") != key:
                return None
            a, slide_id = dict(f["coords"].attrs), h5.stem
            return {"slide_id": slide_id, "slide_path": str(f.attrs.get("source_slide", "")),
                    "h5_path": str(h5.relative_to(out)), "n_tiles": int(f["features"].shape[0]),
                    "mpp": float(f.attrs.get("mpp", 0.0)),
                    **{k: a.get(k) for k in COLUMNS if k in a},
                    "geojson_path": f"tissue/{slide_id}.geojson", "thumbnail_path": f"thumbnails/{slide_id}.png"}
    except (OSError, ValueError, KeyError):
        return None


def table_paths(out: str | os.PathLike, sh: shard.Shard | None = None) -> tuple[Path, Path]:
    """``slides.csv`` and ``errors.jsonl`` of ``out``, or this rank's parts of them in a sharded run."""
    paths = tuple(Path(out) / name for name in TABLES)
    return paths if sh is None else tuple(sh.part_path(p) for p in paths)


def _write_table(tables: tuple[Path, Path], rows: list[dict], errors: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["slide_id"]))
    atomic_write_text(tables[0], buf.getvalue())
    atomic_write_text(tables[1], "".join(json.dumps(e) + "\n" for e in errors))


def merge_tables(out: str | os.PathLike, slides: list[Path], world: int) -> None:
    """Rank 0 after the barrier: the table parts of the ``world`` ranks into ``slides.csv`` and
    ``errors.jsonl``, as one process writes them for ``slides`` (rows by slide_id, errors in the order of
    ``slides``); then every table part in ``out`` (of any world size) is removed."""
    rows: list[dict] = []
    errors: list[dict] = []
    for r in range(world):
        part_csv, part_errors = (shard.part_path(p, r, world) for p in table_paths(out))
        if not (part_csv.exists() and part_errors.exists()):
            raise RuntimeError(f"{out}: rank {r} left no {part_csv.name} / {part_errors.name}; rerun to complete it")
        with open(part_csv, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))  # strings, written back as they are
        errors.extend(json.loads(line) for line in part_errors.read_text(encoding="utf-8").splitlines())
    order = {str(s): i for i, s in enumerate(slides)}
    errors.sort(key=lambda e: order.get(e["slide"], len(order)))
    _write_table(table_paths(out), rows, errors)
    remove_table_parts(out)


def remove_table_parts(out: str | os.PathLike) -> None:
    """Delete the table parts a sharded run left in ``out`` (merged, or stale after a kill)."""
    for table in table_paths(out):
        for p in shard.find_parts(table):
            p.unlink(missing_ok=True)


def check_unique_ids(slides: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for s in slides:
        if s.stem in seen:
            raise WsiLlavaError(f"two slides have the id {s.stem!r}: {seen[s.stem]} and {s}; the outputs are named "
                                "by file stem, so extract them into different --out folders")
        seen[s.stem] = s


def encoder_id(encoder, weights: str | os.PathLike, digest: Callable[[Path], str] = sha256_file) -> str:
    """What identifies a tile encoder's features: its name and the SHA-256 of its weights file (computed
    by ``digest``, e.g. one that remembers it)."""
    return f"{encoder.name}:{digest(Path(weights))}"


def extract_slide(slide: Path, target: Path, key: str, encoder, settings: ExtractSettings,
                  mpp_table: dict[str, float] | None = None, device: str = "cpu", precision: Precision | None = None,
                  tissue: tuple[Path, Path] | None = None) -> int:
    """One slide: plan its tiles, encode them with ``encoder`` (already on ``device``, in eval mode) and
    write the H5 file ``target`` atomically (attribute ``extraction``: ``key``); returns the tile count.
    ``tissue``: (GeoJSON, overview PNG) files to write too, before encoding. A slide without a tissue
    tile, or one that cannot be read, is a :class:`~wsi_llava.data.wsi_reader.WsiError` naming it."""
    from .extract_slide import encode_tiles, plan_slide, write_h5, write_tissue

    plan = plan_slide(slide, settings.magnification, settings.tile_size, settings.min_tissue, mpp_table)
    if tissue is not None:
        write_tissue(plan, *tissue)
    if len(plan.coords) == 0:
        see = f" (see {tissue[1].parent.name}/{tissue[1].name})" if tissue is not None else ""
        raise WsiError(f"{slide}: no tile is at least {settings.min_tissue:.0%} tissue{see}; nothing to encode")
    features = encode_tiles(plan, encoder, settings.batch_size, settings.workers, device, precision)
    write_h5(plan, features, target, {"extraction": key, "source_slide": str(Path(slide).resolve()),
                                      "mpp": plan.mpp, "tile_encoder": settings.encoder_id,
                                      "tissue_threshold": settings.min_tissue})
    return len(features)


def extract_cohort(slides: list[Path], out: str | os.PathLike, encoder, settings: ExtractSettings,
                   mpp_table: dict[str, float] | None = None, device: str = "cpu",
                   precision: Precision | None = None, progress: bool = True,
                   tables: tuple[Path, Path] | None = None) -> dict:
    """Extract every slide of ``slides`` not yet finished into ``out``; returns counts
    ``{"extracted", "skipped", "failed", "tiles"}`` (tiles: written in this run). The rows of ``slides``
    and their errors go to ``tables`` (default :func:`table_paths` of ``out``), rewritten after each slide."""
    from tqdm import tqdm

    check_unique_ids(slides)
    out = Path(out)
    tables = tables or table_paths(out)
    for sub in ("features", "tissue", "thumbnails"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    rows: list[dict] = []
    errors: list[dict] = []
    counts = {"extracted": 0, "skipped": 0, "failed": 0, "tiles": 0}
    with tqdm(slides, desc="extract", unit="slide", disable=not progress) as bar:
        for slide in bar:
            target = out / "features" / f"{slide.stem}.h5"
            key = extraction_key(settings, slide, mpp_table)
            row = finished_row(target, key, out) if target.exists() else None
            if row is not None:
                rows.append(row)
                counts["skipped"] += 1
                continue
            try:
                n = extract_slide(slide, target, key, encoder, settings, mpp_table, device, precision,
                                  tissue=(out / "tissue" / f"{slide.stem}.geojson",
                                          out / "thumbnails" / f"{slide.stem}.png"))
            except WsiLlavaError as e:
                errors.append({"slide": str(slide), "slide_id": slide.stem, "error": str(e)})
                counts["failed"] += 1
                _write_table(tables, rows, errors)
                continue
            rows.append(finished_row(target, None, out))
            counts["extracted"] += 1
            counts["tiles"] += n
            bar.set_postfix(tiles=counts["tiles"], failed=counts["failed"])
            _write_table(tables, rows, errors)
    _write_table(tables, rows, errors)
    return counts


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--magnification``, ``--tile-size``, ``--min-tissue``, ``--mpp-csv``: how a raw slide is tiled
    (``extract``, and ``chat``/``predict``/``serve`` on raw slides); checked by :func:`check_tiling`."""
    parser.add_argument("--magnification", type=float, default=20.0, help="magnification tiles are taken at (20)")
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in pixels at --magnification (256)")
    parser.add_argument("--min-tissue", type=float, default=MIN_TISSUE_FRACTION,
                        help=f"keep a tile when at least this share of it is tissue ({MIN_TISSUE_FRACTION})")
    parser.add_argument("--mpp-csv", help="CSV with columns slide,mpp: pixel size (µm) of slides that lack it "
                                          "(or to override it); slide = file name or stem")


def check_tiling(magnification: float, tile_size: int, min_tissue: float) -> None:
    """The :func:`add_tiling_arguments` values are usable, else a :class:`WsiLlavaError` naming the flag."""
    if magnification <= 0 or tile_size < 1:
        raise WsiLlavaError(f"--magnification {magnification:g} / --tile-size {tile_size}: both must be positive")
    if not 0.0 <= min_tissue <= 1.0:
        raise WsiLlavaError(f"--min-tissue {min_tissue}: expected a share between 0 and 1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDES_OR_DIRS",
                        help="slide files, or folders whose slide files (.svs .tif .tiff .ndpi .mrxs …) are all taken")
    parser.add_argument("--out", required=True, help="output folder (features/, tissue/, thumbnails/, slides.csv)")
    parser.add_argument("--weights", required=True, help="tile encoder weights (.safetensors / .bin), local only")
    parser.add_argument("--encoder", help="gigapath | uni | vit | timm:<arch> (default: the name in --weights' "
                                          "safetensors metadata)")
    add_tiling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per encoder forward (64)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                        help="tile-reading worker processes (default: cores - 1, at most 4; 0 = read in this process)")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from ..model.tile_encoder import load_tile_encoder

    check_tiling(args.magnification, args.tile_size, args.min_tissue)
    if args.batch_size < 1 or args.workers < 0:
        raise WsiLlavaError("--batch-size must be positive and --workers >= 0")
    if not Path(args.weights).is_file():
        raise MissingFileError(f"--weights {args.weights}: file not found; check the path")
    slides = find_slides(args.slides)
    if not slides:
        raise WsiLlavaError(f"no slide files in {', '.join(args.slides)}")
    check_unique_ids(slides)  # over the whole cohort: two ranks must never write the same files
    mpp_table = read_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    encoder = load_tile_encoder(args.weights, args.encoder)
    with shard.sharded() as sh:
        # the weights (GBs for GigaPath) are hashed once, by the main process
        eid = sh.from_main(lambda: encoder_id(encoder, args.weights)) if sh else encoder_id(encoder, args.weights)
        settings = ExtractSettings(eid, args.magnification, args.tile_size, args.min_tissue, args.batch_size,
                                   args.workers)
        device = shard.device_for(args.device, sh)
        precision = resolve_precision(args.precision, device, force=args.force_precision)
        mine = slides
        if sh is not None:  # this rank's slides, balanced by level-0 area
            areas = sh.from_main(lambda: shard.slide_areas(slides, mpp_table))
            mine = [slides[i] for i in shard.balance(areas, sh.world)[sh.rank]]
        counts = extract_cohort(mine, args.out, encoder, settings, mpp_table, device, precision,
                                progress=not args.no_progress and (sh is None or sh.is_main),
                                tables=table_paths(args.out, sh))
        if sh is not None:
            sh.barrier()
            counts = dict(zip(counts, sh.total(list(counts.values()))))
        if sh is None or sh.is_main:
            if sh is not None:
                merge_tables(args.out, slides, sh.world)
            else:
                remove_table_parts(args.out)  # a killed sharded run's parts: this run's tables replace them
            print(f"extracted {counts['extracted']} slide(s) ({counts['tiles']} tiles), skipped {counts['skipped']} "
                  f"already done, {counts['failed']} failed -> {Path(args.out) / 'slides.csv'}"
                  + (f"; see {Path(args.out) / 'errors.jsonl'}" if counts["failed"] else "")
                  + (f" (by {sh.world} processes)" if sh else ""), flush=True)
        if sh is not None:
            sh.barrier()
        return 1 if counts["failed"] else 0
