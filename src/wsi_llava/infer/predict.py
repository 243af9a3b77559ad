"""`wsi-llava predict --model DIR --data test.csv --out preds.jsonl`: batched, resumable answers.

One JSON line per manifest row, appended and flushed as each batch completes. Rows are keyed by
(slide_id, question) (a repeated pair gets ``#2``, ``#3`` …); a rerun skips keys already in the output,
so an interrupted run resumed gives exactly one line per row. Rows whose slide cannot be read go to
``OUT.errors.jsonl`` (with the reason) instead of becoming zeros; a rerun retries them, and the file always
holds one line per row still failing (a rerun never repeats a line; a row answered since is removed).

Line format: ``key, slide_id, question, reference, prediction, choices, kind, category, dataset, row``
(``reference`` is the gold letter for multiple-choice rows, the caption for report rows), plus
``tiles``/``tile_scores``/``coords`` with ``--explain``.

Rows with an ``image_path`` (ROI image) and no ``h5_path`` are encoded on the fly with ``--tile-weights``
(and ``--tile-encoder``; each image once per run, :class:`~wsi_llava.infer.roi.RoiSlides`); without
it each such row is an error saying to run ``wsi-llava encode-roi`` or pass ``--tile-weights``.
Rows whose ``h5_path`` is a raw slide (``.svs``, ``.tif``, ``.ndpi``, ``.mrxs`` …, by suffix) are
extracted with ``--tile-weights`` once and cached (:mod:`.slide_features`); without it each such row is
an error saying to pass ``--tile-weights`` or run ``wsi-llava extract``.

With ``--slide-root DIR`` each row's slide file is looked up under DIR by its ``slide_id`` (relative path,
file stem or TCGA barcode; :class:`~wsi_llava.data.resolve.SlideResolver`, built once per run) instead of
its ``h5_path``: a manifest written on another machine runs as is. A slide id that fits no file (the
message names close matches) or several files (it lists them) is an error line.

Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), whole batches are shared out
among the processes by tile count; each appends to ``OUT.rank{r}-of-{w}.jsonl`` (resumable per rank) and
rank 0 then merges them into ``OUT`` in manifest order: the lines a single process writes, each row
generated in the same batch (:mod:`.shard`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.choices import choice_letter
from ..data.manifest import Record, load_manifest
from ..data.prompts import record_turn
from ..data.resolve import AmbiguousSlideError, SlideNotFoundError, SlideResolver
from ..data.slides import SlideError
from ..data.subset import add_subset_arguments, select
from ..data.wsi_reader import WsiError, is_raw_slide
from ..errors import WsiLlavaError
from ..fileio import atomic_write_text
from ..precision import add_precision_arguments
from . import shard
from .engine import SlideAssistant, zeros_like_slide
from .generation import GenerationSettings
from .roi import RoiSlides, add_tile_encoder_arguments
from .slide_features import add_raw_slide_arguments, feature_cache_from_args

ABLATIONS = ("none", "zero", "shuffle")


def row_keys(records: list[Record]) -> list[str]:
    """Stable key per row: ``slide_id<TAB>question`` (+ ``#n`` for the n-th repeat)."""
    seen: Counter = Counter()
    keys = []
    for r in records:
        base = f"{r.slide_id}\t{r.question or 'report'}"
        seen[base] += 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def read_done(path: Path) -> set[str]:
    """Keys already written to a predictions file (a torn last line is ignored and rewritten)."""
    done = set()
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.loads(line)["key"])
                except (json.JSONDecodeError, KeyError):
                    continue
    return done


