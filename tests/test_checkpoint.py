"""Crash-safe checkpoints: SIGKILL mid-save then exact resume, disk full, rotation, corrupt checkpoints."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from wsi_llava.cli import main as cli
from wsi_llava.train import checkpoint as ck
from wsi_llava.train.checkpoint import CheckpointError

pytestmark = pytest.mark.timeout(240)


def train_cfg(tiny_llm, cohort, out: Path, **kw) -> dict:
    """Stage-2 run, 6 steps, a checkpoint every 2, projector dropout on (so the RNG state matters),
    evaluation at every checkpoint with a best checkpoint tracked (``greater_is_better`` on the loss
    only so that the best one is usually an old one, which rotation must keep)."""
    cfg = dict(llm_name_or_path=str(tiny_llm), dataset=str(cohort.train_csv), eval_dataset=str(cohort.test_csv),
               eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
               greater_is_better=True, image_seq_length=6, patches_per_wsi=32,
               cutoff_len=512, stage="sft", output_dir=str(out), per_device_train_batch_size=2, max_steps=6,
               learning_rate=5e-3, logging_steps=1, report_to="none", save_steps=2, save_total_limit=2, seed=7,
               dataloader_num_workers=0, disable_tqdm=True, finetuning_type="full", freeze_language_model=True,
               projector_dropout=0.3)
    cfg.update(kw)
    return cfg


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def losses(out: Path) -> list[tuple[int, str, float]]:
    """(step, "loss" | "eval_loss", value) of every logged training and evaluation loss."""
    history = json.loads((out / "log_history.json").read_text())
    return [(h["step"], k, h[k]) for h in history for k in ("loss", "eval_loss") if k in h]


def names(run: Path) -> list[str]:
    return [p.name for p in ck.list_checkpoints(run)]


@pytest.fixture(scope="module")
def reference(tiny_llm, cohort, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    assert cli(["train", str(write_cfg(root / "c.yaml", train_cfg(tiny_llm, cohort, root / "run")))]) == 0
    return root / "run"


def kept(run: Path) -> list[str]:
    """What rotation with save_total_limit 2 must leave: the newest complete checkpoint and the best one
    (plus the next newest when the best is the newest)."""
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == run and best.name == f"checkpoint-{state['best_global_step']}"  # the published folder
    return sorted({"checkpoint-6", best.name} | ({"checkpoint-4"} if best.name == "checkpoint-6" else set()),
                  key=lambda n: int(n.split("-")[1]))


def test_reference_run_layout(reference):
    assert names(reference) == kept(reference)
    assert not (reference / ck.STAGING_DIR).exists()
    for name in names(reference):
        manifest = ck.verify_checkpoint(reference / name)
        assert manifest["step"] == int(name.split("-")[1])
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= set(manifest["files"])
    assert [s for s, k, _ in losses(reference) if k == "loss"] == [1, 2, 3, 4, 5, 6]
    assert [s for s, k, _ in losses(reference) if k == "eval_loss"] == [2, 4, 6]


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import wsi_llava.train.checkpoint as ck

    real = ck.write_manifest

    def write_manifest_then_die(folder, step):
        if step == 4:  # every file of checkpoint-4 is staged; die while its manifest is half written
            (Path(folder) / ck.MANIFEST_NAME).write_text('{"format": "wsi-llava-checkpoint", "step": 4, "fil')
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, step)

    ck.write_manifest = write_manifest_then_die
    from wsi_llava.cli import main
    sys.exit(main(["train", sys.argv[1]]))
""")


def test_sigkill_during_save_then_resume_matches_uninterrupted(reference, tiny_llm, cohort, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = train_cfg(tiny_llm, cohort, run)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(write_cfg(tmp_path / "c.yaml", cfg))],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert names(run) == ["checkpoint-2", "checkpoint-4"]  # every file of checkpoint-4 written ...
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        ck.read_manifest(run / "checkpoint-4")  # ... but never committed
    assert ck.find_resume_checkpoint(run) == run / "checkpoint-2"
    ck.verify_checkpoint(run / "checkpoint-2")

    caplog.set_level(logging.INFO)
    cfg["resume_from_checkpoint"] = True
    assert cli(["train", str(write_cfg(tmp_path / "c.yaml", cfg))]) == 0
    assert f"resuming from {run / 'checkpoint-2'}" in caplog.text
    assert f"removing {run / 'checkpoint-4'}: its save never committed" in caplog.text
    assert names(run) == kept(run) == kept(reference)
    assert not (run / ck.STAGING_DIR).exists()
    # the resumed run's per-step losses are exactly those of the uninterrupted run (same seed)
    assert losses(run) == losses(reference)
    for name in names(run):
        ck.verify_checkpoint(run / name)


