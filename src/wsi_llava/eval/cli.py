"""`wsi-llava eval --predictions preds.jsonl [--data test.csv] --out DIR`: score predictions offline.

Writes ``DIR/metrics.json`` and ``DIR/report.md`` and prints a summary table. ``--compare
NAME=OTHER.jsonl`` scores further prediction files of the same rows (e.g. from ``predict --ablate
zero``) and reports each one's numbers and its gap to the main run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .metrics import EvalConfig, EvalInputError, evaluate_items, prepare_items
from .judge import JudgeConfig
from .report import summary_table, write_outputs


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


def join_data(rows: list[dict], data_path: str, split: str | None = None) -> list[dict]:
    """Match predictions to the manifest they came from by ``row`` (its line number).

    Fills a prediction's missing ``category``/``dataset`` from the manifest and returns the manifest
    rows that have no prediction (``[{row, slide_id, question}]``). A prediction whose row is not in
    the manifest is an error.
    """
    from ..data.manifest import load_manifest

    records = {r.row: r for r in load_manifest(data_path, split=split)}
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
    parser.add_argument("--ablate", action="append", default=[], choices=("zero", "shuffle"),
                        help="with --model: also predict with zeroed features or another slide's features and "
                             "report the drop (image-reliance check); repeatable")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: rows generated together")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="with --model: longest answer in tokens")
    parser.add_argument("--data", metavar="CSV",
                        help="the manifest the predictions came from: fills category/dataset, lists rows with no prediction")
    parser.add_argument("--split", help="with --data: only rows of this split")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and report.md")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--confidence", type=float, default=0.95, help="CI coverage")
    parser.add_argument("--bleu-lowercase", action="store_true", help="lowercase before BLEU (default keeps case)")
    parser.add_argument("--wordnet-dir", help="Princeton WordNet 3.0 directory for METEOR synonyms (default: search)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=JSONL",
                        help="another predictions file of the same rows (e.g. predict --ablate zero); repeatable")
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


def score_file(path: str, config: EvalConfig, data: str | None = None, split: str | None = None,
               judge: JudgeConfig | None = None) -> dict:
    """Score one predictions file (joined to ``data`` when given; LLM-judged when ``judge``) → metrics."""
    rows = load_prediction_rows(path)
    missing = join_data(rows, data, split) if data else []
    items = prepare_items(rows, path)
    metrics = evaluate_items(items, config)
    if data:
        metrics["n_missing"] = len(missing)
        metrics["missing"] = missing
    if judge is not None:
        from .judge import judge_items

        metrics["judge"] = judge_items(items, judge, config)
    return metrics


def run(predictions: str, out: str, config: EvalConfig, *, data: str | None = None, split: str | None = None,
        compare: Mapping[str, str] | None = None, judge: JudgeConfig | None = None) -> dict:
    """Score ``predictions`` (and each comparison file), write the outputs; returns the main metrics."""
    metrics = score_file(predictions, config, data, split, judge)
    comparisons = {name: score_file(path, config, data, split) for name, path in (compare or {}).items()}
    json_path, md_path = write_outputs(metrics, out, source=predictions, comparisons=comparisons or None)
    print(summary_table(metrics))
    for name, other in comparisons.items():
        print(f"\n[{name}]\n{summary_table(other)}")
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
                     batch_size: int = 8, max_new_tokens: int = 256) -> tuple[str, dict[str, str]]:
    """Run ``predict`` for ``eval --model``: OUT/predictions.jsonl and OUT/predictions_{ablation}.jsonl
    (each resumable). Returns the main file and ``{ablation: file}``."""
    from ..data.manifest import load_manifest
    from ..infer.engine import GenerationSettings, SlideAssistant
    from ..infer.predict import predict

    assistant = SlideAssistant.from_pretrained(model)
    records = load_manifest(data, split=split)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    folder = Path(out)
    main_file = folder / "predictions.jsonl"
    predict(assistant, records, main_file, batch_size, settings)
    extra = {}
    for ablation in ablations:
        path = folder / f"predictions_{ablation}.jsonl"
        predict(assistant, records, path, batch_size, settings, ablate=ablation)
        extra[ablation] = str(path)
    return str(main_file), extra


def main(args: argparse.Namespace) -> int:
    try:
        compare = _parse_compare(args.compare)
        predictions = args.predictions
        if args.model:
            if not args.data:
                raise EvalInputError("--model needs --data (the manifest to answer)")
            predictions, ablated = predict_for_eval(args.model, args.data, args.out, args.split, args.ablate,
                                                    args.batch_size, args.max_new_tokens)
            compare.update({f"ablate_{k}": v for k, v in ablated.items()})
        elif args.ablate:
            raise EvalInputError("--ablate needs --model (use --compare NAME=JSONL for existing predictions)")
        run(predictions, args.out, config_from_args(args), data=args.data, split=args.split,
            compare=compare, judge=judge_from_args(args))
    except (ValueError, FileNotFoundError) as e:  # EvalInputError, ManifestError (--data)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
