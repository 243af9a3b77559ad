"""Stage-1 slide–text model and its loss: symmetric (multi-positive) InfoNCE.

``SlideTextModel`` = slide tower (GigaPath ``SlideEncoder``) → slide embedding (CLS or mean) →
projection, and text tower (:class:`~wsi_llava.model.text_tower.TextTower`) → projection; both
L2-normalised into one space of width E and compared by cosine similarity times a learnable logit
scale (clamped at ``max_logit_scale`` = ln 100).

Positives are given by integer keys per pair, ``keys`` [B, 3] = (slide, group, text): slide i and
text j are a positive pair when they share the group (the same slide, or the same ``case_id`` in the
``case`` variant) or the text key (identical report text). With only the diagonal positive the loss
is exactly CLIP's cross-entropy; with several it is ``logsumexp(all) - logsumexp(positives)``
(−log of the softmax mass on the positives), never exponentiated, so it cannot overflow.

Shapes: B batch, N tiles, Din tile width, T text tokens, D slide width, Ht text width, E shared width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .slide_encoder import SlideEncoder
from .text_tower import TextTower

#: Columns of the ``keys`` tensor.
SLIDE, GROUP, TEXT = 0, 1, 2


@dataclass
class SlideTextConfig:
    """Heads and loss of the stage-1 model."""

    slide_pool: str = "cls"
    """``cls`` or ``mean`` (``SlideEncoder.embed_slide``)."""
    projection_dim: int = 512
    """Shared width E; 0 = no projection (the towers must be equally wide)."""
    init_temperature: float = 0.07
    """Initial temperature: the logit scale starts at ln(1 / this)."""
    max_logit_scale: float = math.log(100.0)
    """Upper clamp of the logit scale (ln 100)."""
    freeze_slide_tower: bool = False
    """Slide tower in eval mode without gradients."""
    freeze_text_tower: bool = False
    """Text tower in eval mode without gradients."""
    gather_across_processes: bool = True
    """Under ``torch.distributed``: score against the batches of all processes."""


# ---------------------------------------------------------------------------------------------
# loss (pure functions)
# ---------------------------------------------------------------------------------------------
def positive_mask(query_keys: torch.Tensor, gallery_keys: torch.Tensor) -> torch.Tensor:
    """query_keys [Q, 3], gallery_keys [G, 3] → bool [Q, G]: same group or same text."""
    same_group = query_keys[:, None, GROUP] == gallery_keys[None, :, GROUP]
    same_text = query_keys[:, None, TEXT] == gallery_keys[None, :, TEXT]
    return same_group | same_text


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-query loss [Q] = ``logsumexp_j logits[q, j] - logsumexp_{j in P_q} logits[q, j]``.

    logits [Q, G] (any magnitude, float32 recommended), positives [Q, G] bool with at least one True per
    row. Equals ``cross_entropy(logits, target)`` when each row has exactly one positive.
    """
    if positives.shape != logits.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must match logits {tuple(logits.shape)}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive in the gallery")
    lse_all = torch.logsumexp(logits, dim=1)
    lse_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return lse_all - lse_pos


