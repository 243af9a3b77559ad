"""LongNet dilated attention in plain PyTorch (the attention of the Prov-GigaPath slide encoder).

Semantics (those of the original torchscale/GigaPath code, re-stated; see ``docs/slide_encoder.md``):

* Each *branch* has a segment length ``w`` and a dilation ``r``. With ``w_eff = min(w, L)`` the sequence
  is zero-padded to a multiple of ``w_eff`` and cut into segments; each segment is zero-padded to a
  multiple of ``r``. Heads are split into ``r`` consecutive groups (``ceil(H / r)`` heads each, missing
  heads padded); head group ``g`` attends, inside each segment, from and to the positions
  ``g, g + r, g + 2r, ...``. Plain softmax attention with scale ``1/sqrt(Dh)``. Zero-padded rows are
  ordinary keys there: score 0, value 0 (they *are* in the softmax). Outputs are re-assembled by
  laying the padded segments end to end and cutting at L, as the original does; when ``r`` does not
  divide ``w`` and there are several segments (real config: only beyond 185,363 tokens), later
  segments therefore arrive shifted; this quirk is reproduced for checkpoint fidelity.
* Branch outputs are mixed per (token, head) with weights ``softmax_b(lse_b)`` over the branches that
  contain the token for that head (the others get log-sum-exp ``-1e8``, weight 0); the weights carry
  no gradient.
* With ``key_padding_mask`` [B, L] (True = real token) every sample is computed as if it were alone,
  exactly as the original would compute it: tokens marked False are removed from every softmax and
  receive no attention, while the zero rows that the original adds after the sample's last real token
  (up to its own segment / dilation boundary) stay zero keys. A sample therefore gives the same
  outputs for its real tokens whether or not padding is appended, and an all-True mask equals no mask.
  Outputs at masked positions are 0.

Without autograd, a branch whose last segment is mostly zero padding computes that segment over its
real rows only and adds the zero rows' share of the softmax in closed form (same output, less work;
see :func:`_attention_short_tail`).

Every branch is one fused attention call over all segments and head groups (``[B*n*r, H/r, m, Dh]``;
two when the tail is cut); gather and scatter are views (``diagonal`` of a ``[.., m, r, r, H/r, ..]`` view) plus one copy of
``1/r`` of the data. The fused kernel is the one ``F.scaled_dot_product_attention`` runs, called
through its aten op because that is the only way to get its log-sum-exp: on CPU the flash kernel; on
CUDA the flash kernel for fp16/bf16 without a mask (checked once per device, dtype and head width
against the public path). Otherwise ``F.scaled_dot_product_attention`` runs and the log-sum-exp is
computed exactly in a second, chunked, gradient-free pass (:func:`sdpa_with_lse`). Both live in
:mod:`wsi_llava.model.attention_lse` (re-exported here); this module holds the dilated layout and the mixing.

Shapes: B batch, L sequence length, H heads, Dh head width, n segments, r dilation, m = keys per
dilated segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_lse import attention_with_lse, sdpa_with_lse

__all__ = [
    "BranchGeometry",
    "attention_with_lse",
    "branch_attention",
    "dilated_attention",
    "sdpa_with_lse",
]

#: log-sum-exp given to (token, head) pairs a branch does not cover (the original's value).
UNCOVERED_LSE = -1e8


@dataclass(frozen=True)
class BranchGeometry:
    """How one branch cuts a sequence.

    Built by :meth:`of`; all fields are plain ints.
    """

    length: int
    """L, the (unpadded) sequence length."""
    segment: int
    """w_eff = min(segment_length, L): positions per segment before dilation padding."""
    dilation: int
    """r: positions ``g, g+r, ...`` of a segment go to head group ``g``."""
    num_segments: int
    """n = ceil(L / w_eff)."""
    padded_segment: int
    """w_r = ceil(w_eff / r) * r: a segment after dilation padding."""
    heads: int
    """H, the number of heads."""
    group_heads: int
    """ceil(H / r): heads per head group (the last groups may be partly padding when r does not divide H)."""

    @classmethod
    def of(cls, length: int, segment_length: int, dilation: int, heads: int) -> "BranchGeometry":
        if segment_length < 1 or dilation < 1:
            raise ValueError(f"segment length ({segment_length}) and dilation ({dilation}) must be >= 1")
        w_eff = min(int(segment_length), int(length))
        n = -(-length // w_eff)
        w_r = -(-w_eff // dilation) * dilation
        return cls(length, w_eff, int(dilation), n, w_r, int(heads), -(-heads // dilation))

    @property
    def keys_per_group(self) -> int:
        """m = w_r / r: the length of one dilated segment."""
        return self.padded_segment // self.dilation


# ---------------------------------------------------------------------------------------------
# gather / scatter between the dense layout [B, L, H, *tail] and the dilated one [B*n*r, H/r, m, *tail]
# ---------------------------------------------------------------------------------------------
def _linear(geo: BranchGeometry) -> bool:
    """True when position p sits at row p // r, lane p % r of the dilated layout (all but one rare case:
    several segments whose length is not a multiple of r)."""
    return geo.num_segments == 1 or geo.segment % geo.dilation == 0


def _pad_heads(x: torch.Tensor, geo: BranchGeometry) -> torch.Tensor:
    extra = geo.dilation * geo.group_heads - x.shape[2]
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], extra, *x.shape[3:])], dim=2)


def _to_segments(x: torch.Tensor, geo: BranchGeometry) -> torch.Tensor:
    """General (slow) path: x [B, L, H', *t] → [B, n, w_r, H', *t], every segment zero-padded on its own."""
    b, length = x.shape[:2]
    rest_shape = x.shape[2:]
    n, w_eff, w_r = geo.num_segments, geo.segment, geo.padded_segment
    out = x.new_zeros(b, n, w_r, *rest_shape)
    full = length // w_eff
    if full:
        out[:, :full, :w_eff] = x[:, : full * w_eff].view(b, full, w_eff, *rest_shape)
    rest = length - full * w_eff
    if rest:
        out[:, full, :rest] = x[:, full * w_eff:]
    return out


def _rows(x: torch.Tensor, rows: int, geo: BranchGeometry) -> torch.Tensor:
    """The first ``rows * r`` positions of x [B, L, r*hh, *t] as the dilated view [B, rows, r, hh, *t]
    (diagonal of (lane, head group): lane g of a row goes to head group g). A view, no copy."""
    r, hh = geo.dilation, geo.group_heads
    tail = x.shape[3:]
    v = x[:, : rows * r].view(x.shape[0], rows, r, r, hh, *tail).diagonal(0, 2, 3)  # [B, rows, hh, *t, r]
    return v.movedim(-1, 2)


def _gather(x: torch.Tensor, geo: BranchGeometry, end_to_end: bool = False) -> torch.Tensor:
    """x [B, L, H, *t] → [B*n*r, ceil(H/r), m, *t]: for every segment and head group g, the positions
    g, g+r, ... of that segment (zeros where the segment is padded).

    ``end_to_end``: use the output layout of :func:`_scatter_add` instead (padded segments laid end to
    end); it differs only when r does not divide w and there are several segments.
    """
    b, length = x.shape[:2]
    tail = x.shape[3:]
    r, hh, m, n = geo.dilation, geo.group_heads, geo.keys_per_group, geo.num_segments
    x = _pad_heads(x.contiguous(), geo)
    nt = len(tail)
    if not (end_to_end or _linear(geo)):
        seg = _to_segments(x, geo).view(b, n * m, r, r, hh, *tail)
        rows = seg.diagonal(0, 2, 3).movedim(-1, 2)  # [B, n*m, r, hh, *t]
        return rows.reshape(b, n, m, r, hh, *tail).permute(0, 1, 3, 4, 2, *range(5, 5 + nt)).reshape(
            b * n * r, hh, m, *tail)
    full_rows, lanes = divmod(length, r)  # complete rows of r positions; lanes of the last, partial row
    if n * m == full_rows:  # no padding at all: one strided copy
        rows = _rows(x, full_rows, geo).unflatten(1, (n, m))
        return rows.permute(0, 1, 3, 4, 2, *range(5, 5 + nt)).reshape(b * n * r, hh, m, *tail)
    out = x.new_zeros(b, n, r, hh, m, *tail)
    flat = out.permute(0, 1, 4, 2, 3, *range(5, 5 + nt))  # [B, n, m, r, hh, *t] view of out
    full_segs, part = divmod(full_rows, m)
    if full_segs:
        flat[:, :full_segs] = _rows(x, full_segs * m, geo).unflatten(1, (full_segs, m))
    if part:
        flat[:, full_segs, :part] = _rows(x[:, full_segs * m * r:], part, geo)
    if lanes:  # position full_rows*r + j → row full_rows, lane j, head group j
        tail_x = x[:, full_rows * r:].view(b, lanes, r, hh, *tail).diagonal(0, 1, 2)  # [B, hh, *t, lanes]
        s, i = divmod(full_rows, m)
        flat[:, s, i, :lanes] = tail_x.movedim(-1, 1)
    return out.view(b * n * r, hh, m, *tail)


def _scatter_add(result: torch.Tensor, y: torch.Tensor, geo: BranchGeometry, copy: bool = False) -> torch.Tensor:
    """Add (``copy``: write) the dilated y [B*n*r, ceil(H/r), m, *t] back into result [B, L, H, *t], in
    place; returns result.

    Like the original, the dilation-padded segments are laid end to end and cut at L: position p takes
    row p // r, lane p % r. (When r divides w, or there is one segment, that is exactly where p came
    from; otherwise later segments arrive shifted, as in the original.)
    """
    b, length, heads = result.shape[:3]
    tail = result.shape[3:]
    r, hh, m, n = geo.dilation, geo.group_heads, geo.keys_per_group, geo.num_segments
    nt = len(tail)
    flat = y.view(b, n, r, hh, m, *tail).permute(0, 1, 4, 2, 3, *range(5, 5 + nt))  # [B, n, m, r, hh, *t]
    if r * hh != heads:  # rare (padded heads): build the padded dense layout, crop, add
        dense = y.new_zeros(b, n, m, r, r, hh, *tail)
        dense.diagonal(0, 3, 4).copy_(flat.movedim(3, -1))
        dense = dense.view(b, n * m * r, r * hh, *tail)[:, :length, :heads]
        if copy:  # every (position, head) is covered by exactly one lane here
            covered = y.new_zeros(b, n, m, r, r, hh, dtype=torch.bool)
            covered.diagonal(0, 3, 4).fill_(True)
            covered = covered.view(b, n * m * r, r * hh)[:, :length, :heads]
            result[covered] = dense[covered]
        else:
            result += dense
        return result
    write = torch.Tensor.copy_ if copy else torch.Tensor.add_
    full_rows, lanes = divmod(length, r)
    full_segs, part = divmod(full_rows, m)
    if full_segs:
        write(_rows(result, full_segs * m, geo).unflatten(1, (full_segs, m)), flat[:, :full_segs])
    if part:
        write(_rows(result[:, full_segs * m * r:], part, geo), flat[:, full_segs, :part])
    if lanes:
        s, i = divmod(full_rows, m)
        view = result[:, full_rows * r:].view(b, lanes, r, hh, *tail).diagonal(0, 1, 2)  # [B, hh, *t, lanes]
        write(view, flat[:, s, i, :lanes].movedim(1, -1))
    return result


def _scatter(y: torch.Tensor, geo: BranchGeometry, fill: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`_gather`: y [B*n*r, ceil(H/r), m, *t] → [B, L, H, *t]; uncovered entries = ``fill``."""
    b = y.shape[0] // (geo.num_segments * geo.dilation)
    result = y.new_full((b, geo.length, geo.heads, *y.shape[3:]), fill)
    return _scatter_add(result, y, geo, copy=True)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, L] bool → [B] int64: index after each sample's last real token (0 when none)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * pos).amax(dim=1)


