"""`wsi-llava demo`: the whole chain on a fresh machine, proving the model reads the slide.

1. a synthetic cohort whose diagnosis sits in a spatially clustered fraction of tiles;
2. stage 2 (projector alignment, LLM frozen) then stage 3 (LoRA + projector) with a real small
   instruct LLM shipped by a PyPI package (SmolLM2-135M-Instruct; ``--tiny``: a built-in tiny LM);
3. predictions on held-out slides with their real features and with zeroed features;
4. ``OUT/report/`` (``report.md`` + full ``metrics.json`` of ``wsi-llava eval``, zeroed-slide gap included) and
   ``OUT/metrics.json`` with ``closed_accuracy``, ``closed_accuracy_zeroed``, ``chance``, ``n_test``,
   ``seconds`` (+ the n-gram metrics of the open answers), and a printed report and a few answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from importlib import resources

from .config import load_config
from .data.manifest import load_manifest
from .data.synthetic import SynthConfig, make_cohort


@dataclass
class DemoPlan:
    """Sizes of one demo run (the defaults fit about six minutes on two CPU cores)."""

    n_train: int = 160
    """Training slides (each gives a multiple-choice row and a report row)."""
    n_test: int = 64
    """Held-out slides (one multiple-choice question each)."""
    feature_dim: int = 64
    """Tile feature width."""
    signal_fraction: float = 0.5
    """Share of tiles in the diagnostic cluster."""
    signal_strength: float = 8.0
    """Norm of the diagnosis prototype added to cluster tiles."""
    image_seq_length: int = 16
    """Visual tokens per slide (random_sample)."""
    patches_per_wsi: int = 512
    """Tiles read per slide."""
    stage2_steps: int = 40
    """Optimizer steps of stage 2 (projector only)."""
    stage3_steps: int = 50
    """Optimizer steps of stage 3 (LoRA + projector)."""
    batch_size: int = 8
    """Examples per step."""
    stage2_lr: float = 3e-3
    """Stage-2 learning rate."""
    stage3_lr: float = 2e-3
    """Stage-3 learning rate."""
    lora_rank: int = 8
    """LoRA rank in stage 3."""
    system_prompt: str = "You are a pathology assistant."
    """System message of every prompt."""


TINY_PLAN = DemoPlan(n_train=96, n_test=64, stage2_steps=40, stage3_steps=40, stage2_lr=1e-2, stage3_lr=3e-3)


def _llm(tiny: bool, out: Path) -> Path:
    if tiny:
        from .tiny import TinyLMConfig, build_tiny_llm

        return build_tiny_llm(out / "tiny_llm", TinyLMConfig(hidden_size=64, num_layers=2))
    from .models_offline import smollm2_path

    return smollm2_path()


def demo_config_path(stage: int) -> Path:
    """The packaged YAML of demo stage 2 or 3 (``wsi_llava/configs/demo_stage{2,3}.yaml``)."""
    return Path(str(resources.files("wsi_llava") / "configs" / f"demo_stage{stage}.yaml"))


def _stage_config(plan: DemoPlan, llm: Path, cohort, out: Path, stage: int, seed: int):
    """The packaged demo config with this run's paths and sizes."""
    overrides = dict(
        llm_name_or_path=str(llm), dataset=str(cohort.train_csv), eval_dataset=None, eval_strategy="no",
        image_seq_length=plan.image_seq_length, patches_per_wsi=plan.patches_per_wsi,
        per_device_train_batch_size=plan.batch_size, save_strategy="no", plot_loss=False, seed=seed,
        system_prompt=plan.system_prompt, output_dir=str(out / f"stage{stage}"),
        learning_rate=plan.stage2_lr if stage == 2 else plan.stage3_lr,
        max_steps=plan.stage2_steps if stage == 2 else plan.stage3_steps,
        do_sanity_check=False,
    )
    if stage == 3:
        overrides.update(projector_path=str(out / "stage2" / "projector.safetensors"), lora_rank=plan.lora_rank)
    return load_config(demo_config_path(stage), overrides)


