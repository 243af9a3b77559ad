"""Rewrite slide H5 files with contiguous storage (the fastest layout): ``wsi-llava convert-h5``.

``features`` becomes a contiguous float32 dataset (float16 with ``--float16``, or when the input
already is float16; float64 input is narrowed to float32), the coordinate dataset is kept under its
name, values and dtype but stored contiguously, and every other object and attribute is copied
unchanged (soft and external links as links, never followed). Rows keep their order. The input gets
the full check ``validate`` runs (:func:`~wsi_llava.data.scan.scan_slide`'s: layout, every chunk
present, every tile and coordinate; see docs/data.md): a file ``validate`` refuses is reported and not
written, so a half-written input is never laundered into a complete-looking contiguous file.

Each output is written to a temporary file in the output folder, flushed and fsynced, then renamed
into place, so an interrupted run never leaves a partial ``.h5`` under the final name. Existing
outputs are skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .scan import iter_blocks
from .slide_checks import FEATURES_KEY, corrupt_as_slide_error, describe_layout, slide_datasets
from .slides import SlideError, open_slide


@dataclass(frozen=True)
class ConvertResult:
    """Outcome for one input file."""

    src: str
    """Input H5 path."""
    dst: str
    """Output H5 path."""
    status: str
    """``written``, ``skipped`` (output exists) or ``failed``."""
    message: str
    """Layout change (``chunked(1, 1536) → contiguous float32``) or the error."""


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, float16: bool = False, block_rows: int = 8192
) -> str:
    """Rewrite one slide file contiguously; atomic (temp file + fsync + rename).

    Returns a one-line description of the change. Raises :class:`SlideError` for bad input (no
    output is left behind).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise SlideError(f"{src}: output would overwrite the input; choose another --out folder")
    out_dir = os.path.dirname(os.path.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(dst)}.tmp{os.getpid()}")
    try:
        with open_slide(src) as fin:
            with corrupt_as_slide_error(src):
                feats_ds, coords_ds, coords_key, _ = slide_datasets(fin, src, allow_float64=True)
            n, d = feats_ds.shape
            out_dtype = np.float16 if (float16 or feats_ds.dtype == np.float16) else np.float32
            before = f"{describe_layout(feats_ds)} {feats_ds.dtype}"
            with h5py.File(tmp, "w") as fout:
                for key, value in fin.attrs.items():
                    fout.attrs[key] = value
                for name in fin:
                    if name not in (FEATURES_KEY, coords_key):
                        _copy_link(fin, fout, name)
                fo = fout.create_dataset(FEATURES_KEY, shape=(n, d), dtype=out_dtype)
                co = fout.create_dataset(coords_key, shape=coords_ds.shape, dtype=coords_ds.dtype)
                for key, value in feats_ds.attrs.items():
                    fo.attrs[key] = value
                for key, value in coords_ds.attrs.items():
                    co.attrs[key] = value
                for r0, feats, coords in iter_blocks(src, feats_ds, coords_ds, coords_key, block_rows):
                    with np.errstate(over="ignore"):  # overflow is checked just below
                        block = feats.astype(out_dtype)
                    if out_dtype == np.float16 and not np.isfinite(block).all():
                        r = r0 + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                        raise SlideError(
                            f"{src}: `{FEATURES_KEY}` row {r} overflows float16 (|value| > 65504); "
                            "convert without --float16"
                        )
                    fo[r0 : r0 + len(block)] = block
                    co[r0 : r0 + len(coords)] = coords
                fout.attrs["wsi_llava_converted_from"] = os.path.abspath(src)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
        _fsync_dir(out_dir)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return f"{before} → contiguous {np.dtype(out_dtype).name} (N={n}, D={d})"


def _copy_link(fin: h5py.File, fout: h5py.File, name: str) -> None:
    """Copy one other top-level object; soft and external links are copied as links, never followed
    (an external link may point anywhere, a FIFO included)."""
    link = fin.get(name, getlink=True)
    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
        fout[name] = link
    else:
        fin.copy(fin[name], fout, name=name)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders → their ``*.h5`` files (sorted, not recursive)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.glob("*.h5") if q.is_file())
        else:
            out.append(p)
    return out


def convert_many(
    inputs: list[str], out_dir: str | os.PathLike, float16: bool = False, overwrite: bool = False
) -> list[ConvertResult]:
    """Convert every input into ``out_dir`` (same file names). Bad inputs are reported, not fatal."""
    files = expand_inputs(inputs)
    names: dict[str, Path] = {}
    for f in files:
        if f.name in names and names[f.name].resolve() != f.resolve():
            raise SlideError(f"two inputs share the file name {f.name!r} ({names[f.name]} and {f}); "
                             "convert them into different --out folders")
        names[f.name] = f
    results = []
    for f in files:
        dst = Path(out_dir) / f.name
        if dst.exists() and not overwrite and not (f.exists() and dst.resolve() == f.resolve()):
            results.append(ConvertResult(str(f), str(dst), "skipped", "output exists (use --overwrite)"))
            continue
        try:
            msg = convert_file(f, dst, float16=float16)
            results.append(ConvertResult(str(f), str(dst), "written", msg))
        except SlideError as e:
            results.append(ConvertResult(str(f), str(dst), "failed", str(e)))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="slide .h5 files or folders of them")
    parser.add_argument("--out", required=True, help="output folder (file names are kept)")
    parser.add_argument("--float16", action="store_true", help="store features as float16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")


def main(args: argparse.Namespace) -> int:
    try:
        results = convert_many(args.inputs, args.out, float16=args.float16, overwrite=args.overwrite)
    except SlideError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print("error: no .h5 inputs found", file=sys.stderr)
        return 2
    for r in results:
        stream = sys.stderr if r.status == "failed" else sys.stdout
        text = r.message if r.status == "failed" else f"{r.src}: {r.message}"  # errors name the file
        print(f"{r.status:>8}  {text}", file=stream)
    failed = sum(r.status == "failed" for r in results)
    written = sum(r.status == "written" for r in results)
    print(f"{written} written, {len(results) - written - failed} skipped, {failed} failed → {args.out}")
    return 1 if failed else 0
