"""`python experiments/selection_study.py --out DIR`: the token-budget study of the selectors.

An experiment built on the package (run from the repository root with ``wsi_llava`` installed; not a
``wsi-llava`` command). ``--help`` lists the sizes; ``--quick`` runs the whole pipeline in seconds.

On a synthetic cohort whose diagnosis sits in a small, spatially clustered fraction of tiles
(``data/synthetic.py``; every H5 marks those tiles in ``planted``):

1. optional stage 1 (``pretrain_steps`` > 0, the default): the small ``vision_mode: wsi`` slide
   encoder is trained contrastively against the training slides' reports (``stage: contrastive``,
   a tiny BERT text tower), so its CLS attention has something to say; with 0 steps the tower
   stays random;
2. the same tiny model is trained once per (strategy, budget[, seed]) through the normal training
   path (``run_sft``, one stage: projector, prompt top-K query projection and the tiny LM train; the
   tower is frozen, so every strategy sees identical tokens);
3. each model answers the held-out closed questions with ``--explain``; per run the study records
   closed-ended accuracy (scored by ``eval.metrics``, with a bootstrap CI) and the recall of the
   planted tiles among the selected ones, ``|selected ∩ planted| / |planted|`` per question
   (selected = the distinct kept tile indices; for PruMerge(+) the centre tiles, not the tiles
   merged into them), next to what a uniform choice of as many tiles expects (``k / N``);
4. separately, the selection time per slide of each strategy at N = 2,048 and 20,000 tiles (GigaPath
   width D = 768, random inputs, one thread, best of ``timing_repeats``).

Outputs in ``--out``: ``results.json`` (everything), ``table.md`` (Markdown tables), ``study.png``
(accuracy and recall against the budget), plus ``cohort/``, ``llm/``, ``stage1/`` and
``runs/<strategy>_k<k>/`` (the trained models and their ``predictions.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np


#: The budget strategies (``none`` keeps the first k tiles: not a selection strategy).
STRATEGIES = ("random_sample", "prumerge", "prumerge_plus", "prompt_topk")

#: Per-strategy ``select_options``: prompt top-K needs the similarity weighting for its query
#: projection to receive gradients (top-K itself is not differentiable; see docs/selection.md).
SELECT_OPTIONS = {"prompt_topk": {"similarity_weighting": True}}


@dataclass
class StudyConfig:
    """Sizes of one budget study (the defaults take minutes on one CPU thread; docs/selection.md has a measured run)."""

    strategies: tuple[str, ...] = STRATEGIES
    """Selectors to compare (keys of ``SELECTORS``)."""
    budgets: tuple[int, ...] = (8, 32, 128)
    """Token budgets k (``image_seq_length``)."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; each (strategy, budget) is trained once per seed and the metrics averaged."""
    question_kinds: tuple[str, ...] = ("mc",)
    """Closed questions per slide: ``mc`` (diagnosis, multiple choice) and/or ``yn`` (yes/no)."""
    n_train: int = 128
    """Training slides."""
    n_test: int = 64
    """Held-out slides."""
    feature_dim: int = 32
    """Tile feature width."""
    min_tiles: int = 300
    """Fewest tiles per slide."""
    max_tiles: int = 800
    """Most tiles per slide (keep ≤ ``patches_per_wsi`` so every tile can be selected)."""
    signal_fraction: float = 0.03
    """Share of a slide's tiles carrying the diagnosis."""
    signal_strength: float = 8.0
    """Norm of the diagnosis prototype added to the planted tiles (tile noise: unit variance per dim)."""
    embed_dim: int = 64
    """Slide-encoder width (the tower is a small ``vision_mode: wsi`` encoder)."""
    depth: int = 2
    """Slide-encoder blocks."""
    num_heads: int = 4
    """Slide-encoder heads."""
    vision_tower: str | None = None
    """Slide-encoder weights for the small tower (a ``tower.safetensors`` of the same architecture);
    None = a random tower (seeded, identical for every run)."""
    pretrain_steps: int = 80
    """Stage-1 contrastive steps (slide ↔ report, ``stage: contrastive``) on the cohort's training
    reports before the study, starting from ``vision_tower``; the trained tower is then used by every
    run. 0 = none (a random tower: its CLS attention carries no information, see docs/selection.md)."""
    pretrain_batch_size: int = 16
    """Stage-1 batch (in-batch negatives)."""
    pretrain_learning_rate: float = 1e-3
    """Stage-1 peak learning rate."""
    train_tower: bool = False
    """Train the tower with the rest (``freeze_vision_tower: false``)."""
    lm_hidden: int = 64
    """Tiny LM width."""
    lm_layers: int = 2
    """Tiny LM blocks."""
    steps: int = 300
    """Optimiser steps per run."""
    batch_size: int = 8
    """Examples per step."""
    learning_rate: float = 3e-3
    """Peak learning rate (cosine schedule)."""
    patches_per_wsi: int = 1024
    """Tiles read per slide."""
    threads: int = 1
    """torch threads (one by default: more oversubscribe a shared machine)."""
    timing_sizes: tuple[int, ...] = (2048, 20000)
    """Tile counts N for the selection-time table."""
    timing_dim: int = 768
    """Token and key width for the selection-time table (GigaPath)."""
    timing_repeats: int = 5
    """Timed repeats per case (best of)."""
    seed: int = 0
    """Seed of the cohort and the tiny LM."""


