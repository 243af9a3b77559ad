"""ROI mode: a region image (PNG / JPEG / TIFF) → tiles → tile encoder → a :class:`Slide`.

An ROI becomes a slide like any other: features [N, D] from the (frozen) tile encoder and coords
[N, 2], the pixel (x, y) of each tile's top-left corner in the image. Everything after that —
the slide encoder where the model has one, selection, projector, LM — is unchanged, so an ROI and
an H5 file holding the same tiles' features give the same answer.

Tiling: a grid of ``encoder.tile_size`` px tiles from the top-left corner, row-major (y, then x),
whole tiles only (a remainder narrower than a tile at the right or bottom edge is left out, as tile
extractors do). ``tile_size`` is the encoder's resize scale (256 for GigaPath: 256-px tiles, centre
crop 224, as its pipeline does; 224 for UNI), so tiles are never resampled. An image smaller than
one tile in either dimension becomes one tile through the encoder's full preprocessing (resize +
crop). With ``patches_per_wsi`` the tiles kept are those ``load_slide`` keeps in evaluation
(:func:`~wsi_llava.data.sampling.sample_indices` without a generator), and only they are encoded.

:func:`write_roi_h5` writes the features as a slide H5 file (``features`` float32, ``coords`` (x, y)),
which is what ``wsi-llava encode-roi`` (:mod:`.encode_roi`) writes so training reads features instead of
running the ViT every epoch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from ..data.sampling import sample_indices
from ..data.slides import Slide
from ..errors import MissingFileError, WsiLlavaError
from ..model.tile_encoder import TileEncoder, load_tile_encoder


class RoiError(WsiLlavaError, ValueError):
    """An ROI image that cannot be read or tiled; the message names the file."""


def read_roi(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as RGB uint8 [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(os.fspath(path))
    if not path.is_file():
        raise MissingFileError(f"ROI image not found: {path}; check the path")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RoiError(f"{path}: cannot read the ROI image ({type(e).__name__}: {e}); "
                       f"use PNG, JPEG or TIFF") from e


def grid_coords(height: int, width: int, tile: int) -> np.ndarray:
    """(x, y) top-left corners [N, 2] int64 of the whole tiles of a ``tile`` grid, row-major."""
    ys, xs = np.arange(0, height - tile + 1, tile), np.arange(0, width - tile + 1, tile)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)


@torch.inference_mode()
def encode_roi(image: np.ndarray, encoder: TileEncoder, patches_per_wsi: int | None = None,
               batch_size: int = 32, where: str = "ROI") -> tuple[np.ndarray, np.ndarray, int]:
    """RGB uint8 [H, W, 3] → (features [K, D] float32, coords [K, 2] float32 (x, y), N tiles in all)."""
    h, w, _ = image.shape
    tile = encoder.tile_size
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    if h < tile or w < tile:
        pixels = encoder.preprocess(image)[None].to(device, dtype)
        return (encoder(pixels).float().cpu().numpy(), np.zeros((1, 2), np.float32), 1)
    coords = grid_coords(h, w, tile)
    keep = np.sort(sample_indices(len(coords), patches_per_wsi, None))
    coords = coords[keep]
    src = torch.from_numpy(np.ascontiguousarray(image))
    out = []
    for start in range(0, len(coords), batch_size):
        xy = coords[start:start + batch_size]
        tiles = torch.stack([src[y:y + tile, x:x + tile] for x, y in xy])
        pixels = encoder.preprocess.batch(tiles).to(device, dtype)
        out.append(encoder(pixels).float().cpu())
    feats = torch.cat(out).numpy()
    if not np.isfinite(feats).all():
        raise RoiError(f"{where}: the tile encoder gave non-finite features")
    return feats, coords.astype(np.float32), int(len(grid_coords(h, w, tile)))


def roi_to_slide(path: str | os.PathLike, encoder: TileEncoder, patches_per_wsi: int | None = None,
                 batch_size: int = 32) -> Slide:
    """An ROI image as a :class:`Slide` (tiles in spatial order, as ``load_slide`` returns them)."""
    image = read_roi(path)
    feats, coords, n = encode_roi(image, encoder, patches_per_wsi, batch_size, where=str(path))
    return Slide(features=feats, coords=coords, path=str(path), n_total=n)


def write_roi_h5(slide: Slide, out: str | os.PathLike, encoder_name: str = "", attrs: dict | None = None) -> Path:
    """Write ``slide``'s features and coords as a slide H5 file (atomically); returns its path.
    ``attrs``: more string attributes for the file (``encode-roi`` records what made it)."""
    import h5py

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(slide.features, np.float32))
        f.create_dataset("coords", data=np.asarray(slide.coords, np.float32))
        f.attrs["source_image"] = str(slide.path)
        f.attrs["tile_encoder"] = encoder_name
        for k, v in (attrs or {}).items():
            f.attrs[k] = str(v)
    os.replace(tmp, out)
    return out


def add_tile_encoder_arguments(parser: argparse.ArgumentParser, when: str) -> None:
    """``--tile-weights`` and ``--tile-encoder``: the options of every command that encodes ROI images
    (``chat``, ``predict``, ``heatmap``; read by :meth:`RoiSlides.for_model`); ``when`` ends the help
    of ``--tile-weights`` (when the images are encoded)."""
    parser.add_argument("--tile-weights", help=f"tile encoder weights (.safetensors / .bin), local only: {when}")
    parser.add_argument("--tile-encoder", help="gigapath | uni | vit | timm:<arch> (default: the name in "
                                               "--tile-weights' metadata); with --tile-weights")


class TileWidthError(RoiError):
    """The tile encoder's feature width is not the width of the tile features the model takes."""


