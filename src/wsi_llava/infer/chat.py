"""`wsi-llava chat --model DIR --slide X.h5 [--question Q]`: one answer, or a multi-turn session.

``--slide`` may also be a raw slide (``X.svs``, ``.tif``, ``.ndpi``, ``.mrxs`` …, by suffix): its tile
features are extracted with ``--tile-weights`` once and cached (:mod:`.slide_features`), so later
chats on it start at once. With ``--tower-cache DIR`` the slide's tower outputs are read from a
``wsi-llava encode`` folder (by ``--slide-id``, default the file's stem) and the tower does not run. With
``--slide-root DIR``, ``--slide`` may name the slide by relative path, file stem or TCGA barcode
(:class:`~wsi_llava.data.resolve.SlideResolver`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.resolve import add_slide_root_argument, slide_argument
from ..data.wsi_reader import is_raw_slide
from ..precision import add_precision_arguments
from .engine import SlideAssistant
from .generation import GenerationSettings
from .roi import RoiSlides, add_tile_encoder_arguments
from .slide_features import add_raw_slide_arguments, feature_cache_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--slide", help="slide H5 file (features + coords), or its name with --slide-root, or a raw "
                                     "slide (.svs .tif .ndpi .mrxs …): its tile features are extracted with "
                                     "--tile-weights once and cached")
    src.add_argument("--image", help="ROI image (PNG/JPEG/TIFF): tiled and encoded by --tile-encoder (ROI mode)")
    add_slide_root_argument(parser)
    add_tile_encoder_arguments(parser, "with --image or a raw --slide")
    parser.add_argument("--question", help="ask one question and exit; without it, a multi-turn session on stdin")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--explain", action="store_true", help="also print the selected tiles (coords, scores) as JSON")
    parser.add_argument("--tower-cache", help="folder from `wsi-llava encode` (the model's tower): read the slide's "
                                              "cached tower outputs instead of running the tower")
    parser.add_argument("--slide-id", help="the slide's id in the tower cache (default: the slide file's name "
                                           "without .h5); only with --tower-cache")
    add_raw_slide_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.slide_id and not args.tower_cache:
        raise SystemExit("--slide-id only applies with --tower-cache")
    if args.image and args.tower_cache:
        raise SystemExit("--tower-cache reads cached slide files; with --image the tiles are encoded now")
    if args.image and args.slide_root:
        raise SystemExit("--slide-root finds a --slide by name; --image is a path")
    raw = bool(args.slide) and is_raw_slide(args.slide)
    if (args.image or raw) and not args.tile_weights:
        raise SystemExit(f"{'--image' if args.image else f'--slide {args.slide} (a raw slide)'} needs --tile-weights "
                         "(the tile encoder's local weights file)")
    assistant = SlideAssistant.from_pretrained(args.model, tower_cache=args.tower_cache, device=args.device,
                                               precision=args.precision, force_precision=args.force_precision)
    rois = None
    if args.tile_weights and (args.image or raw):  # the tile encoder, on the model's device, width checked
        rois = RoiSlides.for_model(assistant.model, args.tile_weights, args.tile_encoder, assistant.patches_per_wsi)
    if args.image:
        slide = rois(args.image)
        args.slide = args.image
    else:
        path = slide_argument(args.slide, args.slide_root)
        slide_id = (args.slide_id or Path(path).stem) if args.tower_cache else None
        if raw:
            cache = feature_cache_from_args(args, rois.encoder, assistant.model.config.feature_dim,
                                            str(assistant.model.device), assistant.precision)
            path = cache.entry(path)
        slide = assistant.load(path, slide_id=slide_id)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    history: list[tuple[str, str]] = []
    questions = [args.question] if args.question else None
    interactive = questions is None
    if interactive:
        print(f"Slide {args.slide}: {slide.n_total} tiles ({len(slide.features)} used). Empty line or Ctrl-D ends.")
    while True:
        if interactive:
            try:
                q = input("you> ").strip()
            except EOFError:
                break
            if not q:
                break
        else:
            if not questions:
                break
            q = questions.pop(0)
        ans = assistant.answer([slide], [q], [history], settings, explain=args.explain)[0]
        print(("assistant> " if interactive else "") + ans.text)
        if args.explain:
            print(json.dumps({"tile_indices": ans.tile_indices, "coords": ans.coords, "scores": ans.tile_scores}))
        history.append((q, ans.text))
        sys.stdout.flush()
    return 0