#: ``--quick``: the whole pipeline in seconds (for CI); the numbers mean nothing.
QUICK = StudyConfig(budgets=(4, 8), question_kinds=("mc", "yn"), n_train=8, n_test=4, feature_dim=16, min_tiles=40,
                    max_tiles=80, signal_fraction=0.1, embed_dim=16, depth=1, num_heads=2, pretrain_steps=2,
                    pretrain_batch_size=4, lm_hidden=32, lm_layers=1, steps=2, batch_size=4, patches_per_wsi=128,
                    timing_sizes=(256, 2048), timing_dim=64, timing_repeats=1)


# ----------------------------------------------------------------------------------------------
# Planted tiles and selection recall
# ----------------------------------------------------------------------------------------------


def planted_lookup(path: str | Path) -> dict[tuple[float, float], bool]:
    """``(x, y) → planted`` for every tile of a synthetic slide H5 (coords as ``load_slide`` gives them).

    Raises ``ValueError`` naming the file when it has no ``planted`` dataset or its length differs
    from the coordinates'."""
    from wsi_llava.data.slide_checks import COORD_KEYS
    from wsi_llava.data.slides import open_slide, slide_dataset

    with open_slide(path) as f:  # checked: a regular file; links resolved inside the file only
        planted_ds = slide_dataset(f, "planted")
        if planted_ds is None:
            raise ValueError(f"{path}: no 'planted' dataset (only synthetic cohorts mark their diagnostic tiles)")
        planted = np.asarray(planted_ds[:], dtype=bool)
        for key, yx in COORD_KEYS:
            ds = slide_dataset(f, key)
            if ds is not None:
                coords = np.asarray(ds[:], dtype=np.float32)
                if yx:
                    coords = coords[:, ::-1]
                break
        else:
            raise ValueError(f"{path}: no coordinates ('coords' or 'coords_yx')")
    if len(planted) != len(coords):
        raise ValueError(f"{path}: 'planted' has {len(planted)} rows but the coordinates have {len(coords)}")
    return {(float(x), float(y)): bool(p) for (x, y), p in zip(coords, planted)}


def selection_recall(selected_coords: list[list[float]], loaded_coords: np.ndarray,
                     planted: dict[tuple[float, float], bool]) -> dict[str, float]:
    """Recall/precision of the planted tiles for one question.

    Args:
        selected_coords: [K, 2] (x, y) of the kept tiles (repeats allowed; counted once).
        loaded_coords: [N, 2] (x, y) of the tiles the model could choose from.
        planted: :func:`planted_lookup` of the slide.
    Returns:
        ``recall`` = |selected ∩ planted| / |planted among loaded| (1.0 when nothing is planted),
        ``precision`` = |selected ∩ planted| / |selected|, ``hit`` (any planted tile selected),
        ``uniform_recall`` = |selected| / N (what a uniform choice of as many tiles expects).
    """
    def key(c) -> tuple[float, float]:
        xy = (float(c[0]), float(c[1]))
        if xy not in planted:
            raise ValueError(f"tile at (x, y) = {xy} is not in the slide's coordinates")
        return xy

    chosen = {key(c) for c in selected_coords}
    loaded = {key(c) for c in loaded_coords}
    target = {c for c in loaded if planted[c]}
    found = sum(planted[c] for c in chosen)
    return {"recall": found / len(target) if target else 1.0, "precision": found / max(len(chosen), 1),
            "hit": float(found > 0), "uniform_recall": min(len(chosen), len(loaded)) / max(len(loaded), 1)}


