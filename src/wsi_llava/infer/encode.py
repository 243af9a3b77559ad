"""`wsi-llava encode --vision-tower PATH --data manifest.csv --out DIR`: the tower-output cache.

Runs the frozen slide encoder once per distinct ``slide_id`` of the manifest over **all** its tiles (in
spatial order, eval mode, no autograd) and writes ``DIR/<slide_id>.h5`` with the patch tokens of the
chosen layer, the CLS token, the CLS attention and the keys (format: :mod:`wsi_llava.data.tower_cache`).
Training and inference with ``tower_cache: DIR`` then read these files instead of running the tower.

Resumable: a slide whose file exists, is complete, was made by the same tower weights and architecture
with the same select layer, and has the slide's tile count is skipped; any other existing file is
replaced. Files are written to a temporary name and renamed, so an interrupted run leaves only complete
files (and at most one ``.NAME.PID.tmp`` file, safe to delete). An unreadable slide stops the run with
the manifest row and the file named; nothing is ever written as zeros.

Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), the slides are shared out among the
processes by tile count (:mod:`.shard`); each process writes the files of its own slides, so the cache is
the one a single process writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.manifest import Record
from ..data.slide_checks import COORD_KEYS
from ..data.slides import (
    SlideError,
    load_slide,
    open_slide,
    read_slide_meta,
    slide_dataset,
)
from ..data.tower_cache import (
    TowerCache,
    TowerCacheError,
    TowerIdentity,
    tower_identity,
    write_cache_file,
)
from ..precision import Precision, add_precision_arguments
from . import shard
from .embed import tower_job


def file_order(path: str, spatial_coords: np.ndarray) -> np.ndarray:
    """The permutation ``load_slide`` applied to a whole slide: ``order[j]`` = source row of spatial row j.

    Reads the coordinates in file order (``coords_yx`` preferred, as ``load_slide``), sorts them
    row-major (by y, then x; stable) and checks the result equals ``spatial_coords`` [N, 2] (x, y)."""
    with open_slide(path) as f:
        key, yx, ds = next((k, is_yx, d) for k, is_yx in COORD_KEYS if (d := slide_dataset(f, k)) is not None)
        xy = np.asarray(ds[:]).astype(np.float32)
    if yx:
        xy = np.ascontiguousarray(xy[:, ::-1])
    order = np.lexsort((xy[:, 0], xy[:, 1]))
    if xy.shape != spatial_coords.shape or not np.array_equal(xy[order], spatial_coords):
        raise SlideError(f"{path}: tile order could not be reproduced from `{key}` (file changed while reading?)")
    return order


@torch.inference_mode()
def encode_slide(encoder, path: str, select_layer: int = -1, device: str | torch.device = "cpu",
                 precision: Precision | None = None) -> dict[str, np.ndarray]:
    """Run the tower over every tile of one slide → arrays in **source-row order**: tokens [N, D] (layer
    ``select_layer``: -1 = final normalised tokens, else ``hidden_states[select_layer]``), cls_token [D],
    cls_attention [N], keys [N, D], coords [N, 2] (x, y). ``precision``: half precision runs under autocast."""
    slide = load_slide(path, None, rng=None, expected_dim=encoder.config.in_dim)
    order = file_order(path, slide.coords)
    device = torch.device(device)
    feats = torch.from_numpy(slide.features)[None].to(device)
    coords = torch.from_numpy(slide.coords)[None].to(device)
    half = precision is not None and precision.is_half
    autocast = torch.autocast(device.type, dtype=precision.dtype) if half else contextlib.nullcontext()
    with autocast:
        out = encoder(feats, coords, None, output_hidden_states=select_layer != -1)
    tokens = (out.tokens if select_layer == -1 else out.hidden_states[select_layer])[0].float()
    arrays = {"cls_token": tokens[0], "tokens": tokens[1:], "cls_attention": out.cls_attention[0].float(),
              "keys": out.keys[0].float()}
    arrays = {k: v.cpu().numpy() for k, v in arrays.items()}
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the tower produced non-finite {', '.join(bad)}; nothing written")
    result = {"cls_token": arrays["cls_token"], "coords": np.empty_like(slide.coords)}
    result["coords"][order] = slide.coords
    for k in ("tokens", "cls_attention", "keys"):  # spatial row j → source row order[j]
        v = arrays[k]
        result[k] = np.empty_like(v)
        result[k][order] = v
    return result


def _is_current(cache: TowerCache, r: Record) -> bool:
    try:
        cache.check(r.slide_id, read_slide_meta(r.h5_path)[0], r.where)
        return True
    except (TowerCacheError, OSError, ValueError):
        return False


def build_tower_cache(encoder, slides: list[Record], out_dir: str | os.PathLike, select_layer: int = -1,
                      device: str | torch.device = "cpu", precision: Precision | None = None, vision_tower: str = "",
                      progress: bool = True, identity: TowerIdentity | None = None) -> dict[str, int]:
    """Encode every slide of ``slides`` (one record per slide) not yet cached by this tower into ``out_dir``.

    Returns counts ``{"encoded", "skipped", "replaced"}`` (replaced: an existing file made by another
    tower, layer or version of the slide, or unreadable, was overwritten)."""
    encoder = encoder.to(device).eval()
    identity = identity or tower_identity(encoder, select_layer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = TowerCache(out_dir, identity)
    counts = {"encoded": 0, "skipped": 0, "replaced": 0}
    with tqdm(total=len(slides), desc="encode", unit="slide", disable=not progress) as bar:
        for r in slides:
            target = cache.path(r.slide_id)
            if target.exists() and _is_current(cache, r):
                counts["skipped"] += 1
                bar.update(1)
                continue
            existed = target.exists()
            try:
                arrays = encode_slide(encoder, r.h5_path, select_layer, device, precision)
            except SlideError as e:
                raise SlideError(f"{r.where} [h5_path]: {e}") from e
            attrs = {"tower_sha256": identity.sha256, "tower_config": identity.config,
                     "select_layer": identity.select_layer, "source_h5": str(r.h5_path), "slide_id": r.slide_id,
                     "vision_tower": str(vision_tower), "precision": precision.name if precision else "fp32"}
            write_cache_file(target, attrs=attrs, **arrays)
            counts["replaced" if existed else "encoded"] += 1
            bar.update(1)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", required=True,
                        help="slide encoder weights (slide_encoder.pth, tower.safetensors) or a stage-1 / WSI-LLaVA "
                             "folder — the tower the model will use")
    parser.add_argument("--data", required=True, help="manifest CSV (or sharegpt JSON); each slide_id encoded once")
    parser.add_argument("--out", required=True, help="cache folder (one <slide_id>.h5 per slide)")
    parser.add_argument("--select-layer", type=int, default=-1,
                        help="tower state to cache, as the model's mm_vision_select_layer (-1 = final tokens)")
    parser.add_argument("--split", help="only rows with this split value")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    add_precision_arguments(parser)
    parser.add_argument("--vision-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SlideEncoderConfig fields the weights do not store (e.g. num_heads=16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    with shard.sharded() as sh:
        device = shard.device_for(args.device, sh)
        encoder, slides, precision = tower_job(args, device)
        if sh is not None:  # this rank's slides, balanced by tile count (every tile is encoded)
            weights = sh.from_main(lambda: shard.tile_counts([r.h5_path for r in slides]))
            slides = [slides[i] for i in shard.balance(weights, sh.world)[sh.rank]]
        counts = build_tower_cache(encoder, slides, args.out, args.select_layer, device, precision,
                                   vision_tower=str(args.vision_tower),
                                   progress=not args.no_progress and (sh is None or sh.is_main))
        if sh is not None:
            sh.barrier()
            counts = dict(zip(counts, sh.total(list(counts.values()))))
            if not sh.is_main:
                return 0
        print(f"{counts['encoded']} encoded, {counts['skipped']} already cached, {counts['replaced']} replaced "
              f"-> {args.out} (select layer {args.select_layer})" + (f" by {sh.world} processes" if sh else ""))
        return 0
