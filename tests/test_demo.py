"""The demo chain end to end (small sizes; the real demo's targets are checked by `make demo`)."""

from __future__ import annotations

import json

import pytest

from wsi_llava.config import load_config
from wsi_llava.demo import DemoPlan, demo_config_path, run_demo

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("stage", [2, 3])
def test_packaged_demo_configs_parse(stage):
    cfg = load_config(demo_config_path(stage))
    assert cfg.model.vision_mode == "none"
    assert cfg.finetuning.finetuning_type == ("full" if stage == 2 else "lora")


def test_tiny_demo_writes_metrics(tmp_path, capsys):
    plan = DemoPlan(n_train=8, n_test=4, stage2_steps=2, stage3_steps=2, batch_size=4, patches_per_wsi=64,
                    image_seq_length=4)
    metrics = run_demo(tmp_path, tiny=True, plan=plan)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("closed_accuracy", "closed_accuracy_zeroed", "chance", "n_test", "seconds"):
        assert key in saved
    assert saved["n_test"] == 4  # 4 held-out slides, one multiple-choice question each
    assert saved["chance"] == pytest.approx(0.25)
    assert 0.0 <= saved["closed_accuracy"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"mc", "report"}
    out = capsys.readouterr().out
    assert "a generated report" in out and "closed-ended accuracy" in out
    assert (tmp_path / "report" / "report.md").exists()
