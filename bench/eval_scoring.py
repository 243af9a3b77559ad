"""How long `wsi-llava eval` takes on a WSI-Bench-sized prediction set, and what the CIs cost.

Builds pseudo-predictions from the public WSI-Bench test questions (a folder of ``*.json`` files given
with ``--bench-dir``; closed answers in assorted wordings, open answers = the reference of another item),
then times per-item scoring once and the aggregation without CIs (baseline) and with 1000 bootstrap
resamples. Prints a table and the ratio to the baseline measured in the same run.

    .venv/bin/python bench/eval_scoring.py --bench-dir DIR [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import time
from pathlib import Path

from wsi_llava.data.choices import parse_inline_options
from wsi_llava.eval.metrics import EvalConfig, aggregate, score_items
from wsi_llava.eval.rows import prepare_items
from wsi_llava.eval.wordnet import load_wordnet


def bench_files(bench_dir: str) -> list[str]:
    """The WSI-Bench question files in ``bench_dir``; exits with a clear message when there are none."""
    if not os.path.isdir(bench_dir):
        raise SystemExit(f"--bench-dir {bench_dir}: no such folder (give the folder holding the WSI-Bench "
                         f"test question files, *.json)")
    files = sorted(glob.glob(os.path.join(bench_dir, "*.json")))
    if not files:
        raise SystemExit(f"--bench-dir {bench_dir}: no *.json files in it (expected the WSI-Bench test "
                         f"question files, e.g. 1_Report_test.json)")
    return files


def pseudo_predictions(bench_dir: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for path in bench_files(bench_dir):
        category = Path(path).stem.replace("_test", "")
        data = json.load(open(path, encoding="utf-8"))
        for item in data:
            question = item["conversations"][0]["value"].replace("<image>\n", "")
            answer = item["conversations"][1]["value"]
            parsed = parse_inline_options(question)
            if parsed:
                _, options = parsed
                kind = "mc"
                prediction = rng.choice([answer, f"The answer is {answer}", "B) " + options[1], options[0], "I cannot tell"])
            else:
                kind = "report" if category == "1_Report" else "vqa"
                options = None
                other = rng.choice(data)["conversations"][1]["value"]
                prediction = rng.choice([answer, other]) if answer not in ("Yes", "No") else rng.choice(["Yes.", "No"])
            rows.append({"key": f"{category}:{len(rows)}", "slide_id": item["image"], "question": question,
                         "reference": answer, "prediction": prediction, "choices": options, "kind": kind,
                         "category": category, "dataset": item["image"].split("/")[0], "row": len(rows) + 2})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", required=True,
                        help="folder holding the public WSI-Bench test question files (*.json)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="aggregation timings: best of this many")
    args = parser.parse_args()
    rows = pseudo_predictions(args.bench_dir)
    t0 = time.perf_counter()
    wordnet = load_wordnet()
    t_wordnet = time.perf_counter() - t0
    items = prepare_items(rows)
    t0 = time.perf_counter()
    scores = score_items(items, EvalConfig(), wordnet)
    t_score = time.perf_counter() - t0
    timings = {}
    for label, b in (("aggregate, no CIs (baseline)", 0), (f"aggregate, {args.bootstrap} resamples", args.bootstrap)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics = aggregate(items, scores, EvalConfig(bootstrap=b, seed=0))
            best = min(best, time.perf_counter() - t0)
        timings[label] = best
    n_closed, n_open = metrics["n_closed"], metrics["n_open"]
    print(f"items: {len(items)} ({n_closed} closed, {n_open} open; {len(metrics['by_category'])} categories, "
          f"{len(metrics['by_dataset'])} datasets; every group gets its own CIs)")
    print(f"WordNet load: {t_wordnet:.2f} s ({wordnet.source})")
    print(f"per-item scoring (extraction, BLEU statistics, ROUGE, METEOR): {t_score:.2f} s "
          f"({len(items) / t_score:.0f} items/s)")
    base = timings["aggregate, no CIs (baseline)"]
    print(f"{'aggregation':<34} {'seconds':>8} {'vs baseline':>12}")
    for label, seconds in timings.items():
        print(f"{label:<34} {seconds:8.3f} {seconds / base:11.1f}x")
    total = t_wordnet + t_score + timings[f"aggregate, {args.bootstrap} resamples"]
    print(f"total with CIs: {total:.1f} s")


if __name__ == "__main__":
    main()
