"""`wsi-llava embed --vision-tower PATH --data manifest.csv --out embeddings.h5`: one vector per slide.

The slide embedding is the encoder's own (``norm`` of the CLS token, or of the mean of the tile
tokens with ``--pool mean``), for linear probes and retrieval. Each distinct ``slide_id`` of the
manifest is embedded once, with the deterministic evaluation sample of ``--patches-per-wsi`` tiles
(default: every tile). An unreadable slide stops the run with the manifest row and file named
(never a zero vector). The output is written to a temporary file and renamed into place.

Output H5: ``embeddings`` [S, D] float32; ``slide_id``, ``h5_path``, ``case_id``, ``split``,
``dataset`` [S] (UTF-8 strings, "" when absent); ``n_tiles`` [S] (tiles used); attrs ``pool``,
``vision_tower``, ``patches_per_wsi`` (0 = all), ``slide_encoder_config`` (JSON), ``dim``.

Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), whole batches of slides are shared
out among the processes by tile count (:mod:`.shard`); each writes ``OUT.rank{r}-of-{w}.h5`` atomically (a
rerun reuses a rank's complete part) and rank 0 merges them into ``OUT`` in manifest order: the file a
single process writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.collate import pad_tiles
from ..data.manifest import ManifestError, Record, load_manifest
from ..data.slides import SlideError, load_slide
from ..fileio import publishing
from ..model.slide_encoder import SlideEncoder
from ..precision import Precision, add_precision_arguments, resolve_precision
from . import shard

STRING_COLUMNS = ("slide_id", "h5_path", "case_id", "split", "dataset")


def unique_slides(records: list[Record]) -> list[Record]:
    """The first record of each ``slide_id``, in manifest order. A slide id pointing at two different
    files is an error naming both rows."""
    first: dict[str, Record] = {}
    for r in records:
        seen = first.setdefault(r.slide_id, r)
        if seen.h5_path != r.h5_path:
            raise ValueError(f"{r.where} [h5_path]: slide {r.slide_id!r} is {r.h5_path} here but {seen.h5_path} "
                             f"at {seen.where}")
    return list(first.values())


@torch.no_grad()
def embed_slides(encoder: SlideEncoder, slides: list[Record], patches_per_wsi: int | None = None, pool: str = "cls",
                 batch_size: int = 1, device: str | torch.device = "cpu",
                 progress: bool = True, precision: Precision | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [S, D] float32 and tiles used [S] for ``slides`` (one record each), in order.
    ``precision``: half precision runs the encoder under autocast."""
    encoder = encoder.to(device).eval()
    half = precision is not None and precision.is_half
    autocast = torch.autocast(torch.device(device).type, dtype=precision.dtype) if half else contextlib.nullcontext()
    dim = encoder.config.in_dim
    out = np.zeros((len(slides), encoder.hidden_size), dtype=np.float32)
    n_tiles = np.zeros(len(slides), dtype=np.int64)
    with tqdm(total=len(slides), desc="embed", unit="slide", disable=not progress) as bar:
        for start in range(0, len(slides), batch_size):
            chunk = slides[start:start + batch_size]
            feats, coords = [], []
            for r in chunk:
                try:
                    s = load_slide(r.h5_path, patches_per_wsi, rng=None, expected_dim=dim)
                except SlideError as e:
                    raise SlideError(f"{r.where} [h5_path]: {e}") from e
                feats.append(torch.from_numpy(s.features))
                coords.append(torch.from_numpy(s.coords))
            f, c, m = pad_tiles(feats, coords)
            with autocast:
                res = encoder(f.to(device), c.to(device), m.to(device))
            emb = encoder.embed_slide(res, pool).float().cpu().numpy()
            out[start:start + len(chunk)] = emb
            n_tiles[start:start + len(chunk)] = [len(x) for x in feats]
            bar.update(len(chunk))
    if not np.isfinite(out).all():
        bad = [slides[i].where for i in np.nonzero(~np.isfinite(out).all(1))[0][:5]]
        raise ValueError(f"non-finite slide embeddings for {bad}")
    return out, n_tiles


