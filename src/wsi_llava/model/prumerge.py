"""The PruMerge family of token selectors: ``prumerge`` and ``prumerge_plus`` on the slide encoder's
last block (CLS attention + keys), and :func:`prumerge_reference`, an exact vectorised restatement of
the original LLaVA-PruMerge ``token_prune_merge_advanced[_plus]`` (CLIP, no padding, CLS at index 0),
checked against vectors produced by the original code.

Both selectors follow the contract of :mod:`wsi_llava.model.select` (they are entries of its
``SELECTORS``). Shapes: B batch, N tiles, K kept (``k``), D token width, Dk key width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..select_options import SelectOptions
from .select_base import (
    Selection,
    adaptive_keep_counts,
    check_common,
    check_side,
    finish,
    gather_rows,
    hilbert_keys,
    keep_count,
    masked_score_out,
    options_or_default,
    topk_ranked,
)

__all__ = ["PruMergeParts", "prumerge_reference", "prumerge_reference_parts", "select_prumerge",
           "select_prumerge_plus"]


def _merge(tokens: Tensor, keys: Tensor, attn: Tensor, mask: Tensor, centres: Tensor, m: int) -> Tensor:
    """PruMerge merge: each centre + Σ attn_j · token_j over its ``m`` most key-similar others.

    Neighbours are the other *real* tiles of the row (kept ones included), ranked by cosine
    similarity of keys; weights are the raw CLS attentions (not renormalised), as the original.

    Args:
        tokens: [B, N, D]; keys: [B, N, Dk]; attn: [B, N]; mask: [B, N]; centres: [B, K].
    Returns:
        [B, K, D].
    """
    centre_tokens = gather_rows(tokens, centres)
    m = min(m, tokens.shape[1] - 1)
    if m <= 0:
        return centre_tokens
    keys = keys.detach()
    norm = torch.linalg.vector_norm(keys, dim=-1).clamp(min=1e-12)  # as F.normalize, [B, N]
    dots = torch.bmm(gather_rows(keys, centres), keys.transpose(1, 2))  # [B, K, N]
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
    merged = torch.einsum("bkm,bkmd->bkd", weights.to(tokens.dtype), gather_rows(tokens, neighbours))
    return centre_tokens + merged



def _attention_inputs(tokens: Tensor, mask: Tensor, k: int, cls_attention: Tensor | None, keys: Tensor | None,
                      name: str) -> tuple[Tensor, Tensor, Tensor]:
    """The checked inputs of a PruMerge selector: ``n_real`` [B], CLS attention [B, N] (0 on padding)
    and keys [B, N, Dk]."""
    n_real = check_common(tokens, mask, k, name)
    b, n = mask.shape
    attn = check_side(cls_attention, (b, n), "cls_attention", name, mask)
    keys = check_side(keys, (b, n), "keys", name, mask, ndim=3)
    return n_real, attn.masked_fill(~mask, 0), keys


def select_prumerge(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                    keys: Tensor | None = None, query: Tensor | None = None, coords: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    options: SelectOptions | None = None) -> Selection:
    """PruMerge on the slide encoder's last block.

    Keep the top tiles by CLS attention (``k`` with the fixed budget; with ``budget="adaptive"``
    the IQR outlier count, clipped to [1, k], then cycled to ``k``), and merge into each kept
    token its ``merge_neighbours`` most key-similar other real tiles weighted by their attention.
    The original's extra "sum of all pruned tiles" token is not produced (it has no tile and the
    budget is the prompt's fixed count); :func:`prumerge_reference` returns it.
    Needs ``cls_attention`` [B, N] and ``keys`` [B, N, Dk].
    """
    opts = options_or_default(options)
    n_real, attn, keys = _attention_inputs(tokens, mask, k, cls_attention, keys, "prumerge")
    count = keep_count(attn, mask, n_real, k, opts)
    idx = finish(topk_ranked(attn, mask, k), count, k, spatial=opts.order == "spatial")
    merged = _merge(tokens, keys, attn, mask, idx, int(opts.merge_neighbours))
    return Selection(merged, idx, masked_score_out(attn, mask))


def select_prumerge_plus(tokens: Tensor, mask: Tensor, k: int, *, cls_attention: Tensor | None = None,
                         keys: Tensor | None = None, query: Tensor | None = None,
                         coords: Tensor | None = None, generator: torch.Generator | None = None,
                         options: SelectOptions | None = None) -> Selection:
    """PruMerge+: top CLS-attention tiles plus spatially uniform tiles up to the budget ``k``.

    Attention part: ``round(k * plus_topk_fraction)`` tiles (fixed) or the adaptive IQR count
    capped at ``k`` (adaptive). Spatial part: the remaining slots are filled with real tiles not
    already kept, evenly spaced along the Hilbert order of their ``coords`` (:func:`hilbert_keys`),
    i.e. uniform over the slide's own tile grid. All kept tokens (both parts) are merged as in
    PruMerge. Needs ``cls_attention``, ``keys`` and ``coords`` [B, N, 2].
    """
    opts = options_or_default(options)
    n_real, attn, keys = _attention_inputs(tokens, mask, k, cls_attention, keys, "prumerge_plus")
    b, n = mask.shape
    coords = check_side(coords, (b, n, 2), "coords", "prumerge_plus", mask)
    dev = mask.device
    if opts.budget == "adaptive":
        n_att = adaptive_keep_counts(attn, mask, opts.iqr_whisker).clamp(max=k)
    else:
        n_att = torch.full_like(n_real, min(k, int(round(k * opts.plus_topk_fraction))))
    n_att = torch.minimum(n_att, n_real)

    kk = min(k, n)
    j = torch.arange(k, device=dev)[None, :]
    att = topk_ranked(attn, mask, k)  # [B, kk]
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
    idx = finish(cand, n_att + n_sp, k, spatial=opts.order == "spatial")
    merged = _merge(tokens, keys, attn, mask, idx, int(opts.merge_neighbours))
    return Selection(merged, idx, masked_score_out(attn, mask))



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
    sim = torch.bmm(gather_rows(kn, idx), kn.transpose(1, 2))  # [B, K', N]
    sim.scatter_(2, idx[..., None], -math.inf)
    nbr = sim.topk(neighbours, dim=2).indices
    w = cls_attn.gather(1, nbr.flatten(1)).view_as(nbr)
    merged = gather_rows(feats, idx) + torch.einsum("bkm,bkmd->bkd", w, gather_rows(feats, nbr))
    extra = (gather_rows(feats, compl) * cls_attn.gather(1, compl)[..., None]).sum(1, keepdim=True)
    out = torch.cat([merged, extra], dim=1)
    return PruMergeParts(cls_attn, float(reduction_ratio), n_topk, idx, compl, nbr, merged, extra, out)


def prumerge_reference(q: Tensor, k: Tensor, hidden_states: Tensor, plus: bool = False,
                       adaptive: bool = True) -> Tensor:
    """What the original LLaVA-PruMerge function returns: [B, K'+1, C] (see
    :func:`prumerge_reference_parts` for the intermediates and the arguments)."""
    return prumerge_reference_parts(q, k, hidden_states, plus=plus, adaptive=adaptive).out

