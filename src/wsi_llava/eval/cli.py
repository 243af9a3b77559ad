"""`wsi-llava eval --predictions preds.jsonl [--data test.csv] --out DIR`: score predictions offline.

Writes ``DIR/metrics.json`` and ``DIR/report.md`` and prints a summary table. Every report carries the
blind baselines of its questions and the model's margin over the best one
(:mod:`~wsi_llava.eval.baselines`), exact intervals beside the bootstrap, and the question set's
provenance when the manifest has a ``.provenance.json`` sidecar. ``--compare NAME=OTHER.jsonl``
scores further prediction files of the same rows (e.g. from ``predict --ablate zero``), reports each
one's numbers and gap, and paired tests (McNemar, paired bootstrap; :mod:`~wsi_llava.eval.paired`).

``--baselines-only --data FILES`` needs no model and no slides: the blind baselines of question files
(WSI-Bench JSON, SlideBench CSV, our manifest). ``--model DIR --circular`` re-asks every
multiple-choice question under each rotation of its options (:mod:`~wsi_llava.eval.circular`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.subset import add_subset_arguments, select
from ..precision import add_precision_arguments
from .circular import circular_metrics, rotate_records
from .judge import JudgeConfig
from .metrics import EvalConfig, evaluate_items_with_scores
from .rows import EvalInputError, prepare_items
from .report import (
    baselines_summary,
    summary_table,
    write_baselines_outputs,
    write_outputs,
)


def load_prediction_rows(path: str | os.PathLike) -> list[dict]:
    """Read a predictions JSONL file; each row gets ``_line`` (1-based) for error messages.

    Blank lines are skipped; invalid JSON, non-object lines and repeated keys are errors naming the
    file and line(s).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: predictions file not found")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalInputError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            key = row.get("key")
            if key is not None:
                if key in seen:
                    raise EvalInputError(f"{path}, line {lineno}: key {key!r} repeats line {seen[key]} (one line per row expected)")
                seen[key] = lineno
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise EvalInputError(f"{path}: no predictions")
    return rows


def join_data(rows: list[dict], data_path: str, split: str | None = None,
              categories: Sequence[str] | None = None, limit: int | None = None) -> list[dict]:
    """Match predictions to the manifest they came from by ``row`` (its line number).

    Fills a prediction's missing ``category``/``dataset`` from the manifest and returns the manifest
    rows that have no prediction (``[{row, slide_id, question}]``). A prediction whose row is not in
    the manifest is an error. With ``categories``/``limit`` only that subset of the manifest counts:
    predictions of other rows are removed from ``rows`` (in place).
    """
    from ..data.manifest import load_manifest

    manifest = load_manifest(data_path, split=split)
    all_rows = {r.row for r in manifest}
    records = {r.row: r for r in select(manifest, categories, limit)}
    if categories or limit:
        rows[:] = [r for r in rows if r.get("row") in records or r.get("row") not in all_rows]
    predicted = set()
    for row in rows:
        rec = records.get(row.get("row"))
        if rec is None:
            raise EvalInputError(
                f"prediction line {row.get('_line')}: row {row.get('row')!r} is not a row of {data_path}"
                + (f" (split {split!r})" if split else "")
            )
        predicted.add(rec.row)
        for name in ("category", "dataset"):
            if not row.get(name) and getattr(rec, name):
                row[name] = getattr(rec, name)
    return [
        {"row": r.row, "slide_id": r.slide_id, "question": r.question or "(report)"}
        for n, r in sorted(records.items())
        if n not in predicted
    ]


def _parse_compare(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"--compare expects NAME=PREDICTIONS.jsonl, got {value!r}")
        out[name] = path
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", metavar="JSONL", help="predictions written by `wsi-llava predict`")
    src.add_argument("--model", metavar="DIR",
                     help="a trained model: run `predict` on --data first (into OUT/predictions.jsonl, resumable)")
    src.add_argument("--baselines-only", action="store_true",
                     help="no model, no slides: blind baselines of the question files in --data "
                          "(WSI-Bench JSON, SlideBench CSV, manifest CSV)")
    parser.add_argument("--circular", action="store_true",
                        help="with --model: re-ask each multiple-choice question under every rotation of its options "
                             "(CircularEval): circular accuracy and consistency")
    parser.add_argument("--fit-data", nargs="+", metavar="FILE",
                        help="question files (e.g. the train split) to choose the constant letter and yes/no majority "
                             "on, per category (default: the scored questions themselves, which is optimistic)")
    parser.add_argument("--ablate", action="append", default=[], choices=("zero", "shuffle"),
                        help="with --model: also predict with zeroed features or another slide's features and "
                             "report the drop (image-reliance check); repeatable")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: rows generated together")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="with --model: longest answer in tokens")
    add_precision_arguments(parser, device=True)
    parser.add_argument("--data", metavar="FILE", nargs="+",
                        help="the manifest the predictions came from: fills category/dataset, lists rows with no "
                             "prediction; with --baselines-only: one or more question files")
    parser.add_argument("--split", help="with --data: only rows of this split")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and report.md")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--confidence", type=float, default=0.95, help="CI coverage")
    parser.add_argument("--bleu-lowercase", action="store_true", help="lowercase before BLEU (default keeps case)")
    parser.add_argument("--wordnet-dir", help="Princeton WordNet 3.0 directory for METEOR synonyms (default: search)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=JSONL",
                        help="another predictions file of the same rows (e.g. predict --ablate zero); repeatable")
    add_subset_arguments(parser)
    parser.add_argument("--judge-url", metavar="URL",
                        help="OpenAI-compatible API (http://host:port/v1) for optional LLM-judge precision/relevance")
    parser.add_argument("--judge-model", default="judge", help="model name sent to the judge endpoint")
    parser.add_argument("--judge-key-env", metavar="VAR", help="environment variable holding the judge API key, if needed")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    if args.bootstrap < 0:
        raise EvalInputError("--bootstrap must be >= 0")
    if not 0.0 < args.confidence < 1.0:
        raise EvalInputError("--confidence must be between 0 and 1")
    return EvalConfig(
        bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence,
        bleu_lowercase=args.bleu_lowercase, wordnet_dir=args.wordnet_dir,
    )