def write_embeddings(out: str | os.PathLike, slides: list[Record], embeddings: np.ndarray, n_tiles: np.ndarray,
                     attrs: dict) -> Path:
    """Write the embeddings H5 (format in the module docstring) atomically."""
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with publishing(tmp, out):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=embeddings.astype(np.float32))
            f.create_dataset("n_tiles", data=n_tiles)
            for col in STRING_COLUMNS:
                values = [getattr(r, col) or "" for r in slides]
                f.create_dataset(col, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8"))
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["dim"] = int(embeddings.shape[1])
        os.replace(tmp, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", required=True,
                        help="exported tower (tower.safetensors / slide_encoder.pth) or a stage-1 / WSI-LLaVA folder")
    parser.add_argument("--data", required=True, help="manifest CSV (or sharegpt JSON); each slide_id once")
    parser.add_argument("--out", required=True, help="embeddings H5 to write")
    parser.add_argument("--split", help="only rows with this split value")
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls", help="CLS token (default) or mean of tiles")
    parser.add_argument("--patches-per-wsi", type=int, default=0,
                        help="tiles per slide, deterministic sample (default 0 = every tile)")
    parser.add_argument("--batch-size", type=int, default=1, help="slides encoded together (padded)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    add_precision_arguments(parser)
    parser.add_argument("--vision-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SlideEncoderConfig fields the weights do not store (e.g. num_heads=16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_embeddings(path: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """``(columns, embeddings, n_tiles, attrs)`` of an embeddings H5 (``columns``: the string columns)."""
    import h5py

    with h5py.File(path, "r") as f:
        cols = {c: [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in f[c][:]] for c in STRING_COLUMNS}
        return cols, f["embeddings"][:], f["n_tiles"][:], {k: f.attrs[k] for k in f.attrs if k != "dim"}


def _part_matches(path: Path, slides: list[Record], attrs: dict) -> bool:
    """A rank's part from an earlier run holds exactly these slides, made with these settings."""
    try:
        cols, _, _, old = read_embeddings(path)
    except (OSError, KeyError, ValueError):
        return False
    return cols["slide_id"] == [r.slide_id for r in slides] and \
        cols["h5_path"] == [str(r.h5_path) for r in slides] and \
        {k: str(v) for k, v in old.items()} == {k: str(v) for k, v in attrs.items()}


def _embed_sharded(sh, args, encoder, slides, device, precision, attrs) -> int:
    groups = shard.batches(len(slides), args.batch_size)

    def batch_tiles() -> list[int]:
        n = shard.tile_counts([r.h5_path for r in slides], args.patches_per_wsi or None)
        return [sum(n[i] for i in g) for g in groups]

    # the rank's batches in ascending order: all full but possibly the last one of the manifest, which then
    # comes last, so batching ``own`` by batch_size again gives exactly these batches
    own = [slides[i] for b in shard.balance(sh.from_main(batch_tiles), sh.world)[sh.rank] for i in groups[b]]
    part = sh.part_path(args.out)
    if own and not _part_matches(part, own, attrs):
        emb, n_tiles = embed_slides(encoder, own, args.patches_per_wsi or None, args.pool, args.batch_size, device,
                                    progress=not args.no_progress and sh.is_main, precision=precision)
        write_embeddings(part, own, emb, n_tiles, attrs)
    elif not own:
        part.unlink(missing_ok=True)  # more processes than batches: nothing to do here
    sh.barrier()
    if sh.is_main:
        merged = np.zeros((len(slides), encoder.hidden_size), dtype=np.float32)
        tiles = np.zeros(len(slides), dtype=np.int64)
        index = {r.slide_id: i for i, r in enumerate(slides)}
        filled = np.zeros(len(slides), dtype=bool)
        for r in range(sh.world):
            p = sh.part_path(args.out, r)
            if not p.exists():
                continue
            cols, emb, n, _ = read_embeddings(p)
            rows = [index[s] for s in cols["slide_id"]]
            merged[rows], tiles[rows], filled[rows] = emb, n, True
        if not filled.all():
            raise RuntimeError(f"{args.out}: the parts miss {int((~filled).sum())} slide(s); rerun to complete them")
        write_embeddings(args.out, slides, merged, tiles, attrs)
        for p in shard.find_parts(args.out):
            p.unlink(missing_ok=True)
        print(f"wrote {len(slides)} slide embeddings of width {merged.shape[1]} to {args.out} "
              f"(merged from {sh.world} processes)")
    sh.barrier()
    return 0


def tower_job(args: argparse.Namespace, device) -> tuple[SlideEncoder, list[Record], Precision]:
    """What ``embed`` and ``encode`` start from: the tower of ``--vision-tower`` (+ ``--vision-config``),
    one record per slide of ``--data`` (``--split``), and the precision to run in."""
    from ..config import parse_overrides
    from ..model.export import load_tower

    encoder = load_tower(args.vision_tower, **parse_overrides(args.vision_config))
    slides = unique_slides(load_manifest(args.data, split=args.split))
    if not slides:
        raise ManifestError(f"{args.data}: no rows" + (f" with split {args.split!r}" if args.split else ""))
    return encoder, slides, resolve_precision(args.precision, device, force=args.force_precision)


def main(args: argparse.Namespace) -> int:
    if args.patches_per_wsi < 0 or args.batch_size < 1:
        raise ValueError("--patches-per-wsi must be >= 0 and --batch-size >= 1")
    with shard.sharded() as sh:
        device = shard.device_for(args.device, sh)
        encoder, slides, precision = tower_job(args, device)
        attrs = {"pool": args.pool, "vision_tower": str(args.vision_tower),
                 "patches_per_wsi": int(args.patches_per_wsi),
                 "slide_encoder_config": json.dumps(encoder.config.architecture())}
        if sh is not None:
            return _embed_sharded(sh, args, encoder, slides, device, precision, attrs)
        emb, n_tiles = embed_slides(encoder, slides, args.patches_per_wsi or None, args.pool, args.batch_size, device,
                                    progress=not args.no_progress, precision=precision)
        write_embeddings(args.out, slides, emb, n_tiles, attrs)
        print(f"wrote {len(slides)} slide embeddings of width {emb.shape[1]} to {args.out}")
        return 0
