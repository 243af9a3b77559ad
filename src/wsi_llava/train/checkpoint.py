"""Crash-safe training checkpoints: a checksummed manifest as the commit marker, resume rules, rotation.

Layout of an output folder (``OUTPUT``)::

    OUTPUT/checkpoint-N/            a checkpoint, written in place by the Hugging Face ``Trainer``
        model.safetensors, optimizer.pt, scheduler.pt, rng_state[_R].pth, trainer_state.json, ...
        checkpoint.json             the manifest (the commit), written last: step + every file's size and sha256
    OUTPUT/.staging/                folders being deleted (never read; removed at the next start)

Writing a checkpoint uses public ``Trainer`` hooks only: the ``Trainer`` writes ``checkpoint-N`` as it
always does; then :class:`CommitCheckpoints` (a ``TrainerCallback``, ``on_save``) waits for every rank,
and the saving rank fsyncs every file and writes ``checkpoint.json`` (through a temporary file,
fsynced, renamed, the folder fsynced): only then is the checkpoint *committed*. Rotation
(``save_total_limit``) runs after the commit, over committed checkpoints only, and never deletes the
newest committed one nor the best one. A crash at any moment leaves every committed checkpoint intact
and at most one uncommitted ``checkpoint-N`` (no readable manifest), which resume ignores and the next
start removes (:func:`remove_uncommitted`). Any error while saving (``ENOSPC`` and other ``OSError``,
or a writer's ``RuntimeError``) removes the uncommitted folder and stops training with a
:class:`CheckpointError` naming the step, the folder and the last good checkpoint (a full disk is said
as ``disk full while writing PATH``, see :func:`wsi_llava.fileio.is_disk_full`).

Resume (:func:`resolve_resume`): ``true`` → the newest checkpoint whose manifest is present and whose
files all match their size and sha256 (others are skipped with a warning; none → start fresh);
a path → that checkpoint, which must verify (else :class:`CheckpointError`). Before Hugging Face
reads any pickle-based file (optimizer, scheduler, RNG state), each is scanned statically for
globals that ``torch.load(weights_only=True)`` would not allow; any → :class:`UnsafeCheckpointError`
(HF itself also loads them with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import WsiLlavaError
from ..fileio import sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint.json"
"""File name of the manifest inside a checkpoint folder."""
MANIFEST_FORMAT = "wsi-llava-checkpoint"
MANIFEST_VERSION = 1
STAGING_DIR = ".staging"
"""Folder under the output folder where checkpoints are moved to be deleted (a half-deleted folder is never
mistaken for a checkpoint)."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
"""Files with these suffixes are pickle-based and scanned for unsafe globals before any resume."""
NOT_LOADED_ON_RESUME = ("training_args.bin",)
"""Pickle files Hugging Face writes but never reads back on resume (a pickled ``TrainingArguments``)."""
_CHECKPOINT_RE = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")