def _subset_rows(rows: list[dict], categories: Sequence[str] | None, limit: int | None) -> list[dict]:
    return select(rows, categories, limit, category_of=lambda r: r.get("category"), what="predictions")


def score_file_with_scores(path: str, config: EvalConfig, data: str | None = None, split: str | None = None,
                           judge: JudgeConfig | None = None, categories: Sequence[str] | None = None,
                           limit: int | None = None) -> tuple[dict, list, object, list[dict]]:
    """Score one predictions file → (metrics, items, per-item scores, rows)."""
    rows = load_prediction_rows(path)
    if data:
        missing = join_data(rows, data, split, categories, limit)
    else:
        missing = []
        rows = _subset_rows(rows, categories, limit)
    if not rows:
        raise EvalInputError(f"{path}: no predictions left after --category/--limit")
    items = prepare_items(rows, path)
    metrics, scores = evaluate_items_with_scores(items, config)
    if data:
        metrics["n_missing"] = len(missing)
        metrics["missing"] = missing
        from ..data.provenance import read_provenance

        provenance = read_provenance(data)
        if provenance is not None:
            metrics["provenance"] = provenance
    if judge is not None:
        from .judge import judge_items

        metrics["judge"] = judge_items(items, judge, config)
    return metrics, items, scores, rows


def run(predictions: str, out: str, config: EvalConfig, *, data: str | None = None, split: str | None = None,
        compare: Mapping[str, str] | None = None, judge: JudgeConfig | None = None,
        categories: Sequence[str] | None = None, limit: int | None = None,
        circular: Mapping[int, str] | None = None, fit_data: Sequence[str] | None = None) -> dict:
    """Score ``predictions`` (and each comparison file), write the outputs; returns the main metrics."""
    from .baselines import baselines_with_model, group_of
    from .paired import match_items, paired_tests

    metrics, items, scores, rows = score_file_with_scores(predictions, config, data, split, judge, categories, limit)
    comparisons, runs = {}, {}
    for name, path in (compare or {}).items():
        other, other_items, other_scores, _ = score_file_with_scores(path, config, data, split, None, categories, limit)
        other["paired"] = paired_tests(items, scores, other_items, other_scores, config, name)
        comparisons[name] = other
        aligned = np.full(len(items), np.nan)
        for i, j in match_items(items, other_items)[0]:
            aligned[i] = other_scores.correct[j]
        runs[name] = aligned
    fit = _fit_questions(fit_data, split)
    if "baselines" in metrics and (runs or fit is not None):
        metrics["baselines"] = baselines_with_model(items, scores.correct, bootstrap=config.bootstrap,
                                                    confidence=config.confidence, seed=config.seed, runs=runs, fit=fit)
    if circular:
        by_rotation = {0: rows, **{r: _subset_rows(load_prediction_rows(p), categories, None) for r, p in circular.items()}}
        metrics["circular"] = circular_metrics(by_rotation, config.confidence, group_of=group_of)
    json_path, md_path = write_outputs(metrics, out, source=predictions, comparisons=comparisons or None)
    print(summary_table(metrics))
    for name, other in comparisons.items():
        print(f"\n[{name}]\n{summary_table(other)}")
    print(f"\nwrote {json_path} and {md_path}")
    return metrics


def _fit_questions(paths: Sequence[str] | None, split: str | None):
    if not paths:
        return None
    from .questions import load_questions

    return load_questions(paths)[0]