def check_width(encoder, expected_dim: int, weights: str | os.PathLike) -> None:
    """A :class:`TileWidthError` naming both widths when ``encoder`` does not give ``expected_dim``-d
    features (every command that encodes tiles for a model: ROI images, raw slides)."""
    if encoder.embed_dim != expected_dim:
        raise TileWidthError(f"--tile-weights {weights}: the tile encoder gives {encoder.embed_dim}-d features, "
                             f"the model takes {expected_dim}-d tile features; use the tile encoder the model was "
                             "trained on")


class RoiSlides:
    """ROI images as slides for one run (``predict --tile-weights``, ``chat``/``heatmap --image``): the
    tile encoder is loaded once, frozen, and each image is encoded once (later rows reuse its slide)."""

    @classmethod
    def for_model(cls, model, weights: str | os.PathLike, name: str | None = None,
                  patches_per_wsi: int | None = None) -> "RoiSlides":
        """For ``model`` (a WSI-LLaVA): the encoder runs on the model's device and must give its tile-feature
        width (the tower's ``in_dim``, else ``mm_hidden_size``), else :class:`TileWidthError`."""
        return cls(weights, name, patches_per_wsi, model.config.feature_dim, device=model.device)

    def __init__(self, weights: str | os.PathLike, name: str | None = None, patches_per_wsi: int | None = None,
                 expected_dim: int | None = None, batch_size: int = 32, device: str | torch.device = "cpu"):
        self.encoder = load_tile_encoder(weights, name).to(device).eval()
        self.encoder.requires_grad_(False)
        if expected_dim is not None:
            check_width(self.encoder, expected_dim, weights)
        self.patches_per_wsi = patches_per_wsi
        self.batch_size = batch_size
        self._slides: dict[str, Slide] = {}

    def __call__(self, path: str | os.PathLike) -> Slide:
        key = os.path.abspath(os.fspath(path))
        if key not in self._slides:
            self._slides[key] = roi_to_slide(key, self.encoder, self.patches_per_wsi, self.batch_size)
        return self._slides[key]