class CheckpointError(WsiLlavaError, RuntimeError):
    """A checkpoint that cannot be written or used; the message names the folder and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that could run code when unpickled (refused, never loaded)."""


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to stable storage (whichever process wrote it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (creations, renames) to stable storage; a no-op where folders cannot
    be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX relative paths."""
    out = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(x for x in out if x != MANIFEST_NAME)


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def write_manifest(folder: str | os.PathLike, step: int) -> dict:
    """fsync every file of ``folder``, then write ``checkpoint.json`` (step, size and sha256 of every
    file) through a temporary file, fsynced, and fsync the folder. Returns the manifest."""
    folder = Path(folder)
    files = {}
    for rel in _files(folder):
        path = folder / rel
        fsync_file(path)
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    for sub in sorted({p.parent for p in folder.rglob("*") if p.is_file()} - {folder}):
        fsync_dir(sub)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": int(step),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)
    fsync_dir(folder)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a checkpoint folder; :class:`CheckpointError` if absent or malformed."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME} (incomplete: the save did not finish, or the folder "
                              "was not written by WSI-LLaVA)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int)):
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} manifest (needs format, step and files)")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: manifest version {manifest.get('version')!r}; this WSI-LLaVA reads "
                              f"version {MANIFEST_VERSION}")
    return manifest


def is_complete(folder: str | os.PathLike) -> bool:
    """Cheap completeness test: the manifest (written last) is present."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def verify_checkpoint(folder: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Check a checkpoint against its manifest: every listed file present with its size (and sha256),
    no unlisted file, the step matching the folder name, and no pickle-based file holding globals
    that ``torch.load(weights_only=True)`` would refuse. Returns the manifest.

    Raises :class:`CheckpointError` (incomplete or corrupt) or :class:`UnsafeCheckpointError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    manifest = read_manifest(folder)
    m = _CHECKPOINT_RE.match(folder.name)
    if m and int(m.group(1)) != manifest["step"]:
        raise CheckpointError(f"{folder}: manifest says step {manifest['step']}, the folder name step {m.group(1)}")
    listed = manifest["files"]
    present = set(_files(folder))
    missing = sorted(set(listed) - present)
    if missing:
        raise CheckpointError(f"{folder}: file(s) listed in {MANIFEST_NAME} are missing: {missing}")
    extra = sorted(present - set(listed))
    if extra:
        raise CheckpointError(f"{folder}: file(s) not listed in {MANIFEST_NAME}: {extra}")
    for rel, entry in listed.items():
        path = folder / rel
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{path}: size {size} bytes, manifest says {entry.get('size')} "
                                  "(truncated or changed)")
        if check_hashes and sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST_NAME} (corrupted or changed)")
    check_pickles(folder, listed)
    return manifest


def unsafe_pickle_globals(path: str | os.PathLike) -> list[str]:
    """Globals in a ``torch.save`` file that ``torch.load(weights_only=True)`` (with the numpy types
    Hugging Face allows for RNG states) would refuse, found by disassembling the pickle — nothing is
    executed. A file that is not a ``torch.save`` zip archive (a bare pickle) is reported as unsafe."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    if not zipfile.is_zipfile(path):
        return ["<not a torch.save archive: a bare pickle>"]
    with safe_globals():
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as e:  # noqa: BLE001 - a broken archive is refused, not loaded
            return [f"<unreadable archive: {type(e).__name__}: {e}>"]


def check_pickles(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """:class:`UnsafeCheckpointError` if any pickle-based file among ``names`` (relative to ``folder``)
    holds globals that could run code when unpickled."""
    folder = Path(folder)
    for rel in sorted(names):
        if not rel.endswith(PICKLE_SUFFIXES) or Path(rel).name in NOT_LOADED_ON_RESUME:
            continue
        bad = unsafe_pickle_globals(folder / rel)
        if bad:
            raise UnsafeCheckpointError(
                f"{folder / rel}: refusing to load: the pickle references {', '.join(bad)}, which could run code "
                "(only tensors and plain containers are allowed). Do not resume from this checkpoint unless you "
                "know where it came from.")


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``checkpoint-N`` → N; anything else → None."""
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of ``run_dir`` (complete or not), oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def newest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint with a manifest (not verified)."""
    done = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    return done[-1] if done else None


def clean_staging(run_dir: str | os.PathLike) -> list[str]:
    """Remove ``run_dir/.staging`` (leftovers of interrupted deletions); returns what was there."""
    staging = Path(run_dir) / STAGING_DIR
    if not staging.exists():
        return []
    left = sorted(p.name for p in staging.iterdir())
    if left:
        logger.warning("removing leftovers of interrupted checkpoint saves in %s: %s", staging, ", ".join(left))
    shutil.rmtree(staging, ignore_errors=True)
    return left


def _drop_empty_staging(run_dir: Path) -> None:
    try:
        (run_dir / STAGING_DIR).rmdir()
    except OSError:
        pass  # not empty (another save in flight) or already gone


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint folder: first renamed into the staging area (so a half-deleted folder is
    never mistaken for a checkpoint), then removed."""
    path = Path(path)
    trash = path.parent / STAGING_DIR / f"deleting-{path.name}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
    _drop_empty_staging(path.parent)


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int | None,
                       protect: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """Keep at most ``limit`` complete checkpoints (more only to keep the protected ones); delete the
    oldest others. Never deletes the newest complete checkpoint nor any in ``protect`` (the best one);
    incomplete folders are neither counted nor touched. Returns the deleted folders."""
    if limit is None or limit <= 0:
        return []
    done = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    if len(done) <= limit:
        return []
    keep = {done[-1].resolve()} | {Path(p).resolve() for p in protect if p}
    for p in reversed(done):
        if len(keep) >= limit:
            break
        keep.add(p.resolve())
    removed = []
    for p in done:
        if p.resolve() not in keep:
            logger.info("deleting checkpoint %s (save_total_limit %d)", p, limit)
            remove_checkpoint(p)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; incomplete or corrupt ones are skipped
    with a warning. An unsafe pickle is never skipped silently: it raises."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s: %s", path, e)
            continue
        return path
    return None


def resume_requested(value) -> bool:
    """Whether a ``resume_from_checkpoint`` value asks to resume (``true`` or a path)."""
    return not (value is None or value is False
                or (isinstance(value, str) and value.strip().lower() in ("", "false", "no", "off")))


def resolve_resume(value, run_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint`` → the checkpoint folder to hand to ``Trainer.train`` (or None).

    ``None``/``False``/``"false"``/``""``: no resume. ``True``/``"true"``: the newest complete,
    verified checkpoint of ``run_dir``; none → None (start fresh, logged). A path: it must verify,
    else :class:`CheckpointError`."""
    if not resume_requested(value):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on")):
        found = find_resume_checkpoint(run_dir)
        if found is None:
            logger.info("resume_from_checkpoint: true, but %s holds no complete checkpoint; starting fresh", run_dir)
            return None
        logger.info("resuming from %s (newest complete checkpoint)", found)
        return str(found)
    path = Path(os.fspath(value))
    try:
        verify_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"resume_from_checkpoint: {path} cannot be resumed from: {e}. Use "
                              "resume_from_checkpoint: true to take the newest complete checkpoint.") from e
    return str(path)


def load_checkpoint_weights(model, folder: str | os.PathLike) -> None:
    """Load the model weights of a checkpoint folder into ``model`` in place: a parts checkpoint with
    :func:`~wsi_llava.model.saving.apply_parts`; else as Hugging Face does on resume (``model.safetensors``, or the shards of ``model.safetensors.index.json``; on the CPU, then
    copied into the model's tensors). Keys left out of the file because they alias another parameter
    (tied embeddings) are fine; any other missing or unexpected key is a :class:`CheckpointError`."""
    import safetensors.torch
    from transformers.trainer_utils import load_sharded_checkpoint

    from ..model.saving import apply_parts, is_parts_folder

    folder = Path(folder)
    if is_parts_folder(folder):  # only what trained (see wsi_llava.model.saving); applied strictly
        apply_parts(model, folder)
        return
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        state = safetensors.torch.load_file(str(single), device="cpu")
        result = model.load_state_dict(state, strict=False)
        loaded = set(state)
        del state
    elif index.is_file():
        result = load_sharded_checkpoint(model, str(folder), strict=False, prefer_safe=True)
        loaded = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    else:
        raise CheckpointError(f"{folder}: no model.safetensors (or its index) to load the weights from")
    aliases: dict[int, set[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), set()).add(name)
    by_name = {n: group for group in aliases.values() for n in group}
    missing = [k for k in result.missing_keys if not (by_name.get(k, set()) & loaded)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder}: the weights do not fit the model (missing: {sorted(missing)[:5]}, "
                              f"unexpected: {sorted(result.unexpected_keys)[:5]}); was the config changed?")


# ---------------------------------------------------------------------------------------------
# uncommitted folders
# ---------------------------------------------------------------------------------------------
def remove_uncommitted(run_dir: str | os.PathLike) -> list[str]:
    """Remove the ``checkpoint-N`` folders of ``run_dir`` that hold no readable manifest (a save that
    was killed before its commit); returns their names. Committed but corrupt ones stay (resume skips
    them with a warning)."""
    removed = []
    for path in list_checkpoints(run_dir):
        try:
            read_manifest(path)
        except CheckpointError:
            logger.warning("removing %s: its save never committed (no readable %s)", path, MANIFEST_NAME)
            remove_checkpoint(path)
            removed.append(path.name)
    return removed
