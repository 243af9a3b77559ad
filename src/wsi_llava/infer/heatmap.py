"""`wsi-llava heatmap --model DIR --slide X.h5 --out map.png [--geojson sel.geojson] [--image thumb.png]`.

Shows which tiles of a slide the model's selector hands to the LLM for a question: the slide's tile
grid coloured by the selector's per-tile score (PruMerge(+): CLS attention of the tower's last
block; prompt top-K: cosine similarity to the question; ``none``/``random_sample`` have no score, so
the grid shows kept vs not kept), the kept tiles outlined, the slide thumbnail underneath when one
is given. ``--geojson`` writes the kept tiles as a QuPath-readable GeoJSON FeatureCollection of
level-0 squares.

Everything is drawn in level-0 pixel coordinates (x right, y down, origin at the slide's top-left,
as QuPath and OpenSlide use them). The tiles are the ones the model sees: the deterministic sample
of at most ``patches_per_wsi`` tiles that ``chat`` and ``predict`` use.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..precision import add_precision_arguments

#: What each selector's score means (colour-bar label); other selectors: "selector score".
SCORE_LABELS = {
    "prumerge": "CLS attention (tower's last block)",
    "prumerge_plus": "CLS attention (tower's last block)",
    "prompt_topk": "cosine similarity to the question",
}
DEFAULT_PATCH_SIZE = 256
#: QuPath object types a feature may be imported as.
OBJECT_TYPES = ("annotation", "detection", "tile")
#: Outline / classification colour of the kept tiles (RGB).
KEPT_RGB = (255, 48, 48)


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
    """Path of the slide H5."""

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


def read_patch_size(path: str | Path) -> int:
    """Tile side in level-0 pixels from the slide H5's attributes.

    Looked up on the coordinate dataset, then the file: ``patch_size_level0`` (TRIDENT); else
    ``patch_size``, multiplied by the ``downsample`` of ``patch_level`` when the coordinates carry
    CLAM's ``patch_level`` > 0; else 256.
    """
    from ..data.slide_checks import COORD_KEYS
    from ..data.slides import open_slide, slide_dataset

    with open_slide(path) as f:  # checked: a regular file; links resolved inside the file only
        coords = next((d for k, _ in COORD_KEYS if (d := slide_dataset(f, k)) is not None), None)
        places = ([coords.attrs] if coords is not None else []) + [f.attrs]
        for attrs in places:
            if "patch_size_level0" in attrs:
                return _positive_int(attrs["patch_size_level0"], path, "patch_size_level0")
        for attrs in places:
            if "patch_size" in attrs:
                size = _positive_int(attrs["patch_size"], path, "patch_size")
                level = int(np.asarray(attrs.get("patch_level", 0)).reshape(-1)[0])
                if level > 0 and "downsample" in attrs:
                    down = float(np.asarray(attrs["downsample"], dtype=np.float64).reshape(-1)[0])
                    size = int(round(size * down))
                return size
    return DEFAULT_PATCH_SIZE


def _positive_int(value, path, name: str) -> int:
    v = float(np.asarray(value).reshape(-1)[0])
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{path}: attribute {name!r} must be a positive number, got {value!r}")
    return int(round(v))


def select_tiles(assistant, slide, question: str | None = None, patch_size: int | None = None) -> TileSelection:
    """Run the model's tower and selector on ``slide`` for ``question`` (no generation).

    ``assistant``: a :class:`~wsi_llava.infer.engine.SlideAssistant`; ``slide``: what its ``load`` returns.
    ``question`` None: the standard report prompt (only prompt top-K depends on the question).
    """
    import torch

    from ..data.prompts import REPORT_PROMPTS

    question = question or REPORT_PROMPTS[0]
    ex = assistant.builder.build_generation(question, [], question=question, where=slide.path)
    with torch.inference_mode():
        sel = assistant.explain(assistant.batch([slide], [ex]))
    cfg = assistant.model.config
    scores = None if sel.scores is None else sel.scores[0].float().cpu().numpy()
    return TileSelection(coords=np.asarray(slide.coords, dtype=np.float64), indices=sel.indices[0].cpu().numpy(),
                         scores=scores, selector=cfg.vision_feature_select_mode, budget=int(cfg.image_seq_length),
                         question=question, patch_size=int(patch_size or read_patch_size(slide.path)),
                         slide=str(slide.path))


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
                          "question": sel.question, "patch_size": s, "n_tiles": int(len(sel.coords))}}


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
        colormap, label = ListedColormap(["#c8c8c8", "#ff9f1c"]), None
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
        title = (f"{Path(sel.slide).name}: {sel.selector}, budget k = {sel.budget}\n"
                 f"{len(kept)} of {len(coords)} tiles kept (outlined)")
        if sel.selector == "prompt_topk":
            q = sel.question if len(sel.question) <= 70 else sel.question[:67] + "..."
            title += f"\nQ: {q}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--slide", required=True, help="slide H5 file (features + coords)")
    parser.add_argument("--question", help="question the selection is for (matters for prompt_topk; "
                                           "default: the standard report prompt)")
    parser.add_argument("--out", required=True, help="heatmap image to write (PNG)")
    parser.add_argument("--geojson", help="also write the kept tiles as QuPath-readable GeoJSON")
    parser.add_argument("--object-type", choices=OBJECT_TYPES, default="annotation",
                        help="QuPath object type of the GeoJSON features (default annotation)")
    parser.add_argument("--image", help="slide thumbnail (PNG/JPEG) to draw underneath")
    parser.add_argument("--slide-size", type=float, nargs=2, metavar=("W", "H"),
                        help="level-0 slide width and height in pixels (places --image exactly)")
    parser.add_argument("--downsample", type=float,
                        help="level-0 pixels per thumbnail pixel (places --image exactly)")
    parser.add_argument("--patch-size", type=int, help="tile side in level-0 pixels (default: from the H5, else 256)")
    parser.add_argument("--cmap", default="viridis", help="matplotlib colour map of the scores")
    parser.add_argument("--dpi", type=int, default=120, help="image resolution")


def main(args: argparse.Namespace) -> int:
    from .engine import SlideAssistant

    if args.patch_size is not None and args.patch_size < 1:
        raise SystemExit(f"--patch-size must be >= 1, got {args.patch_size}")
    assistant = SlideAssistant.from_pretrained(args.model, device=args.device, precision=args.precision,
                                               force_precision=args.force_precision)
    slide = assistant.load(args.slide)
    sel = select_tiles(assistant, slide, args.question, args.patch_size)
    draw_heatmap(sel, args.out, image=args.image, slide_size=args.slide_size, downsample=args.downsample,
                 cmap=args.cmap, dpi=args.dpi)
    kept, _ = sel.kept()
    print(f"{sel.selector} (k = {sel.budget}) kept {len(kept)} of {len(sel.coords)} tiles -> {args.out}")
    if args.geojson:
        write_geojson(sel, args.geojson, args.object_type)
        print(f"GeoJSON ({len(kept)} {args.object_type} features) -> {args.geojson}")
    return 0
