"""Slide↔text retrieval metrics: R@1/5/10, mean and median rank, both directions, and their chance level.

Galleries hold each distinct slide and each distinct report once (by the slide and text keys of
:mod:`wsi_llava.data.slide_text`), so duplicated rows do not count twice. A slide's positives are
the reports of its group (its own reports; all reports of its case in the ``case`` variant), and
identical reports are one gallery item. The rank of a query is 1 + the number of *non*-positive
items scoring at least as high as its best positive (ties count against the query, so collapsed,
constant embeddings get the worst rank, never a good one).

Chance: with p positives among G items in a random order, P(R@k) = 1 − C(G−p, k) / C(G, k) and the
expected rank of the best positive is (G + 1) / (p + 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (1, 5, 10)


def ranks_of(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """scores [Q, G], positives [Q, G] bool (≥ 1 per row) → 1-based rank [Q] of each query's best positive."""
    if not bool(positives.any(1).all()):
        raise ValueError("every query needs at least one positive in the gallery")
    best = scores.masked_fill(~positives, float("-inf")).max(1).values
    beaten = (scores >= best[:, None]) & ~positives
    return 1 + beaten.sum(1)


def summarize(ranks: torch.Tensor, prefix: str, ks=KS) -> dict[str, float]:
    """ranks [Q] → ``{prefix_r1, …, prefix_mean_rank, prefix_median_rank}``."""
    r = ranks.double()
    out = {f"{prefix}_r{k}": float((r <= k).double().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(r.mean())
    out[f"{prefix}_median_rank"] = float(np.median(r.numpy()))
    return out


def chance(n_positive: torch.Tensor, n_gallery: int, prefix: str, ks=KS) -> dict[str, float]:
    """Expected metrics of a random ranking: n_positive [Q] positives each among ``n_gallery`` items."""
    g = int(n_gallery)
    out = {}
    for k in ks:
        k_eff = min(k, g)
        vals = [1.0 - math.comb(g - int(p), k_eff) / math.comb(g, k_eff) for p in n_positive.tolist()]
        out[f"{prefix}_r{k}"] = float(np.mean(vals))
    out[f"{prefix}_mean_rank"] = float(np.mean([(g + 1) / (int(p) + 1) for p in n_positive.tolist()]))
    return out


def _first_index(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values (sorted) and the first row holding each."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return uniq, first


def slide_text_retrieval(slide_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor,
                         ks=KS) -> tuple[dict[str, float], dict[str, float]]:
    """Whole-set retrieval of M pairs: slide_emb, text_emb [M, E] (normalised), keys [M, 3]
    (slide, group, text) → ``(metrics, chance)`` with ``s2t_*`` (slide→text) and ``t2s_*`` keys plus
    ``n_slides``/``n_texts`` (gallery sizes)."""
    from .slide_text import GROUP, SLIDE, TEXT

    keys = keys.long().cpu()
    slide_emb, text_emb = slide_emb.float().cpu(), text_emb.float().cpu()
    _, s_first = _first_index(keys[:, SLIDE])
    t_ids, t_first = _first_index(keys[:, TEXT])
    slides, texts = slide_emb[s_first], text_emb[t_first]
    # positive[s, t]: some pair of the slide's group has text t
    slide_group = keys[s_first, GROUP]
    text_col = torch.searchsorted(t_ids, keys[:, TEXT].contiguous())  # [M] gallery column of each pair's text
    group_has_text = torch.zeros((len(slide_group), len(t_ids)), dtype=torch.bool)
    same_group = slide_group[:, None] == keys[None, :, GROUP]  # [S, M]
    rows, pair_idx = same_group.nonzero(as_tuple=True)
    group_has_text[rows, text_col[pair_idx]] = True
    scores = slides @ texts.T  # [S, Tu]
    metrics = {**summarize(ranks_of(scores, group_has_text), "s2t", ks),
               **summarize(ranks_of(scores.T, group_has_text.T), "t2s", ks),
               "n_slides": len(slides), "n_texts": len(texts)}
    base = {**chance(group_has_text.sum(1), len(texts), "s2t", ks),
            **chance(group_has_text.sum(0), len(slides), "t2s", ks)}
    return metrics, base
