"""Stage-2 training step with the tower-output cache vs running the real-size slide encoder, same run.

    python bench/tower_cache.py                 # 2 slides x 3,000 tiles of 1536-d features, 2,048 sampled
    python bench/tower_cache.py --steps 5       # more timed steps per mode
    python bench/tower_cache.py --llm DIR       # a real causal LM instead of the tiny test LM

Setup: synthetic slides (contiguous float32 H5), the published GigaPath slide-encoder architecture
(``SlideEncoderConfig()`` defaults: 12 blocks, 768 wide, 16 heads) with random weights, frozen;
projector ``mlp2x_gelu``; LM frozen (stage 2: ``finetuning_type: full`` + ``freeze_language_model``);
``prumerge`` selection of 64 tokens + CLS; batch size 1; AdamW on the trainable parameters.

One *step* = fetch the item from ``SlideQADataset`` (tile sampling with a fresh per-step RNG, as in
training) + collate + forward + backward + optimizer step. The two modes alternate step by step
(after one warm-up step each), so a change in machine load hits both alike; the table gives the
median. The cache is written first with :func:`wsi_llava.infer.encode.build_tower_cache` (the one-off
cost, also reported).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _slides(root: Path, n_slides: int, n_tiles: int):
    from wsi_llava.data.synthetic import SynthConfig, make_cohort

    cfg = SynthConfig(n_train=n_slides, n_test=0, feature_dim=1536, min_tiles=n_tiles, max_tiles=n_tiles, seed=0)
    return make_cohort(root / "cohort", cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=2, help="slides in the cohort")
    ap.add_argument("--slide-tiles", type=int, default=3000, help="tiles per slide")
    ap.add_argument("--tiles", type=int, default=2048, help="patches_per_wsi (tiles per training step)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--llm", help="local causal-LM folder (default: the tiny test LM)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()

    import torch

    from wsi_llava.config import FinetuningArguments, ModelArguments
    from wsi_llava.data.collate import SlideCollator
    from wsi_llava.data.dataset import SlideQADataset
    from wsi_llava.data.manifest import load_manifest
    from wsi_llava.data.prompts import PromptBuilder
    from wsi_llava.data.tower_cache import cache_for_model
    from wsi_llava.infer.embed import unique_slides
    from wsi_llava.infer.encode import build_tower_cache
    from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration
    from wsi_llava.tiny import build_tiny_llm
    from wsi_llava.train.stages import set_trainable

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tower_cache_"))
    t0 = time.perf_counter()
    cohort = _slides(tmp, args.slides, args.slide_tiles)
    llm = Path(args.llm) if args.llm else build_tiny_llm(tmp / "llm")
    model, tok = WsiLlavaForConditionalGeneration.from_llm(
        llm, vision_mode="wsi", vision_config={"in_dim": 1536}, mm_hidden_size=768, image_seq_length=64,
        use_cls_token=True, vision_feature_select_mode="prumerge")
    set_trainable(model, ModelArguments(vision_mode="wsi"), FinetuningArguments(finetuning_type="full"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    print(f"setup {time.perf_counter() - t0:.1f} s: {args.slides} slides x {args.slide_tiles} tiles x 1536, "
          f"tower {sum(p.numel() for p in model.vision_tower.parameters()) / 1e6:.1f} M params (frozen), "
          f"trainable {sum(p.numel() for p in trainable) / 1e6:.2f} M, torch threads {torch.get_num_threads()}")

    records = load_manifest(cohort.train_csv)
    t0 = time.perf_counter()
    counts = build_tower_cache(model.vision_tower, unique_slides(records), tmp / "cache", progress=False)
    encode_s = (time.perf_counter() - t0) / max(1, counts["encoded"])
    cache_mb = sum(p.stat().st_size for p in (tmp / "cache").iterdir()) / 2**20 / args.slides
    h5_mb = sum(p.stat().st_size for p in cohort.slides) / 2**20 / args.slides

    builder = PromptBuilder(tok, model.config.num_image_tokens, 2048)
    datasets = {
        "tower": SlideQADataset(records, builder, args.tiles, 1536, training=True),
        "cache": SlideQADataset(records, builder, args.tiles, 1536, training=True,
                                tower_cache=cache_for_model(tmp / "cache", model)),
    }
    collate = SlideCollator(tok.pad_token_id)
    model.train()
    times: dict[str, dict[str, list[float]]] = {m: {"data": [], "model": []} for m in datasets}

    def step(mode: str, i: int) -> None:
        ds = datasets[mode]
        ds.set_epoch(i)  # fresh tile sample every step
        t_a = time.perf_counter()
        batch = collate([ds[i % len(ds)]])
        t_b = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_c = time.perf_counter()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{mode}: non-finite loss")
        times[mode]["data"].append(t_b - t_a)
        times[mode]["model"].append(t_c - t_b)

    for mode in datasets:  # warm-up (not timed)
        step(mode, 0)
        times[mode] = {"data": [], "model": []}
    for i in range(1, args.steps + 1):
        for mode in datasets:
            step(mode, i)

    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    total = {m: med[m]["data"] + med[m]["model"] for m in med}
    print()
    print(f"stage-2 step, {args.tiles} tiles/slide, batch 1, median of {args.steps} steps per mode (alternating)")
    print("| mode | data s (read + sample + collate) | forward + backward + step s | step s | speed-up |")
    print("|---|---|---|---|---|")
    for m in ("tower", "cache"):
        print(f"| {m} | {med[m]['data']:.3f} | {med[m]['model']:.3f} | {total[m]:.3f} | "
              f"{total['tower'] / total[m]:.1f}x |")
    print()
    print(f"all steps (s): tower {[round(a + b, 3) for a, b in zip(*times['tower'].values())]}, "
          f"cache {[round(a + b, 3) for a, b in zip(*times['cache'].values())]}")
    print(f"one-off encode: {encode_s:.1f} s per slide of {args.slide_tiles} tiles (all tiles, no autograd); "
          f"cache file {cache_mb:.1f} MiB per slide (slide H5 {h5_mb:.1f} MiB)")
    ratio = total["tower"] / total["cache"]
    print(f"speed-up with the cache: {ratio:.1f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'}); "
          f"the one-off encode pays for itself after {encode_s / max(1e-9, total['tower'] - total['cache']):.1f} "
          "training visits of a slide")


if __name__ == "__main__":
    main()
