"""Visual token selectors: choose exactly ``k`` of a slide's N patch tokens for the LLM.

Every selector is a plain function with one signature and lives in the :data:`SELECTORS`
dict (``vision_feature_select_mode`` names the entry)::

    selector(tokens [B, N, D], mask [B, N], k, *, cls_attention=None, keys=None, query=None,
             coords=None, generator=None, training=False, options=None) -> Selection

Guarantees shared by all selectors (tested):

* exactly ``k`` tokens per row, whatever N and however much padding;
* a padded tile (``mask`` False) is never selected;
* vectorised over batch rows and tokens (the only Python loops run over the 16 bits of the
  Hilbert key or nothing at all);
* deterministic: the same inputs (and the same ``generator`` state) give the same result;
* ``training`` changes nothing: selection and weighting are identical in training and evaluation.

Fewer real tiles than ``k``: the row's chosen tiles are repeated by :func:`fill_by_cycling`
(``c0, c1, …, c_{n-1}, c0, c1, …``) so the prompt keeps its fixed number of visual tokens.

Order of the kept tokens: spatial (ascending tile index, which is the slide's row-major order)
by default, ``SelectOptions(order="score")`` gives descending score (PruMerge's own order).

This module also holds :func:`prumerge_reference`, an exact vectorised restatement of the
original LLaVA-PruMerge ``token_prune_merge_advanced[_plus]`` (CLIP, no padding, CLS at index 0),
checked against vectors produced by the original code.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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


# ----------------------------------------------------------------------------------------------
# Public types
# ----------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What a selector returns."""

    tokens: Tensor
    """[B, K, D] selected patch tokens (merged for PruMerge, weighted for weighted prompt top-K)."""
    indices: Tensor
    """[B, K] int64 index of each kept tile in the N patch tokens (a merged token's centre tile)."""
    scores: Tensor | None
    """[B, N] per-tile score behind the choice (detached, 0 on padding), for heatmaps; ``None`` for
    ``none`` and ``random_sample``. PruMerge(+): CLS attention; prompt top-K: cosine similarity."""


