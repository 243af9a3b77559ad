"""Training stages 2 and 3 end to end on tiny data, through the CLI; chat and predict on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from wsi_llava.cli import main as cli
from wsi_llava.data.synthetic import SynthConfig, make_cohort
from wsi_llava.model.wsi_llava import load_wsi_llava

pytestmark = pytest.mark.timeout(300)


def write_config(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump(kw, sort_keys=False))
    return path


def base_cfg(tiny_llm, cohort, out, **kw):
    cfg = dict(llm_name_or_path=str(tiny_llm), dataset=str(cohort.train_csv), eval_dataset=str(cohort.test_csv),
               image_seq_length=6, patches_per_wsi=48, cutoff_len=512, stage="sft", output_dir=str(out),
               per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3, logging_steps=1, report_to="none",
               eval_strategy="steps", eval_steps=2, save_steps=2, seed=7, dataloader_num_workers=0,
               disable_tqdm=True)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def stage2(tiny_llm, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    cfg = write_config(out / "stage2.yaml", **base_cfg(tiny_llm, cohort, out / "run", finetuning_type="full",
                                                       freeze_language_model=True, gamma_min=1.2, gamma_max=1.8,
                                                       bf16=True, warmup_ratio=0.1, plot_loss=True,
                                                       mm_use_im_start_end=False))
    assert cli(["train", str(cfg)]) == 0
    return out / "run"


def test_stage2_outputs_and_only_projector_changed(stage2, tiny_llm):
    for name in ("config.json", "model.safetensors", "projector.safetensors", "tokenizer.json",
                 "train_config.yaml", "log_history.json", "training_loss.png"):
        assert (stage2 / name).exists(), name
    trained = load_file(stage2 / "model.safetensors")
    assert [k for k in trained if k.startswith("language_model.")] == []  # only what trains is saved
    lm = load_wsi_llava(stage2)[0].language_model.state_dict()  # rebuilt from the base LM
    base = load_file(Path(tiny_llm) / "model.safetensors")
    for k, v in base.items():
        assert torch.equal(lm[k][: v.shape[0]], v), k  # embeddings: the base rows (resized for <image>)
    proj = load_file(stage2 / "projector.safetensors")
    assert set(proj) >= {"multi_modal_projector.linear_1.weight", "multi_modal_projector.gamma_logit"}
    history = json.loads((stage2 / "log_history.json").read_text())
    assert any("eval_loss" in h for h in history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)


def test_stage3_lora_from_stage2_projector_then_chat_and_predict(stage2, tiny_llm, cohort, tmp_path, capsys):
    cfg = write_config(tmp_path / "stage3.yaml", **base_cfg(
        tiny_llm, cohort, tmp_path / "run", finetuning_type="lora", gamma_min=1.8, gamma_max=1.9,
        lora_target=["q_proj", "v_proj", "linear_1", "linear_2"], lora_rank=4, lora_alpha=8,
        loraplus_lr_ratio=10.0, do_sanity_check=True, projector_path=str(stage2 / "projector.safetensors"),
        create_new_adapter=True, use_unsloth=False))
    assert cli(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_config.json").exists()
    history = json.loads((run / "log_history.json").read_text())
    sanity = [h for h in history if "eval_sanity_check_loss" in h]
    assert sanity and all("eval_loss" in h for h in history if "eval_runtime" in h)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["gamma_min"], saved["gamma_max"]) == (1.2, 1.8)  # stage-2 bounds kept

    slide = str(cohort.slides[-1])
    capsys.readouterr()
    assert cli(["chat", "--model", str(run), "--slide", slide, "--question", "What is the diagnosis?",
                "--max-new-tokens", "5", "--explain"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    explain = json.loads(lines[-1])
    assert len(explain["tile_indices"]) == 6 and len(explain["coords"]) == 6

    preds = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(run), "--data", str(cohort.test_csv), "--out", str(preds),
            "--max-new-tokens", "4", "--batch-size", "3"]
    assert cli(args) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    n_rows = len(cohort.test_csv.read_text().strip().splitlines()) - 1
    assert len(rows) == n_rows and len({r["key"] for r in rows}) == n_rows
    # resume: drop the last two lines (one torn), rerun, exactly one line per row again and same answers
    text = preds.read_text().splitlines()
    preds.write_text("\n".join(text[:-2]) + "\n" + text[-2][:10])
    assert cli(args) == 0
    again = [json.loads(x) for x in preds.read_text().splitlines()]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
    assert {r["key"]: r["prediction"] for r in again} == {r["key"]: r["prediction"] for r in rows}

    # eval --model runs predict (real and zeroed slides) and reports both
    report = tmp_path / "report"
    assert cli(["eval", "--model", str(run), "--data", str(cohort.test_csv), "--out", str(report),
                "--ablate", "zero", "--max-new-tokens", "4", "--bootstrap", "20"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert (report / "predictions_zero.jsonl").exists() and "ablate_zero" in json.dumps(metrics)
    assert metrics["n_closed"] == sum(r["kind"] != "report" and r["kind"] != "vqa" or r["reference"].lower() in ("yes", "no")
                                      for r in rows)


def test_invalid_data_is_refused_or_skipped(tiny_llm, cohort, tmp_path):
    bad = tmp_path / "bad.csv"
    lines = cohort.train_csv.read_text().splitlines()
    root = str(cohort.train_csv.parent) + "/"
    rows = [lines[0]] + [x.replace("slides/", root + "slides/", 1) for x in lines[1:5]]
    bad.write_text("\n".join(rows + [lines[5].replace("slides/", root + "missing/", 1)]) + "\n")
    cfg = base_cfg(tiny_llm, cohort, tmp_path / "run", dataset=str(bad), eval_dataset=None,
                   finetuning_type="full", max_steps=1, eval_strategy="no")
    with pytest.raises(ValueError, match="bad.csv.*line 6"):
        cli(["--debug", "train", str(write_config(tmp_path / "c.yaml", **cfg))])
    cfg["skip_invalid"] = True
    assert cli(["train", str(write_config(tmp_path / "c.yaml", **cfg))]) == 0
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert skipped and all(s["row"] == 6 for s in skipped)


def test_sanity_check_loss_is_above_eval_loss_once_the_model_reads_the_slide(tiny_llm, tmp_path):
    """On a cohort where every tile carries the diagnosis, 60 steps teach the tiny LM to answer the
    multiple-choice question from the slide: the eval loss drops below what the text alone allows
    (ln 4 on the letter, ~0 on the end token: ln(4) / 2) and zeroing the slides costs clearly more."""
    easy = make_cohort(tmp_path / "easy", SynthConfig(n_train=12, n_test=4, feature_dim=16, min_tiles=8, max_tiles=12,
                                                       signal_fraction=1.0, signal_strength=10.0,
                                                       question_kinds=("mc",), seed=3))
    cfg = write_config(tmp_path / "sft.yaml", **base_cfg(
        tiny_llm, easy, tmp_path / "run", finetuning_type="full", freeze_language_model=False, do_sanity_check=True,
        per_device_train_batch_size=8, max_steps=60, learning_rate=1e-2, logging_steps=10, eval_steps=60,
        save_strategy="no", seed=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: faster, and the same arithmetic on every machine
    try:
        assert cli(["train", str(cfg)]) == 0
    finally:
        torch.set_num_threads(threads)
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    real = [h["eval_loss"] for h in history if "eval_loss" in h]
    zeroed = [h["eval_sanity_check_loss"] for h in history if "eval_sanity_check_loss" in h]
    assert len(real) == len(zeroed) == 1
    assert real[0] < 0.6, real  # below the text-only floor ln(4) / 2 = 0.69: the answer comes from the slide
    assert zeroed[0] > real[0] + 0.1, (real, zeroed)  # and without the slide the model does clearly worse


def test_ddp_two_processes(tiny_llm, cohort, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) runs the same config unchanged, and the ranks stay in
    lockstep: after the steps every trainable tensor moved and is bit-identical on both ranks."""
    cfg = write_config(tmp_path / "ddp.yaml", **base_cfg(tiny_llm, cohort, tmp_path / "run", finetuning_type="full",
                                                          max_steps=2, eval_strategy="no", save_strategy="no"))
    # ddp_probe (this folder) runs the CLI with a callback that writes each rank's trainable weights
    here = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ddp_probe", str(tmp_path / "ranks"), "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "projector.safetensors").exists()
    assert "training on 2 process(es)" in proc.stderr
    from ddp_probe import load_dumps

    (begin0, begin1), (end0, end1) = load_dumps(tmp_path / "ranks", 2)
    assert end0.keys() == end1.keys() == begin0.keys() == begin1.keys()
    assert any(k.startswith("multi_modal_projector.") for k in end0)
    assert [k for k in end0 if not torch.equal(end0[k], end1[k])] == []
    # every trainable tensor moved, except the projector's gamma: gamma_min == gamma_max (1.0) fixes it
    assert [k for k in end0 if torch.equal(end0[k], begin0[k])] == ["multi_modal_projector.gamma_logit"]
    proj = load_file(tmp_path / "run" / "projector.safetensors")  # rank 0 wrote what rank 1 ended with
    assert proj and [k for k in proj if not torch.equal(proj[k], end1[k])] == []