def test_disk_full_during_save_keeps_previous_checkpoint(tiny_llm, cohort, tmp_path, monkeypatch):
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    run = tmp_path / "run"
    cfg = train_cfg(tiny_llm, cohort, run, max_steps=4)
    with pytest.raises(CheckpointError) as info:
        cli(["--debug", "train", str(write_cfg(tmp_path / "c.yaml", cfg))])
    msg = str(info.value)
    assert "step 4" in msg and "disk full" in msg
    assert f"to {run / 'checkpoint-4'}:" in msg
    assert f"last good checkpoint is {run / 'checkpoint-2'}" in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert names(run) == ["checkpoint-2"]
    assert not (run / ck.STAGING_DIR).exists()  # the partial folder was removed
    ck.verify_checkpoint(run / "checkpoint-2")


# ----------------------------------------------------------------------------------- unit level
def fake_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step]) * 100)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    if complete:
        ck.write_manifest(folder, step)
    return folder


def test_rotation_keeps_newest_complete_and_best(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 7, complete=False)  # an incomplete folder: neither counted nor deleted
    removed = ck.rotate_checkpoints(run, 2, protect=[str(run / "checkpoint-1")])
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert names(run) == ["checkpoint-1", "checkpoint-5", "checkpoint-7"]
    assert not (run / ck.STAGING_DIR).exists()
    # limit 1 with a best checkpoint: the newest complete one (5) stays too
    fake_checkpoint(run, 6)
    ck.rotate_checkpoints(run, 1, protect=[run / "checkpoint-1"])
    assert names(run) == ["checkpoint-1", "checkpoint-6", "checkpoint-7"]
    ck.rotate_checkpoints(run, 1)
    assert names(run) == ["checkpoint-6", "checkpoint-7"]
    assert ck.rotate_checkpoints(run, None) == [] and ck.rotate_checkpoints(run, 0) == []


def test_uncommitted_folders_are_removed_committed_ones_kept(tmp_path, caplog):
    run = tmp_path / "run"
    fake_checkpoint(run, 2)
    fake_checkpoint(run, 4, complete=False)  # killed before its commit
    torn = fake_checkpoint(run, 6, complete=False)
    (torn / ck.MANIFEST_NAME).write_text('{"format": "wsi-llava-checkpoint", "st')  # torn manifest
    corrupt = fake_checkpoint(run, 8)
    (corrupt / "optimizer.pt").write_bytes(b"changed")  # committed, then damaged: resume skips it, it stays
    with caplog.at_level(logging.WARNING):
        assert ck.remove_uncommitted(run) == ["checkpoint-4", "checkpoint-6"]
    assert "checkpoint-4: its save never committed" in caplog.text
    assert names(run) == ["checkpoint-2", "checkpoint-8"] and not (run / ck.STAGING_DIR).exists()
    assert ck.find_resume_checkpoint(run) == run / "checkpoint-2"


def test_trainers_override_no_private_trainer_method():
    """Crash safety through public hooks only: no underscore method of ``Trainer`` is overridden."""
    from transformers import Trainer

    from wsi_llava.train.contrastive import ContrastiveTrainer
    from wsi_llava.train.trainer import CrashSafeCheckpoints, WsiTrainer

    for cls in (CrashSafeCheckpoints, WsiTrainer, ContrastiveTrainer):
        private = [n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)]
        assert private == [], f"{cls.__name__} overrides {private}"
    assert "_save_checkpoint" not in vars(CrashSafeCheckpoints)