def run_demo(out: str | Path, tiny: bool = False, seed: int = 0, plan: DemoPlan | None = None) -> dict:
    """Run the demo into ``out``; returns the metrics written to ``out/metrics.json``."""
    from .eval.cli import load_prediction_rows
    from .eval.metrics import evaluate_predictions
    from .eval.report import write_outputs
    from .infer.engine import GenerationSettings, SlideAssistant
    from .infer.predict import predict
    from .train.run import run_sft

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (TINY_PLAN if tiny else DemoPlan())
    print(f"[1/5] synthetic cohort: {plan.n_train} train + {plan.n_test} test slides -> {out / 'cohort'}")
    cohort = make_cohort(out / "cohort", SynthConfig(n_train=plan.n_train, n_test=plan.n_test,
                                                     feature_dim=plan.feature_dim, signal_fraction=plan.signal_fraction,
                                                     signal_strength=plan.signal_strength,
                                                     question_kinds=("mc", "report"), seed=seed))
    llm = _llm(tiny, out)
    print(f"[2/5] language model: {llm}")
    print("[3/5] stage 2: projector alignment (LLM frozen)")
    run_sft(_stage_config(plan, llm, cohort, out, 2, seed))
    print("[4/5] stage 3: LoRA instruction tuning")
    model_dir = run_sft(_stage_config(plan, llm, cohort, out, 3, seed))

    print("[5/5] held-out predictions: real slides, then zeroed slides")
    assistant = SlideAssistant.from_pretrained(model_dir)
    test = load_manifest(cohort.test_csv)
    closed = [r for r in test if r.kind in ("mc", "vqa")]
    reports = [r for r in test if r.kind == "report"][:2]
    short = GenerationSettings(max_new_tokens=4)
    for name, ablate in (("predictions.jsonl", "none"), ("predictions_zeroed.jsonl", "zero")):
        (out / name).unlink(missing_ok=True)
        predict(assistant, closed, out / name, batch_size=16, settings=short, ablate=ablate)
    predict(assistant, reports, out / "predictions.jsonl", batch_size=2, settings=GenerationSettings(max_new_tokens=48))
    rows = load_prediction_rows(out / "predictions.jsonl")
    zeroed = load_prediction_rows(out / "predictions_zeroed.jsonl")
    real_m = evaluate_predictions(rows, bootstrap=200, seed=seed)
    zero_m = evaluate_predictions(zeroed, bootstrap=200, seed=seed)
    chance = sum(1.0 / (len(r.choices) if r.choices else 2) for r in closed) / len(closed)
    metrics = {
        "closed_accuracy": real_m["closed_accuracy"], "closed_accuracy_ci": real_m.get("closed_accuracy_ci"),
        "closed_accuracy_zeroed": zero_m["closed_accuracy"], "chance": chance, "n_test": len(closed),
        "n_test_slides": plan.n_test, "llm": "tiny" if tiny else "SmolLM2-135M-Instruct",
        "seconds": round(time.time() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_outputs(real_m, out / "report", source=str(out / "predictions.jsonl"), comparisons={"zeroed": zero_m})
    print("\n--- a generated report (held-out slide) ---")
    for r in rows:
        if r["kind"] == "report":
            print(f"{r['slide_id']}: {r['prediction']}\n   reference: {r['reference']}")
            break
    print("\n--- a few answers ---")
    for r in [r for r in rows if r["kind"] != "report"][:4]:
        print(f"Q: {r['question']}\nA: {r['prediction']!r} (reference {r['reference']!r})")
    print(f"\nclosed-ended accuracy {metrics['closed_accuracy']:.3f} on {len(closed)} held-out questions; "
          f"with zeroed slides {metrics['closed_accuracy_zeroed']:.3f}; chance {chance:.3f}; "
          f"{metrics['seconds']:.0f} s in all -> {out / 'metrics.json'}")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--tiny", action="store_true", help="use a built-in tiny LM (about a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the cohort and training")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(args.out, tiny=args.tiny, seed=args.seed)
    return 0
