"""Writing files so that a crash never leaves a half-written one, and naming a full disk when a write fails."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from .errors import WsiLlavaError

DISK_FULL_FREE_BYTES = 16 * 2**20
"""A write that failed without an errno (torch's ``[enforce fail at inline_container.cc…]``) counts as
"disk full" when less than this is free on the target's file system."""
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it into place. On any
    error (a full disk: see :func:`write_error_text`) the temporary file is removed and ``path`` is
    left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 4 * 2**20) -> str:
    """Hex SHA-256 of a file's bytes (read in ``chunk``-byte blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system of ``path`` (its nearest existing folder); None
    if that cannot be read."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether a failed write to ``path`` was caused by a full disk (or quota).

    ``ENOSPC``/``EDQUOT`` on an ``OSError`` anywhere in the exception chain, or the OS message in
    another writer's error (safetensors: ``… No space left on device (os error 28)``). Writers that lose
    the errno (torch's ``PytorchStreamWriter``: ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos …``) are judged by the free space left on ``path``'s file
    system (less than :data:`DISK_FULL_FREE_BYTES`)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(error, OSError):  # an OSError with another errno is not a full disk
        return False
    free = free_bytes(path)
    return free is not None and free < DISK_FULL_FREE_BYTES


def write_error_text(error: BaseException, path: str | os.PathLike) -> str:
    """What went wrong writing ``path``: ``disk full while writing PATH (…)`` when :func:`is_disk_full`,
    else ``TYPE: message``. An ``OSError`` naming its own file names that file instead of ``path``."""
    where = getattr(error, "filename", None) or os.fspath(path)
    if is_disk_full(error, path):
        return f"disk full while writing {where} ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def disk_full_error(error: BaseException, path: str | os.PathLike, target: str | os.PathLike) -> WsiLlavaError | None:
    """``could not write TARGET: disk full while writing PATH (…)`` as a :class:`WsiLlavaError` (one
    line, exit 2) when ``error``, raised writing ``path`` (e.g. the temporary file of ``target``), is a
    full disk (:func:`is_disk_full`); None for any other error, which the caller re-raises."""
    if not is_disk_full(error, path):
        return None
    where = " ".join(write_error_text(error, path).split())  # one line: HDF5's messages span several
    return WsiLlavaError(f"could not write {os.fspath(target)}: {where}. Nothing was left behind; free space and "
                         "run again")


@contextlib.contextmanager
def publishing(tmp: str | os.PathLike, target: str | os.PathLike):
    """Around writing ``tmp`` and renaming it onto ``target``: on any error ``tmp`` is removed, and an
    error caused by a full disk is raised as :func:`disk_full_error` (one line naming the path)."""
    tmp = Path(tmp)
    try:
        yield tmp
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, tmp, target)
        if full is not None:
            raise full from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
