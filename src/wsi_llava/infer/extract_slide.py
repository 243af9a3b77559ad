"""One slide of ``wsi-llava extract``: plan (tissue, tile grid), encode (reader workers → tile encoder),
write (TRIDENT-layout H5, GeoJSON, overview PNG). The cohort around it is :mod:`.extract`.

Tiles: a grid of ``patch_size_level0 = round(tile_size × level-0 magnification / target magnification)``
level-0 pixels from the slide's top-left corner (no overlap; whole tiles only), row-major (y, then x),
kept when their tissue share (:func:`~wsi_llava.data.tissue.tile_tissue_fraction`) is at least
``min_tissue``. Each kept tile is read at ``tile_size`` px (:meth:`~wsi_llava.data.wsi_reader.WsiReader.read_tile`)
and put through the encoder's own preprocessing (:class:`~wsi_llava.model.tile_encoder.Preprocess`).

Encoding: a torch ``DataLoader`` whose worker processes each open the slide once and read, resize and
preprocess tiles; batches wait in its bounded prefetch queue (``prefetch_factor`` batches per worker),
so the encoder runs while the next batches are decoded. Half precision runs under autocast.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.tissue import SEG_MPP, mask_to_geojson, segment_tissue, tile_tissue_fraction
from ..data.wsi_reader import WsiError, WsiReader, open_wsi
from ..fileio import atomic_write_text, publishing
from ..precision import Precision
from .roi import grid_coords

#: batches each reader worker keeps ready (the bounded queue in front of the encoder)
PREFETCH = 4


@dataclass
class SlidePlan:
    """What will be extracted from one slide: its geometry, the tissue mask and the kept tiles."""

    path: Path
    slide_id: str
    mpp: float
    level0_magnification: float
    target_magnification: float
    tile_size: int
    patch_size_level0: int
    width: int
    height: int
    seg_downsample: float
    """level-0 pixels per thumbnail / mask pixel"""
    thumbnail: np.ndarray
    """RGB uint8 [h, w, 3] at ``seg_downsample``"""
    mask: np.ndarray
    """tissue bool [h, w]"""
    coords: np.ndarray
    """[N, 2] int64 (x, y) level-0 top-left corners of the kept tiles, row-major"""


def plan_slide(path: str | os.PathLike, target_magnification: float, tile_size: int, min_tissue: float,
               mpp_table: dict[str, float] | None = None) -> SlidePlan:
    """Open the slide, segment its tissue on a thumbnail and choose the tiles."""
    with open_wsi(path, mpp_table) as reader:
        if target_magnification > reader.magnification * 1.01:
            raise WsiError(f"{reader.path}: level 0 is {reader.magnification:g}x ({reader.mpp:g} µm/px, from "
                           f"{reader.mpp_source}); tiles at {target_magnification:g}x would need upsampling. "
                           "Ask for a lower --magnification")
        size0 = int(round(tile_size * reader.magnification / target_magnification))
        seg_ds = max(1.0, SEG_MPP / reader.mpp)
        thumb = reader.thumbnail(seg_ds)
        mask = segment_tissue(thumb, reader.mpp * seg_ds)
        coords = grid_coords(reader.height, reader.width, size0)
        keep = tile_tissue_fraction(mask, seg_ds, coords, size0) >= min_tissue
        return SlidePlan(reader.path, reader.slide_id, reader.mpp, reader.magnification, target_magnification,
                         tile_size, size0, reader.width, reader.height, seg_ds, thumb, mask, coords[keep])


class TileDataset(torch.utils.data.Dataset):
    """Tile ``i`` of a plan → preprocessed pixels float32 [3, S, S]. The slide is opened lazily, once per
    process (each DataLoader worker has its own handle)."""

    def __init__(self, plan: SlidePlan, preprocess):
        self.path, self.mpp = plan.path, plan.mpp
        self.coords, self.size0, self.tile_size = plan.coords, plan.patch_size_level0, plan.tile_size
        self.preprocess = preprocess
        self._reader: WsiReader | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._reader is None:
            self._reader = WsiReader(self.path, self.mpp)
        x, y = self.coords[i]
        return self.preprocess(self._reader.read_tile(int(x), int(y), self.size0, self.tile_size))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@torch.inference_mode()
def encode_tiles(plan: SlidePlan, encoder, batch_size: int = 64, workers: int = 1, device: str = "cpu",
                 precision: Precision | None = None) -> np.ndarray:
    """Features float32 [N, D] of the plan's tiles, in ``plan.coords`` order."""
    device = torch.device(device)
    dataset = TileDataset(plan, encoder.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         prefetch_factor=PREFETCH if workers else None,
                                         pin_memory=device.type == "cuda")
    half = precision is not None and precision.is_half
    autocast = torch.autocast(device.type, dtype=precision.dtype) if half else contextlib.nullcontext()
    out = np.empty((len(dataset), encoder.embed_dim), np.float32)
    start = 0
    try:
        for pixels in loader:
            with autocast:
                feats = encoder(pixels.to(device, non_blocking=True))
            out[start:start + len(pixels)] = feats.float().cpu().numpy()
            start += len(pixels)
    except WsiError as e:  # from a worker: the DataLoader's text carries the worker's traceback; keep the message
        raise WsiError(_worker_message(str(e))) from e
    finally:
        dataset.close()
    if not np.isfinite(out).all():
        raise ValueError(f"{plan.path}: the tile encoder gave non-finite features; nothing written")
    return out


