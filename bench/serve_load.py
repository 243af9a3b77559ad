"""Load check of `wsi-llava serve`: C concurrent clients × R requests each on loopback.

Runs the same load against two servers started in this process — one at a time (``max_batch 1``,
the baseline) and batched (``max_batch B``) — and reports per mode: requests, OK, 429, failures,
p50/p95 latency, requests/s, generated tokens/s, and the batched/one-at-a-time throughput ratio.
A third, deliberately small queue shows the 429s a full queue gives (and that nothing else fails).
Exits 1 if any request failed other than a deliberate 429.

    .venv/bin/python bench/serve_load.py [--clients 32] [--requests 4] [--max-batch 8] [--max-tokens 16]
        [--model DIR --slides-root DIR] [--threads 1] [--stream]

Without ``--model`` it builds the tiny served model of the tests (seconds). Clients cycle through
the slides and four questions (different prompt lengths), greedy decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.serve.app import create_app
from wsi_llava.serve.config import ServeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import running, tiny_serving_cached  # noqa: E402 (the tests' helpers)

QUESTIONS = ("What is the diagnosis?", "Describe this slide.", "Is there a tumor?",
             "Which of the features seen here support a malignant diagnosis, and how confident are you?")


async def one_client(client: httpx.AsyncClient, cid: int, n: int, model: str, slides: list[str], max_tokens: int,
                     stream: bool, out: list) -> None:
    for r in range(n):
        body = {"model": model, "max_tokens": max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": [
                    {"type": "slide", "slide": slides[(cid + r) % len(slides)]},
                    {"type": "text", "text": QUESTIONS[(cid * 3 + r) % len(QUESTIONS)]}]}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        tokens = 0
        try:
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    status = resp.status_code
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line and '"choices":[]' in line:
                            tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
                        if status == 200 and line.startswith('data: {"error"'):
                            status = 599  # an error event after the stream started
            else:
                resp = await client.post("/v1/chat/completions", json=body)
                status = resp.status_code
                if status == 200:
                    tokens = resp.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            status, tokens = f"{type(e).__name__}", 0
        out.append((status, time.perf_counter() - t0, tokens))


async def load(url: str, clients: int, requests: int, model: str, slides: list[str], max_tokens: int,
               stream: bool) -> tuple[list, float]:
    out: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[one_client(client, c, requests, model, slides, max_tokens, stream, out)
                               for c in range(clients)])
        return out, time.perf_counter() - t0


def summarise(name: str, results: list, wall: float) -> dict:
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: float("nan"))
    return {"mode": name, "requests": len(results), "ok": len(ok), "429": sum(r[0] == 429 for r in results),
            "failed": sum(r[0] not in (200, 429) for r in results), "p50_ms": p(0.5), "p95_ms": p(0.95),
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
            "req_s": len(ok) / wall, "tok_s": sum(r[2] for r in ok) / wall, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the generation worker")
    ap.add_argument("--stream", action="store_true", help="stream every answer (server-sent events)")
    ap.add_argument("--model", help="model folder (default: build the tiny test model)")
    ap.add_argument("--slides-root", help="slides folder (with --model)")
    args = ap.parse_args()

    if args.model:
        model_dir, root = Path(args.model), Path(args.slides_root)
        slides = sorted(p.stem for p in root.glob("*.h5"))
    else:
        tiny = tiny_serving_cached(Path(tempfile.gettempdir()) / "wsi_llava_bench_serve_tiny")
        model_dir, root, slides = tiny.model_dir, tiny.slides_root, tiny.slide_ids
    assistant = SlideAssistant.from_pretrained(model_dir)
    name = "bench"
    total = args.clients * args.requests
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, greedy, "
          f"{'streaming' if args.stream else 'plain'}, worker threads {args.threads}, {len(slides)} slides")

    rows = []
    modes = [("one-at-a-time", 1, total), (f"batched (B={args.max_batch})", args.max_batch, total),
             ("small queue (B=1, queue 4)", 1, 4)]
    for label, max_batch, queue in modes:
        cfg = ServeConfig(model=str(model_dir), slides_root=str(root), model_name=name, max_batch=max_batch,
                          queue_size=queue, torch_threads=args.threads, request_timeout=600,
                          max_tokens_limit=max(args.max_tokens, 1))
        with running(create_app(cfg, assistant)) as url:
            # warm-up: load every slide, encode, first generate
            asyncio.run(load(url, 1, len(slides), name, slides, 2, False))
            results, wall = asyncio.run(load(url, args.clients, args.requests, name, slides, args.max_tokens,
                                             args.stream))
            rows.append(summarise(label, results, wall))

    head = f"{'mode':<28} {'req':>5} {'ok':>5} {'429':>5} {'fail':>5} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'tok/s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<28} {r['requests']:>5} {r['ok']:>5} {r['429']:>5} {r['failed']:>5} {r['p50_ms']:>8.0f} "
              f"{r['p95_ms']:>8.0f} {r['req_s']:>7.2f} {r['tok_s']:>8.1f}")
    base, batched = rows[0], rows[1]
    print(f"\nbatching throughput gain: {batched['req_s'] / base['req_s']:.2f}x requests/s, "
          f"p50 latency {batched['p50_ms'] / base['p50_ms']:.2f}x, p95 latency {batched['p95_ms'] / base['p95_ms']:.2f}x "
          "(vs one-at-a-time, same run)")
    failed = sum(r["failed"] for r in rows) + base["429"] + batched["429"]
    if failed:
        print(f"FAIL: {failed} request(s) failed or were refused outside the small-queue run", file=sys.stderr)
        return 1
    if rows[2]["429"] == 0:
        print("note: the small queue gave no 429 (the worker kept up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