def symmetric_nce(slide_emb: torch.Tensor, text_emb: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                  gallery_slide: torch.Tensor | None = None, gallery_text: torch.Tensor | None = None,
                  gallery_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of local queries against a gallery (default: the local batch itself).

    slide_emb, text_emb [Q, E] (normalised), keys [Q, 3], logit_scale scalar (already exp'd and clamped);
    gallery_* [G, E] / [G, 3] hold the local rows too. Returns ``(mean slide→text + mean text→slide) / 2``.
    """
    gallery_slide = slide_emb if gallery_slide is None else gallery_slide
    gallery_text = text_emb if gallery_text is None else gallery_text
    gallery_keys = keys if gallery_keys is None else gallery_keys
    pos = positive_mask(keys, gallery_keys)
    s2t = logit_scale * slide_emb.float() @ gallery_text.float().T
    t2s = logit_scale * text_emb.float() @ gallery_slide.float().T
    return 0.5 * (multi_positive_nce(s2t, pos).mean() + multi_positive_nce(t2s, pos).mean())


# ---------------------------------------------------------------------------------------------
# gathering across processes (uneven batch sizes allowed)
# ---------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather of equally shaped tensors: forward concatenates every process's tensor
    by rank; backward sums the incoming gradients over processes (all-reduce, which every backend has)
    and returns this process's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """All processes' rows of x [b_r, ...] concatenated by rank → ([sum b_r, ...], offset of this rank).

    Batches may differ in size (padded for the exchange). With ``with_grad`` the gather is
    differentiable: each process receives the gradients that all processes' losses send to its rows.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x
    if with_grad:
        gathered = _AllGather.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.cat(parts)
    pieces = [gathered[r * longest:r * longest + n] for r, n in enumerate(sizes)]
    return torch.cat(pieces), sum(sizes[:rank])


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class SlideTextModel(nn.Module):
    """Slide tower + text tower + projections + logit scale (a plain module trained by the HF Trainer).

    ``forward(features [B, N, Din], coords [B, N, 2], tile_mask [B, N], input_ids [B, T],
    attention_mask [B, T], keys [B, 3]) -> {"loss", "slide_embeds" [B, E], "text_embeds" [B, E]}``.
    """

    accepts_loss_kwargs = False
    main_input_name = "input_ids"

    def __init__(self, slide_tower: SlideEncoder, text_tower: TextTower, cfg: SlideTextConfig | None = None):
        super().__init__()
        self.cfg = cfg or SlideTextConfig()
        if self.cfg.slide_pool not in ("cls", "mean"):
            raise ValueError(f"slide_pool must be 'cls' or 'mean', got {self.cfg.slide_pool!r}")
        self.slide_tower = slide_tower
        self.text_tower = text_tower
        d_slide, d_text, e = slide_tower.hidden_size, text_tower.hidden_size, self.cfg.projection_dim
        if e == 0 and d_slide != d_text:
            raise ValueError(f"projection_dim: 0 needs towers of equal width; the slide tower is {d_slide} wide and "
                             f"the text tower {d_text}: set projection_dim > 0")
        self.slide_projection = nn.Linear(d_slide, e, bias=False) if e else nn.Identity()
        self.text_projection = nn.Linear(d_text, e, bias=False) if e else nn.Identity()
        for proj in (self.slide_projection, self.text_projection):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.cfg.init_temperature)))
        self.slide_tower.requires_grad_(not self.cfg.freeze_slide_tower)
        if self.cfg.freeze_text_tower:
            self.text_tower.requires_grad_(False)
        self.train()

    @property
    def embed_dim(self) -> int:
        """Shared width E."""
        return self.cfg.projection_dim or self.slide_tower.hidden_size

    def train(self, mode: bool = True):
        """``nn.Module.train``, but frozen towers stay in eval mode (no dropout)."""
        super().train(mode)
        if self.cfg.freeze_slide_tower:
            self.slide_tower.eval()
        if self.cfg.freeze_text_tower:
            self.text_tower.eval()
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Gradient checkpointing of the trainable towers (called by the Trainer for
        ``gradient_checkpointing: true``)."""
        if not self.cfg.freeze_slide_tower:
            self.slide_tower.gradient_checkpointing_enable()
        if not self.cfg.freeze_text_tower:
            self.text_tower.gradient_checkpointing_enable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Alias of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable()

    def current_logit_scale(self) -> torch.Tensor:
        """exp(clamp(logit_scale, max=ln 100)) — the factor on cosine similarities."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()

    def encode_slides(self, features: torch.Tensor, coords: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """Tiles → normalised slide embeddings [B, E] (float32)."""
        frozen = self.cfg.freeze_slide_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.slide_tower(features, coords, tile_mask)
            pooled = self.slide_tower.embed_slide(out, self.cfg.slide_pool)
        return F.normalize(self.slide_projection(pooled).float(), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids → normalised text embeddings [B, E] (float32)."""
        frozen = self.cfg.freeze_text_tower
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            pooled = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_mask: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor) -> dict:
        slide = self.encode_slides(features, coords, tile_mask)
        text = self.encode_texts(input_ids, attention_mask)
        scale = self.current_logit_scale()
        if self.cfg.gather_across_processes and _distributed():
            all_slide, _ = gather_rows(slide, with_grad=True)
            all_text, _ = gather_rows(text, with_grad=True)
            all_keys, _ = gather_rows(keys, with_grad=False)
            loss = symmetric_nce(slide, text, keys, scale, all_slide, all_text, all_keys)
        else:
            loss = symmetric_nce(slide, text, keys, scale)
        return {"loss": loss, "slide_embeds": slide, "text_embeds": text}
