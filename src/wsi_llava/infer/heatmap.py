"""`wsi-llava heatmap --model DIR (--slide X.h5 [--image thumb.png] | --image roi.png --tile-weights W) --out map.png`.

Shows which tiles of a slide the model's selector hands to the LLM for a question: the slide's tile
grid coloured by the selector's per-tile score (PruMerge(+): CLS attention of the tower's last
block; prompt top-K: cosine similarity to the question; ``none``/``random_sample`` have no score, so
the grid shows kept vs not kept), the kept tiles outlined, the slide thumbnail underneath when one
is given. ``--geojson`` writes the kept tiles as a QuPath-readable GeoJSON FeatureCollection of
level-0 squares.

ROI mode (``--image`` without ``--slide``, as ``chat --image``): the ROI image is tiled and encoded by
the tile encoder (:class:`~wsi_llava.infer.roi.RoiSlides`) and the picture is the image itself, tiles
tinted by score and the kept ones outlined, pixel-aligned and of the image's aspect
(:func:`draw_roi_overlay`; the image's pixels are level 0, tiles of the encoder's tile size).

The tile side comes from one rule (:mod:`wsi_llava.data.tile_size`: H5 attributes, else the coordinate
spacing) unless ``--patch-size`` is given; the command prints it and where it came from, and the
GeoJSON and PNG metadata record it.

Everything is drawn in level-0 pixel coordinates (x right, y down, origin at the slide's top-left,
as QuPath and OpenSlide use them). The tiles are the ones the model sees: the deterministic sample
of at most ``patches_per_wsi`` tiles that ``chat`` and ``predict`` use.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.resolve import add_slide_root_argument, slide_argument
from ..data.tile_size import TileSize, read_tile_size
from ..precision import add_precision_arguments
from .roi import RoiSlides, add_tile_encoder_arguments

#: What each selector's score means (colour-bar label); other selectors: "selector score".
SCORE_LABELS = {
    "prumerge": "CLS attention (tower's last block)",
    "prumerge_plus": "CLS attention (tower's last block)",
    "prompt_topk": "cosine similarity to the question",
}
#: QuPath object types a feature may be imported as.
OBJECT_TYPES = ("annotation", "detection", "tile")
#: Outline / classification colour of the kept tiles (RGB).
KEPT_RGB = (255, 48, 48)
#: Tile colours without scores (RGB): not kept, kept.
UNSCORED_RGB = ((200, 200, 200), (255, 159, 28))


@dataclass
class TileSelection:
    """What the selector kept for one slide and question."""

    coords: np.ndarray
    """[N, 2] float (x, y) level-0 top-left of every tile the model saw."""
    indices: np.ndarray
    """[K] int64 kept tile indices into ``coords``, in the selector's order (repeats possible when the
    slide has fewer tiles than the budget)."""
    scores: np.ndarray | None
    """[N] float per-tile score behind the choice, or None (``none``, ``random_sample``)."""
    selector: str
    """``vision_feature_select_mode`` of the model."""
    budget: int
    """``image_seq_length`` (k) of the model."""
    question: str
    """The question the selection was made for (only prompt top-K depends on it)."""
    patch_size: int
    """Tile side in level-0 pixels."""
    slide: str
    """Path of the slide H5 (or the ROI image)."""
    patch_size_source: str = ""
    """Where ``patch_size`` came from (:class:`~wsi_llava.data.tile_size.TileSize`'s ``source``)."""

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct kept tiles and their ranks: ``(indices [M], ranks [M])``, ordered by rank.

        With scores, rank 1 is the kept tile with the highest score (ties: lower index first); without,
        ranks follow the selector's order (first appearance)."""
        _, first = np.unique(self.indices, return_index=True)
        uniq = self.indices[np.sort(first)]
        if self.scores is not None:
            uniq = uniq[np.lexsort((uniq, -self.scores[uniq]))]
        return uniq.astype(np.int64), np.arange(1, len(uniq) + 1, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def select_tiles(assistant, slide, question: str | None = None,
                 patch_size: int | TileSize | None = None) -> TileSelection:
    """Run the model's tower and selector on ``slide`` for ``question`` (no generation).

    ``assistant``: a :class:`~wsi_llava.infer.engine.SlideAssistant`; ``slide``: what its ``load`` returns.
    ``question`` None: the standard report prompt (only prompt top-K depends on the question).
    ``patch_size``: the tile side (an int: given by the user); None: the data layer's rule for the
    slide's H5 file (:func:`~wsi_llava.data.tile_size.read_tile_size`).
    """
    import torch

    from ..data.prompts import REPORT_PROMPTS

    question = question or REPORT_PROMPTS[0]
    ex = assistant.builder.build_generation(question, [], question=question, where=slide.path)
    with torch.inference_mode():
        sel = assistant.explain(assistant.batch([slide], [ex]))
    if patch_size is None:
        patch_size = read_tile_size(slide.path)
    elif not isinstance(patch_size, TileSize):
        patch_size = TileSize(int(patch_size), "--patch-size")
    cfg = assistant.model.config
    scores = None if sel.scores is None else sel.scores[0].float().cpu().numpy()
    return TileSelection(coords=np.asarray(slide.coords, dtype=np.float64), indices=sel.indices[0].cpu().numpy(),
                         scores=scores, selector=cfg.vision_feature_select_mode, budget=int(cfg.image_seq_length),
                         question=question, patch_size=patch_size.size, slide=str(slide.path),
                         patch_size_source=patch_size.source)


# ----------------------------------------------------------------------------------------------
# GeoJSON
# ----------------------------------------------------------------------------------------------


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def to_geojson(sel: TileSelection, object_type: str = "annotation") -> dict:
    """The kept tiles as a GeoJSON FeatureCollection QuPath imports (File → Import objects, or drag and drop).

    One Polygon feature per distinct kept tile, in rank order: the level-0 square
    ``[x, x + patch_size] × [y, y + patch_size]`` (closed ring, counter-clockwise in image
    coordinates). Properties: ``objectType`` (QuPath's object type), ``name``, ``classification``
    (``{"name": "Selected tile", "color": [r, g, b]}``), ``measurements`` (what QuPath shows in its
    measurement table), and ``index`` (tile index in the model's tiles), ``score`` (None without
    scores), ``rank`` (1 = highest score, else selector order).
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    idx, ranks = sel.kept()
    s = sel.patch_size
    features = []
    for i, rank in zip(idx.tolist(), ranks.tolist()):
        x, y = (float(v) for v in sel.coords[i])
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        score = None if sel.scores is None else float(sel.scores[i])
        measurements = {"selection rank": rank, "tile index": i}
        if score is not None:
            measurements["selection score"] = score
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[_num(a), _num(b)] for a, b in ring]]},
            "properties": {
                "objectType": object_type, "name": f"{sel.selector} #{rank} (tile {i})",
                "classification": {"name": "Selected tile", "color": list(KEPT_RGB)},
                "measurements": measurements, "index": i, "score": score, "rank": rank,
            },
        })
    return {"type": "FeatureCollection", "features": features,
            "wsi_llava": {"slide": sel.slide, "selector": sel.selector, "budget": sel.budget,
                          "question": sel.question, "patch_size": s, "patch_size_source": sel.patch_size_source,
                          "n_tiles": int(len(sel.coords))}}


def write_geojson(sel: TileSelection, path: str | Path, object_type: str = "annotation") -> Path:
    """Write :func:`to_geojson` to ``path`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_geojson(sel, object_type)), encoding="utf-8")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def thumbnail_scale(image_size: tuple[int, int], coords: np.ndarray, patch_size: int,
                    slide_size: tuple[float, float] | None = None, downsample: float | None = None) -> float:
    """Thumbnail pixels per level-0 pixel.

    The thumbnail is assumed to show the whole slide from its level-0 origin, shrunk by the same
    factor on both axes (as ``openslide``'s ``get_thumbnail`` and pyramid levels do). The factor is
    ``1 / downsample`` when given, else ``image width / slide width`` when the level-0 ``slide_size``
    (width, height) is given, else estimated from the tiles: the slide reaches at least the far edge
    of the last tile on each axis, so ``min(image_w / (max x + patch), image_h / (max y + patch))``
    — exact when the tissue touches the slide's right or bottom edge, too large (overlay stretched
    towards the bottom-right) when the slide has empty margin there on both axes.

    Args:
        image_size: (width, height) of the thumbnail in pixels.
        coords: [N, 2] (x, y) level-0 tile corners.
    """
    w, h = image_size
    if downsample is not None:
        if not downsample > 0:
            raise ValueError(f"downsample must be > 0, got {downsample}")
        return 1.0 / float(downsample)
    if slide_size is not None:
        sw, sh = slide_size
        if not (sw > 0 and sh > 0):
            raise ValueError(f"slide size must be positive, got {slide_size}")
        return w / float(sw)
    far = coords.max(axis=0) + patch_size
    return float(min(w / far[0], h / far[1]))


def _tile_grid(coords: np.ndarray, values: np.ndarray, patch_size: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Rasterise per-tile ``values`` [N] onto the tile grid → (grid [rows, cols] with NaN where no tile,
    imshow extent (left, right, bottom, top) in level-0 pixels). Overlapping tiles keep the larger value."""
    origin = coords.min(axis=0)
    cell = np.rint((coords - origin) / patch_size).astype(np.int64)
    grid = np.full((int(cell[:, 1].max()) + 1, int(cell[:, 0].max()) + 1), np.nan)
    order = np.argsort(values, kind="stable")  # the largest value is written last and wins
    grid[cell[order, 1], cell[order, 0]] = values[order]
    x0, y0 = origin
    return grid, (x0, x0 + grid.shape[1] * patch_size, y0 + grid.shape[0] * patch_size, y0)


def figure_title(sel: TileSelection, width: int = 64) -> str:
    """The heatmap's title: the slide's file name wrapped at ``width`` characters (never clipped), the
    selector, budget, kept tiles, tile size, and for prompt top-K the question (first 70 characters)."""
    name = textwrap.wrap(Path(sel.slide).name, width, break_long_words=True, break_on_hyphens=False) or [""]
    kept, _ = sel.kept()
    title = "\n".join([*name, f"{sel.selector}, budget k = {sel.budget}: {len(kept)} of {len(sel.coords)} tiles "
                                f"kept (outlined), tile {sel.patch_size} px"])
    if sel.selector == "prompt_topk":
        q = sel.question if len(sel.question) <= 70 else sel.question[:67] + "..."
        title += f"\nQ: {q}"
    return title


def draw_heatmap(sel: TileSelection, out: str | Path, image: str | Path | None = None,
                 slide_size: tuple[float, float] | None = None, downsample: float | None = None,
                 cmap: str = "viridis", dpi: int = 120, title: str | None = None) -> Path:
    """Draw the tile heatmap of ``sel`` to ``out`` (PNG; any format matplotlib writes by suffix).

    Tiles coloured by score (or kept / not kept without scores), kept tiles outlined in red, a colour
    bar, a title with the slide, selector and budget; the thumbnail ``image`` underneath when given,
    placed by :func:`thumbnail_scale`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    out = Path(out)
    coords, s = sel.coords, sel.patch_size
    kept, _ = sel.kept()
    if sel.scores is not None:
        values, colormap, label = sel.scores.astype(np.float64), plt.get_cmap(cmap), SCORE_LABELS.get(
            sel.selector, "selector score")
    else:
        values = np.zeros(len(coords))
        values[kept] = 1.0
        colormap, label = ListedColormap([np.array(c) / 255.0 for c in UNSCORED_RGB]), None
    grid, extent = _tile_grid(coords, values, s)

    thumb = None
    if image is not None:
        from PIL import Image

        with Image.open(image) as im:
            thumb = np.asarray(im.convert("RGB"))
    if thumb is not None:
        scale = thumbnail_scale((thumb.shape[1], thumb.shape[0]), coords, s, slide_size, downsample)
        view = (0.0, thumb.shape[1] / scale, thumb.shape[0] / scale, 0.0)
    else:
        pad = 2 * s
        view = (extent[0] - pad, extent[1] + pad, extent[2] + pad, extent[3] - pad)
    aspect = (view[2] - view[3]) / max(view[1] - view[0], 1e-9)
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, min(max(fig_w * aspect * 0.85, 3.0), 14.0)))
    if thumb is not None:
        ax.imshow(thumb, extent=view, interpolation="bilinear")
    im = ax.imshow(np.ma.masked_invalid(grid), extent=extent, cmap=colormap, interpolation="nearest",
                   alpha=0.6 if thumb is not None else 1.0,
                   vmin=None if sel.scores is not None else 0.0, vmax=None if sel.scores is not None else 1.0)
    boxes = [Rectangle((coords[i, 0], coords[i, 1]), s, s) for i in kept.tolist()]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=np.array(KEPT_RGB) / 255.0,
                                      linewidth=max(0.4, min(1.5, 60.0 / math.sqrt(len(coords) + 1)))))
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if label is None:
        bar.set_ticks([0.25, 0.75], labels=["not kept", "kept"])
    else:
        bar.set_label(label)
    if title is None:
        title = figure_title(sel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.suffix.lower() == ".png"
    meta = {"Description": f"tile size {s} px: {sel.patch_size_source or 'given'}"} if png else None
    fig.savefig(out, dpi=dpi, metadata=meta)
    plt.close(fig)
    return out


def draw_roi_overlay(sel: TileSelection, image: str | Path, out: str | Path, cmap: str = "viridis",
                     min_side: int = 512) -> Path:
    """ROI mode: the ROI ``image`` itself with its tiles tinted by score (kept / not kept without scores)
    and the kept tiles outlined in :data:`KEPT_RGB`, written to ``out`` (PNG).

    Pixel-aligned with the image (``sel.coords`` are its pixels): the output is the image enlarged by the
    integer factor that brings its longer side to at least ``min_side`` (so outlines stay visible), the
    same aspect; the tile size and its source go into the PNG's ``Description``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .roi import read_roi

    rgb = read_roi(image).astype(np.float64)
    h, w, _ = rgb.shape
    f = max(1, math.ceil(min_side / max(h, w)))
    canvas = np.repeat(np.repeat(rgb, f, axis=0), f, axis=1)
    kept, _ = sel.kept()
    if sel.scores is not None:
        v = sel.scores.astype(np.float64)
        span = float(v.max() - v.min())
        colours = plt.get_cmap(cmap)((v - v.min()) / span if span > 0 else np.full_like(v, 0.5))[:, :3] * 255
    else:
        colours = np.tile(np.array(UNSCORED_RGB[0], dtype=np.float64), (len(sel.coords), 1))
        colours[kept] = UNSCORED_RGB[1]
    s, line = sel.patch_size * f, max(1, sel.patch_size * f // 24)
    boxes = [(int(round(x * f)), int(round(y * f))) for x, y in sel.coords]
    for (x, y), c in zip(boxes, colours):
        canvas[y:y + s, x:x + s] = 0.55 * canvas[y:y + s, x:x + s] + 0.45 * c
    for i in kept.tolist():
        x, y = boxes[i]
        tile = canvas[y:y + s, x:x + s]
        for edge in (tile[:line], tile[-line:], tile[:, :line], tile[:, -line:]):
            edge[...] = KEPT_RGB
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", f"{Path(sel.slide).name}: {sel.selector}, k = {sel.budget}, {len(kept)} of "
                                 f"{len(sel.coords)} tiles kept; tile size {sel.patch_size} px: "
                                 f"{sel.patch_size_source}")
    Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8)).save(
        out, pnginfo=info if out.suffix.lower() == ".png" else None)
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--slide", help="slide H5 file (features + coords), or its name with --slide-root")
    add_slide_root_argument(parser)
    parser.add_argument("--image", help="without --slide: an ROI image (PNG/JPEG/TIFF), tiled and encoded by "
                                        "--tile-weights and drawn under its tiles; with --slide: the slide's "
                                        "thumbnail drawn underneath")
    add_tile_encoder_arguments(parser, "with --image and no --slide (ROI mode)")
    parser.add_argument("--question", help="question the selection is for (matters for prompt_topk; "
                                           "default: the standard report prompt)")
    parser.add_argument("--out", required=True, help="heatmap image to write (PNG)")
    parser.add_argument("--geojson", help="also write the kept tiles as QuPath-readable GeoJSON")
    parser.add_argument("--object-type", choices=OBJECT_TYPES, default="annotation",
                        help="QuPath object type of the GeoJSON features (default annotation)")
    parser.add_argument("--slide-size", type=float, nargs=2, metavar=("W", "H"),
                        help="level-0 slide width and height in pixels (places a thumbnail --image exactly)")
    parser.add_argument("--downsample", type=float,
                        help="level-0 pixels per thumbnail pixel (places a thumbnail --image exactly)")
    parser.add_argument("--patch-size", type=int, help="tile side in level-0 pixels (default: the H5 attributes, "
                                                       "else the coordinate spacing; ROI: the tile encoder's tile)")
    parser.add_argument("--cmap", default="viridis", help="matplotlib colour map of the scores")
    parser.add_argument("--dpi", type=int, default=120, help="image resolution")


def _roi_slide(args: argparse.Namespace, assistant):
    """ROI mode: the image as a slide (tiled, encoded) and its tile size (the encoder's tile)."""
    if not args.tile_weights:
        raise SystemExit("--image without --slide is an ROI image: it needs --tile-weights (the tile encoder's "
                         "local weights file)")
    if args.slide_size or args.downsample is not None:
        raise SystemExit("--slide-size / --downsample place a thumbnail of a --slide; an ROI image is its own "
                         "level 0")
    rois = RoiSlides.for_model(assistant.model, args.tile_weights, args.tile_encoder,
                               assistant.patches_per_wsi)
    return rois(args.image), TileSize(rois.encoder.tile_size, "the tile encoder's tile size (ROI image)")


def main(args: argparse.Namespace) -> int:
    from .engine import SlideAssistant

    if args.patch_size is not None and args.patch_size < 1:
        raise SystemExit(f"--patch-size must be >= 1, got {args.patch_size}")
    if not args.slide and not args.image:
        raise SystemExit("give --slide (a slide H5 file) or --image (an ROI image, with --tile-weights)")
    if args.slide_root and not args.slide:
        raise SystemExit("--slide-root finds a --slide by name; an ROI --image is a path")
    if args.slide and args.tile_weights:
        raise SystemExit("--tile-weights encodes an ROI --image; with --slide the features come from the H5 file")
    assistant = SlideAssistant.from_pretrained(args.model, device=args.device, precision=args.precision,
                                               force_precision=args.force_precision)
    if args.slide:
        slide = assistant.load(slide_argument(args.slide, args.slide_root))
        sel = select_tiles(assistant, slide, args.question, args.patch_size)
        draw_heatmap(sel, args.out, image=args.image, slide_size=args.slide_size, downsample=args.downsample,
                     cmap=args.cmap, dpi=args.dpi)
    else:
        slide, size = _roi_slide(args, assistant)
        sel = select_tiles(assistant, slide, args.question, args.patch_size or size)
        draw_roi_overlay(sel, args.image, args.out, cmap=args.cmap)
    kept, _ = sel.kept()
    print(f"{sel.selector} (k = {sel.budget}) kept {len(kept)} of {len(sel.coords)} tiles -> {args.out}")
    print(f"tile size {sel.patch_size} px (from {sel.patch_size_source})")
    if args.geojson:
        write_geojson(sel, args.geojson, args.object_type)
        print(f"GeoJSON ({len(kept)} {args.object_type} features) -> {args.geojson}")
    return 0
