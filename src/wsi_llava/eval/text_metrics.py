"""Per-item scores of open-ended answers: BLEU sufficient statistics, ROUGE-1/2/L, METEOR.

* BLEU — sacrebleu's per-sentence statistics, summed over any subset of items to give that subset's
  corpus BLEU exactly (:func:`bleu_from_statistics` through sacrebleu; :func:`bleu_from_statistics_batch`,
  the same arithmetic vectorised for bootstrap resamples).
* ROUGE — rouge-score F-measures with Porter stemming.
* METEOR — nltk's ``meteor_score`` on lowercased word/punctuation tokens, with WordNet synonyms when
  WordNet is available offline (:mod:`wsi_llava.eval.wordnet`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .wordnet import WordNet, load_wordnet

MAX_BLEU_ORDER = 4


def bleu_statistics(
    hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a", lowercase: bool = False
) -> np.ndarray:
    """Per-item BLEU sufficient statistics ``[n, 2 + 2·4]``: sys_len, ref_len, correct_1..4, total_1..4.

    Summed over any subset of items (with multiplicity), they give that subset's corpus BLEU exactly.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = BLEU(tokenize=tokenize, lowercase=lowercase, max_ngram_order=MAX_BLEU_ORDER, effective_order=True)
    stats = np.zeros((len(hypotheses), 2 + 2 * MAX_BLEU_ORDER), dtype=np.int64)
    for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
        s = scorer.sentence_score(hyp, [ref])
        stats[i, 0], stats[i, 1] = s.sys_len, s.ref_len
        stats[i, 2:2 + MAX_BLEU_ORDER] = s.counts
        stats[i, 2 + MAX_BLEU_ORDER:] = s.totals
    return stats


def bleu_from_statistics(summed: np.ndarray, order: int) -> float:
    """Corpus BLEU-``order`` (0–1) from summed statistics (sacrebleu's ``exp`` smoothing)."""
    from sacrebleu.metrics import BLEU

    correct = [int(x) for x in summed[2:2 + order]]
    total = [int(x) for x in summed[2 + MAX_BLEU_ORDER:2 + MAX_BLEU_ORDER + order]]
    score = BLEU.compute_bleu(
        correct, total, int(summed[0]), int(summed[1]), smooth_method="exp", max_ngram_order=order
    )
    return score.score / 100.0


# --------------------------------------------------------------------------------------------------
# ROUGE and METEOR


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-item ROUGE-1/2/L F-measures (rouge-score, Porter stemming): ``{"rouge_1": [n], …}``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = {name: np.zeros(len(hypotheses)) for name in ("rouge_1", "rouge_2", "rouge_l")}
    for i, (hyp, ref) in enumerate(zip(hypotheses, references)):
        s = scorer.score(ref, hyp)  # (target, prediction)
        out["rouge_1"][i] = s["rouge1"].fmeasure
        out["rouge_2"][i] = s["rouge2"].fmeasure
        out["rouge_l"][i] = s["rougeL"].fmeasure
    return out


_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


def meteor_tokens(text: str) -> list[str]:
    """Lowercased word / punctuation tokens (METEOR needs pre-tokenised text; no punkt download)."""
    return _TOKEN.findall(text.lower())


def meteor_scores(hypotheses: Sequence[str], references: Sequence[str], wordnet: WordNet | None = None) -> np.ndarray:
    """Per-item METEOR (nltk) on :func:`meteor_tokens`; synonyms from ``wordnet`` (default: :func:`load_wordnet`)."""
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet or load_wordnet()
    return np.array(
        [
            meteor_score([meteor_tokens(ref)], meteor_tokens(hyp), wordnet=wn.reader)
            for hyp, ref in zip(hypotheses, references)
        ],
        dtype=np.float64,
    )


def bleu_from_statistics_batch(summed: np.ndarray, order: int) -> np.ndarray:
    """Vectorised :func:`bleu_from_statistics` over rows of ``summed`` ``[b, 10]`` → ``[b]`` (0–1).

    Same arithmetic as sacrebleu's ``compute_bleu`` with ``exp`` smoothing: an order with no match
    gets precision ``1 / (2^z · total)`` (z = zero-match orders so far); an order with no n-grams at
    all, or no match at any order, gives 0.
    """
    summed = np.asarray(summed, dtype=np.float64)
    sys_len, ref_len = summed[:, 0], summed[:, 1]
    correct = summed[:, 2:2 + order]
    total = summed[:, 2 + MAX_BLEU_ORDER:2 + MAX_BLEU_ORDER + order]
    zero = correct == 0
    halvings = np.cumsum(zero, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(zero, 1.0 / (np.power(2.0, halvings) * total), correct / total)
        log_mean = np.log(prec).mean(axis=1)
        bp = np.where(sys_len >= ref_len, 1.0, np.exp(1.0 - ref_len / sys_len))
        bp = np.where(sys_len > 0, bp, 0.0)
        score = bp * np.exp(log_mean)
    dead = (total == 0).any(axis=1) | ~(correct > 0).any(axis=1)
    return np.where(dead, 0.0, score)
