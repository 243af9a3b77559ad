"""ROI encoding (read + tile + preprocess + tile encoder) vs the encoder's forward alone, same run.

    python bench/roi.py                      # 4 x 4 tiles of 224 px, ViT-Ti/16 layout, batch 16
    python bench/roi.py --image ROI.png      # your own region instead of a synthetic one
    python bench/roi.py --reps 5 --threads 2

Setup: the ``vit`` tile encoder with ViT-Ti/16 sizes (224 px, patch 16, 192 wide, 12 blocks, 3 heads;
random weights, frozen, float32), ``resize = crop = 224`` so tiles are cut at 224 px. *ROI* = one
:func:`wsi_llava.infer.roi.roi_to_slide` call on the PNG file (decode, grid, crop, normalise, forward
in batches). *Forward alone* = the same batches of pixels, made beforehand, through the encoder.
The two alternate rep by rep (after one warm-up each), so a change in machine load hits both alike;
the table gives the median and the CPU time of the process beside the wall time. Target: ROI
tiles/s ≥ 0.85 × forward-alone tiles/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="ROI image (default: a synthetic 896 x 896 PNG)")
    ap.add_argument("--grid", type=int, default=4, help="synthetic ROI: tiles per side")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from wsi_llava.infer.roi import grid_coords, read_roi, roi_to_slide
    from wsi_llava.model.tile_encoder import build_tile_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = build_tile_encoder("vit", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                             resize=224, crop=224)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(args.image) if args.image else Path(tmp) / "roi.png"
        if not args.image:
            side = 224 * args.grid
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(image)
        arr = read_roi(image)
        coords = grid_coords(arr.shape[0], arr.shape[1], enc.tile_size)
        n = len(coords)
        src = torch.from_numpy(arr)
        pixels = enc.preprocess.batch(torch.stack([src[y:y + 224, x:x + 224] for x, y in coords]))
        batches = list(pixels.split(args.batch))

        def roi():
            roi_to_slide(image, enc, batch_size=args.batch)

        @torch.inference_mode()
        def forward():
            for b in batches:
                enc(b)

        runs = {"roi": [], "forward": []}
        for rep in range(args.reps + 1):
            for name, fn in (("roi", roi), ("forward", forward)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if rep:  # the first rep of each is a warm-up
                    runs[name].append((wall, cpu))
    print(f"{n} tiles of 224 px, batch {args.batch}, {args.threads} thread(s), {args.reps} reps (median)")
    print(f"{'':18}{'wall s':>9}{'CPU s':>9}{'tiles/s':>10}")
    rate = {}
    for name, label in (("forward", "forward alone"), ("roi", "ROI encoding")):
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        rate[name] = n / wall
        print(f"{label:18}{wall:9.3f}{cpu:9.3f}{rate[name]:10.1f}")
    ratio = rate["roi"] / rate["forward"]
    print(f"ROI / forward alone: {ratio:.3f} (target >= 0.85)")
    return 0 if ratio >= 0.85 else 1


if __name__ == "__main__":
    raise SystemExit(main())
