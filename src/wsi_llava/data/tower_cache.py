"""Tower-output cache: a frozen slide encoder's outputs, stored once per slide, read instead of running it.

``wsi-llava encode`` (:mod:`wsi_llava.infer.encode`) runs the tower over **all** tiles of each slide and
writes one file per slide; training and inference with ``tower_cache: DIR`` sample tiles from these
files exactly as :func:`~wsi_llava.data.slides.load_slide` samples them from the slide H5 (same rows for
the same ``rng``, same spatial order), so the model gets the tower's output without running it.

File ``DIR/<slide_id>.h5`` (:func:`cache_file_name` quotes characters that are not safe in a file
name). Rows follow the **source H5's row order**: row i is tile i of the slide file.

=================  ==========  =========  ==================================================================
dataset            shape       dtype      content
=================  ==========  =========  ==================================================================
``tokens``         [N, D]      float16    patch tokens of the chosen layer (``select_layer``)
``cls_token``      [D]         float32    CLS token of the same layer
``cls_attention``  [N]         float32    last-block CLS→patch attention over all N tiles (PruMerge's)
``keys``           [N, D]      float16    last-block patch keys
``coords``         [N, 2]      float32    (x, y) level-0 pixels, as ``load_slide`` returns them
=================  ==========  =========  ==================================================================

Attributes: ``format_version``; ``tower_sha256`` (:func:`weights_sha256` of the tower's state dict);
``tower_config`` (JSON of the output-relevant :class:`SlideEncoderConfig` fields); ``select_layer``
(canonical: -1, or 0…depth); ``source_h5``; ``n_tiles``; ``slide_id``; ``dim``; ``precision``.

Files are written to a temporary name in the same folder and renamed into place, so a file under its
final name is always complete. All datasets are stored contiguous and uncompressed, so sampled rows
are read by byte address (a few milliseconds for 2,048 of 50,000 rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from ..errors import WsiLlavaError
from ..fileio import publishing
from . import h5safety
from .h5layout import FileReader
from .h5safety import SlideError
from .sampling import sample_indices
from .slides import Slide, read_slide_meta
from .tower_output import TowerOutput

FORMAT_VERSION = 1
#: ``SlideEncoderConfig`` fields that change the tower's output (dropout, drop-path, FFN chunking and
#: ``slide_ngrids`` do not in eval mode).
OUTPUT_CONFIG_FIELDS = ("in_dim", "embed_dim", "depth", "num_heads", "mlp_ratio", "tile_size", "segment_lengths",
                        "dilations", "layernorm_eps", "norm_eps")
_SAFE_CHARS = "-_.+=@~,"


class TowerCacheError(WsiLlavaError, ValueError):
    """A tower-cache file is missing, unreadable or made by another tower; the message names the file."""


# ------------------------------------------------------------------------------------------ identity


def weights_sha256(state_dict) -> str:
    """SHA-256 of a state dict: for every tensor in key order, its name, dtype, shape and bytes (floating
    tensors as float32, so the hash does not depend on the file format the weights came from)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        if t.is_floating_point():
            t = t.float()
        t = t.cpu().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def canonical_layer(layer: int, depth: int) -> int:
    """``mm_vision_select_layer`` → -1 (final normalised tokens) or the ``hidden_states`` index 0…depth
    it names (``-2`` and ``depth - 1`` are the same state)."""
    layer = int(layer)
    if layer == -1:
        return -1
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(f"select layer {layer} is out of range for a {depth}-block encoder "
                         f"(-1 = final tokens, or a hidden_states index in [{-(depth + 1)}, {depth}])")
    return layer % (depth + 1)


@dataclass(frozen=True)
class TowerIdentity:
    """What makes cached outputs valid for a model: the tower's weights, architecture and select layer."""

    sha256: str
    """:func:`weights_sha256` of the tower's state dict."""
    config: str
    """JSON (sorted keys) of the tower's :data:`OUTPUT_CONFIG_FIELDS`."""
    select_layer: int
    """Canonical select layer (:func:`canonical_layer`)."""


