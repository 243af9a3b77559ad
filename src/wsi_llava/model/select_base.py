"""What every token selector shares: the :class:`Selection` it returns, the input checks, and the
vectorised building blocks (cycling to ``k``, the adaptive IQR budget, the Hilbert order, top-K with
padding ranked last). The selectors are in :mod:`wsi_llava.model.select` (registry and the simple
ones) and :mod:`wsi_llava.model.prumerge` (the PruMerge family).

Shapes: B batch, N tiles (patch tokens), K kept (the budget ``k``), D token width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..select_options import SelectOptions


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


def check_common(tokens: Tensor, mask: Tensor, k: int, name: str) -> Tensor:
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


def check_side(value: Tensor | None, shape: tuple[int, ...], what: str, name: str, mask: Tensor,
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


def real_first(mask: Tensor) -> Tensor:
    """[B, N] tile indices with the row's real tiles first, each group in index order."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def finish(ranked: Tensor, count: Tensor, k: int, spatial: bool) -> Tensor:
    """First ``count`` entries of ``ranked`` (optionally sorted by index), cycled to ``k``."""
    take = ranked[:, :k]
    if spatial:
        j = torch.arange(take.shape[1], device=take.device)[None, :]
        last = torch.iinfo(torch.int64).max  # invalid slots sort after every tile index
        take = torch.where(j < count[:, None], take, last).sort(dim=1).values
    return fill_by_cycling(take, count, k)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` [B, N, *] gathered at ``idx`` [B, *I] → [B, *I, *]."""
    b = torch.arange(x.shape[0], device=x.device).view(-1, *([1] * (idx.dim() - 1)))
    return x[b, idx]


def masked_score_out(scores: Tensor, mask: Tensor) -> Tensor:
    return scores.detach().masked_fill(~mask, 0)


def topk_ranked(scores: Tensor, mask: Tensor, k: int) -> Tensor:
    """[B, min(k, N)] indices of the highest real scores (padding ranks last)."""
    masked = scores.detach().masked_fill(~mask, -math.inf)
    return masked.topk(min(k, scores.shape[1]), dim=1).indices



def options_or_default(options: SelectOptions | None) -> SelectOptions:
    """The given options, or the defaults."""
    return options if options is not None else SelectOptions()


def keep_count(scores: Tensor, mask: Tensor, n_real: Tensor, k: int, opts: SelectOptions) -> Tensor:
    """[B] tiles a score-ranked selector keeps before cycling to ``k``: ``k`` with the fixed budget,
    the row's IQR outlier count of ``scores`` [B, N] clipped to [1, k] with ``budget="adaptive"``;
    never more than the row's ``n_real`` real tiles."""
    if opts.budget == "adaptive":
        count = adaptive_keep_counts(scores, mask, opts.iqr_whisker).clamp(1, k)
    else:
        count = torch.full_like(n_real, k)
    return torch.minimum(count, n_real)
