"""`wsi-llava extract` end to end vs the tile encoder alone (same run) and vs naive per-tile reading.

    python bench/extract.py                  # synthetic 40x slide, ViT-Ti/16 sizes, 224-px tiles at 20x, batch 16
    python bench/extract.py --slide S.svs    # your own slide instead
    python bench/extract.py --reps 5 --threads 2 --workers 2

Setup: the ``timm:vit_tiny_patch16_224`` tile encoder (ViT-Ti/16: 224 px, patch 16, 192 wide, 12 blocks,
3 heads; random weights, frozen, float32; ``resize = crop = 224`` so tiles are cut at 224 px),
``--threads`` torch threads for the encoder.

- *extract*: :func:`wsi_llava.infer.extract.extract_cohort` on the slide into a fresh folder (tissue
  segmentation, tile grid, ``--workers`` reader processes feeding the encoder, H5 + GeoJSON + PNG);
- *encoder alone*: the same tiles, read and preprocessed beforehand, through the encoder in the same
  batches;
- *naive*: each tile read with one ``read_region`` at level 0 (``patch_size_level0`` px), resized to the
  tile size, preprocessed and encoded in batches, all in this process.

The three alternate rep by rep (after one warm-up each), so a change in machine load hits all alike;
the table gives the median wall time and the CPU time (this process and its reaped children). Target:
extract tiles/s ≥ 0.85 × encoder-alone tiles/s; the exit code is 1 when it is missed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_llava.data.synthetic_wsi import draw_tissue, write_pyramid_tiff
from wsi_llava.data.wsi_reader import open_wsi
from wsi_llava.infer.extract import ExtractSettings, extract_cohort
from wsi_llava.infer.extract_slide import plan_slide
from wsi_llava.model.tile_encoder import build_tile_encoder

TARGET = 0.85


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", help="slide file (default: a synthetic 40x 6144 x 4096 generic TIFF, zlib)")
    ap.add_argument("--magnification", type=float, default=20.0)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the encoder")
    ap.add_argument("--workers", type=int, default=1, help="reader worker processes of extract")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = build_tile_encoder("timm:vit_tiny_patch16_224", resize=224, crop=224)  # ViT-Ti/16, tiles cut at 224
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(args.slide) if args.slide else Path(tmp) / "bench.tiff"
        if not args.slide:
            image, _ = draw_tissue(4096, 6144, [(1500, 2000, 1400, 1800), (4300, 2000, 1500, 1900)], [], seed=0)
            write_pyramid_tiff(slide, image, mpp=0.25, compression="zlib")
            del image
        plan = plan_slide(slide, args.magnification, args.tile_size, 0.5)
        n, size0 = len(plan.coords), plan.patch_size_level0
        with open_wsi(slide) as r:
            pixels = torch.stack([enc.preprocess(r.read_tile(int(x), int(y), size0, args.tile_size))
                                  for x, y in plan.coords])
        batches = list(pixels.split(args.batch))
        settings = ExtractSettings("vit:bench", args.magnification, args.tile_size, 0.5, args.batch, args.workers)

        @torch.inference_mode()
        def encoder_alone():
            for b in batches:
                enc(b)

        runs = iter(range(10**6))

        def extract():
            extract_cohort([slide], Path(tmp) / f"out{next(runs)}", enc, settings, progress=False)

        @torch.inference_mode()
        def naive():
            from PIL import Image

            with open_wsi(slide) as r:
                for start in range(0, n, args.batch):
                    tiles = []
                    for x, y in plan.coords[start:start + args.batch]:
                        region = r.read_region(int(x), int(y), 0, size0, size0)
                        tile = np.asarray(Image.fromarray(region).resize((args.tile_size,) * 2, Image.BICUBIC))
                        tiles.append(enc.preprocess(tile))
                    enc(torch.stack(tiles))

        modes = {"encoder alone": encoder_alone, "extract": extract, "naive read_region": naive}
        wall: dict[str, list[float]] = {k: [] for k in modes}
        cpu: dict[str, list[float]] = {k: [] for k in modes}
        for rep in range(args.reps + 1):
            for name, fn in modes.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                if rep:  # rep 0 warms up
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(cpu_seconds() - c0)

    med = {k: statistics.median(v) for k, v in wall.items()}
    print(f"{n} tiles of {args.tile_size} px at {args.magnification:g}x ({size0} level-0 px), batch {args.batch}, "
          f"{args.threads} encoder thread(s), {args.workers} reader worker(s), median of {args.reps}")
    print("| measured | wall s | CPU s | tiles/s (wall) | vs encoder alone |\n|---|---|---|---|---|")
    for k in modes:
        print(f"| {k} | {med[k]:.2f} | {statistics.median(cpu[k]):.2f} | {n / med[k]:.1f} | "
              f"{med['encoder alone'] / med[k]:.2f} |")
    ratio = med["encoder alone"] / med["extract"]
    print(f"extract / encoder alone = {ratio:.2f} (target >= {TARGET}); extract / naive = "
          f"{med['naive read_region'] / med['extract']:.2f}x")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
