"""`wsi-llava demo`: the whole chain on a fresh machine, proving the model reads the slide.

1. a synthetic cohort whose diagnosis sits in a spatially clustered 10 % of each slide's tiles, under a
   per-slide stain offset that makes the mean of all tiles uninformative (the mean-pool baseline,
   nearest centroid on mean-pooled features, is printed and must stay <= 0.6);
2. the ``feature_outlier`` selector passes each slide's 8 most atypical tiles to the LM; stage 2
   (projector, LM frozen) then stage 3 (LoRA + projector) train a real small instruct LLM shipped by a
   PyPI package (SmolLM2-135M-Instruct; ``--tiny``: a built-in tiny LM on an easy cohort);
3. held-out multiple-choice answers from the real slides, from zeroed slides and from shuffled slides
   (another slide's tiles), each with a Clopper-Pearson interval;
4. ``OUT/report/`` (the full ``wsi-llava eval`` report) and ``OUT/metrics.json`` (``closed_accuracy``,
   ``closed_accuracy_ci``, ``closed_accuracy_zeroed``, ``closed_accuracy_shuffled``,
   ``mean_pool_baseline``, ``chance``, ``n_test``, ``seconds``, ``cpu_seconds``, ``claims_failed``).

The command exits 1, naming each claim it missed (:func:`check_claims`), when the real-slide accuracy
does not beat both ablations by ``min_margin`` or misses ``min_accuracy``, or the mean-pool baseline
exceeds ``max_mean_pool``. Precision follows :mod:`wsi_llava.precision` (bf16 only where it is fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .config import load_config
from .data.manifest import load_manifest
from .data.synthetic import SynthConfig, make_cohort
from .fileio import atomic_write_text


@dataclass
class DemoPlan:
    """Sizes of one demo run and the claims it must meet (exit status 1 when one fails)."""

    n_train: int = 160
    """Training slides (one multiple-choice row each, or one row per ``question_kinds`` entry)."""
    n_test: int = 64
    """Held-out slides (one multiple-choice question each)."""
    feature_dim: int = 64
    """Tile feature width."""
    min_tiles: int = 40
    """Fewest tissue tiles per slide."""
    max_tiles: int = 48
    """Most tissue tiles per slide (all are read: ``patches_per_wsi``)."""
    signal_fraction: float = 0.1
    """Share of tiles in the diagnostic cluster (4–5 of 40–48 tiles)."""
    signal_strength: float = 10.0
    """Norm of the diagnosis prototype added to cluster tiles (noise: unit variance per dimension)."""
    stain_strength: float = 2.0
    """Per-slide offset along the diagnosis directions: mean-pooling all tiles no longer suffices."""
    selector: str = "feature_outlier"
    """``vision_feature_select_mode``: the tiles farthest from their slide's median tile reach the LM."""
    image_seq_length: int = 8
    """Visual tokens per slide."""
    stage2_steps: int = 30
    """Optimizer steps of stage 2 (projector only)."""
    stage3_steps: int = 30
    """Optimizer steps of stage 3 (LoRA + projector)."""
    batch_size: int = 8
    """Examples per step."""
    stage2_lr: float = 1e-2
    """Stage-2 learning rate."""
    stage3_lr: float = 3e-3
    """Stage-3 learning rate."""
    lora_rank: int = 8
    """LoRA rank in stage 3."""
    stage3_finetuning: str = "lora"
    """Stage-3 ``finetuning_type``: ``lora`` (the packaged config) or ``full`` (a tiny LM learns faster so)."""
    question_kinds: tuple[str, ...] = ("mc",)
    """Rows per slide (see :class:`~wsi_llava.data.synthetic.SynthConfig`); the test rows scored are ``mc``."""
    system_prompt: str = "You are a pathology assistant."
    """System message of every prompt."""
    n_reports: int = 0
    """Held-out reports generated for show (not scored against a claim)."""
    min_accuracy: float = 0.9
    """Claim: closed-ended accuracy on real slides at least this."""
    min_margin: float = 0.3
    """Claim: real-slide accuracy beats the zeroed and the shuffled slides by at least this."""
    max_mean_pool: float = 0.6
    """Claim: the mean-pool baseline stays at or under this (the task needs the sparse tiles)."""


TINY_PLAN = DemoPlan(
    n_train=96, n_test=32, min_tiles=20, max_tiles=24, selector="random_sample", image_seq_length=24, signal_fraction=0.5, signal_strength=8.0, stain_strength=0.0, question_kinds=("mc",),
    stage2_steps=20, stage3_steps=120, stage2_lr=1e-2, stage3_lr=3e-3, stage3_finetuning="full", n_reports=0,
    max_mean_pool=1.0)
"""``demo --tiny`` and the test's reduced demo: a tiny LM trained from scratch in about a minute. A random
tiny LM cannot learn the sparse task in that time, so its cohort carries the diagnosis in half the tiles
(mean pooling solves it too: that claim is not made here); it checks that the whole chain learns to
answer from the slide, above the zeroed and shuffled slides."""