def test_corrupt_or_incomplete_checkpoints_are_skipped_on_resume(reference, tmp_path, caplog):
    run = tmp_path / "run"
    for name in names(reference):
        shutil.copytree(reference / name, run / name)
    assert ck.find_resume_checkpoint(run) == run / "checkpoint-6"
    older = names(run)[0]

    # flip one byte of the newest checkpoint's optimizer state: same size, different sha256
    opt = run / "checkpoint-6" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    # and a newer folder without a manifest (as a crash in an in-place writer leaves it)
    fake_checkpoint(run, 8, complete=False)
    caplog.set_level(logging.INFO)
    assert ck.resolve_resume(True, run) == str(run / older)
    assert "skipping checkpoint" in caplog.text and "checkpoint-8" in caplog.text
    assert "optimizer.pt: sha256 differs" in caplog.text

    with pytest.raises(CheckpointError, match=r"checkpoint-6 cannot be resumed from: .*optimizer.pt: sha256 differs"):
        ck.resolve_resume(str(run / "checkpoint-6"), run)
    with pytest.raises(CheckpointError, match=r"checkpoint-8 cannot be resumed from: .*no checkpoint.json"):
        ck.resolve_resume(str(run / "checkpoint-8"), run)

    # truncated, extra and missing files are each refused with their own message
    sched = run / older / "scheduler.pt"
    sched.write_bytes(sched.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"scheduler.pt: size .* \(truncated"):
        ck.verify_checkpoint(run / older)
    (run / "checkpoint-8" / "extra.bin").write_bytes(b"x")
    ck.write_manifest(run / "checkpoint-8", 8)
    (run / "checkpoint-8" / "intruder.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not listed in checkpoint.json: \['intruder.pt'\]"):
        ck.verify_checkpoint(run / "checkpoint-8")
    (run / "checkpoint-8" / "intruder.pt").unlink()
    (run / "checkpoint-8" / "extra.bin").unlink()
    with pytest.raises(CheckpointError, match=r"missing: \['extra.bin'\]"):
        ck.verify_checkpoint(run / "checkpoint-8")
    assert ck.resolve_resume(True, run) is None  # nothing usable left
    assert "starting fresh" in caplog.text


def test_resume_true_without_checkpoints_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert ck.resolve_resume(True, tmp_path / "absent") is None
    assert "starting fresh" in caplog.text
    for off in (None, False, "false", ""):
        assert ck.resolve_resume(off, tmp_path) is None
    with pytest.raises(CheckpointError, match="not a folder"):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_staging_leftovers_are_cleaned(tmp_path, caplog):
    (tmp_path / ck.STAGING_DIR / "checkpoint-9").mkdir(parents=True)
    (tmp_path / ck.STAGING_DIR / "checkpoint-9" / "optimizer.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert ck.clean_staging(tmp_path) == ["checkpoint-9"]
    assert not (tmp_path / ck.STAGING_DIR).exists() and "checkpoint-9" in caplog.text
    assert ck.clean_staging(tmp_path) == []


def test_commit_callback_replaces_a_step_saved_again_then_commits_and_rotates(tmp_path):
    """The callback alone (no training): a committed folder of the step about to be saved is removed
    before the ``Trainer`` writes into it; ``on_save`` commits the new folder, then rotates."""
    from types import SimpleNamespace

    from wsi_llava.train.trainer import CommitCheckpoints

    run = tmp_path / "run"
    for step in (2, 4, 6):
        fake_checkpoint(run, step)
    (run / "checkpoint-6" / "stale.bin").write_bytes(b"old")
    barriers = []
    trainer = SimpleNamespace(accelerator=SimpleNamespace(wait_for_everyone=lambda: barriers.append(1)))
    cb = CommitCheckpoints(trainer, checkpoint_limit=2)
    args = SimpleNamespace(output_dir=str(run), should_save=True)
    state = SimpleNamespace(global_step=6, best_model_checkpoint=str(run / "checkpoint-2"))
    cb.before_save(args, state, run)  # the final save into the run folder, not a checkpoint
    assert names(run) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # not a save step: untouched
    cb.before_save(args, state, run / "checkpoint-6")  # the step's checkpoint, whatever the save strategy
    assert names(run) == ["checkpoint-2", "checkpoint-4"]
    fake_checkpoint(run, 6, complete=False)  # what the Trainer writes
    assert not ck.is_complete(run / "checkpoint-6")
    cb.on_save(args, state, SimpleNamespace(should_save=True))
    assert ck.verify_checkpoint(run / "checkpoint-6")["step"] == 6  # committed, without the stale file
    assert names(run) == ["checkpoint-2", "checkpoint-6"]  # rotated after the commit: newest and best kept
    assert len(barriers) == 3