def run_baselines(data: Sequence[str], out: str, config: EvalConfig, *, split: str | None = None,
                  categories: Sequence[str] | None = None, limit: int | None = None,
                  fit_data: Sequence[str] | None = None) -> dict:
    """``--baselines-only``: blind baselines of question files (no model, no slides) → outputs."""
    from .baselines import baseline_table, public
    from .questions import load_questions

    questions, provenance = load_questions(data, split)
    questions = select(questions, categories, limit, what="questions")
    table = baseline_table(questions, config.confidence, _fit_questions(fit_data, split))
    metrics = {
        "mode": "baselines-only", "n_items": len(questions),
        "n_closed": sum(q.kind != "open" for q in questions),
        "n_mc": sum(q.kind == "mc" for q in questions), "n_yes_no": sum(q.kind == "yes_no" for q in questions),
        "n_open": sum(q.kind == "open" for q in questions),
        "baselines": public(table), "provenance": provenance,
        "settings": {"confidence": config.confidence, "data": list(data), "split": split,
                     "category": list(categories or []), "limit": limit, "fit_data": list(fit_data or [])},
    }
    json_path, md_path = write_baselines_outputs(metrics, out)
    print(baselines_summary(metrics))
    print(f"\nwrote {json_path} and {md_path}")
    return metrics


def judge_from_args(args: argparse.Namespace) -> JudgeConfig | None:
    if not args.judge_url:
        return None
    key = None
    if args.judge_key_env:
        key = os.environ.get(args.judge_key_env)
        if not key:
            raise EvalInputError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set")
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api_key=key, timeout=args.judge_timeout)


def predict_for_eval(model: str, data: str, out: str, split: str | None, ablations: Sequence[str],
                     batch_size: int = 8, max_new_tokens: int = 256, *, categories: Sequence[str] | None = None,
                     limit: int | None = None, circular: bool = False, device: str = "auto",
                     precision: str = "auto", force_precision: bool = False) -> tuple[str, dict[str, str], dict[int, str]]:
    """Run ``predict`` for ``eval --model``: OUT/predictions.jsonl, OUT/predictions_{ablation}.jsonl and,
    with ``circular``, OUT/predictions_rotation{r}.jsonl (each resumable). Returns the main file,
    ``{ablation: file}`` and ``{rotation: file}``."""
    from ..data.manifest import load_manifest
    from ..infer.engine import SlideAssistant
    from ..infer.generation import GenerationSettings
    from ..infer.predict import predict

    assistant = SlideAssistant.from_pretrained(model, device=device, precision=precision,
                                               force_precision=force_precision)
    records = select(load_manifest(data, split=split), categories, limit)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    folder = Path(out)
    main_file = folder / "predictions.jsonl"
    predict(assistant, records, main_file, batch_size, settings)
    extra = {}
    for ablation in ablations:
        path = folder / f"predictions_{ablation}.jsonl"
        predict(assistant, records, path, batch_size, settings, ablate=ablation)
        extra[ablation] = str(path)
    rotations = {}
    if circular:
        rotated = rotate_records(records)
        if not rotated:
            raise EvalInputError(f"--circular: {data} has no multiple-choice rows" + (" in this subset" if categories or limit else ""))
        for r, rows in rotated.items():
            path = folder / f"predictions_rotation{r}.jsonl"
            predict(assistant, rows, path, batch_size, settings)
            rotations[r] = str(path)
    return str(main_file), extra, rotations


def main(args: argparse.Namespace) -> int:
    try:
        compare = _parse_compare(args.compare)
        config = config_from_args(args)
        if args.baselines_only:
            if not args.data:
                raise EvalInputError("--baselines-only needs --data FILE [FILE ...] (question files)")
            if args.compare or args.ablate or args.circular:
                raise EvalInputError("--baselines-only scores no predictions: drop --compare/--ablate/--circular")
            run_baselines(args.data, args.out, config, split=args.split, categories=args.category, limit=args.limit,
                          fit_data=args.fit_data)
            return 0
        if args.data and len(args.data) > 1:
            raise EvalInputError("--data takes one manifest with --predictions/--model (several files only with --baselines-only)")
        data = args.data[0] if args.data else None
        predictions = args.predictions
        rotations = None
        if args.model:
            if not data:
                raise EvalInputError("--model needs --data (the manifest to answer)")
            predictions, ablated, rotations = predict_for_eval(
                args.model, data, args.out, args.split, args.ablate, args.batch_size, args.max_new_tokens,
                categories=args.category, limit=args.limit, circular=args.circular, device=args.device,
                precision=args.precision, force_precision=args.force_precision)
            compare.update({f"ablate_{k}": v for k, v in ablated.items()})
        elif args.ablate:
            raise EvalInputError("--ablate needs --model (use --compare NAME=JSONL for existing predictions)")
        elif args.circular:
            raise EvalInputError("--circular needs --model (it asks the model each question under every option order)")
        run(predictions, args.out, config, data=data, split=args.split, compare=compare,
            judge=judge_from_args(args), categories=args.category, limit=args.limit, circular=rotations,
            fit_data=args.fit_data)
    except (ValueError, FileNotFoundError) as e:  # EvalInputError, ManifestError (--data): a user error
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
