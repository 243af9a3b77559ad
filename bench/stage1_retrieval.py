"""Stage 1 on the synthetic cohort: does contrastive pretraining teach the slide encoder, and does it help stage 2?

    .venv/bin/python bench/stage1_retrieval.py [--out bench_out/stage1] [--quick]

Runs, all through the CLI and in one process:
  1. a synthetic cohort (diagnosis carried by a small cluster of tiles) and tiny offline text/LM models;
  2. ``wsi-llava train`` stage 1 (``stage: contrastive``, small GigaPath-shaped encoder from random init),
     evaluated before training (``eval_on_start``) and after;
  3. ``wsi-llava export-tower`` → tower.safetensors;
  4. ``wsi-llava embed`` of every slide with the trained and with the random tower; nearest-class-mean
     diagnosis accuracy of the held-out slides (a linear-probe stand-in);
  5. ``wsi-llava train`` stage 2 (``vision_mode: wsi``, tower frozen, CLS + K tile tokens) on the training
     multiple-choice and yes/no rows, twice: from the stage-1 tower and from the same random tower. The
     tiny LM is random, so it trains along with the projector (a frozen random LM cannot be steered by
     the projector alone in a few hundred steps). Scored on the held-out multiple-choice and yes/no
     rows: answer loss, and multiple-choice accuracy by the likelihood of the option letters.
Prints tables with chance / the random tower as the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from wsi_llava.cli import main as cli
from wsi_llava.data.synthetic import SynthConfig, make_cohort
from wsi_llava.tiny import TinyLMConfig, build_tiny_llm, build_tiny_text_encoder


@dataclass
class Plan:
    n_train: int = 160
    n_test: int = 64
    feature_dim: int = 32
    min_tiles: int = 100
    max_tiles: int = 300
    signal_fraction: float = 0.15
    patches_per_wsi: int = 256
    stage1_steps: int = 150
    stage1_batch: int = 16
    stage1_lr: float = 1e-3
    stage2_steps: int = 200
    stage2_batch: int = 8
    stage2_lr: float = 3e-3
    image_seq_length: int = 4


QUICK = Plan(n_train=64, n_test=32, stage1_steps=40, stage2_steps=80)
ENCODER = dict(embed_dim=64, depth=2, num_heads=4, segment_lengths=[64, 128], dilations=[1, 2])


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run(argv: list[str]) -> None:
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"`wsi-llava {' '.join(argv)}` exited with {code}")


def filtered_manifest(src: Path, dst: Path, categories: set[str]) -> Path:
    import csv

    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["category"] in categories)
    return dst


def diagnosis_of(caption: str) -> str:
    return caption.split(".")[0].removeprefix("Diagnosis: ")


def probe_accuracy(emb_path: Path, labels: dict[str, str]) -> float:
    """Nearest-class-mean (cosine) diagnosis accuracy: class means from train slides, scored on test slides."""
    import h5py

    with h5py.File(emb_path, "r") as f:
        emb = f["embeddings"][:]
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["slide_id"][:]]
        split = [s.decode() if isinstance(s, bytes) else s for s in f["split"][:]]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    y = np.array([labels[i] for i in ids])
    train = np.array([s == "train" for s in split])
    classes = sorted(set(y))
    means = np.stack([emb[train & (y == c)].mean(0) for c in classes])
    pred = np.array(classes)[(emb[~train] @ means.T).argmax(1)]
    return float((pred == y[~train]).mean())


@torch.no_grad()
def stage2_scores(model_dir: Path, manifest: Path, patches: int) -> tuple[float, float]:
    """(mean answer loss over the rows, multiple-choice accuracy by the likelihood of the option letters)."""
    from wsi_llava.data.collate import SlideCollator
    from wsi_llava.data.dataset import SlideQADataset
    from wsi_llava.data.manifest import load_manifest
    from wsi_llava.data.prompts import PromptBuilder
    from wsi_llava.model.wsi_llava import load_wsi_llava

    model, tok = load_wsi_llava(model_dir)
    saved = yaml.safe_load((model_dir / "train_config.yaml").read_text())
    records = load_manifest(manifest)
    builder = PromptBuilder(tok, model.config.num_image_tokens, 512, saved.get("system_prompt"))
    ds = SlideQADataset(records, builder, patches, training=False)
    collate = SlideCollator(tok.pad_token_id)
    letters = [tok.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    losses, hits, n_mc = [], 0, 0
    for start in range(0, len(ds), 8):
        items = [ds[i] for i in range(start, min(start + 8, len(ds)))]
        batch = collate(items)
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits.float()
        for b, it in enumerate(items):
            labels = torch.as_tensor(it["labels"])
            pos = torch.nonzero(labels != -100)[:, 0]
            lp = torch.log_softmax(logits[b, pos - 1], -1)
            losses.append(float(-lp[torch.arange(len(pos)), labels[pos]].mean()))
            rec = records[start + b]
            if rec.kind == "mc":
                gold = int(labels[pos[0]])
                if gold in letters:
                    n_mc += 1
                    hits += int(letters[int(lp[0, letters].argmax())] == gold)
    return float(np.mean(losses)), hits / max(n_mc, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/stage1")
    ap.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest on a shared 2-core machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if args.quick else Plan()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cohort = make_cohort(out / "cohort", SynthConfig(
        n_train=plan.n_train, n_test=plan.n_test, feature_dim=plan.feature_dim, min_tiles=plan.min_tiles,
        max_tiles=plan.max_tiles, signal_fraction=plan.signal_fraction, question_kinds=("mc", "yn", "report"),
        seed=args.seed))
    text = build_tiny_text_encoder(out / "text_encoder", seed=args.seed)
    llm = build_tiny_llm(out / "tiny_llm", TinyLMConfig(seed=args.seed))
    common = dict(patches_per_wsi=plan.patches_per_wsi, seed=args.seed, report_to="none", dataloader_num_workers=0,
                  disable_tqdm=True, save_strategy="no", logging_steps=10, vision_config=ENCODER)

    # ---- stage 1
    s1 = out / "stage1"
    write_yaml(out / "stage1.yaml", dict(
        stage="contrastive", text_model_name_or_path=str(text), dataset=str(cohort.train_csv),
        eval_dataset=str(cohort.test_csv), freeze_vision_tower=False, projection_dim=32, output_dir=str(s1),
        per_device_train_batch_size=plan.stage1_batch, per_device_eval_batch_size=16, max_steps=plan.stage1_steps,
        learning_rate=plan.stage1_lr, warmup_ratio=0.05, eval_strategy="steps", eval_steps=plan.stage1_steps // 3,
        eval_on_start=True, **common))
    t1 = time.time()
    run(["train", str(out / "stage1.yaml")])
    s1_seconds = time.time() - t1
    metrics = json.loads((s1 / "metrics.json").read_text())
    start = metrics["history"][0]
    run(["export-tower", str(s1), "--out", str(out / "tower.safetensors")])

    # ---- the random tower: same architecture and seed as stage 1 started from
    from wsi_llava.model.export import save_tower
    from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig

    torch.manual_seed(args.seed)
    save_tower(SlideEncoder(SlideEncoderConfig(in_dim=plan.feature_dim, **ENCODER)), out / "random_tower.safetensors")

    # ---- embeddings + nearest-class-mean probe
    labels = {}
    from wsi_llava.data.manifest import load_manifest

    for r in load_manifest(cohort.all_csv):
        if r.caption:
            labels[r.slide_id] = diagnosis_of(r.caption)
    probe = {}
    for name in ("tower", "random_tower"):
        run(["embed", "--vision-tower", str(out / f"{name}.safetensors"), "--data", str(cohort.all_csv), "--out",
             str(out / f"{name}_embeddings.h5"), "--patches-per-wsi", str(plan.patches_per_wsi), "--no-progress"])
        probe[name] = probe_accuracy(out / f"{name}_embeddings.h5", labels)

    # ---- stage 2 from each tower
    kinds = {"diagnosis_choice", "diagnosis_yes_no"}
    closed = filtered_manifest(cohort.test_csv, cohort.root / "test_closed.csv", kinds)
    closed_train = filtered_manifest(cohort.train_csv, cohort.root / "train_closed.csv", kinds)
    s2 = {}
    for name in ("tower", "random_tower"):
        write_yaml(out / f"stage2_{name}.yaml", dict(
            stage="sft", finetuning_type="full", freeze_language_model=False, llm_name_or_path=str(llm),
            vision_mode="wsi", vision_tower=str(out / f"{name}.safetensors"), image_seq_length=plan.image_seq_length,
            use_cls_token=True, vision_feature_select_mode="random_sample", dataset=str(closed_train), eval_dataset=None,
            cutoff_len=512, output_dir=str(out / f"stage2_{name}"), per_device_train_batch_size=plan.stage2_batch,
            max_steps=plan.stage2_steps, learning_rate=plan.stage2_lr, eval_strategy="no", **common))
        run(["train", str(out / f"stage2_{name}.yaml")])
        s2[name] = stage2_scores(out / f"stage2_{name}", closed, plan.patches_per_wsi)

    r, ch = metrics["retrieval"], metrics["chance"]
    lines = [
        f"synthetic cohort: {plan.n_train} train / {plan.n_test} held-out slides, {metrics['retrieval']['n_texts']} "
        f"distinct reports; stage 1 {plan.stage1_steps} steps × {plan.stage1_batch} pairs in {s1_seconds:.0f} s",
        "",
        "| held-out retrieval | chance | random init (step 0) | after stage 1 | ratio vs chance |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("s2t_r1", "slide→text R@1"), ("t2s_r1", "text→slide R@1"), ("t2s_r5", "text→slide R@5"),
                       ("s2t_mean_rank", "slide→text mean rank"), ("t2s_mean_rank", "text→slide mean rank")):
        lines.append(f"| {label} | {ch[key]:.3f} | {start['eval_' + key]:.3f} | {r[key]:.3f} | {r[key] / ch[key]:.2f} |")
    lines += ["", "| slide tower | diagnosis probe acc. (held-out) | stage-2 eval loss (MC+Y/N) | stage-2 MC acc. |",
              "|---|---|---|---|"]
    for name, label in (("random_tower", "random (baseline)"), ("tower", "stage 1")):
        lines.append(f"| {label} | {probe[name]:.3f} | {s2[name][0]:.3f} | {s2[name][1]:.3f} |")
    lines += ["", f"chance: probe {1 / len(set(labels.values())):.3f}, MC {1 / len(set(labels.values())):.3f}; "
              f"ratios stage 1 / random: probe {probe['tower'] / max(probe['random_tower'], 1e-9):.2f}, "
              f"stage-2 loss {s2['tower'][0] / s2['random_tower'][0]:.2f}; total {time.time() - t0:.0f} s"]
    report = "\n".join(lines)
    print("\n" + report)
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