@dataclass
class SelectOptions:
    """Per-selector knobs. Fields a selector does not use are ignored by it."""

    budget: str = "fixed"
    """PruMerge(+): ``"fixed"`` keeps exactly ``k`` attention tiles (PruMerge+ keeps
    ``round(k * plus_topk_fraction)``); ``"adaptive"`` keeps as many as the original IQR outlier
    rule finds in the row (capped at ``k``), see :func:`adaptive_keep_counts`. For ``prumerge`` the
    remaining slots repeat the kept tokens (:func:`fill_by_cycling`); for ``prumerge_plus`` they
    are filled with spatially uniform tiles."""
    merge_neighbours: int = 32
    """PruMerge(+): how many most key-similar other real tiles are merged into each kept token
    (the original uses 32 at inference). 0 disables merging (plain top CLS-attention tiles)."""
    iqr_whisker: float = 1.5
    """Adaptive budget: a tile is an outlier when its CLS attention exceeds ``Q3 + whisker * IQR``
    of its slide's real tiles (the original's 1.5)."""
    plus_topk_fraction: float = 0.5
    """PruMerge+ with the fixed budget: fraction of the ``k`` slots taken by top CLS-attention
    tiles; the rest are spatially uniform tiles (the original's fixed-ratio variant uses half)."""
    similarity_weighting: bool = False
    """Prompt top-K: multiply each kept token by ``K * softmax(sim / similarity_temperature)``
    over the kept tokens (mean weight 1). This is the only path by which gradients reach the
    query (and so ``text_query_projection``): top-K itself is not differentiable."""
    similarity_temperature: float = 0.5
    """Prompt top-K weighting temperature (> 0); smaller means sharper weights."""
    order: str = "spatial"
    """Order of the kept tokens: ``"spatial"`` (ascending tile index) or ``"score"`` (descending
    score; PruMerge+ puts its spatial tiles after the attention tiles, as the original does).
    ``none`` and ``random_sample`` are always spatial."""

    def __post_init__(self) -> None:
        if self.budget not in ("fixed", "adaptive"):
            raise ValueError(f"SelectOptions.budget must be 'fixed' or 'adaptive', got {self.budget!r}")
        if self.order not in ("spatial", "score"):
            raise ValueError(f"SelectOptions.order must be 'spatial' or 'score', got {self.order!r}")
        if int(self.merge_neighbours) != self.merge_neighbours or self.merge_neighbours < 0:
            raise ValueError(
                f"SelectOptions.merge_neighbours must be an integer >= 0, got {self.merge_neighbours!r}"
            )
        if not 0.0 <= self.plus_topk_fraction <= 1.0:
            raise ValueError(
                f"SelectOptions.plus_topk_fraction must lie in [0, 1], got {self.plus_topk_fraction!r}"
            )
        if not self.similarity_temperature > 0:
            raise ValueError(
                f"SelectOptions.similarity_temperature must be > 0, got {self.similarity_temperature!r}"
            )
        if not (math.isfinite(self.iqr_whisker) and self.iqr_whisker >= 0):
            raise ValueError(f"SelectOptions.iqr_whisker must be finite and >= 0, got {self.iqr_whisker!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SelectOptions:
        """Build from a config mapping; an unknown key raises with the closest valid name."""
        values = dict(values or {})
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(names)}"
                raise ValueError(f"unknown selector option {key!r}{more}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def fill_by_cycling(candidates: Tensor, count: Tensor, k: int) -> Tensor:
    """Repeat each row's first ``count`` candidates cyclically to length ``k``.

    ``out[b, j] = candidates[b, j % count[b]]`` — so a row with at least ``k`` candidates keeps
    its first ``k`` unchanged, and a row with fewer (a slide with fewer real tiles than the
    budget, or an adaptive budget below ``k``) is padded deterministically by its own tokens in
    the same order (``c0, c1, c2, c0, c1, …``), never by padding.

    Args:
        candidates: [B, M] int64 tile indices, the valid ones first.
        count: [B] int64 number of valid candidates per row, 1 <= count <= M.
        k: output length.
    Returns:
        [B, k] int64.
    """
    if candidates.dim() != 2 or count.shape != candidates.shape[:1]:
        raise ValueError(
            f"fill_by_cycling: candidates must be [B, M] and count [B], got "
            f"{tuple(candidates.shape)} and {tuple(count.shape)}"
        )
    bad = (count < 1) | (count > candidates.shape[1])
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"fill_by_cycling: count must lie in [1, {candidates.shape[1]}]; batch rows {rows} have "
            f"{count[bad].tolist()}"
        )
    pos = torch.arange(k, device=candidates.device)[None, :] % count[:, None]
    return candidates.gather(1, pos)


def adaptive_keep_counts(scores: Tensor, mask: Tensor, whisker: float = 1.5) -> Tensor:
    """Per-row PruMerge adaptive budget: the number of IQR outliers among the row's real tiles.

    Per row over real tiles: ``Q1, Q3`` = 25th/75th percentiles (linear interpolation, as
    ``numpy.percentile``), ``ratio = count(s > Q3 + whisker * IQR) / n``, ``K = int(n * ratio)``
    (float64, the original's arithmetic). The original pools the whole batch; for slides each
    slide gets its own count (for B = 1 both agree).

    Args:
        scores: [B, N] CLS attention.
        mask: [B, N] bool, True = real tile.
    Returns:
        [B] int64 counts in [0, n_real].
    """
    n = mask.sum(1)
    s = scores.detach().double()
    ordered = s.masked_fill(~mask, math.inf).sort(dim=1).values
    last = (n - 1).clamp(min=0)

    def percentile(p: float) -> Tensor:
        h = p * last.double()
        lo = h.floor().long()
        hi = torch.minimum(lo + 1, last)
        a = ordered.gather(1, lo[:, None]).squeeze(1)
        b = ordered.gather(1, hi[:, None]).squeeze(1)
        return a + (b - a) * (h - lo.double())

    q1, q3 = percentile(0.25), percentile(0.75)
    upper = q3 + whisker * (q3 - q1)
    outliers = ((s > upper[:, None]) & mask).sum(1)
    ratio = outliers.double() / n.clamp(min=1).double()
    return (n.double() * ratio).floor().long()