def tower_identity(encoder, select_layer: int = -1) -> TowerIdentity:
    """The identity of a :class:`~wsi_llava.model.slide_encoder.SlideEncoder` used with ``select_layer``."""
    cfg = encoder.config.to_dict()
    config = json.dumps({k: cfg[k] for k in OUTPUT_CONFIG_FIELDS}, sort_keys=True)
    return TowerIdentity(weights_sha256(encoder.state_dict()), config,
                         canonical_layer(select_layer, int(cfg["depth"])))


# ------------------------------------------------------------------------------------------ files


def cache_file_name(slide_id: str) -> str:
    """``<slide_id>.h5`` with every character outside ``[A-Za-z0-9-_.+=@~,]`` percent-quoted (so ids with
    ``/`` or spaces become one safe file name)."""
    if not slide_id:
        raise TowerCacheError("a slide needs a non-empty slide_id to be cached")
    return urllib.parse.quote(slide_id, safe=_SAFE_CHARS) + ".h5"


def write_cache_file(path: str | os.PathLike, *, tokens: np.ndarray, cls_token: np.ndarray,
                     cls_attention: np.ndarray, keys: np.ndarray, coords: np.ndarray, attrs: dict) -> Path:
    """Write one slide's cache file atomically (temporary file in the same folder, fsync, rename).

    tokens [N, D], cls_token [D], cls_attention [N], keys [N, D], coords [N, 2] (x, y), in source-row order.
    """
    path = Path(path)
    n, d = tokens.shape
    shapes = {"cls_token": (cls_token.shape, (d,)), "cls_attention": (cls_attention.shape, (n,)),
              "keys": (keys.shape, (n, keys.shape[-1])), "coords": (coords.shape, (n, 2))}
    bad = [f"{k} {tuple(got)} (expected {want})" for k, (got, want) in shapes.items() if tuple(got) != want]
    if bad:
        raise ValueError(f"{path}: inconsistent tower outputs: {', '.join(bad)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with publishing(tmp, path):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=np.asarray(tokens, dtype=np.float16))
            f.create_dataset("cls_token", data=np.asarray(cls_token, dtype=np.float32))
            f.create_dataset("cls_attention", data=np.asarray(cls_attention, dtype=np.float32))
            f.create_dataset("keys", data=np.asarray(keys, dtype=np.float16))
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.float32))
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["n_tiles"] = int(n)
            f.attrs["dim"] = int(d)
            for k, v in attrs.items():
                f.attrs[k] = v
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path