# ----------------------------------------------------------------------------------------------
# One run: train, answer, score
# ----------------------------------------------------------------------------------------------


def tower_config(cfg: StudyConfig) -> dict:
    """``vision_config`` of the study's small tower: one dense attention branch over all tiles
    (a single LongNet segment longer than any slide), so it is cheap on CPU."""
    return dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                segment_lengths=[max(4096, cfg.patches_per_wsi + 1)], dilations=[1])


def run_config(cfg: StudyConfig, strategy: str, budget: int, seed: int, train_csv: Path, llm: Path,
               out_dir: Path, vision_tower: str | None = None) -> dict:
    """The flat training config (LLaMA-Factory dialect) of one study run."""
    return dict(
        llm_name_or_path=str(llm), dataset=str(train_csv), vision_mode="wsi", vision_config=tower_config(cfg),
        vision_tower=vision_tower, freeze_vision_tower=not cfg.train_tower,
        image_seq_length=budget, vision_feature_select_mode=strategy,
        select_options=dict(SELECT_OPTIONS.get(strategy, {})), system_prompt="You are a pathology assistant.",
        stage="sft", finetuning_type="full", freeze_language_model=False, patches_per_wsi=cfg.patches_per_wsi,
        cutoff_len=512, output_dir=str(out_dir), per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_ratio=0.1,
        logging_steps=max(1, cfg.steps // 5), save_strategy="no", eval_strategy="no", report_to="none",
        seed=seed, dataloader_num_workers=0, disable_tqdm=True, plot_loss=False)


def pretrain_config(cfg: StudyConfig, train_csv: Path, test_csv: Path, text_model: Path, out_dir: Path) -> dict:
    """Stage-1 contrastive config of the study's tower (slide CLS ↔ report text)."""
    return dict(
        stage="contrastive", text_model_name_or_path=str(text_model), dataset=str(train_csv),
        eval_dataset=str(test_csv), vision_mode="wsi", vision_config=tower_config(cfg), vision_tower=cfg.vision_tower,
        freeze_vision_tower=False, slide_pool="cls", projection_dim=32, patches_per_wsi=cfg.patches_per_wsi,
        output_dir=str(out_dir), per_device_train_batch_size=cfg.pretrain_batch_size, per_device_eval_batch_size=16,
        max_steps=cfg.pretrain_steps, learning_rate=cfg.pretrain_learning_rate, lr_scheduler_type="cosine",
        warmup_ratio=0.1, logging_steps=max(1, cfg.pretrain_steps // 5), eval_strategy="no", save_strategy="no",
        report_to="none", seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=True)


def closed_manifest(src: Path, dest: Path) -> Path:
    """Copy a manifest CSV keeping only the closed-question rows (no report/caption rows)."""
    import csv

    from wsi_llava.data.manifest_writer import write_manifest_csv

    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = [r for r in reader if r.get("category") != "report"]
    return write_manifest_csv(dest, rows, fields)


def evaluate_run(model_dir: Path, records: list, planted: dict[str, dict], out: Path) -> dict:
    """Closed-question accuracy and planted-tile recall of a trained model on ``records``."""
    from wsi_llava.infer.engine import SlideAssistant
    from wsi_llava.infer.generation import GenerationSettings
    from wsi_llava.infer.predict import predict
    from wsi_llava.eval.metrics import evaluate_predictions

    assistant = SlideAssistant.from_pretrained(model_dir)
    out.unlink(missing_ok=True)
    predict(assistant, records, out, batch_size=16, settings=GenerationSettings(max_new_tokens=4),
            explain=True, progress=False)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != len(records):
        raise RuntimeError(f"{out}: {len(rows)} predictions for {len(records)} questions (see the .errors.jsonl)")
    metrics = evaluate_predictions(rows, bootstrap=1000, seed=0)
    by_id = {r.slide_id: r.h5_path for r in records}
    loaded = {sid: assistant.load(path).coords for sid, path in by_id.items()}
    per_row = [selection_recall(r["coords"], loaded[r["slide_id"]], planted[r["slide_id"]]) for r in rows]
    mean = {k: float(np.mean([p[k] for p in per_row])) for k in per_row[0]}
    return {"closed_accuracy": metrics["closed_accuracy"], "closed_accuracy_ci": metrics.get("closed_accuracy_ci"),
            "mc_accuracy": metrics.get("mc_accuracy"), "yes_no_accuracy": metrics.get("yes_no_accuracy"),
            "n_closed": metrics.get("n_closed"), "n_unparsed": metrics.get("n_unparsed"), **mean}


def attention_on_planted(model_dir: Path, records: list, planted: dict[str, dict], patches_per_wsi: int) -> dict:
    """How much of the tower's CLS attention falls on the planted tiles (what PruMerge ranks by).

    Per held-out slide: ``share`` = CLS-attention mass on planted tiles, ``tiles`` = planted share of
    the tiles; returned as their means over slides (equal when attention ignores the planted tiles)."""
    import torch

    from wsi_llava.data.slides import load_slide
    from wsi_llava.model.wsi_llava import load_wsi_llava

    model, _ = load_wsi_llava(model_dir)
    tower = model.vision_tower
    shares, tiles = [], []
    for sid, path in {r.slide_id: r.h5_path for r in records}.items():
        slide = load_slide(path, patches_per_wsi)
        flags = np.array([planted[sid][(float(x), float(y))] for x, y in slide.coords])
        with torch.no_grad():
            out = tower(torch.from_numpy(slide.features)[None], torch.from_numpy(slide.coords)[None],
                        torch.ones(1, len(flags), dtype=torch.bool))
        if out.cls_attention is None:
            return {}
        a = out.cls_attention[0].double().numpy()
        shares.append(float(a[flags].sum() / a.sum()))
        tiles.append(float(flags.mean()))
    return {"planted_attention_share": float(np.mean(shares)), "planted_tile_share": float(np.mean(tiles))}


# ----------------------------------------------------------------------------------------------
# Selection time per slide
# ----------------------------------------------------------------------------------------------


def time_selectors(strategies: tuple[str, ...], sizes: tuple[int, ...], budgets: tuple[int, ...], dim: int,
                   repeats: int, seed: int = 0) -> list[dict]:
    """Best-of-``repeats`` milliseconds of one selector call per slide (B = 1, random inputs, D = Dk = ``dim``).

    Returns rows ``{"strategy", "n", "k", "ms"}`` for every combination.
    """
    import torch

    from wsi_llava.model.select import SELECTORS, SelectOptions

    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in sizes:
        tokens = torch.randn(1, n, dim, generator=g)
        keys = torch.randn(1, n, dim, generator=g)
        attn = torch.softmax(torch.randn(1, n, generator=g), dim=1)
        query = torch.randn(1, dim, generator=g)
        side = math.ceil(math.sqrt(n))
        ii = torch.arange(n)
        coords = (torch.stack([ii % side, ii // side], dim=1).float() * 256)[None]
        mask = torch.ones(1, n, dtype=torch.bool)
        for strategy in strategies:
            options = SelectOptions.from_mapping(SELECT_OPTIONS.get(strategy))
            for k in budgets:
                def call():
                    SELECTORS[strategy](tokens, mask, k, cls_attention=attn, keys=keys, query=query, coords=coords,
                                        generator=torch.Generator().manual_seed(0), options=options)
                with torch.no_grad():
                    call()  # warm-up
                    best = math.inf
                    for _ in range(max(1, repeats)):
                        t0 = time.perf_counter()
                        call()
                        best = min(best, time.perf_counter() - t0)
                rows.append({"strategy": strategy, "n": n, "k": k, "ms": best * 1e3})
    return rows


# ----------------------------------------------------------------------------------------------
# Report: table and plot
# ----------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summarise(runs: list[dict]) -> list[dict]:
    """Average the per-seed runs of each (strategy, budget); keep the per-seed accuracies."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    out = []
    for (strategy, budget), rs in groups.items():
        row = {"strategy": strategy, "budget": budget, "n_seeds": len(rs),
               "accuracy_per_seed": [r["closed_accuracy"] for r in rs]}
        for key in ("closed_accuracy", "mc_accuracy", "yes_no_accuracy", "recall", "precision", "hit",
                    "uniform_recall", "train_seconds", "final_loss"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = float(np.mean(vals)) if vals else None
        row["closed_accuracy_ci"] = rs[0].get("closed_accuracy_ci") if len(rs) == 1 else None
        out.append(row)
    return out


def tower_line(cfg: StudyConfig, stage1: dict | None, attention: dict | None = None) -> str:
    """Which tower the runs used, and how much of its CLS attention falls on the planted tiles."""
    arch = f"{cfg.depth}-block, {cfg.embed_dim}-wide slide encoder"
    if stage1:
        r, c = (stage1.get("retrieval") or {}), (stage1.get("chance") or {})
        got = f" (held-out slide→report R@1 {r['s2t_r1']:.2f}, chance {c['s2t_r1']:.2f})" if "s2t_r1" in r else ""
        line = f"Tower: {arch} after {cfg.pretrain_steps} stage-1 contrastive steps{got}"
    elif cfg.vision_tower:
        line = f"Tower: {arch} loaded from {cfg.vision_tower}"
    else:
        line = f"Tower: {arch}, random init"
    line += ", trained in the runs." if cfg.train_tower else ", frozen in the runs."
    if attention:
        line += (f" Its CLS attention puts {100 * attention['planted_attention_share']:.1f} % of its mass on the "
                 f"planted tiles, which are {100 * attention['planted_tile_share']:.1f} % of the tiles.")
    return line


def markdown_table(summary: list[dict], timing: list[dict], cfg: StudyConfig, chance: float,
                   stage1: dict | None = None, attention: dict | None = None) -> str:
    """The study's Markdown: accuracy/recall per strategy and budget, then selection times."""
    budgets = sorted({r["budget"] for r in summary})
    strategies = [s for s in cfg.strategies if any(r["strategy"] == s for r in summary)]
    cell = {(r["strategy"], r["budget"]): r for r in summary}
    seeds = f"mean of {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else "95 % bootstrap CI in brackets"
    lines = [tower_line(cfg, stage1, attention), "",
             f"Closed-ended accuracy on held-out questions (chance {chance:.3f}; {seeds}):", "",
             "| strategy | " + " | ".join(f"k = {k}" for k in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for s in strategies:
        cells = []
        for k in budgets:
            r = cell.get((s, k))
            if r is None:
                cells.append("–")
                continue
            ci = r.get("closed_accuracy_ci")
            cells.append(_fmt(r["closed_accuracy"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Recall of the planted tiles among the selected ones (uniform choice of as many tiles in brackets):",
              "", "| strategy | " + " | ".join(f"k = {k}" for k in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for s in strategies:
        cells = []
        for k in budgets:
            r = cell.get((s, k))
            cells.append("–" if r is None else f"{_fmt(r['recall'])} ({_fmt(r['uniform_recall'])})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if timing:
        sizes = sorted({t["n"] for t in timing})
        tcell = {(t["strategy"], t["k"], t["n"]): t["ms"] for t in timing}
        lines += ["", f"Selection time per slide, ms (B = 1, D = {cfg.timing_dim}, best of {cfg.timing_repeats}):", "",
                  "| strategy | k | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
                  "|---|---:|" + "---:|" * len(sizes)]
        for s in strategies:
            for k in sorted({t["k"] for t in timing}):
                lines.append(f"| {s} | {k} | " + " | ".join(_fmt(tcell.get((s, k, n)), 2) for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def plot_study(summary: list[dict], path: Path, chance: float) -> None:
    """Two panels against the budget (log scale): accuracy (with chance) and planted-tile recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rec) = plt.subplots(1, 2, figsize=(10, 4))
    budgets = sorted({r["budget"] for r in summary})
    for strategy in dict.fromkeys(r["strategy"] for r in summary):
        rs = sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["budget"])
        ks = [r["budget"] for r in rs]
        acc = [r["closed_accuracy"] for r in rs]
        ci = [r.get("closed_accuracy_ci") for r in rs]
        if all(ci):
            err = np.array([[a - c[0] for a, c in zip(acc, ci)], [c[1] - a for a, c in zip(acc, ci)]])
            ax_acc.errorbar(ks, acc, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=strategy)
        else:
            ax_acc.plot(ks, acc, marker="o", label=strategy)
        ax_rec.plot(ks, [r["recall"] for r in rs], marker="o", label=strategy)
    uniform = {}
    for r in summary:
        uniform.setdefault(r["budget"], []).append(r["uniform_recall"])
    ax_rec.plot(budgets, [float(np.mean(uniform[k])) for k in budgets], "k--", lw=1, label="uniform k/N")
    ax_acc.axhline(chance, color="k", ls="--", lw=1, label="chance")
    for ax, title in ((ax_acc, "closed-ended accuracy"), (ax_rec, "recall of planted tiles")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(k) for k in budgets])
        ax.set_xlabel("token budget k")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax_rec.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


def run_study(out: str | Path, cfg: StudyConfig | None = None) -> dict:
    """Run the whole study into ``out``; returns what ``results.json`` holds."""
    import torch

    from wsi_llava.config import config_from_dict
    from wsi_llava.data.manifest import load_manifest
    from wsi_llava.data.synthetic import SynthConfig, make_cohort
    from wsi_llava.model.select import SELECTORS
    from wsi_llava.tiny import TinyLMConfig, build_tiny_llm, build_tiny_text_encoder
    from wsi_llava.train.contrastive import run_contrastive
    from wsi_llava.train.run import run_sft

    cfg = cfg or StudyConfig()
    unknown = [s for s in cfg.strategies if s not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {sorted(SELECTORS)}")
    if not cfg.question_kinds or set(cfg.question_kinds) - {"mc", "yn"}:
        raise ValueError(f"question_kinds must be a non-empty subset of mc, yn, got {list(cfg.question_kinds)}")
    if not cfg.budgets or min(cfg.budgets) < 1:
        raise ValueError(f"budgets must be integers >= 1, got {list(cfg.budgets)}")
    if cfg.max_tiles > cfg.patches_per_wsi:
        raise ValueError(f"max_tiles {cfg.max_tiles} > patches_per_wsi {cfg.patches_per_wsi}: some planted tiles "
                         "could never be selected; raise patches_per_wsi")
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(out / "cohort", SynthConfig(
        n_train=cfg.n_train, n_test=cfg.n_test, feature_dim=cfg.feature_dim, min_tiles=cfg.min_tiles,
        max_tiles=cfg.max_tiles, signal_fraction=cfg.signal_fraction, signal_strength=cfg.signal_strength,
        question_kinds=tuple(cfg.question_kinds) + ("report",), seed=cfg.seed))
    train_csv = closed_manifest(cohort.train_csv, cohort.root / "train_closed.csv")
    test_csv = closed_manifest(cohort.test_csv, cohort.root / "test_closed.csv")
    llm = build_tiny_llm(out / "llm", TinyLMConfig(hidden_size=cfg.lm_hidden, num_layers=cfg.lm_layers,
                                                  intermediate_size=2 * cfg.lm_hidden, seed=cfg.seed))
    tower, stage1 = cfg.vision_tower, None
    if cfg.pretrain_steps > 0:
        print(f"stage 1: contrastive pretraining of the tower, {cfg.pretrain_steps} steps", flush=True)
        t0 = time.time()
        text = build_tiny_text_encoder(out / "text_encoder", hidden_size=32, seed=cfg.seed)
        s1 = run_contrastive(config_from_dict(pretrain_config(cfg, cohort.train_csv, cohort.test_csv, text,
                                                              out / "stage1"), source="study stage 1"))
        tower = str(s1 / "tower.safetensors")
        metrics = json.loads((s1 / "metrics.json").read_text(encoding="utf-8"))
        stage1 = {"retrieval": metrics.get("retrieval"), "chance": metrics.get("chance"),
                  "seconds": round(time.time() - t0, 1), "tower": tower}
    test = load_manifest(test_csv)
    planted = {r.slide_id: planted_lookup(r.h5_path) for r in test}
    chance = float(np.mean([1.0 / len(r.choices) if r.choices else 0.5 for r in test]))

    runs = []
    total = len(cfg.strategies) * len(cfg.budgets) * len(cfg.seeds)
    for strategy in cfg.strategies:
        for budget in cfg.budgets:
            for seed in cfg.seeds:
                name = f"{strategy}_k{budget}" + (f"_s{seed}" if len(cfg.seeds) > 1 else "")
                run_dir = out / "runs" / name
                t0 = time.time()
                model_dir = run_sft(config_from_dict(run_config(cfg, strategy, budget, seed, train_csv, llm, run_dir,
                                                                tower), source=f"study run {name}"))
                train_s = time.time() - t0
                history = json.loads((model_dir / "log_history.json").read_text(encoding="utf-8"))
                losses = [h["loss"] for h in history if "loss" in h]
                result = evaluate_run(model_dir, test, planted, run_dir / "predictions.jsonl")
                result.update(strategy=strategy, budget=budget, seed=seed, train_seconds=round(train_s, 1),
                              final_loss=losses[-1] if losses else None)
                runs.append(result)
                print(f"[{len(runs)}/{total}] {name}: accuracy {result['closed_accuracy']:.3f}, recall "
                      f"{result['recall']:.3f} (uniform {result['uniform_recall']:.3f}), {train_s:.0f} s", flush=True)
    summary = summarise(runs)
    attention = {}
    if not cfg.train_tower:  # every run shares the frozen tower: measure it once, from the first run
        first = runs[0]
        name = f"{first['strategy']}_k{first['budget']}" + (f"_s{first['seed']}" if len(cfg.seeds) > 1 else "")
        attention = attention_on_planted(out / "runs" / name, test, planted, cfg.patches_per_wsi)
    print("timing the selectors …", flush=True)
    timing = time_selectors(tuple(cfg.strategies), tuple(cfg.timing_sizes), tuple(cfg.budgets), cfg.timing_dim,
                            cfg.timing_repeats, cfg.seed)
    table = markdown_table(summary, timing, cfg, chance, stage1, attention)
    results = {"config": _jsonable(asdict(cfg)), "chance": chance, "n_test_questions": len(test), "stage1": stage1,
               "tower_attention": attention,
               "summary": summary, "runs": runs, "timing": timing, "seconds": round(time.time() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_study(summary, out / "study.png", chance)
    print(table)
    print(f"{results['seconds']:.0f} s in all -> {out / 'table.md'}, {out / 'study.png'}, {out / 'results.json'}")
    return results


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


#: CLI flag → StudyConfig field for the plain scalar sizes.
_SCALAR_FLAGS = ("n_train", "n_test", "feature_dim", "min_tiles", "max_tiles", "signal_fraction", "signal_strength",
                 "embed_dim", "depth", "num_heads", "pretrain_steps", "pretrain_batch_size", "pretrain_learning_rate",
                 "lm_hidden", "lm_layers", "steps", "batch_size",
                 "learning_rate", "patches_per_wsi", "threads", "timing_dim", "timing_repeats", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (table.md, study.png, results.json, runs/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the whole pipeline in seconds (CI)")
    parser.add_argument("--strategies", type=_names, help=f"comma-separated selectors (default {','.join(STRATEGIES)})")
    parser.add_argument("--question-kinds", type=_names, help="closed question kinds per slide: mc, yn (default mc)")
    parser.add_argument("--budgets", type=_ints, help="comma-separated token budgets (default 8,32,128)")
    parser.add_argument("--seeds", type=_ints, help="comma-separated training seeds, averaged (default 0)")
    parser.add_argument("--timing-sizes", type=_ints, help="tile counts for the timing table (default 2048,20000)")
    parser.add_argument("--vision-tower", help="slide-encoder weights for the small tower (default: random init)")
    parser.add_argument("--train-tower", action="store_true", help="train the tower too (freeze_vision_tower: false)")
    defaults = StudyConfig()
    for name in _SCALAR_FLAGS:
        value = getattr(defaults, name)
        doc = _field_doc(name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                            help=f"{doc} (default {value}; --quick: {getattr(QUICK, name)})")


def _field_doc(name: str) -> str:
    import ast
    import inspect

    body = ast.parse(inspect.getsource(StudyConfig)).body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and a.target.id == name and isinstance(b, ast.Expr):
            return " ".join(str(b.value.value).split()).replace("%", "%%")
    return name


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The study config of the command line: ``--quick`` or the defaults, then each flag given."""
    cfg = QUICK if args.quick else StudyConfig()
    changes = {name: getattr(args, name) for name in _SCALAR_FLAGS if getattr(args, name) is not None}
    for name in ("strategies", "question_kinds", "budgets", "seeds", "timing_sizes", "vision_tower"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.train_tower:
        changes["train_tower"] = True
    return replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (``argv``; default ``sys.argv[1:]``) and run the study."""
    parser = argparse.ArgumentParser(prog="python experiments/selection_study.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_study(args.out, config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
