"""Safety rules of the server: slides resolve only inside the slides root, bearer-token checks,
loopback detection. Pure functions; errors are :class:`~wsi_llava.serve.errors.ApiError`.

Slide references are what clients send: a slide id (a path relative to the root, ``/``-separated,
without the ``.h5``/``.hdf5`` suffix of an H5 file; a raw slide's id keeps its suffix, e.g.
``cases/a.svs``) or the relative path with the suffix. A reference without a suffix is tried with
``.h5``, ``.hdf5``, then each raw-slide suffix (:data:`RAW_SLIDE_SUFFIXES`). Refused: absolute paths,
``..``/``.``/empty components, backslashes, NUL and other control characters, and anything whose real
path (symlinks resolved) is not a regular slide file (H5 or raw) inside the root's real path. A
reference outside the root and a missing one get the same answer, so the server never tells what
exists outside the root.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass

from ..data.resolve import H5_SUFFIXES
from ..data.wsi_reader import SLIDE_SUFFIXES as RAW_SLIDE_SUFFIXES
from ..data.wsi_reader import is_raw_slide
from .errors import ApiError

#: suffixes of slide H5 files (dropped from their ids), tried first for a reference without a suffix
SLIDE_SUFFIXES = H5_SUFFIXES
#: every suffix served as a slide: H5 files, then raw slides (their features extracted on first use)
SERVED_SUFFIXES = SLIDE_SUFFIXES + RAW_SLIDE_SUFFIXES
#: longest slide reference accepted (characters)
MAX_REF_CHARS = 1024


@dataclass(frozen=True)
class SlideRef:
    """A slide reference that passed every check."""

    id: str
    """Canonical id: the path relative to the root, ``/``-separated, without the suffix."""
    path: str
    """Real (symlink-free) absolute path of the file; inside the root's real path."""

    @property
    def raw(self) -> bool:
        """Whether the file is a raw slide (tile features to extract), not a slide H5 file."""
        return is_raw_slide(self.path)


def _invalid(ref: str, why: str, what: str = "slide", param: str = "slide") -> ApiError:
    return ApiError(400, f"invalid {what} reference {ref[:200]!r}: {why}", code=f"invalid_{what}", param=param)


def _not_found(ref: str, what: str = "slide", param: str = "slide") -> ApiError:
    listed = " (GET /v1/slides lists them)" if what == "slide" else ""
    return ApiError(404, f"{what} {ref[:200]!r} not found under the slides root{listed}", code=f"{what}_not_found",
                    param=param)


def check_ref_syntax(ref: object, what: str = "slide", param: str = "slide") -> str:
    """The reference as a clean relative ``/`` path, or ApiError 400 (code ``invalid_<what>``)."""
    if not isinstance(ref, str) or not ref:
        raise ApiError(400, f"a {what} reference must be a non-empty string", code=f"invalid_{what}", param=param)
    if len(ref) > MAX_REF_CHARS:
        raise _invalid(ref, f"longer than {MAX_REF_CHARS} characters", what, param)
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise _invalid(ref, "control characters are not allowed", what, param)
    if "\\" in ref:
        raise _invalid(ref, "use '/' as the separator", what, param)
    if ref.startswith("/") or os.path.isabs(ref) or ref.startswith("~"):
        raise _invalid(ref, "absolute paths are not allowed; give a path relative to the slides root", what, param)
    parts = ref.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _invalid(ref, "'..', '.' and empty path components are not allowed", what, param)
    return ref


def real_root(root: str | os.PathLike) -> str:
    """The slides root as a real absolute path; ValueError if it is not a folder."""
    path = os.path.realpath(os.fspath(root))
    if not os.path.isdir(path):
        raise ValueError(f"slides root {os.fspath(root)!r} is not a folder")
    return path


def _inside(root: str, path: str) -> bool:
    return path != root and os.path.commonpath([root, path]) == root


def _slide_id(root: str, candidate: str) -> str:
    rel = os.path.relpath(candidate, root).replace(os.sep, "/")
    for suffix in SLIDE_SUFFIXES:
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def resolve_slide(root: str, ref: object) -> SlideRef:
    """Turn a client's slide reference into a real file path inside ``root`` (a :func:`real_root`).

    Raises ApiError 400 (malformed reference) or 404 (missing, outside the root, not a slide file).
    """
    return resolve_file(root, ref)


def resolve_file(root: str, ref: object, suffixes: tuple[str, ...] = SERVED_SUFFIXES, what: str = "slide",
                 param: str = "slide") -> SlideRef:
    """:func:`resolve_slide` for files with other ``suffixes`` (ROI images: ``what="image"``, the
    suffix must be given); errors say ``what`` and name ``param``."""
    ref = check_ref_syntax(ref, what, param)
    has_suffix = ref.lower().endswith(suffixes)
    candidates = [ref] if has_suffix else [ref + s for s in suffixes] if what == "slide" else []
    for cand in candidates:
        joined = os.path.join(root, *cand.split("/"))
        real = os.path.realpath(joined)
        if not _inside(root, real):
            raise _not_found(ref, what, param)
        if not real.lower().endswith(suffixes) or not os.path.isfile(real):
            continue
        return SlideRef(id=_slide_id(root, joined), path=real)
    raise _not_found(ref, what, param)


def list_slides(root: str, limit: int = 10_000) -> tuple[list[SlideRef], bool]:
    """Every slide file under ``root`` that :func:`resolve_slide` would accept, sorted by id.

    Returns ``(slides, truncated)``; at most ``limit`` entries. Symlinked folders are not followed;
    symlinked files are listed only when they point inside the root.
    """
    out: list[SlideRef] = []
    truncated = False
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(SERVED_SUFFIXES):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            try:
                ref = resolve_slide(root, rel)
            except ApiError:
                continue
            if len(out) >= limit:
                truncated = True
                break
            out.append(ref)
        if truncated:
            break
    out.sort(key=lambda r: r.id)
    return out, truncated


def bearer_ok(authorization: str | None, api_key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <api_key>`` (constant-time compare).
    Always True when no key is configured."""
    if not api_key:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