def _repair_tail(path: Path) -> None:
    """Drop a partial last line left by a killed run, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.seek(cut)
            f.truncate()


def read_errors(path: Path) -> dict[str, dict]:
    """``key → error line`` of an errors file (the last line per key; torn or foreign lines ignored)."""
    out: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    out[str(entry["key"])] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return out


def write_errors(path: Path, errors: dict[str, dict]) -> None:
    """Rewrite the errors file atomically (removed when no error is left)."""
    if not errors:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in errors.values()))


def reference_of(record: Record) -> str:
    """Gold answer: the letter for multiple choice, the caption for reports, else the answer."""
    if record.kind == "mc":
        return choice_letter(record.answer, record.choices) or record.answer
    return record.caption if record.kind == "report" else record.answer


def shuffle_partner(slide_ids: list[str], seed: int = 0) -> dict[str, str]:
    """Each slide id → another slide id: a seeded random cyclic permutation of the sorted unique ids
    (Sattolo's shuffle, so no slide keeps its own features). Random rather than "the next id", so the
    partner's label is unrelated to the slide's even when ids follow the labels (as in synthetic cohorts)."""
    uniq = sorted(set(slide_ids))
    if len(uniq) < 2:
        raise ValueError("--ablate shuffle needs at least two different slides")
    order = list(range(len(uniq)))
    rng = np.random.default_rng(seed)
    for i in range(len(order) - 1, 0, -1):  # Sattolo: j < i, so the result is one cycle over all ids
        j = int(rng.integers(0, i))
        order[i], order[j] = order[j], order[i]
    return {uniq[i]: uniq[order[i]] for i in range(len(uniq))}


def predict(assistant: SlideAssistant, records: list[Record], out: Path, batch_size: int = 8,
            settings: GenerationSettings | None = None, ablate: str = "none", explain: bool = False,
            progress: bool = True, batches: list[int] | None = None, also_done: Sequence[Path] = (),
            rois=None, resolver: SlideResolver | None = None, raw=None) -> dict:
    """Answer every record not yet in ``out``; returns counts ``{"done", "skipped", "errors"}``.

    Batches are fixed: batch b holds rows ``b*batch_size …`` of ``records``, whatever is already done
    (a resumed run leaves out the rows done, it does not shift later rows into other batches).
    ``batches``: only these batch numbers (a rank's share of a sharded run; :mod:`.shard`).
    ``also_done``: other prediction files whose keys count as done.
    ``rois``: image path → :class:`Slide` (a :class:`~wsi_llava.infer.roi.RoiSlides`) for rows with an
    ``image_path`` and no ``h5_path``; None: such rows are errors.
    ``resolver``: each row's slide file is found by its ``slide_id`` with this resolver (``--slide-root``)
    instead of its ``h5_path``; a name that fits no file, or several, makes the row an error line.
    ``raw``: a :class:`~wsi_llava.infer.slide_features.FeatureCache` for rows whose ``h5_path`` is a raw
    slide; None: such rows are errors."""
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors_path = out.with_name(out.stem + ".errors.jsonl")
    _repair_tail(out)
    done = read_done(out)
    for other in also_done:
        done |= read_done(Path(other))
    errors = read_errors(errors_path)
    if any(k in done for k in errors) or (errors_path.exists() and not errors):
        errors = {k: e for k, e in errors.items() if k not in done}
        write_errors(errors_path, errors)
    keys = row_keys(records)
    groups = shard.batches(len(records), batch_size)
    if batches is not None:
        groups = [groups[b] for b in batches]
    todo = [[(keys[i], records[i]) for i in g if keys[i] not in done] for g in groups]
    by_id = {r.slide_id: r for r in records}

    def load_row(rec: Record, sid: str):
        if resolver is not None:
            return assistant.load(str(resolver.resolve(rec.slide_id)), slide_id=sid)
        if rec.h5_path and is_raw_slide(rec.h5_path):
            if raw is None:
                raise ValueError(f"{rec.where} [h5_path]: {rec.h5_path} is a raw slide; pass --tile-weights to "
                                 f"extract its tile features now (cached), or run `wsi-llava extract` and point "
                                 f"h5_path at its H5 file")
            return assistant.load(raw.entry(rec.h5_path), slide_id=sid)
        if rec.h5_path:
            return assistant.load(rec.h5_path, slide_id=sid)
        if rois is None:
            raise ValueError(f"{rec.where}: the row has only an ROI image ({rec.image_path}); run `wsi-llava "
                             f"encode-roi --data MANIFEST --tile-weights W --out DIR` and predict on DIR/manifest.csv, "
                             f"or pass --tile-weights to encode it now")
        return rois(rec.image_path)

    partner = shuffle_partner(list(by_id)) if ablate == "shuffle" else {}
    n_todo = sum(len(c) for c in todo)
    counts = {"done": 0, "skipped": sum(len(g) for g in groups) - n_todo, "errors": 0}
    with open(out, "a", encoding="utf-8") as fout, \
            tqdm(total=n_todo, desc="predict", unit="row", disable=not progress) as bar:
        for chunk in todo:
            if not chunk:
                continue
            ok, slides, users, qtexts = [], [], [], []
            for key, r in chunk:
                try:
                    sid = partner[r.slide_id] if ablate == "shuffle" else r.slide_id
                    slide = load_row(by_id[sid] if ablate == "shuffle" else r, sid)
                    if ablate == "zero":
                        slide = zeros_like_slide(slide)
                    user, _, qtext = record_turn(r)
                except (SlideError, WsiError, OSError, ValueError) as e:
                    counts["errors"] += 1
                    entry = {"key": key, "source": r.source, "row": r.row, "error": str(e)}
                    if errors.get(key) != entry:  # a rerun that fails the same way adds nothing
                        errors[key] = entry
                        write_errors(errors_path, errors)
                    continue
                ok.append((key, r))
                slides.append(slide)
                users.append(user)
                qtexts.append(qtext)
            if ok:
                answers = assistant.answer(slides, users, None, settings, explain=explain, question_texts=qtexts)
                for (key, r), ans in zip(ok, answers):
                    line = {"key": key, "slide_id": r.slide_id, "question": r.question,
                            "reference": reference_of(r), "prediction": ans.text,
                            "choices": list(r.choices) if r.choices else None, "kind": r.kind,
                            "category": r.category, "dataset": r.dataset, "row": r.row}
                    if explain:
                        line.update(tiles=ans.tile_indices, tile_scores=ans.tile_scores, coords=ans.coords)
                    fout.write(json.dumps(line) + "\n")
                fout.flush()
                os.fsync(fout.fileno())
                counts["done"] += len(ok)
                if any(key in errors for key, _ in ok):  # failed before, answered now
                    for key, _ in ok:
                        errors.pop(key, None)
                    write_errors(errors_path, errors)
            bar.update(len(chunk))
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained WSI-LLaVA folder")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--data", required=True, help="manifest CSV (or sharegpt JSON) of rows to answer")
    parser.add_argument("--out", required=True, help="predictions JSONL (appended; rerun resumes)")
    parser.add_argument("--split", help="only rows with this split value")
    parser.add_argument("--batch-size", type=int, default=8, help="rows generated together")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--ablate", choices=ABLATIONS, default="none",
                        help="image-reliance check: zeroed features, or features of another slide")
    parser.add_argument("--explain", action="store_true", help="record the selected tiles and scores per answer")
    add_subset_arguments(parser)
    parser.add_argument("--tower-cache", help="folder from `wsi-llava encode` (the model's tower): read cached tower "
                                              "outputs by slide_id instead of running the tower")
    parser.add_argument("--slide-root", help="folder of slide H5 files: each row's slide is found there by its "
                                             "slide_id (relative path, file stem or TCGA barcode) instead of h5_path")
    add_tile_encoder_arguments(parser, "rows with an image_path and no h5_path, or whose h5_path is a raw slide, "
                                       "are encoded on the fly")
    add_raw_slide_arguments(parser)


def merge_parts(out: Path, records: list[Record]) -> int:
    """Rank 0 of a sharded run: fold every rank's part (and its errors file) into ``out`` and
    ``OUT.errors.jsonl`` in manifest order (:func:`.shard.merge_jsonl`); returns the rows of
    ``records`` still failing."""
    out = Path(out)
    keys = row_keys(records)
    parts = shard.find_parts(out)
    part_errors = [p.with_name(p.stem + ".errors.jsonl") for p in parts]
    shard.merge_jsonl(out, keys, parts)
    done = read_done(out)
    errors_path = out.with_name(out.stem + ".errors.jsonl")
    errors = read_errors(errors_path)
    rank_of = {k: i for i, k in enumerate(keys)}
    new = {}
    for p in part_errors:
        new.update(read_errors(p))
    for k in sorted(new, key=lambda k: rank_of.get(k, len(rank_of))):
        errors[k] = new[k]
    errors = {k: e for k, e in errors.items() if k not in done}
    write_errors(errors_path, errors)
    for p in part_errors:
        p.unlink(missing_ok=True)
    return sum(k in errors for k in keys)


def _summary(counts: dict, out: str) -> str:
    return (f"{counts['done']} answered, {counts['skipped']} already done, {counts['errors']} unreadable "
            f"(see {Path(out).stem}.errors.jsonl)" if counts["errors"] else
            f"{counts['done']} answered, {counts['skipped']} already done -> {out}")


def main(args: argparse.Namespace) -> int:
    with shard.sharded() as sh:
        assistant = SlideAssistant.from_pretrained(args.model, tower_cache=getattr(args, "tower_cache", None),
                                                   device=shard.device_for(args.device, sh),
                                                   precision=args.precision, force_precision=args.force_precision)
        records = select(load_manifest(args.data, split=args.split), getattr(args, "category", None),
                         getattr(args, "limit", None))
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        out = Path(args.out)
        rois = raw = None
        image_only = any(r.image_path and not r.h5_path for r in records)
        raw_rows = any(r.h5_path and is_raw_slide(r.h5_path) for r in records)
        if image_only and (sh is not None or (args.tile_weights and getattr(args, "tower_cache", None))):
            raise WsiLlavaError("rows with only an ROI image (image_path, no h5_path) are encoded in the run: not "
                                "with --tower-cache or a sharded launch; run `wsi-llava encode-roi` first and "
                                "predict on its manifest")
        if raw_rows and sh is not None:
            raise WsiLlavaError("rows whose h5_path is a raw slide are extracted in the run: not in a sharded "
                                "launch; run `wsi-llava extract` first (or predict once without torchrun, which "
                                "fills the feature cache) and point h5_path at the H5 files")
        cfg = assistant.model.config
        if image_only and args.tile_weights:
            rois = RoiSlides.for_model(assistant.model, args.tile_weights, args.tile_encoder, assistant.patches_per_wsi)
        if raw_rows and args.tile_weights:
            from ..model.tile_encoder import load_tile_encoder

            encoder = rois.encoder if rois is not None else load_tile_encoder(args.tile_weights, args.tile_encoder)
            raw = feature_cache_from_args(args, encoder, cfg.feature_dim, str(assistant.model.device),
                                          assistant.precision)
        resolver = SlideResolver(args.slide_root) if getattr(args, "slide_root", None) else None
        if sh is None:
            counts = predict(assistant, records, out, args.batch_size, settings, args.ablate, args.explain,
                             rois=rois, resolver=resolver, raw=raw)
            print(_summary(counts, args.out))
            return 1 if counts["errors"] else 0
        # sharded: whole batches per rank, balanced by tiles; each rank appends to its own part file
        groups = shard.batches(len(records), args.batch_size)

        def row_path(r: Record) -> str:
            try:
                return str(resolver.resolve(r.slide_id)) if resolver is not None else r.h5_path
            except (AmbiguousSlideError, SlideNotFoundError):
                return ""  # the row's rank reports the error

        def batch_tiles() -> list[int]:
            n = shard.tile_counts([row_path(r) for r in records], assistant.patches_per_wsi)
            return [sum(n[i] for i in g) for g in groups]

        weights = sh.from_main(batch_tiles)
        mine = shard.balance(weights, sh.world)[sh.rank]
        stale = [p for p in shard.find_parts(out) if p != sh.part_path(out)]
        stale = [p for p in stale if not p.name.endswith(f"-of-{sh.world}{out.suffix}")]
        counts = predict(assistant, records, sh.part_path(out), args.batch_size, settings, args.ablate, args.explain,
                         progress=sh.is_main, batches=mine, also_done=[out, *stale], resolver=resolver)
        print(f"rank {sh.rank}/{sh.world}: {_summary(counts, str(sh.part_path(out)))}", flush=True)
        sh.barrier()
        failing = merge_parts(out, records) if sh.is_main else 0
        totals = sh.total([counts["done"], counts["skipped"], failing])
        if sh.is_main:
            print(_summary({"done": totals[0], "skipped": totals[1], "errors": totals[2]}, args.out)
                  + f" (merged from {sh.world} processes)")
        return 1 if totals[2] else 0