def _llm(tiny: bool, out: Path) -> Path:
    if tiny:
        from .tiny import TinyLMConfig, build_tiny_llm

        return build_tiny_llm(out / "tiny_llm", TinyLMConfig(hidden_size=64, num_layers=2))
    from .models_offline import smollm2_path

    return smollm2_path()


def demo_config_path(stage: int) -> Path:
    """The packaged YAML of demo stage 2 or 3 (``wsi_llava/configs/demo_stage{2,3}.yaml``)."""
    return Path(str(resources.files("wsi_llava") / "configs" / f"demo_stage{stage}.yaml"))


def _stage_config(plan: DemoPlan, llm: Path, cohort, out: Path, stage: int, seed: int, precision: str):
    """The packaged demo config with this run's paths and sizes."""
    overrides = dict(
        llm_name_or_path=str(llm), dataset=str(cohort.train_csv), eval_dataset=None, eval_strategy="no",
        image_seq_length=plan.image_seq_length, patches_per_wsi=plan.max_tiles,
        vision_feature_select_mode=plan.selector,
        per_device_train_batch_size=plan.batch_size, save_strategy="no", plot_loss=False, seed=seed,
        system_prompt=plan.system_prompt, output_dir=str(out / f"stage{stage}"),
        learning_rate=plan.stage2_lr if stage == 2 else plan.stage3_lr,
        max_steps=plan.stage2_steps if stage == 2 else plan.stage3_steps,
        do_sanity_check=False,
    )
    if precision != "auto":
        overrides.update(bf16=precision == "bf16", force_precision=precision == "bf16")
    if stage == 3:
        overrides.update(projector_path=str(out / "stage2" / "projector.safetensors"), lora_rank=plan.lora_rank,
                         finetuning_type=plan.stage3_finetuning)
        if plan.stage3_finetuning == "full":
            overrides.update(freeze_language_model=False)
    return load_config(demo_config_path(stage), overrides)


def mean_pool_baseline(train, test) -> float:
    """Nearest-centroid accuracy on mean-pooled tile features (all tiles of each slide).

    Fitted on the training rows' slides (one centroid per gold letter), scored on the test rows: what a
    model that averages the whole slide can reach. ``train``/``test``: multiple-choice records."""
    from .data.slides import load_slide
    from .infer.predict import reference_of

    def pooled(rows):
        return np.stack([load_slide(r.h5_path).features.mean(0) for r in rows])

    gold_train = [reference_of(r) for r in train]
    x = pooled(train)
    labels = sorted(set(gold_train))
    centroids = np.stack([x[[g == lab for g in gold_train]].mean(0) for lab in labels])
    d = ((pooled(test)[:, None, :] - centroids[None]) ** 2).sum(-1)
    pred = [labels[i] for i in d.argmin(1)]
    return float(np.mean([p == reference_of(r) for p, r in zip(pred, test)]))


def _interval(correct: int, n: int) -> list[float]:
    from .eval.stats import clopper_pearson_interval

    return [round(v, 4) for v in clopper_pearson_interval(correct, n)]


def check_claims(metrics: dict, plan: DemoPlan) -> list[str]:
    """The demo's claims that ``metrics`` fails (empty: all hold)."""
    failed = []
    acc = metrics["closed_accuracy"]
    best_ablation = max(metrics["closed_accuracy_zeroed"], metrics["closed_accuracy_shuffled"])
    if acc - best_ablation < plan.min_margin:
        failed.append(f"real-slide accuracy {acc:.3f} does not beat the best ablation ({best_ablation:.3f}) "
                      f"by {plan.min_margin}: the model does not answer from the slide")
    if acc < plan.min_accuracy:
        failed.append(f"real-slide accuracy {acc:.3f} is under {plan.min_accuracy}")
    if metrics["mean_pool_baseline"] > plan.max_mean_pool:
        failed.append(f"the mean-pool baseline {metrics['mean_pool_baseline']:.3f} is over {plan.max_mean_pool}: "
                      "the task does not need the sparse diagnostic tiles")
    return failed


