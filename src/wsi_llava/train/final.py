"""The end of a training run (stages 1, 2 and 3): the final save, the completion marker, and what a rerun does.

A finished run is final. After the final model, ``log_history.json`` and ``training_loss.png`` are
in place, ``OUTPUT/run_complete.json`` is written (through a temporary file, fsynced, renamed):

```json
{"format": "wsi-llava-run-complete", "version": 1, "step": 4, "max_steps": 4, "created": "…",
 "config_sha256": "…", "config": {…}, "files": {"model.safetensors": {"size": 485308, "sha256": "…"}, …}}
```

``config`` is the run's config without the keys that cannot change the result
(:data:`NOT_IN_IDENTITY`: ``output_dir``, ``resume_from_checkpoint``, logging and data-loader
settings); ``files`` lists every file the final save wrote. The marker is removed before anything in
the output folder changes (a fresh start, more training, or finishing a save), so it is only ever
present beside a complete final model.

What ``resume_from_checkpoint`` (true or a path) does, in order (:func:`wsi_llava.train.run.run_sft`;
:func:`wsi_llava.train.contrastive.run_contrastive` for stage 1, whose final files are ``model.safetensors``,
``tower.safetensors``, ``train_config.yaml``, ``log_history.json`` and ``metrics.json``):

1. the marker is present, its files have their recorded sizes and the config is the same → nothing
   to do: one log line, exit 0, nothing read beyond the marker, nothing written;
2. otherwise the newest complete checkpoint is the end of training (its step ≥ the ``max_steps`` the
   current config gives) → with a valid marker (the config changed in a way that leaves nothing to
   train) nothing to do either; without one (the final save was interrupted) the final model is
   written from that checkpoint (the best checkpoint's weights with ``load_best_model_at_end``, as
   at the end of training) without training a step;
3. otherwise training continues from the checkpoint (e.g. after raising ``max_steps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..fileio import write_error_text
from .checkpoint import (
    CheckpointError,
    fsync_dir,
    fsync_file,
    resume_requested,
    sha256_file,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)

MARKER_NAME = "run_complete.json"
"""The completion marker in the output folder."""
MARKER_FORMAT = "wsi-llava-run-complete"
MARKER_VERSION = 1
FINAL_TMP = ".final.tmp"
"""Folder under the output folder where the final model is written before being moved into place."""
NOT_IN_IDENTITY = frozenset({
    "output_dir", "resume_from_checkpoint", "logging_dir", "run_name", "report_to", "disable_tqdm",
    "log_level", "log_level_replica", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_pin_memory", "save_total_limit",
})
"""Config keys that cannot change a run's result; changing them does not make a finished run unfinished."""


def config_identity(dump: dict) -> dict:
    """The config of a run as stored in the marker: ``dump`` without :data:`NOT_IN_IDENTITY`, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in dump.items() if k not in NOT_IN_IDENTITY}, sort_keys=True,
                                 default=str))


def config_sha256(identity: dict) -> str:
    """sha256 of the canonical JSON of a :func:`config_identity`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def config_changes(old: dict, new: dict, limit: int = 5) -> str:
    """``max_steps: 4 → 6, learning_rate: …`` for the keys that differ (at most ``limit`` shown)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------
# the marker
# ---------------------------------------------------------------------------------------------
def read_marker(out_dir: str | os.PathLike) -> dict | None:
    """The marker of ``out_dir`` if it is present, well-formed and every file it lists has its
    recorded size; None otherwise (a broken one is logged)."""
    path = Path(out_dir) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("files"), dict):
            raise ValueError("not a run_complete marker")
        int(marker["step"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        logger.warning("ignoring %s: unreadable (%s)", path, e)
        return None
    for rel, info in marker["files"].items():
        f = Path(out_dir) / rel
        size = f.stat().st_size if f.is_file() else None
        expected = info.get("size") if isinstance(info, dict) else None
        if size != expected:
            logger.warning("ignoring %s: %s %s since the run completed", path, f,
                           "is missing" if size is None else f"changed size ({expected} → {size} bytes)")
            return None
    return marker


def already_final(out_dir: str | os.PathLike, step: int, max_steps: int, identity: dict) -> bool:
    """Whether ``out_dir`` holds the final model of ``step`` already (a valid marker of that step): then there
    is nothing to do, which is logged with the config keys changed since."""
    marker = read_marker(out_dir)
    if marker is None or int(marker["step"]) != step:
        return False
    logger.info("run already complete: %s holds the final model of step %d; nothing left to train (max_steps %d; "
                "config changed since: %s); nothing to do", out_dir, step, max_steps,
                config_changes(marker.get("config", {}), identity) or "nothing that matters")
    return True


def write_marker(out_dir: str | os.PathLike, step: int, max_steps: int, identity: dict, files: list[str]) -> dict:
    """Write ``run_complete.json`` atomically (temporary file, fsync, rename, fsync the folder)."""
    out_dir = Path(out_dir)
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "step": int(step), "max_steps": int(max_steps),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config_sha256": config_sha256(identity), "config": identity,
              "files": {rel: {"size": (out_dir / rel).stat().st_size, "sha256": sha256_file(out_dir / rel)}
                        for rel in sorted(files)}}
    tmp = out_dir / (MARKER_NAME + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / MARKER_NAME)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {out_dir / MARKER_NAME}: {write_error_text(e, tmp)}. The final "
                              "model is in place; rerun with resume_from_checkpoint: true to write the marker "
                              "(the final model is written again from the last checkpoint, nothing is trained)") from e
    fsync_dir(out_dir)
    return marker


def remove_marker(out_dir: str | os.PathLike) -> None:
    """Delete the marker (durably) before anything in ``out_dir`` changes."""
    path = Path(out_dir) / MARKER_NAME
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def marker_stamp(out_dir: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(inode, mtime_ns, size)`` of the marker, None when there is none. Every final save removes the
    marker first and writes a new one last, so a run that leaves the stamp as it was wrote no final
    model: it was already complete (what ``wsi-llava train`` prints)."""
    try:
        st = (Path(out_dir) / MARKER_NAME).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def finished_run(out_dir: str | os.PathLike, identity: dict) -> dict | None:
    """The valid marker of ``out_dir`` when it was written for the same config (rule 1), else None."""
    marker = read_marker(out_dir)
    if marker is not None and marker.get("config_sha256") == config_sha256(identity):
        return marker
    return None


