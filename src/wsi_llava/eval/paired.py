"""Paired tests between two prediction files of the same questions (``eval --compare NAME=FILE``).

Items are matched by ``row`` (the manifest line both files came from) when both items have one, else
by ``key``. On the matched items:

* closed answers — McNemar's exact test (:func:`~wsi_llava.eval.stats.mcnemar_exact`) on the
  discordant pairs (``b`` = main right & other wrong, ``c`` = main wrong & other right), plus the
  accuracy difference with a paired-bootstrap interval;
* open answers — paired bootstrap of the difference in BLEU-4 (corpus, recomputed per resample),
  ROUGE-1/2/L and METEOR (means).

Differences are ``other − main``, the same sign as the comparison table's Δ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import EvalConfig, ItemScores
from .rows import Item
from .stats import mcnemar_exact, paired_bootstrap, stable_seed
from .text_metrics import MAX_BLEU_ORDER, bleu_from_statistics_batch

OPEN_METRICS = ("rouge_1", "rouge_2", "rouge_l", "meteor")


def _match_key(item: Item) -> object:
    return ("row", item.row) if item.row is not None else ("key", item.key)


def match_items(main: Sequence[Item], other: Sequence[Item]) -> tuple[list[tuple[int, int]], int, int]:
    """Index pairs (main, other) of the same question; counts of unmatched items on each side."""
    where = {}
    for j, it in enumerate(other):
        where.setdefault(_match_key(it), j)
    pairs, used = [], set()
    for i, it in enumerate(main):
        j = where.get(_match_key(it))
        if j is not None and j not in used and other[j].kind == it.kind:
            pairs.append((i, j))
            used.add(j)
    return pairs, len(main) - len(pairs), len(other) - len(pairs)


def paired_tests(main: Sequence[Item], main_scores: ItemScores, other: Sequence[Item], other_scores: ItemScores,
                 config: EvalConfig, name: str) -> dict[str, object]:
    """McNemar for closed items, paired bootstrap for every metric; see the module docstring."""
    pairs, only_main, only_other = match_items(main, other)
    rng = lambda part: np.random.default_rng(stable_seed(config.seed, "paired", name, part))  # noqa: E731
    out: dict[str, object] = {"n_matched": len(pairs), "n_only_main": only_main, "n_only_other": only_other}
    closed = [(i, j) for i, j in pairs if main[i].kind != "open"]
    if closed:
        a = np.array([main_scores.correct[i] for i, _ in closed])
        b = np.array([other_scores.correct[j] for _, j in closed])
        right_wrong = int(((a == 1) & (b == 0)).sum())
        wrong_right = int(((a == 0) & (b == 1)).sum())
        diff = paired_bootstrap(b, a, bootstrap=config.bootstrap, confidence=config.confidence, rng=rng("closed"))
        out["closed"] = {
            "n": len(closed), "main_accuracy": float(a.mean()), "other_accuracy": float(b.mean()),
            "diff": diff["diff"], "diff_ci": diff["ci"], "bootstrap_p_value": diff["p_value"],
            "main_right_other_wrong": right_wrong, "main_wrong_other_right": wrong_right,
            "mcnemar_p_value": mcnemar_exact(right_wrong, wrong_right),
        }
    opened = [(i, j) for i, j in pairs if main[i].kind == "open"]
    if opened:
        res: dict[str, object] = {"n": len(opened)}
        for metric in OPEN_METRICS:
            a = np.array([main_scores.open_scores[metric][i] for i, _ in opened])
            b = np.array([other_scores.open_scores[metric][j] for _, j in opened])
            d = paired_bootstrap(b, a, bootstrap=config.bootstrap, confidence=config.confidence, rng=rng(metric))
            res[metric] = {"diff": d["diff"], "ci": d["ci"], "p_value": d["p_value"]}
        a = main_scores.bleu_stats[[i for i, _ in opened]]
        b = other_scores.bleu_stats[[j for _, j in opened]]
        d = paired_bootstrap(b, a, bootstrap=config.bootstrap, confidence=config.confidence, rng=rng("bleu_4"),
                             statistic=lambda summed: bleu_from_statistics_batch(np.atleast_2d(summed), MAX_BLEU_ORDER))
        res["bleu_4"] = {"diff": d["diff"], "ci": d["ci"], "p_value": d["p_value"]}
        out["open"] = res
    return out
