"""Visual token selectors: choose exactly ``k`` of a slide's N patch tokens for the LLM.

Every selector is a plain function with one signature and lives in the :data:`SELECTORS`
dict (``vision_feature_select_mode`` names the entry)::

    selector(tokens [B, N, D], mask [B, N], k, *, cls_attention=None, keys=None, query=None,
             coords=None, generator=None, options=None) -> Selection

Guarantees shared by all selectors (tested):

* exactly ``k`` tokens per row, whatever N and however much padding;
* a padded tile (``mask`` False) is never selected;
* vectorised over batch rows and tokens (the only Python loops run over the 16 bits of the
  Hilbert key or nothing at all);
* deterministic: the same inputs (and the same ``generator`` state) give the same result, in
  training and evaluation alike (no selector has a training mode).

Fewer real tiles than ``k``: the row's chosen tiles are repeated by :func:`fill_by_cycling`
(``c0, c1, …, c_{n-1}, c0, c1, …``) so the prompt keeps its fixed number of visual tokens.

Order of the kept tokens: spatial (ascending tile index, which is the slide's row-major order)
by default, ``SelectOptions(order="score")`` gives descending score (PruMerge's own order).

Modules: this one holds the registry and the simple selectors (``none``, ``random_sample``,
``prompt_topk``, ``feature_outlier``); :mod:`wsi_llava.model.prumerge` the PruMerge family and
:func:`prumerge_reference`, an exact vectorised restatement of the original LLaVA-PruMerge
(re-exported here); :mod:`wsi_llava.model.select_base` the shared helpers; the options are
:class:`wsi_llava.select_options.SelectOptions` (checked when a config is loaded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..select_options import SelectOptions
from .prumerge import (
    PruMergeParts,
    prumerge_reference,
    prumerge_reference_parts,
    select_prumerge,
    select_prumerge_plus,
)
from .select_base import (
    Selection,
    adaptive_keep_counts,
    check_common,
    fill_by_cycling,
    finish,
    gather_rows,
    hilbert_keys,
    keep_count,
    masked_score_out,
    options_or_default,
    real_first,
    topk_ranked,
)

__all__ = [
    "SELECTORS",
    "PruMergeParts",
    "SelectOptions",
    "Selection",
    "adaptive_keep_counts",
    "fill_by_cycling",
    "hilbert_keys",
    "prumerge_reference",
    "prumerge_reference_parts",
    "select_feature_outlier",
    "select_none",
    "select_prompt_topk",
    "select_prumerge",
    "select_prumerge_plus",
    "select_random_sample",
]


def select_none(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                generator: torch.Generator | None = None, options: SelectOptions | None = None) -> Selection:
    """The first ``k`` real tiles in index order (cycled if the row has fewer)."""
    n_real = check_common(tokens, mask, k, "none")
    idx = finish(real_first(mask), n_real.clamp(max=k), k, spatial=False)
    return Selection(gather_rows(tokens, idx), idx, None)


def select_random_sample(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                         keys: Tensor | None = None, query: Tensor | None = None,
                         coords: Tensor | None = None, generator: torch.Generator | None = None,
                         options: SelectOptions | None = None) -> Selection:
    """``k`` real tiles uniformly without replacement, returned in index order.

    With a ``generator``: top-``k`` of i.i.d. uniform keys drawn from it on the generator's device
    (so the draw is the same whatever device the tokens are on). Without one: evenly spaced real
    tiles ``floor(j * n / k)``, j = 0..k-1 (deterministic). Rows with fewer than ``k`` real tiles
    take all of them, cycled.
    """
    n_real = check_common(tokens, mask, k, "random_sample")
    count = n_real.clamp(max=k)
    if generator is None:
        j = torch.arange(k, device=mask.device)[None, :]
        pos = torch.where(n_real[:, None] >= k, (j * n_real[:, None]) // k, j % n_real[:, None])
        idx = real_first(mask).gather(1, pos)
    else:
        u = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
        ranked = u.masked_fill(~mask, -1.0).topk(min(k, mask.shape[1]), dim=1).indices
        idx = finish(ranked, count, k, spatial=True)
    return Selection(gather_rows(tokens, idx), idx, None)



def select_prompt_topk(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                       keys: Tensor | None = None, query: Tensor | None = None,
                       coords: Tensor | None = None, generator: torch.Generator | None = None,
                       options: SelectOptions | None = None) -> Selection:
    """The ``k`` real tiles most cosine-similar to the text ``query`` [B, D].

    With ``similarity_weighting`` each kept token is multiplied by
    ``K * softmax(sim / similarity_temperature)`` over the kept tokens (differentiable in
    ``query`` and ``tokens``), the same in training and evaluation.
    """
    opts = options_or_default(options)
    name = "prompt_topk"
    n_real = check_common(tokens, mask, k, name)
    b, n, d = tokens.shape
    if query is None or tuple(query.shape) != (b, d):
        got = None if query is None else tuple(query.shape)
        raise ValueError(f"{name}: needs `query` of shape {(b, d)} (tower width), got {got}")
    qn = query.detach().norm(dim=-1)
    bad = ~torch.isfinite(qn) | (qn == 0)
    if bool(bad.any()):
        raise ValueError(f"{name}: `query` is zero or NaN/Inf in batch rows {bad.nonzero().flatten().tolist()}")
    real_tokens = tokens.masked_fill(~mask[..., None], 0)  # padding (even NaN) stays out of grads
    norms = torch.linalg.vector_norm(real_tokens, dim=-1).clamp(min=1e-12)  # as F.normalize
    sim = torch.einsum("bnd,bd->bn", real_tokens, F.normalize(query, dim=-1)) / norms
    count = torch.minimum(n_real, torch.full_like(n_real, k))
    idx = finish(topk_ranked(sim, mask, k), count, k, spatial=opts.order == "spatial")
    kept = gather_rows(tokens, idx)
    if opts.similarity_weighting:
        w = torch.softmax(sim.gather(1, idx) / opts.similarity_temperature, dim=1) * k
        kept = kept * w[..., None].to(kept.dtype)
    return Selection(kept, idx, masked_score_out(sim, mask))


def select_feature_outlier(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                           keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                           generator: torch.Generator | None = None,
                           options: SelectOptions | None = None) -> Selection:
    """The ``k`` real tiles farthest from their slide's typical tile: PruMerge's "keep the outliers"
    without a tower, for tile features used directly (``vision_mode: none``) or any tower output.

    Score of tile i: ``‖x_i − median(x)‖₂``, the median taken per dimension over the row's real tiles,
    so a per-slide offset (stain, scanner) shared by all tiles cancels and tiles unlike the rest of
    their slide (a tumour focus in normal tissue) rank first. ``budget="adaptive"`` keeps the IQR
    outliers of the scores (clipped to [1, k], cycled to ``k``) as PruMerge does with CLS attention.
    """
    opts = options_or_default(options)
    n_real = check_common(tokens, mask, k, "feature_outlier")
    x = tokens.detach().float()
    centre = x.masked_fill(~mask[..., None], float("nan")).nanmedian(dim=1).values  # [B, D]
    scores = torch.linalg.vector_norm(x - centre[:, None, :], dim=-1).masked_fill(~mask, 0)  # [B, N]
    count = keep_count(scores, mask, n_real, k, opts)
    idx = finish(topk_ranked(scores, mask, k), count, k, spatial=opts.order == "spatial")
    return Selection(gather_rows(tokens, idx), idx, masked_score_out(scores, mask))


SELECTORS: dict[str, Callable[..., Selection]] = {
    "none": select_none,
    "random_sample": select_random_sample,
    "prumerge": select_prumerge,
    "prumerge_plus": select_prumerge_plus,
    "prompt_topk": select_prompt_topk,
    "feature_outlier": select_feature_outlier,
}
"""``vision_feature_select_mode`` → selector."""

