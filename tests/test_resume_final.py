"""A finished run is final: a rerun with ``resume_from_checkpoint: true`` changes nothing; a kill during
the final save resumes into finishing the save (never into more steps); a full disk during the final
save says so and leaves no temporary folder."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wsi_llava.cli import main as cli
from wsi_llava.config import load_config
from wsi_llava.train import checkpoint as ck
from wsi_llava.train import final
from wsi_llava.train.checkpoint import CheckpointError

pytestmark = pytest.mark.timeout(300)


def train_cfg(tiny_llm, cohort, out: Path, **kw) -> dict:
    """Stage 2, 4 steps, a checkpoint every 2, resume on (as one would leave it), no evaluation."""
    cfg = dict(llm_name_or_path=str(tiny_llm), dataset=str(cohort.train_csv), image_seq_length=6, patches_per_wsi=32,
               cutoff_len=512, stage="sft", output_dir=str(out), per_device_train_batch_size=2, max_steps=4,
               learning_rate=5e-3, logging_steps=1, report_to="none", save_steps=2, seed=7, dataloader_num_workers=0,
               disable_tqdm=True, finetuning_type="full", freeze_language_model=True, projector_dropout=0.3,
               plot_loss=True, resume_from_checkpoint=True)
    cfg.update(kw)
    return cfg


def with_eval(cfg: dict, cohort) -> dict:
    """The same run evaluated at every checkpoint, ending on the best checkpoint's weights."""
    return {**cfg, "eval_dataset": str(cohort.test_csv), "eval_strategy": "steps", "eval_steps": 2,
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": True}


def write_cfg(path: Path, cfg: dict) -> Path:
    import yaml

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


def package_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("wsi_llava") and r.levelno >= logging.INFO]


@pytest.fixture(scope="module")
def finished(tiny_llm, cohort, tmp_path_factory) -> Path:
    """A run that went to the end (4 steps) with resume_from_checkpoint: true."""
    root = tmp_path_factory.mktemp("finished")
    assert cli(["train", str(write_cfg(root / "c.yaml", train_cfg(tiny_llm, cohort, root / "run")))]) == 0
    return root / "run"


def test_a_finished_run_has_a_marker(finished):
    marker = json.loads((finished / final.MARKER_NAME).read_text())
    assert marker["format"] == final.MARKER_FORMAT and marker["step"] == 4 and marker["max_steps"] == 4
    assert {"model.safetensors", "projector.safetensors", "log_history.json", "training_loss.png",
            "train_config.yaml"} <= set(marker["files"])
    for rel, info in marker["files"].items():
        assert (finished / rel).stat().st_size == info["size"]
        assert ck.sha256_file(finished / rel) == info["sha256"]
    assert "output_dir" not in marker["config"] and "resume_from_checkpoint" not in marker["config"]
    assert marker["config"]["max_steps"] == 4
    assert train_steps(finished) == [1, 2, 3, 4]
    assert not (finished / final.FINAL_TMP).exists()


def test_rerunning_a_finished_run_changes_nothing(finished, tiny_llm, cohort, tmp_path, caplog):
    before = tree(finished)
    cfg = write_cfg(tmp_path / "c.yaml", train_cfg(tiny_llm, cohort, finished))
    caplog.set_level(logging.INFO)
    assert cli(["train", str(cfg)]) == 0
    messages = package_records(caplog)
    assert len(messages) == 1 and "run already complete" in messages[0] and "nothing to do" in messages[0], messages
    assert tree(finished) == before  # weights, logs, checkpoints: byte-identical, nothing added
    # the same from the command line, with settings that cannot change the result
    caplog.clear()
    assert cli(["train", str(cfg), "resume_from_checkpoint=yes", "dataloader_num_workers=1", "disable_tqdm=false",
                "save_total_limit=1"]) == 0
    assert "nothing to do" in caplog.text and "checkpoint-5" not in caplog.text
    assert tree(finished) == before


