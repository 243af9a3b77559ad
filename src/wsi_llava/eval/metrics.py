"""Scores for prediction rows: closed-ended accuracy, BLEU-1…4, ROUGE-1/2/L, METEOR, bootstrap CIs.

Rows are validated and classed by :mod:`wsi_llava.eval.rows` (``mc``, ``yes_no`` — a ``vqa`` row whose
reference is exactly Yes/No —, or ``open``). Closed answers are read by
:func:`~wsi_llava.eval.extract.extract_choice` / :func:`~wsi_llava.eval.extract.extract_yes_no`; those
that cannot be parsed count as wrong and are listed under ``"unparsed"``. Open answers get the
per-item scores of :mod:`wsi_llava.eval.text_metrics`; this module aggregates them.

Metric definitions (all reported on a 0–1 scale):

* ``bleu_n`` — sacrebleu *corpus* BLEU with ``tokenize="13a"``, ``max_ngram_order=n``, sacrebleu's
  default ``exp`` smoothing and case kept: ``BP · exp(Σ_{k=1..n} (1/n) · log p_k)``, i.e. uniform
  weights 1/n over the 1…n-gram precisions (BLEU-1 = BP·p1, BLEU-4 = BP·(p1 p2 p3 p4)^(1/4)), BP the
  corpus brevity penalty. Computed from per-item sufficient statistics, so resampling is exact.
* ``rouge_1``/``rouge_2``/``rouge_l`` — mean over items of rouge-score's F-measure with Porter
  stemming (``RougeScorer([...], use_stemmer=True)``; its tokenizer lowercases and drops punctuation).
* ``meteor`` — mean over items of ``nltk.translate.meteor_score.meteor_score`` (alpha 0.9, beta 3,
  gamma 0.5) on lowercased word/punctuation tokens, with WordNet synonyms when WordNet is available
  offline (see :func:`~wsi_llava.eval.wordnet.load_wordnet`); ``meteor_synonyms`` says whether it was.
* CIs — percentile bootstrap (default 1000 resamples, 95 %) over items, seeded (:mod:`wsi_llava.eval.stats`); corpus BLEU is
  recomputed on each resample. Accuracies also get exact intervals (``*_wilson``,
  ``*_clopper_pearson``; :mod:`wsi_llava.eval.stats`).
* ``binary_text_accuracy`` — open items whose question is yes/no (or "good or poor") and whose gold
  answer states it in a sentence (:mod:`wsi_llava.eval.polar`): the share whose prediction states the
  same label; gold answers that cannot be read are left out and counted (``n_binary_text_gold_unparsed``),
  predictions that cannot be read count wrong and are counted (``n_binary_text_unparsed``).
* ``baselines`` — the blind baselines of the same questions and the model's margin over the best
  one (:mod:`wsi_llava.eval.baselines`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .extract import extract_choice, extract_yes_no
from .rows import Item, prepare_items
from .stats import mean_with_ci, percentile_interval, proportion_intervals, resample_counts, stable_seed
from .text_metrics import (MAX_BLEU_ORDER, bleu_from_statistics, bleu_from_statistics_batch, bleu_statistics,
                           meteor_scores, rouge_scores)
from .wordnet import WordNet, load_wordnet

HEADLINE = (
    "closed_accuracy", "mc_accuracy", "yes_no_accuracy",
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor",
)
#: Which item count goes with each headline metric.
COUNT_OF = {
    "closed_accuracy": "n_closed", "mc_accuracy": "n_mc", "yes_no_accuracy": "n_yes_no",
    **{m: "n_open" for m in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor")},
}


@dataclass
class EvalConfig:
    """Settings of one evaluation."""

    bootstrap: int = 1000
    """Bootstrap resamples for the CIs; 0 disables CIs (``*_ci`` keys are then null)."""
    seed: int = 0
    """Seed of the bootstrap (the same seed gives identical CIs)."""
    confidence: float = 0.95
    """Two-sided coverage of the percentile interval."""
    bleu_tokenize: str = "13a"
    """sacrebleu tokenizer."""
    bleu_lowercase: bool = False
    """Lowercase before BLEU (sacrebleu ``lowercase``); case is kept by default, as sacrebleu does."""
    wordnet_dir: str | None = None
    """A Princeton WordNet 3.0 database directory for METEOR synonyms; None = search (see load_wordnet)."""
    groups: tuple[str, ...] = field(default=("category", "dataset", "group"))
    """Row fields to break the metrics down by (a ``by_<field>`` entry each, when any row has one);
    ``group`` is the benchmark group of the category (WSI-Bench morphology / diagnosis / treatment)."""


# --------------------------------------------------------------------------------------------------
# Closed-ended


def closed_answer(item: Item) -> str | None:
    """The letter / yes-no the prediction gives (``None`` = unparseable)."""
    if item.kind == "mc":
        return extract_choice(item.prediction, item.choices or ())
    if item.kind == "yes_no":
        label = extract_yes_no(item.prediction)
        if label is None:  # "The prognosis is generally poor." to "is the prognosis poor?"
            from .polar import binary_label

            label = binary_label(item.question, item.prediction)
        return label if label in ("yes", "no") else None
    raise ValueError(f"item {item.key!r} is open-ended, not closed")

def _bleu_with_ci(stats: np.ndarray, config: EvalConfig, rng: np.random.Generator) -> dict[str, object]:
    out: dict[str, object] = {}
    total = stats.sum(axis=0)
    for n in range(1, MAX_BLEU_ORDER + 1):
        out[f"bleu_{n}"] = bleu_from_statistics(total, n)
    if config.bootstrap <= 0:
        out.update({f"bleu_{n}_ci": None for n in range(1, MAX_BLEU_ORDER + 1)})
        return out
    sums = np.concatenate([w @ stats for w in resample_counts(len(stats), config.bootstrap, rng)])
    for n in range(1, MAX_BLEU_ORDER + 1):
        out[f"bleu_{n}_ci"] = percentile_interval(bleu_from_statistics_batch(sums, n), config.confidence)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ItemScores:
    """Per-item scores for a list of items (NaN where a score does not apply to the item's kind)."""

    correct: np.ndarray
    """[n] 1.0/0.0 for closed items."""
    parsed: list[str | None]
    """Extracted answer per item (None for open items and unparseable closed ones)."""
    bleu_stats: np.ndarray
    """[n, 10] BLEU statistics (zeros for closed items)."""
    open_scores: dict[str, np.ndarray]
    """rouge_1, rouge_2, rouge_l, meteor: [n] each."""
    binary: list[tuple[str | None, str | None] | None] = field(default_factory=list)
    """Open items with a yes/no (or "X or Y") question: (label of the gold answer, label of the
    prediction), None where unreadable; None for other items."""


def score_items(items: Sequence[Item], config: EvalConfig, wordnet: WordNet | None = None) -> ItemScores:
    """Compute every per-item score once; groups and bootstrap only re-aggregate these."""
    n = len(items)
    correct = np.full(n, np.nan)
    parsed: list[str | None] = [None] * n
    for i, it in enumerate(items):
        if it.kind != "open":
            parsed[i] = closed_answer(it)
            correct[i] = float(parsed[i] is not None and parsed[i] == it.reference)
    open_idx = [i for i, it in enumerate(items) if it.kind == "open"]
    hyps = [items[i].prediction for i in open_idx]
    refs = [items[i].reference for i in open_idx]
    bleu = np.zeros((n, 2 + 2 * MAX_BLEU_ORDER), dtype=np.int64)
    open_scores = {k: np.full(n, np.nan) for k in ("rouge_1", "rouge_2", "rouge_l", "meteor")}
    if open_idx:
        bleu[open_idx] = bleu_statistics(hyps, refs, tokenize=config.bleu_tokenize, lowercase=config.bleu_lowercase)
        for name, values in rouge_scores(hyps, refs).items():
            open_scores[name][open_idx] = values
        open_scores["meteor"][open_idx] = meteor_scores(hyps, refs, wordnet)
    return ItemScores(correct, parsed, bleu, open_scores, binary_scores(items))


def binary_scores(items: Sequence[Item]) -> list[tuple[str | None, str | None] | None]:
    """Per item: (gold label, predicted label) for open items whose question is binary, else None."""
    from .polar import binary_label, question_form

    out: list[tuple[str | None, str | None] | None] = []
    for it in items:
        if it.kind == "open" and question_form(it.question) is not None:
            out.append((binary_label(it.question, it.reference), binary_label(it.question, it.prediction)))
        else:
            out.append(None)
    return out


def summarise(
    items: Sequence[Item], scores: ItemScores, index: Sequence[int], config: EvalConfig, label: str
) -> dict[str, object]:
    """Headline numbers, CIs and counts for the items at ``index`` (``label`` seeds the bootstrap)."""
    idx = np.asarray(index, dtype=np.int64)
    kinds = np.array([items[i].kind for i in idx], dtype=object)
    out: dict[str, object] = {"n_items": int(len(idx))}

    def rng(part: str) -> np.random.Generator:
        return np.random.default_rng(stable_seed(config.seed, label, part))

    for name, mask in (
        ("closed_accuracy", kinds != "open"), ("mc_accuracy", kinds == "mc"), ("yes_no_accuracy", kinds == "yes_no"),
    ):
        sel = idx[mask]
        out[COUNT_OF[name]] = int(len(sel))
        if len(sel):
            out[name], out[f"{name}_ci"] = mean_with_ci(scores.correct[sel], bootstrap=config.bootstrap,
                                                           confidence=config.confidence, rng=rng(name))
            exact = proportion_intervals(scores.correct[sel], config.confidence)
            out[f"{name}_wilson"], out[f"{name}_clopper_pearson"] = exact["wilson"], exact["clopper_pearson"]
        else:
            out[name], out[f"{name}_ci"] = None, None
            out[f"{name}_wilson"], out[f"{name}_clopper_pearson"] = None, None
    closed_sel = idx[kinds != "open"]
    out["n_unparsed"] = int(sum(scores.parsed[i] is None for i in closed_sel))
    out.update(_binary_summary([scores.binary[i] for i in idx] if scores.binary else [], config))

    open_sel = idx[kinds == "open"]
    out["n_open"] = int(len(open_sel))
    if len(open_sel):
        out.update(_bleu_with_ci(scores.bleu_stats[open_sel], config, rng("bleu")))
        for name in ("rouge_1", "rouge_2", "rouge_l", "meteor"):
            out[name], out[f"{name}_ci"] = mean_with_ci(scores.open_scores[name][open_sel], bootstrap=config.bootstrap,
                                                       confidence=config.confidence, rng=rng(name))
    else:
        for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor"):
            out[name], out[f"{name}_ci"] = None, None
    return out


def _binary_summary(pairs: Sequence[tuple[str | None, str | None] | None], config: EvalConfig) -> dict[str, object]:
    """``binary_text_accuracy`` and its counts over (gold label, predicted label) pairs."""
    pairs = [p for p in pairs if p is not None]
    scored = [p for p in pairs if p[0] is not None]
    out: dict[str, object] = {
        "n_binary_text": len(scored), "n_binary_text_gold_unparsed": len(pairs) - len(scored),
        "n_binary_text_unparsed": sum(p[1] is None for p in scored),
    }
    if scored:
        right = np.array([float(g == p) for g, p in scored])
        out["binary_text_accuracy"] = float(right.mean())
        out["binary_text_accuracy_wilson"] = proportion_intervals(right, config.confidence)["wilson"]
    else:
        out["binary_text_accuracy"], out["binary_text_accuracy_wilson"] = None, None
    return out


def _unparsed_entries(items: Sequence[Item], scores: ItemScores) -> list[dict[str, object]]:
    out = []
    for it, parsed in zip(items, scores.parsed):
        if it.kind != "open" and parsed is None:
            out.append(
                {
                    "key": it.key, "row": it.row, "slide_id": it.slide_id, "kind": it.kind,
                    "category": it.category, "reference": it.reference,
                    "choices": list(it.choices) if it.choices else None, "prediction": it.prediction,
                }
            )
    return out


def evaluate_items(items: Sequence[Item], config: EvalConfig | None = None) -> dict[str, object]:
    """Metrics for validated items: headline numbers with CIs, breakdowns, unparsed list, settings."""
    return evaluate_items_with_scores(items, config)[0]


def evaluate_items_with_scores(items: Sequence[Item], config: EvalConfig | None = None) -> tuple[dict[str, object], ItemScores]:
    """:func:`evaluate_items` and the per-item scores (for paired tests between runs)."""
    config = config or EvalConfig()
    wordnet = load_wordnet(config.wordnet_dir)
    scores = score_items(items, config, wordnet if any(it.kind == "open" for it in items) else None)
    result = aggregate(items, scores, config)
    result["meteor_synonyms"] = wordnet.available
    result["settings"] = settings_dict(config, wordnet)
    return result, scores


def aggregate(items: Sequence[Item], scores: ItemScores, config: EvalConfig) -> dict[str, object]:
    """Overall and per-group numbers with CIs, plus the unparsed list, from per-item scores."""
    from .baselines import baselines_with_model, group_of

    result: dict[str, object] = summarise(items, scores, range(len(items)), config, "__all__")
    for group in config.groups:
        labels = [group_of(it.category) if group == "group" else getattr(it, group) for it in items]
        if not any(label is not None for label in labels):
            continue
        members: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label if label is not None else "(none)", []).append(i)
        result[f"by_{group}"] = {
            name: summarise(items, scores, members[name], config, f"{group}={name}") for name in sorted(members)
        }
    result["unparsed"] = _unparsed_entries(items, scores)
    if any(it.kind != "open" for it in items) or any(b is not None for b in scores.binary):
        result["baselines"] = baselines_with_model(items, scores.correct, bootstrap=config.bootstrap,
                                                   confidence=config.confidence, seed=config.seed)
    return result


