"""One slide-name resolver: a name a user or a benchmark gives → the one slide file it means.

:class:`SlideResolver` indexes slide files once (every ``*.h5``/``*.hdf5`` under a folder, recursively,
or an explicit list of files); :meth:`SlideResolver.resolve` then costs a few dictionary look-ups, so
build it once per folder and query it for every name (``import``, ``chat --slide-root``,
``heatmap --slide-root``; the server can hold one per slide folder).

A name is tried, in order, as

1. a **relative path** under the folder (``a/b/slide.h5``, or without the suffix ``a/b/slide``);
2. a file **stem** (``TCGA-21-1083-01Z-00-DX1.8288ca92-…``), case-sensitive;
3. a TCGA **slide barcode**: the part before the first ``.`` (``TCGA-21-1083-01Z-00-DX1``),
   case-insensitive, so a barcode finds the file whose name adds the UUID and a name with a UUID finds
   the file named by the barcode alone;
4. a TCGA **patient barcode**, only when the name is one (the first 12 characters, ``TCGA-21-1083``):
   the patient's one slide. A name that is a slide barcode never matches another slide of the same
   patient (``…-DX2`` never finds ``…-DX1``). ``patient_barcode=False`` leaves this step out (``import``).

The first step with candidates decides: one file → that file; several → :class:`AmbiguousSlideError`
listing them all (no later step is tried). No candidate at any step → :class:`SlideNotFoundError`
naming the closest names (:mod:`difflib`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import MissingFileError, WsiLlavaError

__all__ = ["H5_SUFFIXES", "AmbiguousSlideError", "SlideNotFoundError", "SlideResolver", "add_slide_root_argument",
           "slide_argument", "tcga_barcode", "tcga_patient"]

H5_SUFFIXES = (".h5", ".hdf5")
_PATIENT = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$", re.IGNORECASE)
#: candidates an ambiguity error lists before "… and N more"
_LIST_MAX = 20


class AmbiguousSlideError(WsiLlavaError, ValueError):
    """A slide name that fits several files; the message lists them."""

    def __init__(self, message: str, candidates: list[str]):
        super().__init__(message)
        self.candidates = candidates


class SlideNotFoundError(MissingFileError):
    """A slide name that fits no file; the message names the closest names (also a FileNotFoundError)."""

    def __init__(self, message: str, suggestions: list[str]):
        super().__init__(message)
        self.suggestions = suggestions


def tcga_barcode(name: str) -> str | None:
    """``TCGA-21-1083-01Z-00-DX1.8288ca92-…`` → ``TCGA-21-1083-01Z-00-DX1`` (None if not a TCGA name)."""
    if not name.upper().startswith("TCGA-"):
        return None
    return name.split(".", 1)[0].upper()


def tcga_patient(name: str) -> str | None:
    """TCGA patient barcode (first 12 characters, ``TCGA-21-1083``) of a TCGA name, else None."""
    barcode = tcga_barcode(name)
    return barcode[:12] if barcode and _PATIENT.match(barcode[:12]) else None


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    low = name.lower()
    for s in suffixes:
        if low.endswith(s):
            return name[: -len(s)]
    return name


class SlideResolver:
    """Slide files indexed by relative path, stem, TCGA slide barcode and patient barcode (module doc).

    ``source``: a folder (searched recursively, symlinked folders not followed) or an iterable of files
    (relative paths are then the paths as given). ``what``: how messages name the files.
    """

    def __init__(self, source: str | os.PathLike | Iterable[str | os.PathLike],
                 suffixes: Iterable[str] = H5_SUFFIXES, *, patient_barcode: bool = True, what: str = "H5 file"):
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.patient_barcode = patient_barcode
        self.what = what
        if isinstance(source, (str, os.PathLike)):
            self.root: Path | None = Path(source)
            if not self.root.is_dir():
                raise MissingFileError(f"{self.root}: not a folder; give the folder holding the slide files")
            files = [os.path.join(d, n) for d, _, names in os.walk(self.root) for n in names
                     if n.lower().endswith(self.suffixes)]
        else:
            self.root = None
            files = [os.fspath(p) for p in source]
        self.by_path: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        self.by_barcode: dict[str, list[str]] = {}
        self.by_patient: dict[str, list[str]] = {}
        for full in files:
            rel = os.path.relpath(full, self.root) if self.root is not None else os.path.normpath(full)
            rel = rel.replace(os.sep, "/")
            name = os.path.basename(full)
            stem = _strip_suffix(name, self.suffixes) if name.lower().endswith(self.suffixes) else Path(name).stem
            for key in {rel, _strip_suffix(rel, self.suffixes)}:
                self.by_path.setdefault(key, []).append(full)
            self.by_stem.setdefault(stem, []).append(full)
            if (barcode := tcga_barcode(stem)) is not None:
                self.by_barcode.setdefault(barcode, []).append(full)
            if (patient := tcga_patient(stem)) is not None:
                self.by_patient.setdefault(patient, []).append(full)
        self.n_files = len(files)

    def _where(self) -> str:
        return f"under {self.root}" if self.root is not None else f"among {self.n_files} files"

    def _steps(self, name: str):
        rel = os.path.normpath(name).replace(os.sep, "/") if name else name
        yield "relative path", rel, self.by_path.get(rel, [])
        yield "name", name, self.by_stem.get(name, [])
        barcode = tcga_barcode(name)
        if barcode:
            yield "slide barcode", barcode, self.by_barcode.get(barcode, [])
        if self.patient_barcode and barcode and _PATIENT.match(barcode):
            yield "patient barcode", barcode, self.by_patient.get(barcode, [])

    def resolve(self, name: str, suggest: bool = True) -> Path:
        """The one file ``name`` means (module doc); raises :class:`AmbiguousSlideError` or
        :class:`SlideNotFoundError` (with close names when ``suggest``: a scan of every name, so callers
        matching many names turn it off)."""
        name = str(name).strip()
        for step, key, found in self._steps(name):
            if len(found) == 1:
                return Path(found[0])
            if len(found) > 1:
                cands = sorted(found)
                shown = ", ".join(cands[:_LIST_MAX]) + (f" … and {len(cands) - _LIST_MAX} more"
                                                        if len(cands) > _LIST_MAX else "")
                raise AmbiguousSlideError(
                    f"slide {name!r} is ambiguous: {len(cands)} {self.what}s {self._where()} have the {step} "
                    f"{key}: {shown}; name one by its relative path", cands)
        close = difflib.get_close_matches(name, list(self.by_stem) + list(self.by_path), n=3, cutoff=0.6) \
            if suggest else []
        close = list(dict.fromkeys(close))
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SlideNotFoundError(f"no {self.what} for slide {name!r} {self._where()}{hint}", close)

    def __len__(self) -> int:
        return self.n_files


def add_slide_root_argument(parser) -> None:
    """``--slide-root DIR``: the option of every command whose ``--slide`` may be a slide name."""
    parser.add_argument("--slide-root", help="folder of slide H5 files (searched recursively): --slide may then "
                                             "be a path relative to it, a file stem or a TCGA barcode")


def slide_argument(slide: str, root: str | os.PathLike | None) -> str:
    """``--slide`` as a file path: as given without ``--slide-root``, else resolved under it."""
    return slide if root is None else str(SlideResolver(root).resolve(slide))
