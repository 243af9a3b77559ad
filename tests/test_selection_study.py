"""experiments/selection_study.py: the token-budget study (pieces, the command line, and the whole pipeline
with --quick). ``experiments/`` is on ``sys.path`` through conftest.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from selection_study import (QUICK, STRATEGIES, StudyConfig, add_arguments, closed_manifest, config_from_args,
                             markdown_table, planted_lookup, pretrain_config, run_config, run_study, selection_recall,
                             summarise, time_selectors)

from wsi_llava.cli import COMMANDS
from wsi_llava.config import config_from_dict

pytestmark = pytest.mark.timeout(180)


def test_selection_recall_counts_distinct_tiles():
    planted = {(0.0, 0.0): True, (256.0, 0.0): True, (512.0, 0.0): False, (768.0, 0.0): False, (0.0, 256.0): True}
    loaded = np.array([[0, 0], [256, 0], [512, 0], [768, 0]], dtype=float)  # (0, 256) was not loaded
    r = selection_recall([[0, 0], [0, 0], [512, 0]], loaded, planted)  # a repeat counts once
    assert r == {"recall": 0.5, "precision": 0.5, "hit": 1.0, "uniform_recall": 0.5}
    r = selection_recall([[512, 0], [768, 0]], loaded, planted)
    assert r["recall"] == 0.0 and r["hit"] == 0.0
    with pytest.raises(ValueError, match=r"\(1.0, 2.0\)"):
        selection_recall([[1, 2]], loaded, planted)


def test_planted_lookup_reads_both_coordinate_conventions(cohort, tmp_path):
    seen_yx = False
    for path in cohort.slides[:3]:  # the synthetic cohort stores every third slide as coords_yx
        with h5py.File(path, "r") as f:
            yx = "coords_yx" in f
            coords = f["coords_yx"][:][:, ::-1] if yx else f["coords"][:]
            planted = f["planted"][:]
        seen_yx |= yx
        lookup = planted_lookup(path)
        assert [lookup[(float(x), float(y))] for x, y in coords] == planted.tolist()
        assert any(lookup.values())
    assert seen_yx
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f["features"] = np.zeros((2, 4), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match="bare.h5.*planted"):
        planted_lookup(bare)


def test_run_configs_are_valid_training_configs(tmp_path):
    cfg = StudyConfig()
    for strategy in STRATEGIES:
        raw = run_config(cfg, strategy, 32, 0, tmp_path / "train.csv", tmp_path / "llm", tmp_path / "run",
                         vision_tower=str(tmp_path / "tower.safetensors"))
        parsed = config_from_dict(raw)  # unknown or dead keys would raise
        m = parsed.model
        assert m.vision_feature_select_mode == strategy and m.image_seq_length == 32
        assert m.vision_mode == "wsi" and m.freeze_vision_tower and m.vision_tower.endswith("tower.safetensors")
        assert m.select_options == ({"similarity_weighting": True} if strategy == "prompt_topk" else {})
        assert m.vision_config["embed_dim"] == cfg.embed_dim and m.vision_config["depth"] == cfg.depth
        assert parsed.training["max_steps"] == cfg.steps
    s1 = config_from_dict(pretrain_config(cfg, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "text",
                                          tmp_path / "s1"))
    assert s1.finetuning.stage == "contrastive" and not s1.model.freeze_vision_tower
    assert s1.model.vision_config == run_config(cfg, "prumerge", 8, 0, tmp_path, tmp_path, tmp_path)["vision_config"]
    assert s1.training["max_steps"] == cfg.pretrain_steps


def test_closed_manifest_drops_report_rows(cohort, tmp_path):
    rows = cohort.train_csv.read_text().splitlines()
    assert any(",report" in r for r in rows)
    out = closed_manifest(cohort.train_csv, tmp_path / "closed.csv")
    kept = out.read_text().splitlines()
    assert kept[0] == rows[0] and len(kept) == 1 + sum(",report" not in r for r in rows[1:])
    assert not any(",report" in r for r in kept[1:])


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--out", "x"]))
    assert cfg == StudyConfig()
    assert cfg.strategies == STRATEGIES and cfg.budgets == (8, 32, 128) and cfg.timing_sizes == (2048, 20000)
    cfg = config_from_args(parser.parse_args(["--out", "x", "--quick", "--budgets", "2,4", "--steps", "3",
                                              "--strategies", "prompt_topk", "--signal-fraction", "0.05",
                                              "--train-tower"]))
    assert cfg == replace(QUICK, budgets=(2, 4), steps=3, strategies=("prompt_topk",), signal_fraction=0.05,
                          train_tower=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--budgets", "8,a"])


def test_runs_as_a_script_from_the_repository_root_not_as_a_wsi_llava_command():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "experiments/selection_study.py", "--help"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python experiments/selection_study.py") and "--quick" in out
    assert "--budgets" in out and "--pretrain-steps" in out
    assert "study-selection" not in COMMANDS
    assert not any("selection_study" in module for module, _ in COMMANDS.values())


def test_timing_rows_cover_every_case():
    rows = time_selectors(STRATEGIES, (64, 300), (4, 16), dim=8, repeats=1)
    assert {(r["strategy"], r["n"], r["k"]) for r in rows} == {(s, n, k) for s in STRATEGIES for n in (64, 300)
                                                              for k in (4, 16)}
    assert all(r["ms"] > 0 for r in rows)


def test_table_and_summary_from_runs():
    runs = [dict(strategy="prumerge", budget=8, seed=s, closed_accuracy=a, closed_accuracy_ci=[0.1, 0.9], recall=r,
                 precision=0.1, hit=1.0, uniform_recall=0.02, train_seconds=1.0, final_loss=0.5, mc_accuracy=a,
                 yes_no_accuracy=a) for s, a, r in ((0, 0.5, 0.2), (1, 0.7, 0.4))]
    summary = summarise(runs)
    assert len(summary) == 1 and summary[0]["closed_accuracy"] == pytest.approx(0.6)
    assert summary[0]["recall"] == pytest.approx(0.3) and summary[0]["accuracy_per_seed"] == [0.5, 0.7]
    cfg = replace(StudyConfig(), seeds=(0, 1), strategies=("prumerge",))
    table = markdown_table(summary, [{"strategy": "prumerge", "n": 2048, "k": 8, "ms": 12.345}], cfg, chance=0.375)
    assert "chance 0.375" in table and "mean of 2 seeds" in table and "random init, frozen in the runs" in table
    assert "| prumerge | 0.600 |" in table and "| prumerge | 0.300 (0.020) |" in table
    assert "| prumerge | 8 | 12.35 |" in table and "N = 2,048" in table


def planted_tiles(path) -> tuple[set, int]:
    """(x, y) of a synthetic slide's planted tiles and its tile count, straight from the H5."""
    with h5py.File(path, "r") as f:
        coords = f["coords_yx"][:][:, ::-1] if "coords_yx" in f else f["coords"][:]
        planted = f["planted"][:].astype(bool)
    return {(float(x), float(y)) for x, y in coords[planted]}, len(coords)