def nothing_to_do(out_dir: str | os.PathLike, identity: dict, resume) -> bool:
    """True (logged in one line) when ``resume_from_checkpoint`` is on and ``out_dir`` already holds the
    finished run of this config: the caller returns without reading or writing anything else."""
    if not resume_requested(resume):
        return False
    done = finished_run(out_dir, identity)
    if done is None:
        return False
    logger.info("run already complete: %s holds the final model of step %d (%s); nothing to do",
                out_dir, done["step"], MARKER_NAME)
    return True


# ---------------------------------------------------------------------------------------------
# the final save
# ---------------------------------------------------------------------------------------------
def _files_under(root: Path, item: Path) -> list[str]:
    if item.is_dir():
        return [p.relative_to(root).as_posix() for p in sorted(item.rglob("*")) if p.is_file()]
    return [item.relative_to(root).as_posix()]


def publish_final(out_dir: str | os.PathLike, write) -> list[str]:
    """Run ``write(tmp)`` into ``OUTPUT/.final.tmp`` (emptied first), then move each item it wrote
    into ``OUTPUT`` (a folder of the same name is replaced). Returns the files now in place (paths
    relative to ``OUTPUT``). Any error while writing removes ``.final.tmp`` and raises a
    :class:`CheckpointError` (``disk full while writing PATH`` for a full disk); what is already in
    ``OUTPUT`` is untouched until every file is written."""
    out_dir = Path(out_dir)
    tmp = out_dir / FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for item in tmp.rglob("*"):
            if item.is_file():
                fsync_file(item)
    except Exception as e:
        where = write_error_text(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the final model to {out_dir}: {where}. The partial files were "
                              "removed; the checkpoints are intact. Free space or fix the error, then rerun with "
                              "resume_from_checkpoint: true (the final model is then written from the last "
                              "checkpoint without training)") from e
    files = []
    for item in sorted(tmp.iterdir()):
        dest = out_dir / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
        files += _files_under(out_dir, dest)
    tmp.rmdir()
    fsync_dir(out_dir)
    return files


def final_weights(checkpoint: Path, best_model_checkpoint: str | None, load_best_model_at_end: bool) -> Path:
    """The checkpoint whose weights the end of training would have left in the model: the best one
    (``load_best_model_at_end``; looked for where it was saved and beside ``checkpoint``, as the run
    folder may have moved) when it verifies, else ``checkpoint`` itself."""
    if load_best_model_at_end and best_model_checkpoint:
        best = Path(best_model_checkpoint)
        for candidate in (best, checkpoint.parent / best.name):
            try:
                verify_checkpoint(candidate)
            except CheckpointError as e:
                logger.warning("best checkpoint %s cannot be used (%s)", candidate, e)
                continue
            return candidate
    return checkpoint