def test_a_larger_max_steps_continues_training(finished, tiny_llm, cohort, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    caplog.set_level(logging.INFO)
    assert cli(["train", str(write_cfg(tmp_path / "c.yaml", train_cfg(tiny_llm, cohort, run, max_steps=6)))]) == 0
    assert f"resuming from {run / 'checkpoint-4'}" in caplog.text
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / final.MARKER_NAME).read_text())["step"] == 6
    assert [p.name for p in ck.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    same_weights(run / "model.safetensors", run / "checkpoint-6" / "model.safetensors")
    # and that run is final in turn
    before = tree(run)
    caplog.clear()
    assert cli(["train", str(tmp_path / "c.yaml")]) == 0
    assert "nothing to do" in caplog.text and tree(run) == before


def test_a_final_model_changed_after_the_run_is_written_again(finished, tiny_llm, cohort, tmp_path, caplog):
    """A marker whose files no longer match (here: the final weights truncated) is not trusted: the rerun
    writes the final model again from the last checkpoint, without training."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    caplog.set_level(logging.INFO)
    assert cli(["train", str(write_cfg(tmp_path / "c.yaml", train_cfg(tiny_llm, cohort, run)))]) == 0
    assert "changed size" in caplog.text and "is the end of training (step 4 of 4)" in caplog.text
    same_weights(weights, finished / "model.safetensors")
    assert [p.name for p in ck.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((run / final.MARKER_NAME).read_text())["step"] == 4


def test_resume_off_starts_fresh_and_replaces_the_marker(finished, tiny_llm, cohort, tmp_path):
    """Without resume a rerun trains from scratch (as asked); the old marker goes first."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = train_cfg(tiny_llm, cohort, run, resume_from_checkpoint=False, max_steps=2)
    assert cli(["train", str(write_cfg(tmp_path / "c.yaml", cfg))]) == 0
    assert json.loads((run / final.MARKER_NAME).read_text())["step"] == 2
    assert train_steps(run) == [1, 2]


CHILD = textwrap.dedent("""
    import os, signal, sys
    import wsi_llava.train.final as final
    import wsi_llava.train.run as run

    where = sys.argv[2]
    if where == "projector":  # the model and tokenizer are in .final.tmp; die while writing the projector
        def save_projector_then_die(model, path):
            open(path, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        run.save_projector = save_projector_then_die
    else:  # every file is in place; die before the marker is written
        def write_marker_then_die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        final.write_marker = write_marker_then_die
    from wsi_llava.cli import main
    sys.exit(main(["train", sys.argv[1]]))
""")


@pytest.mark.parametrize("where,evaluate", [("projector", False), ("marker", True)])
def test_kill_during_the_final_save_then_rerun_finishes_the_save(finished, tiny_llm, cohort, tmp_path, caplog,
                                                                 where, evaluate):
    run = tmp_path / "run"
    cfg = train_cfg(tiny_llm, cohort, run)
    if evaluate:
        cfg = with_eval(cfg, cohort)
    path = write_cfg(tmp_path / "c.yaml", cfg)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), where], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (run / final.MARKER_NAME).exists()
    assert (run / final.FINAL_TMP).exists() == (where == "projector")
    assert "checkpoint-4" in [p.name for p in ck.list_checkpoints(run)]

    caplog.set_level(logging.INFO)
    assert cli(["train", str(path)]) == 0
    assert "is the end of training (step 4 of 4)" in caplog.text
    assert [p.name for p in ck.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-5
    assert not (run / final.FINAL_TMP).exists() and not (run / ck.STAGING_DIR).exists()
    assert json.loads((run / final.MARKER_NAME).read_text())["step"] == 4
    assert train_steps(run) == [1, 2, 3, 4]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    if evaluate:  # the end of training loads the best checkpoint's weights; so does finishing the save
        weights = Path(state["best_model_checkpoint"]) / "model.safetensors"
        assert f"writing the final model from {Path(state['best_model_checkpoint'])}" in caplog.text
    else:  # exactly the final model of the uninterrupted run
        weights = run / "checkpoint-4" / "model.safetensors"
        same_weights(run / "model.safetensors", finished / "model.safetensors")
        assert (run / "projector.safetensors").read_bytes() == (finished / "projector.safetensors").read_bytes()
    same_weights(run / "model.safetensors", weights)

    before = tree(run)
    caplog.clear()
    assert cli(["train", str(path)]) == 0
    assert "nothing to do" in caplog.text and tree(run) == before


# ------------------------------------------------------------------------------------ disk full
@pytest.fixture()
def tiny_disk(small_tmpfs):
    """A 256 KiB tmpfs (a real full disk); the simulated disk-full tests run everywhere."""
    return small_tmpfs("256k")


@pytest.mark.parametrize("writer", ["torch", "safetensors", "python"])
def test_a_full_disk_in_the_final_save_says_so_and_leaves_no_temp_folder(tiny_disk, writer):
    out = tiny_disk / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous final model")
    big = {"w": torch.zeros(200_000)}  # 800 KB: more than the disk holds

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        if writer == "torch":
            torch.save(big, tmp / "optimizer.pt")  # RuntimeError: [enforce fail at inline_container.cc…]
        elif writer == "safetensors":
            from safetensors.torch import save_file

            save_file(big, str(tmp / "model.safetensors"))
        else:
            (tmp / "log_history.json").write_bytes(b"x" * 800_000)

    with pytest.raises(CheckpointError) as info:
        final.publish_final(out, write)
    msg = str(info.value)
    assert "disk full while writing" in msg and str(out / final.FINAL_TMP) in msg, msg
    assert not (out / final.FINAL_TMP).exists()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous final model"


def test_disk_full_detection_without_a_real_full_disk(tmp_path, monkeypatch):
    from wsi_llava import fileio

    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.pt"))
    assert fileio.write_error_text(enospc, tmp_path).startswith(f"disk full while writing {tmp_path / 'a.pt'}")
    assert fileio.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device "
                                            "(os error 28)"), tmp_path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not fileio.is_disk_full(torch_error, tmp_path)  # plenty of space here: not called a full disk
    assert not fileio.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 4096)
    assert fileio.is_disk_full(torch_error, tmp_path)
    assert fileio.write_error_text(torch_error, tmp_path / "x").startswith(f"disk full while writing {tmp_path / 'x'}")


def test_enospc_in_the_final_save_then_rerun_finishes(finished, tiny_llm, cohort, tmp_path, monkeypatch, caplog):
    """The final save fails on a full disk (checkpoints are complete): a clear error, no .final.tmp,
    no marker; after space is freed the rerun writes the final model without training."""
    import wsi_llava.train.run as run_module

    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished / name, run / name)

    def full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "save_projector", full)
    path = write_cfg(tmp_path / "c.yaml", train_cfg(tiny_llm, cohort, run))
    with pytest.raises(CheckpointError, match=r"disk full while writing .*\.final\.tmp/projector\.safetensors"):
        run_module.run_sft(load_config(path))
    assert not (run / final.FINAL_TMP).exists() and not (run / final.MARKER_NAME).exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-4"]

    monkeypatch.undo()
    caplog.set_level(logging.INFO)
    assert cli(["train", str(path)]) == 0
    assert "is the end of training" in caplog.text
    same_weights(run / "model.safetensors", finished / "model.safetensors")
    assert train_steps(run) == [1, 2, 3, 4]