def _worker_message(text: str) -> str:
    """The error message at the end of a DataLoader worker's "Caught … Original Traceback" text."""
    prefix = f"{WsiError.__module__}.{WsiError.__qualname__}: "
    last = text.strip().splitlines()[-1] if text.strip() else text
    return last[len(prefix):] if last.startswith(prefix) else text


def _number(v: float):
    return int(v) if float(v).is_integer() else float(v)


def write_h5(plan: SlidePlan, features: np.ndarray, target: Path, attrs: dict) -> Path:
    """``features`` [N, D] float32 and ``coords`` [N, 2] int64 (x, y, level 0) in TRIDENT's layout (its
    attributes on ``coords``), plus ``attrs`` on the file; written beside ``target`` and renamed."""
    import h5py

    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # processes share a cache
    with publishing(tmp, target):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float32, copy=False))
            f["features"].attrs["name"] = plan.slide_id
            coords = f.create_dataset("coords", data=plan.coords.astype(np.int64))
            for k, v in {"patch_size": plan.tile_size, "patch_size_level0": plan.patch_size_level0,
                         "level0_magnification": _number(plan.level0_magnification),
                         "target_magnification": _number(plan.target_magnification), "overlap": 0,
                         "level0_width": plan.width, "level0_height": plan.height, "name": plan.slide_id}.items():
                coords.attrs[k] = v
            for k, v in attrs.items():
                f.attrs[k] = v
        os.replace(tmp, target)
    return target


def write_tissue(plan: SlidePlan, geojson: Path, overview: Path) -> None:
    """The tissue mask as GeoJSON (QuPath annotations, level-0 coordinates) and the overview PNG."""
    geo = mask_to_geojson(plan.mask, plan.seg_downsample)
    atomic_write_text(geojson, json.dumps(geo))
    write_overview(plan, geo, overview)


def write_overview(plan: SlidePlan, geo: dict, target: Path) -> Path:
    """The thumbnail with the tissue outline of ``geo`` (green) and the kept tiles (blue) drawn, as PNG."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(plan.thumbnail)
    draw = ImageDraw.Draw(image)
    ds = plan.seg_downsample
    for x, y in plan.coords:
        draw.rectangle([x / ds, y / ds, (x + plan.patch_size_level0) / ds - 1, (y + plan.patch_size_level0) / ds - 1],
                       outline=(40, 90, 220))
    for feature in geo["features"]:
        for ring in feature["geometry"]["coordinates"]:
            draw.line([(x / ds, y / ds) for x, y in ring], fill=(0, 170, 0), width=2)
    tmp = target.with_name(f".{target.name}.tmp")
    with publishing(tmp, target):
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
    return target