def hilbert_keys(coords: Tensor, mask: Tensor, bits: int = 16) -> Tensor:
    """Position of each tile along a Hilbert curve over its slide's tile bounding box.

    Coordinates are shifted by the row's minimum over real tiles, scaled by the larger extent
    (same scale on both axes) onto a ``2**bits`` grid, and mapped to the Hilbert index. Evenly
    spaced picks along this order cover the tissue uniformly whatever its shape (no aliasing
    with the row width, unlike every-n-th tile in row-major order). Padding gets the largest key.

    Args:
        coords: [B, N, 2] (x, y) level-0 pixels.
        mask: [B, N] bool.
    Returns:
        [B, N] int64 keys.
    """
    c = coords.detach().double()
    big = torch.finfo(torch.float64).max
    lo = c.masked_fill(~mask[..., None], big).amin(dim=1, keepdim=True)
    hi = c.masked_fill(~mask[..., None], -big).amax(dim=1, keepdim=True)
    extent = (hi - lo).amax(dim=2, keepdim=True).clamp(min=1e-9)
    side = 1 << bits
    q = ((c - lo) / extent * (side - 1)).round().clamp(0, side - 1).long()
    q = q.masked_fill(~mask[..., None], 0)
    x, y = q[..., 0], q[..., 1]
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:  # loop over bits, not tokens
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        flip = (~ry) & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return d.masked_fill(~mask, torch.iinfo(torch.int64).max)