def _key_bias(mask: torch.Tensor, last: torch.Tensor, geo: BranchGeometry, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias [B*n*r, 1, 1, m] for one branch (see module doc for the semantics).

    A key is kept when it is a real token, or a zero row the original would have added for that
    sample alone: after its last real token up to its own padded end ``Z`` (``ceil(L_b/r)*r`` when the
    sample fits in one segment, else ``ceil(L_b/w)*w``), or dilation padding of a segment it uses.
    Head groups left without any key (only padded queries there) keep all keys, so no row is empty.
    """
    b, length = mask.shape
    n, w_eff, w_r, r = geo.num_segments, geo.segment, geo.padded_segment, geo.dilation
    dev = mask.device
    seg = torch.arange(n, device=dev).view(n, 1)
    loc = torch.arange(w_r, device=dev).view(1, w_r)
    in_seg = loc < w_eff
    pos = seg * w_eff + loc  # [n, w_r]; the sequence position for in-segment slots (and all of segment 0)
    real_mask = F.pad(mask, (0, n * w_eff + w_r - length), value=False)
    real = (in_seg & (pos < length)).unsqueeze(0) & real_mask[:, pos.clamp_max(real_mask.shape[1] - 1)]
    last_b = last.view(b, 1, 1)
    # alone, a sample of length L_b <= w is one segment padded to ceil(L_b/r)*r (slots of segment 0) ...
    one_segment = last_b <= w_eff
    one_rows = (seg == 0) & (loc >= last_b) & (loc < -(-last_b // r) * r)
    # ... and a longer one is padded to ceil(L_b/w)*w, each segment it uses then padded to w_r
    multi_rows = (in_seg & (pos >= last_b) & (pos < -(-last_b // w_eff) * w_eff)) | (
        ~in_seg & (seg * w_eff < last_b))
    keep = real | torch.where(one_segment, one_rows, multi_rows)  # [B, n, w_r]
    keep = keep.view(b, n, -1, r).transpose(2, 3)  # [B, n, r, m]
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    bias = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill_(~keep, float("-inf"))
    return bias.view(b * n * r, 1, 1, -1)


# ---------------------------------------------------------------------------------------------
# branches and mixing
# ---------------------------------------------------------------------------------------------
def _branch_sparse(q, k, v, geo: BranchGeometry, mask, last, scale, fused):
    """One branch in the dilated layout: out [B*n*r, ceil(H/r), m, Dh], lse [B*n*r, ceil(H/r), m]."""
    bias = None if mask is None else _key_bias(mask, last, geo, q.dtype)
    qi, ki, vi = (_gather(t, geo) for t in (q, k, v))
    tail = _real_tail_rows(geo)
    if bias is None and tail is not None and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _attention_short_tail(qi, ki, vi, geo, tail, scale, fused)
    return attention_with_lse(qi, ki, vi, bias, scale, fused=fused)


def _real_tail_rows(geo: BranchGeometry) -> int | None:
    """Rows of the last segment's dilated groups that hold real positions, when that segment is
    mostly zero padding (several segments, L not a multiple of w, linear layout); else None."""
    if geo.num_segments < 2 or not _linear(geo):
        return None
    rest = geo.length - (geo.num_segments - 1) * geo.segment
    rows = -(-rest // geo.dilation)
    return rows if rows < geo.keys_per_group else None


def _attention_short_tail(qi, ki, vi, geo: BranchGeometry, tail: int, scale, fused):
    """:func:`attention_with_lse` over the dilated layout, with the last segment cut to its ``tail``
    real rows and its ``z = m - tail`` zero rows put back in closed form.

    A zero row is a key with score 0 and value 0: it adds ``exp(0) = 1`` to the softmax sum and
    nothing to its numerator, so with ``lse`` and ``out`` over the real keys the full answer is
    ``lse' = logaddexp(lse, log z)`` and ``out' = out · exp(lse - lse')``. Exact, but the scale
    factor comes from the (gradient-free) log-sum-exp, so this runs only without autograd (a frozen
    tower, ``encode``, inference); training the tower takes the plain path. Zero-row queries lie past
    L and are never read. Saves up to one segment's work per branch (16 % of a 70,000-tile slide).
    """
    n, r, m = geo.num_segments, geo.dilation, geo.keys_per_group
    b = qi.shape[0] // (n * r)
    hh, dh = qi.shape[1], qi.shape[3]

    def split(t):  # [B*n*r, hh, m, Dh] → full segments [B*(n-1)*r, hh, m, Dh], tail [B*r, hh, tail, Dh]
        t6 = t.view(b, n, r, hh, m, dh)
        return t6[:, : n - 1].reshape(-1, hh, m, dh), t6[:, n - 1, :, :, :tail].reshape(-1, hh, tail, dh)

    (qf, qt), (kf, kt), (vf, vt) = split(qi), split(ki), split(vi)
    out_full, lse_full = attention_with_lse(qf, kf, vf, None, scale, fused=fused)
    out_tail, lse_tail = attention_with_lse(qt, kt, vt, None, scale, fused=fused)
    lse_all = torch.logaddexp(lse_tail, lse_tail.new_tensor(math.log(m - tail)))
    out_tail = out_tail * torch.exp(lse_tail - lse_all).unsqueeze(-1).to(out_tail.dtype)
    out = qi.new_zeros(b, n, r, hh, m, dh)
    lse = lse_full.new_full((b, n, r, hh, m), UNCOVERED_LSE)
    out[:, : n - 1] = out_full.view(b, n - 1, r, hh, m, dh)
    out[:, n - 1, :, :, :tail] = out_tail.view(b, r, hh, tail, dh)
    lse[:, : n - 1] = lse_full.view(b, n - 1, r, hh, m)
    lse[:, n - 1, :, :, :tail] = lse_all.view(b, r, hh, tail)
    return out.view(b * n * r, hh, m, dh), lse.view(b * n * r, hh, m)


def _prepare(q, k, v, key_padding_mask):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, L, H, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    mask = key_padding_mask
    if mask is not None:
        if mask.shape != q.shape[:2]:
            raise ValueError(f"key_padding_mask is {tuple(mask.shape)} but q is [B, L] = {tuple(q.shape[:2])}")
        mask = mask.to(device=q.device, dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # identical by construction, and faster
        else:  # padded tokens become the zero rows the original would have (NaN-safe: masked_fill)
            drop = ~mask.view(*mask.shape, 1, 1)
            q, k, v = (t.masked_fill(drop, 0) for t in (q, k, v))
    last = None if mask is None else _last_real(mask)
    return q, k, v, mask, last


def branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, dilation: int,
                     key_padding_mask: torch.Tensor | None = None, *, scale: float | None = None,
                     fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch, back in the dense layout.

    q, k, v [B, L, H, Dh] → out [B, L, H, Dh] (0 where the branch does not cover a (token, head)),
    lse [B, L, H] float32 (``UNCOVERED_LSE`` there).
    """
    q, k, v, mask, last = _prepare(q, k, v, key_padding_mask)
    geo = BranchGeometry.of(q.shape[1], segment_length, dilation, q.shape[2])
    out, lse = _branch_sparse(q, k, v, geo, mask, last, scale, fused)
    return _scatter(out, geo), _scatter(lse, geo, fill=UNCOVERED_LSE)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                      dilations: Sequence[int], key_padding_mask: torch.Tensor | None = None, *,
                      scale: float | None = None, fused: bool | None = None) -> torch.Tensor:
    """Mixed LongNet attention over all branches.

    q, k, v [B, L, H, Dh] (projection outputs split into heads); key_padding_mask None or [B, L] bool
    (True = real token) → [B, L, H, Dh]. ``scale`` defaults to ``1/sqrt(Dh)``.
    Memory: the branch outputs in their dilated layout (about ``sum(1/r)`` times q) plus one dense
    buffer; no attention matrix is ever materialised beyond the kernel's own blocks.
    """
    if len(segment_lengths) != len(dilations) or not segment_lengths:
        raise ValueError(f"segment_lengths {list(segment_lengths)} and dilations {list(dilations)} must be "
                         "non-empty and of equal length")
    q, k, v, mask, last = _prepare(q, k, v, key_padding_mask)
    b, length, heads, _ = q.shape
    geos = [BranchGeometry.of(length, w, r, heads) for w, r in zip(segment_lengths, dilations)]
    outs, lses = [], []
    for geo in geos:  # at most a handful of branches; everything inside is batched
        out, lse = _branch_sparse(q, k, v, geo, mask, last, scale, fused)
        outs.append(out)
        lses.append(lse)
    with torch.no_grad():  # mixing weights carry no gradient, like the original
        dense = torch.stack([_scatter(lse, geo, fill=UNCOVERED_LSE) for lse, geo in zip(lses, geos)])
        weights = torch.softmax(dense, dim=0)  # [nb, B, L, H]
        del dense
    result = q.new_zeros(q.shape)
    for i, (geo, w) in enumerate(zip(geos, weights)):
        weighted = outs[i] * _gather(w, geo, end_to_end=True).unsqueeze(-1).to(outs[i].dtype)
        outs[i] = None  # free the branch output early
        _scatter_add(result, weighted, geo)
    if mask is not None:
        result = result.masked_fill(~mask.view(b, length, 1, 1), 0)
    return result