def _read_rows(fr: FileReader, ds: h5py.Dataset, idx: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``out[r] = ds[idx[order[r]]]`` (``idx`` sorted) of a 2-D dataset: contiguous storage is read by
    byte address straight into output order through ``fr`` (a reader of the same file), else h5py."""
    offset = ds.id.get_offset() if ds.chunks is None else None
    if offset is not None:
        row_bytes = ds.shape[1] * ds.dtype.itemsize
        return fr.gather(offset + idx[order].astype(np.int64) * row_bytes, row_bytes).view(ds.dtype)
    return ds[idx][order]


@dataclass
class CachedSlide(Slide):
    """A slide's sampled tiles with their cached tower outputs (rows in spatial order, like :class:`Slide`).

    ``features`` is empty ([K, 0] float32: the tiles' features are not needed); the tower's outputs are in
    ``tower_outputs``."""

    tower_outputs: TowerOutput
    """One slide's :class:`~wsi_llava.data.tower_output.TowerOutput` (no B axis): tokens [1+K, D] float32
    (CLS, then the kept tiles' tokens of the cached layer), cls_attention [K] float32 (last block, computed
    over all N tiles), keys [K, Dk] float16 (last block)."""


class TowerCache:
    """A folder of tower-cache files, checked against the model's tower (``identity``).

    ``check`` validates a slide's file; ``read`` samples it like ``load_slide``. Holds only paths, so it
    pickles to DataLoader workers; every call opens and closes its file.
    """

    def __init__(self, directory: str | os.PathLike, identity: TowerIdentity | None = None):
        self.directory = Path(directory)
        self.identity = identity
        if not self.directory.is_dir():
            raise TowerCacheError(f"tower_cache {self.directory} is not a folder (write it with `wsi-llava encode`)")

    def path(self, slide_id: str) -> Path:
        """The cache file of ``slide_id``."""
        return self.directory / cache_file_name(slide_id)

    def _open(self, slide_id: str, where: str) -> tuple[Path, h5py.File]:
        path = self.path(slide_id)
        at = f" ({where})" if where else ""
        if not path.is_file():
            raise TowerCacheError(f"{path}: no tower-cache file for slide {slide_id!r}{at}; run `wsi-llava encode "
                                  f"--data MANIFEST --out {self.directory}` with the model's tower for every slide")
        try:  # the same checked open as slide files: a regular HDF5 file, never a FIFO or device
            return path, h5safety.open_h5(str(path))
        except SlideError as e:
            raise TowerCacheError(f"unreadable tower-cache file{at}: {e}; delete it and re-run "
                                  "`wsi-llava encode`") from None

    def _datasets(self, path: Path, f: h5py.File, at: str) -> dict[str, h5py.Dataset]:
        """The five datasets, looked up inside the file only and with their storage checked like a slide
        file's (no external links, virtual datasets or external storage; allocated; inside the file)."""
        found: dict[str, h5py.Dataset] = {}
        missing = []
        try:
            size = h5safety.file_size(f)
            for k in ("tokens", "cls_token", "cls_attention", "keys", "coords"):
                ds = h5safety.get_dataset(f, str(path), k)
                if ds is None:
                    missing.append(k)
                    continue
                h5safety.check_storage(str(path), k, ds, size)
                found[k] = ds
        except SlideError as e:
            raise TowerCacheError(f"{e}{at}; delete it and re-run `wsi-llava encode`") from None
        missing += [k for k in ("format_version", "tower_sha256", "tower_config", "select_layer", "n_tiles")
                    if k not in f.attrs]
        if missing:
            raise TowerCacheError(f"{path}: not a tower-cache file{at}: lacks {', '.join(missing)}")
        return found

    def _validate(self, path: Path, f: h5py.File, n_tiles: int | None, at: str) -> tuple[int, dict]:
        """Check one open file against the identity (and ``n_tiles``); returns N and the datasets."""
        a = f.attrs
        f = self._datasets(path, f, at)
        if int(a["format_version"]) != FORMAT_VERSION:
            raise TowerCacheError(f"{path}: tower-cache format {int(a['format_version'])}{at}; this version reads "
                                  f"format {FORMAT_VERSION}: re-run `wsi-llava encode`")
        n = int(a["n_tiles"])
        d = f["tokens"].shape[1] if f["tokens"].ndim == 2 else -1
        shapes = {"tokens": (n, d), "cls_token": (d,), "cls_attention": (n,), "keys": (n, f["keys"].shape[-1]),
                  "coords": (n, 2)}
        bad = [f"{k} {f[k].shape}" for k, want in shapes.items() if f[k].shape != want]
        if bad or d < 1:
            raise TowerCacheError(f"{path}: inconsistent tower-cache file{at} (n_tiles {n}): {', '.join(bad)}")
        ident = self.identity
        if ident is not None:
            if int(a["select_layer"]) != ident.select_layer:
                raise TowerCacheError(
                    f"{path}: cached tokens are from select layer {int(a['select_layer'])} but the model uses "
                    f"mm_vision_select_layer {ident.select_layer}{at}; re-run `wsi-llava encode --select-layer "
                    f"{ident.select_layer}` into another folder")
            if str(a["tower_sha256"]) != ident.sha256:
                raise TowerCacheError(
                    f"{path}: made by other tower weights (sha256 {str(a['tower_sha256'])[:16]}…) than the "
                    f"model's vision tower ({ident.sha256[:16]}…){at}; re-run `wsi-llava encode` with the "
                    "model's tower")
            if str(a["tower_config"]) != ident.config:
                theirs, ours = json.loads(str(a["tower_config"])), json.loads(ident.config)
                diff = ", ".join(f"{k}: cache {theirs.get(k)!r} vs model {ours.get(k)!r}"
                                 for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
                raise TowerCacheError(f"{path}: made by a tower of another architecture{at}: {diff}")
        if n_tiles is not None and n != int(n_tiles):
            raise TowerCacheError(f"{path}: caches {n} tiles but the slide file has {n_tiles}{at} (the slide "
                                  "changed since `wsi-llava encode`?); re-run it")
        return n, f

    def check(self, slide_id: str, n_tiles: int | None = None, where: str = "") -> Path:
        """Validate ``slide_id``'s file (exists, complete, same tower and layer, ``n_tiles`` tiles)."""
        path, f = self._open(slide_id, where)
        with f:
            self._validate(path, f, n_tiles, f" ({where})" if where else "")
        return path

    def check_records(self, records: Iterable) -> None:
        """Validate the file of every distinct slide of ``records`` (manifest records) against its slide
        H5's tile count; all problems are reported together."""
        problems, seen = [], set()
        for r in records:
            if (r.slide_id, r.h5_path) in seen:
                continue
            seen.add((r.slide_id, r.h5_path))
            try:
                self.check(r.slide_id, read_slide_meta(r.h5_path)[0], r.where)
            except (TowerCacheError, OSError, ValueError) as e:
                problems.append(str(e))
        if problems:
            more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise TowerCacheError(f"tower_cache {self.directory}: {len(problems)} slide(s) cannot be used:\n  "
                                  + "\n  ".join(problems[:20]) + more)

    def read(self, slide_id: str, patches_per_wsi: int | None = None, rng: np.random.Generator | None = None,
             where: str = "", n_tiles: int | None = None) -> CachedSlide:
        """Sample a slide's cached outputs exactly as ``load_slide`` samples its tiles: rows
        ``sample_indices(N, patches_per_wsi, rng)``, put in spatial (y, then x) order. The file is checked
        as in :meth:`check` (``n_tiles``: the slide H5's tile count, if known).

        Returns :class:`CachedSlide`: coords [K, 2] float32 and ``tower_outputs`` (tokens [1+K, D] float32,
        CLS first; cls_attention [K] float32; keys [K, Dk] float16)."""
        import torch

        path, f = self._open(slide_id, where)
        with f:
            n, ds = self._validate(path, f, n_tiles, f" ({where})" if where else "")
            coords_all = np.asarray(ds["coords"][:], dtype=np.float32)
            idx = sample_indices(n, patches_per_wsi, rng)
            c = coords_all[idx]
            order = np.lexsort((c[:, 0], c[:, 1]))  # row-major, as load_slide
            with FileReader(str(path)) as fr:
                tokens = _read_rows(fr, ds["tokens"], idx, order)
                keys = _read_rows(fr, ds["keys"], idx, order)
            cls_attention = np.asarray(ds["cls_attention"][:], dtype=np.float32)[idx[order]]
            cls_token = np.asarray(ds["cls_token"][:], dtype=np.float32)
            source = str(f.attrs.get("source_h5", ""))
        full = np.concatenate([cls_token[None], tokens.astype(np.float32)])
        out = TowerOutput(tokens=torch.from_numpy(full), cls_attention=torch.from_numpy(cls_attention),
                          keys=torch.from_numpy(np.ascontiguousarray(keys)))
        return CachedSlide(features=np.zeros((len(idx), 0), np.float32), coords=c[order], path=source or str(path),
                           n_total=n, tower_outputs=out)


def cache_for_model(directory: str | os.PathLike, model) -> TowerCache:
    """A :class:`TowerCache` checked against a WSI-LLaVA model's tower and ``mm_vision_select_layer``.

    Refuses models whose visual path has no slide encoder (``vision_mode: none``) or whose tower trains
    (``freeze_vision_tower: false``): cached outputs stand in for a frozen tower only."""
    cfg = model.config
    if cfg.vision_mode != "wsi":
        raise TowerCacheError(f"tower_cache {directory}: needs vision_mode: wsi (the cache holds slide-encoder "
                              f"outputs), but vision_mode is {cfg.vision_mode!r}")
    if not cfg.freeze_vision_tower:
        raise TowerCacheError(f"tower_cache {directory}: the vision tower trains (freeze_vision_tower: false), so "
                              "precomputed outputs cannot stand in for it; set freeze_vision_tower: true or drop "
                              "tower_cache")
    return TowerCache(directory, tower_identity(model.vision_tower, cfg.mm_vision_select_layer))
