"""Raw slides (.svs, .tif/.tiff, .ndpi, .mrxs …) for ``chat``, ``predict`` and ``serve``: tile features
extracted once and cached on disk.

:meth:`FeatureCache.entry` turns a raw slide into the path of a slide H5 file of its tile features
(``features`` [N, D] float32, ``coords`` [N, 2] int64 (x, y) level-0 pixels; ``wsi-llava extract``'s
layout), extracting it with :func:`~wsi_llava.infer.extract.extract_slide` on a miss. An entry is
``<cache>/<key>.h5``; the key is the SHA-256 of (:meth:`FeatureCache.entry_key`):

- the slide's content hash (SHA-256 of its bytes; a MIRAX ``.mrxs`` also of the files in its
  companion folder), so a changed file makes a new entry and a renamed or copied one reuses its entry;
- the tile encoder (name + SHA-256 of its weights: :func:`~wsi_llava.infer.extract.encoder_id`);
- the extraction settings: magnification, tile size, tissue threshold, and the pixel size given for
  the slide in ``--mpp-csv`` (None when the slide's own is used).

Entries are written under a temporary name and renamed (:func:`~wsi_llava.infer.extract_slide.write_h5`),
so a killed extraction leaves no entry. Hashing a multi-GB slide (or tile encoder) takes seconds, so
each file's hash is remembered in ``<cache>/hashes/`` with the file's size and modification time, and
recomputed only when either changes (:func:`remembered_sha256`; a file rewritten in place with its size
and modification time restored would keep its old hash). The cache folder is
``--feature-cache DIR``, default :func:`default_cache_dir` (``$XDG_CACHE_HOME/wsi-llava/features``,
else ``~/.cache/wsi-llava/features``); nothing removes old entries (delete the folder to reclaim the
space). Only the H5 entry is cached: for the tissue mask and overview of a slide, run ``wsi-llava extract``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..data.wsi_reader import mpp_override, read_mpp_csv
from ..errors import MissingFileError
from ..fileio import atomic_write_text, sha256_file
from ..precision import Precision
from .extract import ExtractSettings, add_tiling_arguments, check_tiling, encoder_id, extract_slide, finished_row
from .roi import check_width

__all__ = ["FeatureCache", "add_raw_slide_arguments", "default_cache_dir",
           "feature_cache", "feature_cache_from_args", "remembered_sha256", "slide_files"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wsi-llava/features``, or ``~/.cache/wsi-llava/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsi-llava" / "features"


def slide_files(path: Path) -> list[Path]:
    """The files holding a slide's pixels: the file, and for MIRAX (``.mrxs``) every file of the folder
    beside it with the same stem."""
    files = [path]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(p for p in companion.iterdir() if p.is_file())
    return files


def remembered_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """SHA-256 of one file's bytes, remembered in ``cache_dir/hashes/`` with the file's real path, size and
    modification time, and recomputed only when one of them changes."""
    path = Path(path)
    st = path.stat()
    real = os.path.realpath(path)
    memo = Path(cache_dir) / "hashes" / f"{hashlib.sha256(real.encode()).hexdigest()}.json"
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, json.dumps({**stamp, "sha256": digest}))
    return digest


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class FeatureCache:
    """Raw slide → cached H5 entry of its tile features (see the module docstring).

    ``encoder``: the frozen tile encoder loaded from ``weights`` (moved to ``device``, eval mode);
    ``settings``: the :class:`~wsi_llava.infer.extract.ExtractSettings` to extract with, whose
    ``encoder_id`` is filled in on first use (:func:`~wsi_llava.infer.extract.encoder_id` with the
    remembered hash of ``weights``: nothing is read or written before a raw slide is asked for);
    ``report``: called with one line before and after each extraction (default: stderr). Thread-safe:
    one extraction runs at a time. ``extractions`` counts the extractions this object ran."""

    def __init__(self, encoder, weights: str | os.PathLike, settings: ExtractSettings,
                 cache_dir: str | os.PathLike | None = None, mpp_table: dict[str, float] | None = None,
                 device: str = "cpu", precision: Precision | None = None, report: Callable[[str], None] = _stderr):
        check_tiling(settings.magnification, settings.tile_size, settings.min_tissue)
        self.encoder = encoder.to(device).eval()
        self.encoder.requires_grad_(False)
        self.weights = Path(weights)
        self._settings = settings
        self.dir = (Path(cache_dir) if cache_dir else default_cache_dir()).absolute()
        self.mpp_table = mpp_table or {}
        self.device, self.precision, self.report = device, precision, report
        self.extractions = 0
        self._lock = threading.Lock()
        #: (real path, size, mtime) of a slide's files → its entry: a known slide version is not hashed again
        self._entries: dict[tuple, Path] = {}

    @functools.cached_property
    def settings(self) -> ExtractSettings:
        """The extraction settings, with the tile encoder's id."""
        eid = encoder_id(self.encoder, self.weights, self.file_hash)
        return dataclasses.replace(self._settings, encoder_id=eid)

    # -- keys ------------------------------------------------------------------------------------
    def file_hash(self, path: Path) -> str:
        """:func:`remembered_sha256` in this cache's folder."""
        return remembered_sha256(path, self.dir)

    def content_hash(self, slide: Path) -> str:
        """SHA-256 of the slide's content: its file's hash, or for a multi-file slide of every file's name
        and hash."""
        files = slide_files(slide)
        if len(files) == 1:
            return self.file_hash(slide)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(slide.parent).as_posix()}\0{self.file_hash(f)}\n".encode())
        return h.hexdigest()

    def entry_key(self, slide: Path) -> str:
        """The JSON that identifies the slide's entry (stored in the entry as its ``extraction`` attribute)."""
        s = self.settings
        return json.dumps({"slide_sha256": self.content_hash(slide), "encoder": s.encoder_id,
                           "magnification": s.magnification, "tile_size": s.tile_size, "min_tissue": s.min_tissue,
                           "mpp": mpp_override(slide, self.mpp_table)}, sort_keys=True)

    # -- entries ---------------------------------------------------------------------------------
    def entry(self, slide: str | os.PathLike) -> Path:
        """The cache entry (a slide H5 file) of ``slide``'s tile features, extracted now if missing.

        A slide that cannot be read, has no tissue tile or no pixel size is a
        :class:`~wsi_llava.data.wsi_reader.WsiError` naming it; nothing is then cached."""
        slide = Path(slide)
        if not slide.is_file():
            raise MissingFileError(f"slide not found: {slide}; check the path")
        version = tuple((str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns) for f in slide_files(slide))
        known = self._entries.get(version)
        if known is not None and known.is_file():
            return known
        key = self.entry_key(slide)
        target = self.dir / f"{hashlib.sha256(key.encode()).hexdigest()}.h5"
        if not (target.exists() and finished_row(target, key, self.dir) is not None):
            self._extract(slide, target, key)  # one at a time; a cached slide never waits for it
        self._entries[version] = target
        return target

    def _extract(self, slide: Path, target: Path, key: str) -> None:
        with self._lock:
            if target.exists() and finished_row(target, key, self.dir) is not None:
                return  # another thread extracted it meanwhile
            self.dir.mkdir(parents=True, exist_ok=True)
            s = self.settings
            self.report(f"extracting tile features of {slide} ({self.encoder.name}, {s.magnification:g}x, "
                        f"{s.tile_size} px tiles) into {self.dir} …")
            start = time.monotonic()
            n = extract_slide(slide, target, key, self.encoder, s, self.mpp_table, self.device, self.precision)
            self.extractions += 1
            self.report(f"extracted {n} tiles of {slide.name} in {time.monotonic() - start:.1f} s")


