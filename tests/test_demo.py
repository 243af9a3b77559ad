"""The demo chain end to end: a reduced demo must learn to answer from the slide.

The full demo's own claims (sparse tiles, mean-pool baseline <= 0.6, accuracy >= 0.9) are checked by
`wsi-llava demo`, which exits 1 when one fails (`make demo`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wsi_llava.config import load_config
from wsi_llava.demo import (
    TINY_PLAN,
    DemoPlan,
    check_claims,
    demo_config_path,
    exit_status,
    run_demo,
)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("stage", [2, 3])
def test_packaged_demo_configs_parse(stage):
    cfg = load_config(demo_config_path(stage))
    assert cfg.model.vision_mode == "none"
    assert cfg.finetuning.finetuning_type == ("full" if stage == 2 else "lora")
    assert cfg.training.get("bf16") is True  # "where fast": portable, decided per machine (wsi_llava.precision)


def test_reduced_demo_learns_from_the_slide(tmp_path, capsys):
    metrics = run_demo(tmp_path, tiny=True, plan=TINY_PLAN)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    n = TINY_PLAN.n_test
    assert saved["n_test"] == n and saved["chance"] == pytest.approx(0.25)
    # learning, measured against the model's own ablations, not a range
    assert saved["closed_accuracy"] >= 0.9
    assert saved["closed_accuracy"] - max(saved["closed_accuracy_zeroed"], saved["closed_accuracy_shuffled"]) >= 0.4
    assert abs(saved["closed_accuracy_shuffled"] - saved["chance"]) <= 0.25  # another slide's answer, not ours
    lo, hi = saved["closed_accuracy_ci"]
    assert lo < saved["closed_accuracy"] <= hi and lo < 1.0  # exact interval, never degenerate
    assert saved["claims_failed"] == []
    assert set(saved) >= {"closed_accuracy", "closed_accuracy_ci", "closed_accuracy_zeroed", "closed_accuracy_shuffled",
                          "mean_pool_baseline", "chance", "n_test", "seconds"}
    out = capsys.readouterr().out
    assert "shuffled slides" in out and "mean-pool baseline" in out
    assert (tmp_path / "report" / "report.md").exists()


def _metrics(**kw):
    base = dict(closed_accuracy=0.95, closed_accuracy_zeroed=0.25, closed_accuracy_shuffled=0.3, mean_pool_baseline=0.4)
    return {**base, **kw}


def test_claims_fail_when_the_model_ignores_the_slide():
    plan = DemoPlan()
    assert check_claims(_metrics(), plan) == []
    assert any("does not answer from the slide" in c for c in check_claims(_metrics(closed_accuracy_shuffled=0.9), plan))
    assert any("under 0.9" in c for c in check_claims(_metrics(closed_accuracy=0.8), plan))
    assert any("mean-pool" in c for c in check_claims(_metrics(mean_pool_baseline=0.7), plan))


def test_demo_exits_1_when_a_claim_fails(tmp_path, capsys):
    """An untrained model (1 step each) cannot beat the ablations: the demo says so and exits 1."""
    plan = dataclasses.replace(TINY_PLAN, n_train=8, n_test=8, stage2_steps=1, stage3_steps=1)
    metrics = run_demo(tmp_path, tiny=True, plan=plan)
    assert metrics["claims_failed"]
    assert exit_status(metrics) == 1
    assert "demo FAILED" in capsys.readouterr().err
