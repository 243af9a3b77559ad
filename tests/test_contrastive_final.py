"""Stage 1 (``stage: contrastive``): a finished run is final, as in stages 2 and 3 — a rerun with
``resume_from_checkpoint: true`` changes nothing; what a kill during the final save leaves behind is
finished from the last checkpoint without training; a full disk in the final save says so and leaves
no temporary files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from wsi_llava.cli import main as cli
from wsi_llava.model.export import saved_tower_config
from wsi_llava.tiny import build_tiny_text_encoder
from wsi_llava.train import checkpoint as ck
from wsi_llava.train import final

pytestmark = pytest.mark.timeout(300)

ENC = dict(embed_dim=32, depth=2, num_heads=4, segment_lengths=[32, 64], dilations=[1, 2])
FINAL_FILES = {"model.safetensors", "tower.safetensors", "train_config.yaml", "log_history.json", "metrics.json"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"))


def stage1_cfg(cohort, text_encoder, out: Path, **kw) -> dict:
    """Stage 1, 4 steps, a checkpoint and an evaluation every 2, resume on (as one would leave it)."""
    cfg = dict(stage="contrastive", text_model_name_or_path=str(text_encoder), dataset=str(cohort.train_csv),
               eval_dataset=str(cohort.test_csv), vision_config=ENC, freeze_vision_tower=False, projection_dim=16,
               patches_per_wsi=32, output_dir=str(out), per_device_train_batch_size=6, per_device_eval_batch_size=4,
               max_steps=4, learning_rate=5e-3, logging_steps=1, eval_strategy="steps", eval_steps=2, save_steps=2,
               seed=1, dataloader_num_workers=0, disable_tqdm=True, report_to="none", resume_from_checkpoint=True)
    cfg.update(kw)
    return cfg


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tree(run: Path) -> dict[str, str]:
    """Every file and folder under ``run`` → sha256 of its bytes (folders: "dir")."""
    return {p.relative_to(run).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))}


def train_steps(run: Path) -> list[int]:
    return [h["step"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def finished(cohort, text_encoder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1_finished")
    assert cli(["train", str(write_cfg(root / "c.yaml", stage1_cfg(cohort, text_encoder, root / "run")))]) == 0
    return root / "run"


def test_a_finished_stage1_run_has_a_marker(finished):
    marker = json.loads((finished / final.MARKER_NAME).read_text())
    assert marker["format"] == final.MARKER_FORMAT and marker["step"] == 4 and marker["max_steps"] == 4
    assert set(marker["files"]) == FINAL_FILES
    for rel, info in marker["files"].items():
        assert ck.sha256_file(finished / rel) == info["sha256"]
    assert marker["config"]["stage"] == "contrastive" and "output_dir" not in marker["config"]
    assert train_steps(finished) == [1, 2, 3, 4]
    assert [p.name for p in ck.list_checkpoints(finished)] == ["checkpoint-2", "checkpoint-4"]
    assert not (finished / final.FINAL_TMP).exists() and not list(finished.glob(".*.tmp"))
    assert (finished / "contrastive_config.json").is_file()


def test_rerunning_a_finished_stage1_run_changes_nothing(finished, cohort, text_encoder, tmp_path, caplog, capsys):
    before = tree(finished)
    cfg = write_cfg(tmp_path / "c.yaml", stage1_cfg(cohort, text_encoder, finished))
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert cli(["train", str(cfg)]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("wsi_llava") and r.levelno >= logging.INFO]
    assert len(messages) == 1 and "run already complete" in messages[0] and "nothing to do" in messages[0], messages
    assert capsys.readouterr().out.strip() == f"already complete: {finished} (nothing to do)"
    assert tree(finished) == before  # weights, logs, checkpoints: byte-identical, nothing added
    caplog.clear()
    assert cli(["train", str(cfg), "resume_from_checkpoint=yes", "dataloader_num_workers=1", "save_total_limit=1"]) == 0
    assert "nothing to do" in caplog.text and tree(finished) == before
    assert capsys.readouterr().out.startswith("already complete: ")


def _partial_final_save(run: Path) -> None:
    """Killed while writing the final model: part of it in .final.tmp, nothing moved, no marker."""
    (run / final.FINAL_TMP).mkdir()
    (run / final.FINAL_TMP / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    for name in FINAL_FILES | {final.MARKER_NAME}:
        (run / name).unlink()


def _files_moved_no_marker(run: Path) -> None:
    """Killed after every final file was moved into place, before the marker was written."""
    (run / final.MARKER_NAME).unlink()


def _half_moved(run: Path) -> None:
    """Killed while moving the final files into place: some moved, the rest still in .final.tmp."""
    (run / final.FINAL_TMP).mkdir()
    for name in ("tower.safetensors", "metrics.json"):
        shutil.move(run / name, run / final.FINAL_TMP / name)
    (run / final.MARKER_NAME).unlink()


@pytest.mark.parametrize("killed", [_partial_final_save, _files_moved_no_marker, _half_moved])
def test_a_kill_during_the_final_save_is_finished_without_training(finished, cohort, text_encoder, tmp_path, caplog,
                                                                   capsys, killed):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    killed(run)
    path = write_cfg(tmp_path / "c.yaml", stage1_cfg(cohort, text_encoder, run))
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert cli(["train", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"saved to {run}"
    assert "is the end of training (step 4 of 4)" in caplog.text
    assert [p.name for p in ck.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-5
    assert not (run / final.FINAL_TMP).exists() and not list(run.glob(".*.tmp"))
    marker = json.loads((run / final.MARKER_NAME).read_text())
    assert marker["step"] == 4 and set(marker["files"]) == FINAL_FILES
    assert train_steps(run) == [1, 2, 3, 4]
    # exactly the final model and metrics of the uninterrupted run
    same_weights(run / "model.safetensors", finished / "model.safetensors")
    same_weights(run / "model.safetensors", finished / "checkpoint-4" / "model.safetensors")
    same_weights(run / "tower.safetensors", finished / "tower.safetensors")  # (metadata order is not fixed)
    assert saved_tower_config(run / "tower.safetensors") == saved_tower_config(finished / "tower.safetensors")
    m, m0 = json.loads((run / "metrics.json").read_text()), json.loads((finished / "metrics.json").read_text())
    assert m["retrieval"] == pytest.approx(m0["retrieval"]) and m["chance"] == m0["chance"]
    assert m["step"] == 4 and m["history"] == m0["history"]  # the step-4 evaluation is not logged twice
    # and the finished run is final in turn
    before = tree(run)
    caplog.clear()
    assert cli(["train", str(path)]) == 0
    assert "nothing to do" in caplog.text and tree(run) == before
    assert capsys.readouterr().out.startswith("already complete: ")


def test_a_larger_max_steps_continues_stage1(finished, cohort, text_encoder, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    caplog.set_level(logging.INFO)
    assert cli(["train", str(write_cfg(tmp_path / "c.yaml", stage1_cfg(cohort, text_encoder, run, max_steps=6)))]) == 0
    assert f"resuming from {run / 'checkpoint-4'}" in caplog.text
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / final.MARKER_NAME).read_text())["step"] == 6


# ------------------------------------------------------------------------------------ disk full
@pytest.fixture()
def tiny_disk(small_tmpfs):
    """A 1 MiB tmpfs (a real full disk)."""
    return small_tmpfs("1m")


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` but ``leave`` bytes."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_full_disk_in_the_stage1_final_save_says_so(tiny_disk, cohort, text_encoder, tmp_path, capsys):
    run = tiny_disk / "run"
    fill(tiny_disk, 48 * 1024)  # room for contrastive_config.json, not for the final weights
    cfg = write_cfg(tmp_path / "c.yaml", stage1_cfg(cohort, text_encoder, run, save_strategy="no", max_steps=1,
                                                    resume_from_checkpoint=False))
    capsys.readouterr()
    assert cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "disk full while writing" in err and str(run / final.FINAL_TMP) in err, err
    assert sorted(p.name for p in run.iterdir()) == ["contrastive_config.json"]  # no .final.tmp, no temp file