# -- command line --------------------------------------------------------------------------------
def add_raw_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """How raw slides are tiled (:func:`~wsi_llava.infer.extract.add_tiling_arguments`) and cached
    (``--feature-cache``); the tile encoder is ``--tile-weights`` / ``--tile-encoder``."""
    group = parser.add_argument_group("raw slides (.svs .tif .ndpi .mrxs …: extracted once with --tile-weights, "
                                      "then cached)")
    add_tiling_arguments(group)
    group.add_argument("--feature-cache", metavar="DIR",
                       help=f"folder of cached tile features of raw slides (default: {default_cache_dir()})")


def feature_cache(weights: str | os.PathLike, encoder, expected_dim: int, cache_dir: str | os.PathLike | None = None,
                  magnification: float = 20.0, tile_size: int = 256, min_tissue: float | None = None,
                  mpp_csv: str | os.PathLike | None = None, device: str = "cpu", precision: Precision | None = None,
                  workers: int = 1, report: Callable[[str], None] = _stderr) -> FeatureCache:
    """A :class:`FeatureCache` for the tile encoder ``encoder`` loaded from ``weights`` (its width checked
    against the model's ``expected_dim``)."""
    check_width(encoder, expected_dim, weights)
    extra = {} if min_tissue is None else {"min_tissue": min_tissue}
    settings = ExtractSettings("", magnification, tile_size, workers=workers, **extra)
    return FeatureCache(encoder, weights, settings, cache_dir, read_mpp_csv(mpp_csv) if mpp_csv else None, device,
                        precision, report)


def feature_cache_from_args(args: argparse.Namespace, encoder, expected_dim: int, device: str = "cpu",
                            precision: Precision | None = None) -> FeatureCache:
    """:func:`feature_cache` from the :func:`add_raw_slide_arguments` and ``--tile-weights`` of a command."""
    return feature_cache(args.tile_weights, encoder, expected_dim, args.feature_cache, args.magnification,
                         args.tile_size, args.min_tissue, args.mpp_csv, device, precision)
