"""The README's "full run from features to scores", with a tiny LM and few steps (key=value overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wsi_llava.cli import main as cli
from wsi_llava.demo import demo_config_path

pytestmark = pytest.mark.timeout(300)


def test_readme_full_run(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        fast = ["max_steps=2", "per_device_train_batch_size=4", "patches_per_wsi=64", "eval_steps=2",
                "save_steps=2", "per_device_eval_batch_size=4"]
        assert cli(["synth", "--out", "data", "--n-train", "8", "--n-test", "3", "--min-tiles", "40",
                    "--max-tiles", "80", "--signal-fraction", "0.5", "--signal-strength", "8"]) == 0
        assert cli(["offline-llm", "tiny", "--out", "models/SmolLM2-135M-Instruct"]) == 0
        assert cli(["train", str(demo_config_path(2)), *fast]) == 0
        assert cli(["train", str(demo_config_path(3)), *fast]) == 0
        assert (Path("runs/demo_stage3") / "adapter").is_dir()
        for extra in ([], ["--ablate", "zero"]):
            out = "preds_zero.jsonl" if extra else "preds.jsonl"
            assert cli(["predict", "--model", "runs/demo_stage3", "--data", "data/test.csv", "--out", out,
                        "--max-new-tokens", "4", *extra]) == 0
        assert cli(["eval", "--predictions", "preds.jsonl", "--compare", "zeroed=preds_zero.jsonl",
                    "--out", "report", "--bootstrap", "20"]) == 0
        metrics = json.loads(Path("report/metrics.json").read_text())
        assert metrics["n_closed"] == 6 and "zeroed" in metrics["comparisons"]
    finally:
        os.chdir(cwd)
