"""Dilated (LongNet) attention vs dense SDPA on CPU, and one full-size slide-encoder forward.

    python bench/attention.py            # N = 1k, 2k, 4k, 8k, 16k; 16 heads x 48 dims (GigaPath config)
    python bench/attention.py --quick    # N = 1k, 2k, 4k
    python bench/attention.py --big      # also: the 12-layer, 768-wide encoder on a 70,000-tile slide

Every case runs in its own fresh subprocess, so its peak memory is the growth of the process's
maximum resident set (``ru_maxrss``) from just before the first call (inputs already allocated) to
after it: everything the call allocated at its worst moment, output included. Times are the
minimum over ``--repeats`` calls after that first one. Ratios compare with dense SDPA measured in the
same run. "pairs" compares the (query, key) scores each method computes (a machine-free measure
of the work): "dense/orig" against the original LongNet (every segment padded to full length),
"dense/ours" against this implementation, which without autograd cuts a mostly padded last segment
to its real rows (same output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from wsi_llava.model.slide_encoder import SlideEncoderConfig

_PUBLISHED = SlideEncoderConfig()  # the published gigapath_slide_enc12l768d
SEGMENTS, DILATIONS = _PUBLISHED.segment_lengths, _PUBLISHED.dilations
HEADS, HEAD_DIM = _PUBLISHED.num_heads, _PUBLISHED.embed_dim // _PUBLISHED.num_heads
BIG_TILES = 70_000


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def dilated_pairs(n: int, trim_tail: bool = False) -> int:
    """Scores computed for one sequence of n tokens (all heads, all branches): by the original
    (every segment padded to full length), or with ``trim_tail`` by ours without autograd (a mostly
    padded last segment cut to its real rows, the zero rows added in closed form)."""
    total = 0
    for w, r in zip(SEGMENTS, DILATIONS):
        w_eff = min(w, n)
        segs = -(-n // w_eff)
        m = -(-w_eff // r)
        total += segs * HEADS * m * m  # each head: one group of m positions per segment
        rest = n - (segs - 1) * w_eff
        if trim_tail and segs > 1 and w_eff % r == 0 and -(-rest // r) < m:
            total -= HEADS * (m * m - (-(-rest // r)) ** 2)
    return total


def _run_case(kind: str, n: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if kind == "encoder":
        from wsi_llava.model.slide_encoder import SlideEncoder

        model = SlideEncoder().eval()
        side = math.ceil(math.sqrt(n))
        idx = torch.arange(n)
        coords = torch.stack([(idx % side) * 256, (idx // side) * 256], dim=-1).float().unsqueeze(0)
        feats = torch.randn(1, n, 1536)

        def call():
            return model(feats, coords)
    elif kind == "dilated":
        from wsi_llava.model.dilated_attention import dilated_attention

        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM) for _ in range(3))

        def call():
            return dilated_attention(q, k, v, SEGMENTS, DILATIONS)
    elif kind == "dense":
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(3))

        def call():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        raise ValueError(kind)
    with torch.inference_mode():
        before = _maxrss_mb()
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        peak = _maxrss_mb() - before
        del out
        times = [first]
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "n": n, "time_s": min(times[1:] or times), "first_s": first, "peak_mb": peak,
            "threads": torch.get_num_threads(), "base_mb": before}


def _subprocess(kind: str, n: int, repeats: int, timeout: float) -> dict:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--case", kind, str(n), "--repeats", str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"case {kind} N={n} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if x == x else "-"


def attention_table(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        d = _subprocess("dilated", n, repeats, 1800)
        s = _subprocess("dense", n, repeats, 1800)
        rows.append({"n": n, "dil": d, "dense": s})
        print(f"  measured N={n}: dilated {d['time_s']:.3f} s, dense {s['time_s']:.3f} s", flush=True)
    hdr = ("N", "dilated s", "dense s", "speed-up", "dil MB", "dense MB", "dil t x/2N", "dense t x/2N",
           "dil MB x/2N", "pairs dense/orig", "pairs dense/ours")
    print("\n| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    prev = None
    growth_t, growth_m = [], []
    for row in rows:
        n, d, s = row["n"], row["dil"], row["dense"]
        gt = gd = gm = float("nan")
        if prev is not None and n == 2 * prev["n"]:
            gt = d["time_s"] / prev["dil"]["time_s"]
            gd = s["time_s"] / prev["dense"]["time_s"]
            gm = d["peak_mb"] / max(prev["dil"]["peak_mb"], 1e-9)
            growth_t.append(gt)
            growth_m.append(gm)
        pr = HEADS * n * n / dilated_pairs(n)
        po = HEADS * n * n / dilated_pairs(n, trim_tail=True)
        print(f"| {n} | {d['time_s']:.3f} | {s['time_s']:.3f} | {s['time_s'] / d['time_s']:.2f}x | "
              f"{d['peak_mb']:.0f} | {s['peak_mb']:.0f} | {_fmt(gt)} | {_fmt(gd)} | {_fmt(gm)} | {pr:.2f} | "
              f"{po:.2f} |")
        prev = row
    last = rows[-1]
    print(f"\nthreads: {last['dil']['threads']}; times: min of {repeats} calls after a first call")
    print(f"speed-up at N={last['n']}: {last['dense']['time_s'] / last['dil']['time_s']:.2f}x (target >= 5x)")
    if growth_t:
        gmean = math.exp(sum(map(math.log, growth_t)) / len(growth_t))
        print(f"dilated time growth per doubling: max {max(growth_t):.2f}x, geometric mean {gmean:.2f}x "
              f"(target <= 2.3x); memory growth per doubling: max {max(growth_m):.2f}x")
        for label, trim in (("the original", False), ("ours", True)):
            pair_g = [dilated_pairs(2 * r["n"], trim) / dilated_pairs(r["n"], trim) for r in rows[:-1]]
            print(f"work (pairs) growth per doubling, {label}: " + ", ".join(f"{g:.2f}x" for g in pair_g))
    return rows


def big_case(repeats: int) -> dict:
    print(f"\nfull-size encoder (12 x 768, 16 heads), one slide of {BIG_TILES:,} tiles, CPU, inference_mode:",
          flush=True)
    r = _subprocess("encoder", BIG_TILES, repeats, 7200)
    print(f"  time {r['first_s']:.1f} s, peak memory +{r['peak_mb'] / 1024:.2f} GiB over the inputs "
          f"(process {(_fmt((r['base_mb'] + r['peak_mb']) / 1024))} GiB), threads {r['threads']}")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 1k, 2k, 4k only")
    p.add_argument("--big", action="store_true", help="also time the full-size encoder on a 70,000-tile slide")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case after the first (default 3)")
    p.add_argument("--case", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(args.case[0], int(args.case[1]), args.repeats)))
        return 0
    sizes = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    print(f"dilated attention (segments {list(SEGMENTS)}, dilations {list(DILATIONS)}) vs dense SDPA; "
          f"B=1, {HEADS} heads x {HEAD_DIM} dims, float32, CPU ({os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.1f})")
    attention_table(sizes, args.repeats)
    if args.big:
        big_case(0)
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the machine distort small cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