def settings_dict(config: EvalConfig, wordnet: WordNet) -> dict[str, object]:
    """What the numbers depend on (recorded in metrics.json)."""
    import nltk
    import rouge_score
    import sacrebleu

    return {
        "bootstrap": config.bootstrap,
        "seed": config.seed,
        "confidence": config.confidence,
        "bleu": f"sacrebleu {sacrebleu.__version__} corpus BLEU, tokenize={config.bleu_tokenize}, "
        f"lowercase={config.bleu_lowercase}, smooth=exp, weights 1/n over 1..n-grams",
        "rouge": f"rouge-score {getattr(rouge_score, '__version__', '0.1.2')} F-measure, use_stemmer=True",
        "meteor": f"nltk {nltk.__version__} meteor_score (alpha 0.9, beta 3, gamma 0.5), "
        f"synonyms={'yes' if wordnet.available else 'no'}",
        "wordnet": wordnet.source,
        "scale": "all metrics on 0-1",
    }


def evaluate_predictions(
    rows: Sequence[Mapping], *, bootstrap: int = 1000, seed: int = 0, config: EvalConfig | None = None,
    source: str = "predictions",
) -> dict[str, object]:
    """Score prediction rows (dicts as ``predict`` writes them) → the ``metrics.json`` dict.

    Keys: ``n_items``, ``closed_accuracy`` (+ ``_ci``, ``n_closed``), ``mc_accuracy``, ``yes_no_accuracy``,
    ``n_unparsed``, ``bleu_1``…``bleu_4``, ``rouge_1``, ``rouge_2``, ``rouge_l``, ``meteor`` (each with
    ``_ci``; ``n_open``), ``by_category`` / ``by_dataset`` (same keys per group), ``unparsed`` (list),
    ``meteor_synonyms``, ``settings``. Metrics with no items are ``None``.
    """
    if config is None:
        config = EvalConfig(bootstrap=bootstrap, seed=seed)
    items = prepare_items(rows, source)
    return evaluate_items(items, config)


def compare_metrics(base: Mapping[str, object], other: Mapping[str, object]) -> dict[str, float | None]:
    """Per headline metric, ``other − base`` (e.g. zeroed-slide run minus normal run); None where absent."""
    out: dict[str, float | None] = {}
    for name in HEADLINE:
        a, b = base.get(name), other.get(name)
        out[name] = None if a is None or b is None else float(b) - float(a)
    return out