def test_quick_study_end_to_end(tmp_path):
    """The whole pipeline at --quick sizes. Its numbers mean nothing (2 training steps; at these sizes the
    selectors are no better than random over seeds), so what is checked is that every stored number is
    the one its raw outputs give: recall and accuracy recomputed from predictions.jsonl and the H5s, the
    summary from the runs, the table from the summary, the chance levels from the questions."""
    from wsi_llava.data.manifest import load_manifest
    from wsi_llava.data.slides import load_slide
    from wsi_llava.eval.metrics import evaluate_predictions

    cfg = replace(QUICK, strategies=("random_sample", "prumerge", "prompt_topk"), budgets=(4,))
    results = run_study(tmp_path, cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert [(r["strategy"], r["budget"]) for r in saved["runs"]] == [(s, 4) for s in cfg.strategies]
    test = load_manifest(tmp_path / "cohort" / "test_closed.csv")
    assert saved["n_test_questions"] == len(test) == 2 * cfg.n_test
    assert saved["chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)  # one 4-way multiple choice + one yes/no per slide
    slides = {r.slide_id: r.h5_path for r in test}
    truth = {sid: planted_tiles(path) for sid, path in slides.items()}
    loaded = {sid: load_slide(path, cfg.patches_per_wsi).coords for sid, path in slides.items()}
    assert all(len(loaded[sid]) == truth[sid][1] for sid in slides)  # patches_per_wsi >= max_tiles: all tiles
    for r in saved["runs"]:
        rows = [json.loads(x) for x in (tmp_path / "runs" / f"{r['strategy']}_k4" / "predictions.jsonl")
                .read_text().splitlines()]
        assert r["n_closed"] == len(rows) == 2 * cfg.n_test  # multiple choice + yes/no per held-out slide
        per_row = []
        for x in rows:
            assert len(x["tiles"]) == 4 and len(set(x["tiles"])) == 4  # k = 4 distinct tiles
            np.testing.assert_array_equal(loaded[x["slide_id"]][x["tiles"]], np.asarray(x["coords"]))
            chosen = {(float(a), float(b)) for a, b in x["coords"]}
            planted, n = truth[x["slide_id"]]
            found = len(chosen & planted)
            per_row.append({"recall": found / len(planted), "precision": found / len(chosen), "hit": float(found > 0),
                            "uniform_recall": len(chosen) / n})
        for key in ("recall", "precision", "hit", "uniform_recall"):
            assert r[key] == pytest.approx(np.mean([p[key] for p in per_row])), (r["strategy"], key)
        scored = evaluate_predictions(rows, bootstrap=1000, seed=0)
        assert r["closed_accuracy"] == scored["closed_accuracy"] and r["closed_accuracy_ci"] == scored["closed_accuracy_ci"]
        s = next(x for x in saved["summary"] if (x["strategy"], x["budget"]) == (r["strategy"], 4))
        assert s["n_seeds"] == 1 and all(s[k] == r[k] for k in ("closed_accuracy", "recall", "uniform_recall"))
    assert {(t["strategy"], t["n"]) for t in saved["timing"]} == {(s, n) for s in cfg.strategies
                                                                  for n in cfg.timing_sizes}
    stage1 = json.loads((tmp_path / "stage1" / "metrics.json").read_text())  # --quick runs stage 1 too (2 steps)
    assert saved["stage1"]["retrieval"] == stage1["retrieval"] and saved["stage1"]["chance"]["s2t_r1"] == 0.25
    assert saved["stage1"]["tower"] == str(tmp_path / "stage1" / "tower.safetensors")
    share = saved["tower_attention"]
    assert share["planted_tile_share"] == pytest.approx(np.mean([len(p) / n for p, n in truth.values()]))
    assert 0.0 < share["planted_attention_share"] < 1.0
    # the table: the configured strategies in order, one k column, each cell the summary's value
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table.count("| strategy | k = 4 |") == 2 and "| strategy | k | N = 256 | N = 2,048 |" in table
    by = {x["strategy"]: x for x in saved["summary"]}
    acc = [f"| {s} | {by[s]['closed_accuracy']:.3f} [{by[s]['closed_accuracy_ci'][0]:.2f}, "
           f"{by[s]['closed_accuracy_ci'][1]:.2f}] |" for s in cfg.strategies]
    rec = [f"| {s} | {by[s]['recall']:.3f} ({by[s]['uniform_recall']:.3f}) |" for s in cfg.strategies]
    first = table.index("| strategy | k = 4 |")
    second = table.index("| strategy | k = 4 |", first + 1)
    assert table[first + 2:first + 2 + len(acc)] == acc and table[second + 2:second + 2 + len(rec)] == rec
    with Image.open(tmp_path / "study.png") as im:
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.shape[1] > 500 and px.std() > 10


def test_bad_study_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown strategies.*prumurge"):
        run_study(tmp_path, replace(QUICK, strategies=("prumurge",)))
    with pytest.raises(ValueError, match="patches_per_wsi"):
        run_study(tmp_path, replace(QUICK, max_tiles=500, patches_per_wsi=100))
