"""Time every selector per slide at N = 2,048 and 20,000 tiles (D = 768, k = 128).

Baselines measured in the same run: ``none`` (a gather, the floor) and a per-token Python loop
PruMerge in the style of the original (one concatenation + top-k per kept token), checked to
give the same merged tokens as the vectorised selector.

    .venv/bin/python bench/selection_speed.py [--n 2048 20000] [--k 128] [--repeats 7] [--threads T]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from wsi_llava.model.select import SELECTORS, SelectOptions

CASES = [
    ("none", SelectOptions()),
    ("random_sample", SelectOptions()),
    ("prompt_topk", SelectOptions()),
    ("prompt_topk", SelectOptions(similarity_weighting=True)),
    ("prumerge", SelectOptions()),
    ("prumerge", SelectOptions(budget="adaptive")),
    ("prumerge_plus", SelectOptions()),
    ("prumerge_plus", SelectOptions(budget="adaptive")),
]


def loop_prumerge(tokens, keys, attn, k, m=32):
    """Per-token loop (the original's structure): top-k by attention, then one top-m per kept token."""
    x, key, a = tokens[0], F.normalize(keys[0], dim=-1), attn[0]
    keep = a.topk(k).indices.sort().values
    out = torch.empty(k, x.shape[1])
    for i, c in enumerate(keep.tolist()):
        rest = torch.cat([torch.arange(c), torch.arange(c + 1, x.shape[0])])
        sim = key[rest] @ key[c]
        nb = rest[sim.topk(m).indices]
        out[i] = x[c] + (a[nb, None] * x[nb]).sum(0)
    return keep, out


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3  # best of: robust to other processes on a shared machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 20000])
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1, D={args.d}, k={args.k}, "
          f"best of {args.repeats}\n")
    print("| selector | options | " + " | ".join(f"N={n} ms | ×none" for n in args.n) + " |")
    print("|---|---|" + "---:|---:|" * len(args.n))
    rows: dict[str, list[str]] = {}
    base: dict[int, float] = {}
    loops: dict[int, tuple[float, float, float]] = {}
    for n in args.n:
        side = int(n**0.5) + 1
        i = torch.arange(n)
        batch = dict(
            cls_attention=torch.softmax(torch.randn(1, n) * 3, dim=1),
            keys=torch.randn(1, n, args.d),
            query=torch.randn(1, args.d),
            coords=(torch.stack([i % side, i // side], 1).float() * 256)[None],
            generator=torch.Generator().manual_seed(0),
        )
        tokens = torch.randn(1, n, args.d)
        mask = torch.ones(1, n, dtype=torch.bool)
        for name, opts in CASES:
            label = f"| {name} | {'adaptive' if opts.budget == 'adaptive' else ''}" \
                    f"{'weighting' if opts.similarity_weighting else ''} |"
            ms = timed(lambda: SELECTORS[name](tokens, mask, args.k, options=opts, **batch), args.repeats)
            if name == "none":
                base[n] = ms
            rows.setdefault(label, []).append(f" {ms:.2f} | {ms / base[n]:.1f} |")
        vec = timed(lambda: SELECTORS["prumerge"](tokens, mask, args.k, **batch), args.repeats)
        loop = timed(lambda: loop_prumerge(tokens, batch["keys"], batch["cls_attention"], args.k),
                     max(1, args.repeats // 2))
        sel = SELECTORS["prumerge"](tokens, mask, args.k, **batch)
        keep, ref = loop_prumerge(tokens, batch["keys"], batch["cls_attention"], args.k)
        assert torch.equal(sel.indices[0], keep)
        err = (sel.tokens[0] - ref).abs().max().item()
        loops[n] = (vec, loop, err)
    for label, cells in rows.items():
        print(label + "".join(cells))
    print("\nprumerge, vectorised vs per-token loop baseline:")
    print("| N | vectorised ms | loop ms | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for n, (vec, loop, err) in loops.items():
        print(f"| {n} | {vec:.2f} | {loop:.1f} | {loop / vec:.1f}× | {err:.1e} |")


if __name__ == "__main__":
    main()
