"""One prepared accelerator check for the slide encoder (run it whenever a GPU is lent).

    python bench/gpu_check.py                          # cuda: bf16 and fp32, N up to 64k, 70k-tile slide
    python bench/gpu_check.py --device cpu --quick     # smoke run on CPU (the test suite does this)

Prints, in one run:

1. **correctness**: dilated attention on the device (bf16, fp32) against float32 on the CPU (max
   absolute error, relative to the output's scale), and whether the device's fused kernel passed its
   one-time self-check (``dilated_attention._verified``);
2. **speed**: dilated attention vs dense ``F.scaled_dot_product_attention`` in bf16 at several N
   (median of ``--repeats`` synchronised calls after a warm-up; the ratio is measured in this run);
3. **a whole slide**: the full-size encoder (12 × 768) on ``--tiles`` tiles under bf16 autocast,
   ``inference_mode``: time and peak device memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from wsi_llava.model import attention_lse, dilated_attention as DA
from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig

_PUBLISHED = SlideEncoderConfig()  # the published gigapath_slide_enc12l768d
SEGMENTS, DILATIONS = _PUBLISHED.segment_lengths, _PUBLISHED.dilations
HEADS, HEAD_DIM = _PUBLISHED.num_heads, _PUBLISHED.embed_dim // _PUBLISHED.num_heads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def correctness(device: torch.device, n: int) -> list[tuple[str, float, bool]]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    with torch.inference_mode():
        ref = DA.dilated_attention(q, k, v, SEGMENTS, DILATIONS)
        rows = []
        for dtype in (torch.bfloat16, torch.float32):
            got = DA.dilated_attention(*(t.to(device, dtype) for t in (q, k, v)), SEGMENTS, DILATIONS)
            err = (got.float().cpu() - ref).abs().max().item() / ref.abs().max().item()
            fused = attention_lse._fused_kernel(torch.empty(1, 1, 1, HEAD_DIM, device=device, dtype=dtype), None) is not None
            rows.append((str(dtype).replace("torch.", ""), err, fused))
    return rows


def speed(device: torch.device, sizes: list[int], repeats: int, dtype: torch.dtype) -> list[tuple[int, float, float]]:
    rows = []
    for n in sizes:
        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        qd, kd, vd = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with torch.inference_mode():
            t_dil = _timed(lambda: DA.dilated_attention(q, k, v, SEGMENTS, DILATIONS), device, repeats)
            t_dense = _timed(lambda: F.scaled_dot_product_attention(qd, kd, vd), device, repeats)
        rows.append((n, t_dil, t_dense))
        del q, k, v, qd, kd, vd
    return rows


def whole_slide(device: torch.device, tiles: int) -> tuple[float, float]:
    model = SlideEncoder().eval().to(device)
    side = math.ceil(math.sqrt(tiles))
    idx = torch.arange(tiles)
    coords = (torch.stack([(idx % side) * 256, (idx // side) * 256], dim=-1).float().unsqueeze(0)).to(device)
    feats = torch.randn(1, tiles, 1536, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with torch.inference_mode(), autocast:
        _sync(device)
        t0 = time.perf_counter()
        out = model(feats, coords)
        _sync(device)
        elapsed = time.perf_counter() - t0
    assert torch.isfinite(out.tokens).all(), "non-finite encoder output"
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    p.add_argument("--tiles", type=int, default=None, help="tiles of the whole-slide case (default 70,000; 2,000 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")

    n_check = 1500 if args.quick else 12000
    print(f"\n1. correctness, N = {n_check} (max |error| / max |reference|, vs float32 on the CPU)")
    for dtype, err, fused in correctness(device, n_check):
        print(f"   {dtype:<9} error {err:.2e}   fused kernel with log-sum-exp: {'yes' if fused else 'no'}")

    sizes = [1024, 2048] if args.quick else [4096, 16384, 65536]
    dtype = torch.bfloat16
    print(f"\n2. speed, {HEADS} heads x {HEAD_DIM}, {str(dtype).replace('torch.', '')}, median of {args.repeats}")
    print("   | N | dilated s | dense s | speed-up |")
    print("   |---|---|---|---|")
    for n, t_dil, t_dense in speed(device, sizes, args.repeats, dtype):
        print(f"   | {n} | {t_dil:.4f} | {t_dense:.4f} | {t_dense / t_dil:.2f}x |")

    tiles = args.tiles or (2000 if args.quick else 70_000)
    elapsed, peak = whole_slide(device, tiles)
    print(f"\n3. full-size encoder, {tiles:,} tiles, bf16 autocast: {elapsed:.2f} s, peak device memory "
          f"{peak:.2f} GiB" + (" (CPU: not measured)" if device.type != "cuda" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