def run_demo(out: str | Path, tiny: bool = False, seed: int = 0, plan: DemoPlan | None = None,
             precision: str = "auto") -> dict:
    """Run the demo into ``out``; returns the metrics written to ``out/metrics.json`` (``claims_failed``
    lists the claims of ``plan`` that the run did not meet)."""
    from .eval.cli import load_prediction_rows
    from .eval.metrics import evaluate_predictions
    from .eval.report import write_outputs
    from .infer.engine import SlideAssistant
    from .infer.generation import GenerationSettings
    from .infer.predict import predict
    from .train.run import run_sft

    t0, c0 = time.time(), time.process_time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (TINY_PLAN if tiny else DemoPlan())
    print(f"[1/5] synthetic cohort: {plan.n_train} train + {plan.n_test} test slides -> {out / 'cohort'}")
    cohort = make_cohort(out / "cohort", SynthConfig(
        n_train=plan.n_train, n_test=plan.n_test, feature_dim=plan.feature_dim, min_tiles=plan.min_tiles,
        max_tiles=plan.max_tiles, signal_fraction=plan.signal_fraction, signal_strength=plan.signal_strength,
        stain_strength=plan.stain_strength, question_kinds=plan.question_kinds, seed=seed))
    train = [r for r in load_manifest(cohort.train_csv) if r.kind == "mc"]
    test = load_manifest(cohort.test_csv)
    closed = [r for r in test if r.kind in ("mc", "vqa")]
    pool = mean_pool_baseline(train, closed)
    print(f"      mean-pool baseline (nearest centroid on all tiles' mean): {pool:.3f}")
    llm = _llm(tiny, out)
    print(f"[2/5] language model: {llm}")
    print("[3/5] stage 2: projector alignment (LLM frozen)")
    run_sft(_stage_config(plan, llm, cohort, out, 2, seed, precision))
    print("[4/5] stage 3: LoRA instruction tuning")
    model_dir = run_sft(_stage_config(plan, llm, cohort, out, 3, seed, precision))

    print("[5/5] held-out predictions: real slides, zeroed slides, shuffled slides (another slide's tiles)")
    assistant = SlideAssistant.from_pretrained(model_dir)
    reports = [r for r in test if r.kind == "report"][:plan.n_reports]
    short = GenerationSettings(max_new_tokens=4)
    runs = {"none": "predictions.jsonl", "zero": "predictions_zeroed.jsonl", "shuffle": "predictions_shuffled.jsonl"}
    scored = {}
    for ablate, name in runs.items():
        (out / name).unlink(missing_ok=True)
        predict(assistant, closed, out / name, batch_size=16, settings=short, ablate=ablate)
        if ablate == "none" and reports:  # the real run also writes a few reports, scored with it
            predict(assistant, reports, out / name, batch_size=2, settings=GenerationSettings(max_new_tokens=48))
        scored[ablate] = evaluate_predictions(load_prediction_rows(out / name), bootstrap=200, seed=seed)
    rows = load_prediction_rows(out / runs["none"])
    real_m = scored["none"]
    chance = sum(1.0 / (len(r.choices) if r.choices else 2) for r in closed) / len(closed)
    n = len(closed)

    def acc(m):
        return float(m["closed_accuracy"])

    metrics = {
        "closed_accuracy": acc(real_m), "closed_accuracy_ci": _interval(round(acc(real_m) * n), n),
        "closed_accuracy_zeroed": acc(scored["zero"]),
        "closed_accuracy_zeroed_ci": _interval(round(acc(scored["zero"]) * n), n),
        "closed_accuracy_shuffled": acc(scored["shuffle"]),
        "closed_accuracy_shuffled_ci": _interval(round(acc(scored["shuffle"]) * n), n),
        "interval": "Clopper-Pearson exact 95 %", "mean_pool_baseline": pool, "chance": chance, "n_test": n,
        "n_test_slides": plan.n_test, "llm": "tiny" if tiny else "SmolLM2-135M-Instruct",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
    }
    metrics["claims_failed"] = check_claims(metrics, plan)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_outputs(real_m, out / "report", source=str(out / "predictions.jsonl"),
                  comparisons={"zeroed": scored["zero"], "shuffled": scored["shuffle"]})
    for r in rows:
        if r["kind"] == "report":
            print(f"\n--- a generated report (held-out slide) ---\n{r['slide_id']}: {r['prediction']}\n"
                  f"   reference: {r['reference']}")
            break
    print("\n--- a few answers ---")
    for r in [r for r in rows if r["kind"] != "report"][:4]:
        print(f"Q: {r['question']}\nA: {r['prediction']!r} (reference {r['reference']!r})")
    ci = metrics["closed_accuracy_ci"]
    print(f"\nclosed-ended accuracy on {n} held-out questions (exact 95 % interval):\n"
          f"  real slides      {metrics['closed_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]\n"
          f"  zeroed slides    {metrics['closed_accuracy_zeroed']:.3f}\n"
          f"  shuffled slides  {metrics['closed_accuracy_shuffled']:.3f}\n"
          f"  mean-pool baseline {pool:.3f}; chance {chance:.3f}\n"
          f"{metrics['seconds']:.0f} s wall, {metrics['cpu_seconds']:.0f} s CPU -> {out / 'metrics.json'}")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--tiny", action="store_true", help="use a built-in tiny LM instead of SmolLM2")
    parser.add_argument("--seed", type=int, default=0, help="seed for the cohort and training")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto (default): the packaged configs' bf16 where this machine runs it fast, else "
                             "fp32; fp32 or bf16 force one")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return exit_status(run_demo(args.out, tiny=args.tiny, seed=args.seed, precision=args.precision))


def exit_status(metrics: dict) -> int:
    """1 (each failed claim printed to stderr) when the run missed a claim, else 0."""
    if metrics["claims_failed"]:
        for claim in metrics["claims_failed"]:
            print(f"demo FAILED: {claim}", file=sys.stderr)
        return 1
    print("demo passed: the model answers from the slide's sparse diagnostic tiles")
    return 0