def _check_common(tokens: Tensor, mask: Tensor, k: int, name: str) -> Tensor:
    """Validate the shared inputs; return ``n_real`` [B] int64."""
    if tokens.dim() != 3:
        raise ValueError(f"{name}: tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"{name}: mask must be bool [B, N] = {tuple(tokens.shape[:2])}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: k (image_seq_length) must be an int >= 1, got {k!r}")
    n_real = mask.sum(1)
    empty = n_real == 0
    if bool(empty.any()):
        raise ValueError(
            f"{name}: batch rows {empty.nonzero().flatten().tolist()} have no real tile (mask all False)"
        )
    return n_real


def _check_side(value: Tensor | None, shape: tuple[int, ...], what: str, name: str, mask: Tensor,
                ndim: int | None = None) -> Tensor:
    """A required side input: present, ``ndim``-D with the given leading shape, finite on real tiles."""
    if value is None:
        raise ValueError(f"{name}: needs `{what}` (got None)")
    ndim = len(shape) if ndim is None else ndim
    if tuple(value.shape[: len(shape)]) != shape or value.dim() != ndim:
        raise ValueError(f"{name}: `{what}` must be {ndim}-D with leading shape {shape}, got "
                         f"{tuple(value.shape)}")
    summary = value.detach()
    if summary.dim() == 3:  # one pass: a NaN/Inf element makes the row's norm NaN/Inf
        summary = torch.linalg.vector_norm(summary, dim=-1)
    bad = mask & ~torch.isfinite(summary)
    if bool(bad.any()):
        rows, cols = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: `{what}` is NaN/Inf at batch row {rows}, tile {cols} (a real tile)")
    return value


def _real_first(mask: Tensor) -> Tensor:
    """[B, N] tile indices with the row's real tiles first, each group in index order."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def _finish(ranked: Tensor, count: Tensor, k: int, spatial: bool) -> Tensor:
    """First ``count`` entries of ``ranked`` (optionally sorted by index), cycled to ``k``."""
    take = ranked[:, :k]
    if spatial:
        j = torch.arange(take.shape[1], device=take.device)[None, :]
        last = torch.iinfo(torch.int64).max  # invalid slots sort after every tile index
        take = torch.where(j < count[:, None], take, last).sort(dim=1).values
    return fill_by_cycling(take, count, k)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` [B, N, *] gathered at ``idx`` [B, *I] → [B, *I, *]."""
    b = torch.arange(x.shape[0], device=x.device).view(-1, *([1] * (idx.dim() - 1)))
    return x[b, idx]


def _masked_score_out(scores: Tensor, mask: Tensor) -> Tensor:
    return scores.detach().masked_fill(~mask, 0)


def _topk_ranked(scores: Tensor, mask: Tensor, k: int) -> Tensor:
    """[B, min(k, N)] indices of the highest real scores (padding ranks last)."""
    masked = scores.detach().masked_fill(~mask, -math.inf)
    return masked.topk(min(k, scores.shape[1]), dim=1).indices


def _merge(tokens: Tensor, keys: Tensor, attn: Tensor, mask: Tensor, centres: Tensor, m: int) -> Tensor:
    """PruMerge merge: each centre + Σ attn_j · token_j over its ``m`` most key-similar others.

    Neighbours are the other *real* tiles of the row (kept ones included), ranked by cosine
    similarity of keys; weights are the raw CLS attentions (not renormalised), as the original.

    Args:
        tokens: [B, N, D]; keys: [B, N, Dk]; attn: [B, N]; mask: [B, N]; centres: [B, K].
    Returns:
        [B, K, D].
    """
    centre_tokens = _gather_rows(tokens, centres)
    m = min(m, tokens.shape[1] - 1)
    if m <= 0:
        return centre_tokens
    keys = keys.detach()
    norm = torch.linalg.vector_norm(keys, dim=-1).clamp(min=1e-12)  # as F.normalize, [B, N]
    dots = torch.bmm(_gather_rows(keys, centres), keys.transpose(1, 2))  # [B, K, N]
    sim = dots / (norm.gather(1, centres)[:, :, None] * norm[:, None, :])  # cosine, K×N not N×Dk work
    sim = sim.masked_fill(~mask[:, None, :], -math.inf)
    sim.scatter_(2, centres[..., None], -math.inf)
    top = sim.topk(m, dim=2)
    # A row with fewer than m other real tiles: the missing neighbours point at the centre
    # itself with weight 0, so padding values (even NaN) never enter the sum.
    real = torch.isfinite(top.values)
    neighbours = torch.where(real, top.indices, centres[..., None])  # [B, K, m]
    weights = attn.gather(1, neighbours.flatten(1)).view_as(neighbours)
    weights = weights.masked_fill(~real, 0)
    merged = torch.einsum("bkm,bkmd->bkd", weights.to(tokens.dtype), _gather_rows(tokens, neighbours))
    return centre_tokens + merged


# ----------------------------------------------------------------------------------------------
# Selectors
# ----------------------------------------------------------------------------------------------


def select_none(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                generator: torch.Generator | None = None, training: bool = False,
                options: SelectOptions | None = None) -> Selection:
    """The first ``k`` real tiles in index order (cycled if the row has fewer)."""
    n_real = _check_common(tokens, mask, k, "none")
    idx = _finish(_real_first(mask), n_real.clamp(max=k), k, spatial=False)
    return Selection(_gather_rows(tokens, idx), idx, None)


def select_random_sample(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                         keys: Tensor | None = None, query: Tensor | None = None,
                         coords: Tensor | None = None, generator: torch.Generator | None = None,
                         training: bool = False, options: SelectOptions | None = None) -> Selection:
    """``k`` real tiles uniformly without replacement, returned in index order.

    With a ``generator``: top-``k`` of i.i.d. uniform keys drawn from it on the generator's device
    (so the draw is the same whatever device the tokens are on). Without one: evenly spaced real
    tiles ``floor(j * n / k)``, j = 0..k-1 (deterministic). Rows with fewer than ``k`` real tiles
    take all of them, cycled.
    """
    n_real = _check_common(tokens, mask, k, "random_sample")
    count = n_real.clamp(max=k)
    if generator is None:
        j = torch.arange(k, device=mask.device)[None, :]
        pos = torch.where(n_real[:, None] >= k, (j * n_real[:, None]) // k, j % n_real[:, None])
        idx = _real_first(mask).gather(1, pos)
    else:
        u = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
        ranked = u.masked_fill(~mask, -1.0).topk(min(k, mask.shape[1]), dim=1).indices
        idx = _finish(ranked, count, k, spatial=True)
    return Selection(_gather_rows(tokens, idx), idx, None)


def _opts(options: SelectOptions | None) -> SelectOptions:
    return options if options is not None else SelectOptions()


def select_prumerge(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                    keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                    generator: torch.Generator | None = None, training: bool = False,
                    options: SelectOptions | None = None) -> Selection:
    """PruMerge on the slide encoder's last block.

    Keep the top tiles by CLS attention (``k`` with the fixed budget; with ``budget="adaptive"``
    the IQR outlier count, clipped to [1, k], then cycled to ``k``), and merge into each kept
    token its ``merge_neighbours`` most key-similar other real tiles weighted by their attention.
    The original's extra "sum of all pruned tiles" token is not produced (it has no tile and the
    budget is the prompt's fixed count); :func:`prumerge_reference` returns it.
    Needs ``cls_attention`` [B, N] and ``keys`` [B, N, Dk].
    """
    opts = _opts(options)
    n_real = _check_common(tokens, mask, k, "prumerge")
    b, n = mask.shape
    attn = _check_side(cls_attention, (b, n), "cls_attention", "prumerge", mask)
    keys = _check_side(keys, (b, n), "keys", "prumerge", mask, ndim=3)
    attn = attn.masked_fill(~mask, 0)
    if opts.budget == "adaptive":
        count = adaptive_keep_counts(attn, mask, opts.iqr_whisker).clamp(1, k)
    else:
        count = torch.full_like(n_real, k)
    count = torch.minimum(count, n_real)
    idx = _finish(_topk_ranked(attn, mask, k), count, k, spatial=opts.order == "spatial")
    merged = _merge(tokens, keys, attn, mask, idx, int(opts.merge_neighbours))
    return Selection(merged, idx, _masked_score_out(attn, mask))


def select_prumerge_plus(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                         keys: Tensor | None = None, query: Tensor | None = None,
                         coords: Tensor | None = None, generator: torch.Generator | None = None,
                         training: bool = False, options: SelectOptions | None = None) -> Selection:
    """PruMerge+: top CLS-attention tiles plus spatially uniform tiles up to the budget ``k``.

    Attention part: ``round(k * plus_topk_fraction)`` tiles (fixed) or the adaptive IQR count
    capped at ``k`` (adaptive). Spatial part: the remaining slots are filled with real tiles not
    already kept, evenly spaced along the Hilbert order of their ``coords`` (:func:`hilbert_keys`),
    i.e. uniform over the slide's own tile grid. All kept tokens (both parts) are merged as in
    PruMerge. Needs ``cls_attention``, ``keys`` and ``coords`` [B, N, 2].
    """
    opts = _opts(options)
    name = "prumerge_plus"
    n_real = _check_common(tokens, mask, k, name)
    b, n = mask.shape
    attn = _check_side(cls_attention, (b, n), "cls_attention", name, mask)
    keys = _check_side(keys, (b, n), "keys", name, mask, ndim=3)
    coords = _check_side(coords, (b, n, 2), "coords", name, mask)
    attn = attn.masked_fill(~mask, 0)
    dev = mask.device
    if opts.budget == "adaptive":
        n_att = adaptive_keep_counts(attn, mask, opts.iqr_whisker).clamp(max=k)
    else:
        n_att = torch.full_like(n_real, min(k, int(round(k * opts.plus_topk_fraction))))
    n_att = torch.minimum(n_att, n_real)

    kk = min(k, n)
    j = torch.arange(k, device=dev)[None, :]
    att = _topk_ranked(attn, mask, k)  # [B, kk]
    att_valid = j[:, :kk] < n_att[:, None]
    chosen = torch.zeros_like(mask).scatter(1, att, att_valid)
    rest = mask & ~chosen
    n_rest = rest.sum(1)
    rest_order = hilbert_keys(coords, rest).argsort(dim=1, stable=True)  # rest tiles first
    n_sp = torch.minimum(k - n_att, n_rest)
    pos = ((2 * j + 1) * n_rest[:, None]) // (2 * n_sp.clamp(min=1)[:, None])
    spatial = rest_order.gather(1, pos.clamp(max=n - 1))  # [B, k]
    sp_valid = j < n_sp[:, None]
    spatial = torch.where(sp_valid, spatial, n).sort(dim=1).values  # index order, invalid last

    cand = torch.cat([att, spatial], dim=1)
    valid = torch.cat([att_valid, sp_valid], dim=1)
    cand = cand.gather(1, torch.argsort((~valid).to(torch.int8), dim=1, stable=True))
    idx = _finish(cand, n_att + n_sp, k, spatial=opts.order == "spatial")
    merged = _merge(tokens, keys, attn, mask, idx, int(opts.merge_neighbours))
    return Selection(merged, idx, _masked_score_out(attn, mask))


def select_prompt_topk(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                       keys: Tensor | None = None, query: Tensor | None = None,
                       coords: Tensor | None = None, generator: torch.Generator | None = None,
                       training: bool = False, options: SelectOptions | None = None) -> Selection:
    """The ``k`` real tiles most cosine-similar to the text ``query`` [B, D].

    With ``similarity_weighting`` each kept token is multiplied by
    ``K * softmax(sim / similarity_temperature)`` over the kept tokens (differentiable in
    ``query`` and ``tokens``), the same in training and evaluation.
    """
    opts = _opts(options)
    name = "prompt_topk"
    n_real = _check_common(tokens, mask, k, name)
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
    idx = _finish(_topk_ranked(sim, mask, k), count, k, spatial=opts.order == "spatial")
    kept = _gather_rows(tokens, idx)
    if opts.similarity_weighting:
        w = torch.softmax(sim.gather(1, idx) / opts.similarity_temperature, dim=1) * k
        kept = kept * w[..., None].to(kept.dtype)
    return Selection(kept, idx, _masked_score_out(sim, mask))


def select_feature_outlier(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                           keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                           generator: torch.Generator | None = None, training: bool = False,
                           options: SelectOptions | None = None) -> Selection:
    """The ``k`` real tiles farthest from their slide's typical tile: PruMerge's "keep the outliers"
    without a tower, for tile features used directly (``vision_mode: none``) or any tower output.

    Score of tile i: ``‖x_i − median(x)‖₂``, the median taken per dimension over the row's real tiles,
    so a per-slide offset (stain, scanner) shared by all tiles cancels and tiles unlike the rest of
    their slide (a tumour focus in normal tissue) rank first. ``budget="adaptive"`` keeps the IQR
    outliers of the scores (clipped to [1, k], cycled to ``k``) as PruMerge does with CLS attention.
    """
    opts = _opts(options)
    n_real = _check_common(tokens, mask, k, "feature_outlier")
    x = tokens.detach().float()
    centre = x.masked_fill(~mask[..., None], float("nan")).nanmedian(dim=1).values  # [B, D]
    scores = torch.linalg.vector_norm(x - centre[:, None, :], dim=-1).masked_fill(~mask, 0)  # [B, N]
    if opts.budget == "adaptive":
        count = adaptive_keep_counts(scores, mask, opts.iqr_whisker).clamp(1, k)
    else:
        count = torch.full_like(n_real, k)
    count = torch.minimum(count, n_real)
    idx = _finish(_topk_ranked(scores, mask, k), count, k, spatial=opts.order == "spatial")
    return Selection(_gather_rows(tokens, idx), idx, _masked_score_out(scores, mask))


SELECTORS: dict[str, Callable[..., Selection]] = {
    "none": select_none,
    "random_sample": select_random_sample,
    "prumerge": select_prumerge,
    "prumerge_plus": select_prumerge_plus,
    "prompt_topk": select_prompt_topk,
    "feature_outlier": select_feature_outlier,
}
"""``vision_feature_select_mode`` → selector."""


# ----------------------------------------------------------------------------------------------
# Exact restatement of the original LLaVA-PruMerge (CLIP tower, no padding)
# ----------------------------------------------------------------------------------------------


@dataclass
class PruMergeParts:
    """Intermediates of the original algorithm (names as in the reference files)."""

    cls_attn: Tensor
    """[B, N] softmax(q_cls · kᵀ / sqrt(C)) over all N+1 keys, patch columns."""
    reduction_ratio: float
    """Outlier ratio (adaptive) or the given fixed ratio."""
    n_topk: int
    """``int(N * reduction_ratio)`` top-attention tokens."""
    keep_idx: Tensor
    """[B, K'] kept patch indices: top-attention descending, then PruMerge+'s spatial ones."""
    complement_idx: Tensor
    """[B, N-K'] the other patch indices, ascending."""
    neighbor_idx: Tensor
    """[B, K', m] patch indices merged into each kept token, most similar first."""
    merged_kept: Tensor
    """[B, K', C] merged kept tokens."""
    extra_token: Tensor
    """[B, 1, C] Σ over non-kept tokens of cls_attn · feature."""
    out: Tensor
    """[B, K'+1, C] the original function's return value (merged_kept ++ extra_token)."""


def prumerge_reference_parts(q: Tensor, k: Tensor, hidden_states: Tensor, plus: bool = False,
                             adaptive: bool = True, reduction_ratio: float = 1 / 8,
                             neighbours: int = 32) -> PruMergeParts:
    """The original ``token_prune_merge_advanced`` (``plus=False``) / ``…_plus`` (``plus=True``).

    Args:
        q, k: [B, N+1, C] query / key projections of the chosen block, CLS at index 0.
        hidden_states: [B, N+1, C] the features (patch features are ``hidden_states[:, 1:]``).
        plus: PruMerge+ (spatial indices on CLIP's 24x24 grid; adaptive needs B = 1).
        adaptive: IQR outlier ratio pooled over the batch; else ``reduction_ratio``.
    Where the original would crash (too few tokens for the neighbour count, a zero spatial
    stride, B > 1 with adaptive PruMerge+), this raises ``ValueError`` instead.
    """
    import numpy as np

    feats = hidden_states[:, 1:]
    b, n, c = feats.shape
    logits = (q[:, :1] @ k.transpose(-2, -1)) * c**-0.5
    cls_attn = torch.softmax(logits, dim=-1)[:, 0, 1:]  # [B, N]
    if adaptive:
        a = cls_attn.detach().to(torch.float32).cpu().numpy().ravel()
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        reduction_ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)
    n_topk = int(n * reduction_ratio)
    idx = torch.topk(cls_attn, n_topk, dim=1, largest=True).indices
    if plus:
        if reduction_ratio == 0:
            raise ValueError("prumerge_reference: reduction ratio 0 (original divides by it)")
        step = int(1 / reduction_ratio)
        if adaptive:
            stride = int(step / 3)
            if stride == 0 or b != 1:
                raise ValueError(f"prumerge_reference: PruMerge+ adaptive needs B == 1 and stride > 0 "
                                 f"(got B={b}, stride={stride})")
            seq = torch.arange(0, 575, stride, device=idx.device)
            seq = seq[~torch.isin(seq, idx.flatten())]
        else:
            seq = torch.arange(int(step / 2), 575, step, device=idx.device)
            if seq.numel() != n_topk:
                raise ValueError(f"prumerge_reference: PruMerge+ fixed ratio needs {n_topk} spatial "
                                 f"indices, the 575 grid gives {seq.numel()}")
        idx = torch.cat([idx, seq[None].expand(b, -1)], dim=1)
    kept_n = idx.shape[1]
    if neighbours > n - 1:
        raise ValueError(f"prumerge_reference: {neighbours} neighbours need N-1 >= {neighbours}, N={n}")

    others = torch.ones(b, n, dtype=torch.bool, device=idx.device).scatter(1, idx, False)
    compl = torch.sort(torch.where(others, torch.arange(n, device=idx.device), n), dim=1).values
    compl = compl[:, : n - kept_n]

    kn = F.normalize(k[:, 1:], p=2, dim=-1)
    sim = torch.bmm(_gather_rows(kn, idx), kn.transpose(1, 2))  # [B, K', N]
    sim.scatter_(2, idx[..., None], -math.inf)
    nbr = sim.topk(neighbours, dim=2).indices
    w = cls_attn.gather(1, nbr.flatten(1)).view_as(nbr)
    merged = _gather_rows(feats, idx) + torch.einsum("bkm,bkmd->bkd", w, _gather_rows(feats, nbr))
    extra = (_gather_rows(feats, compl) * cls_attn.gather(1, compl)[..., None]).sum(1, keepdim=True)
    out = torch.cat([merged, extra], dim=1)
    return PruMergeParts(cls_attn, float(reduction_ratio), n_topk, idx, compl, nbr, merged, extra, out)


def prumerge_reference(q: Tensor, k: Tensor, hidden_states: Tensor, plus: bool = False,
                       adaptive: bool = True) -> Tensor:
    """What the original LLaVA-PruMerge function returns: [B, K'+1, C] (see
    :func:`prumerge_reference_parts` for the intermediates and the arguments)."""
    return prumerge_reference_parts(q, k, hidden_states, plus=plus, adaptive=adaptive).out
