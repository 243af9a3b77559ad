"""A slide tower's output: one typed value, whether the tower ran or its outputs were read from a cache.

The model's towers (:mod:`wsi_llava.model.towers`) return it batched; a tower cache
(:mod:`wsi_llava.data.tower_cache`) reads it per slide (no B axis), :class:`~wsi_llava.data.collate.SlideCollator`
batches those (``batch["tower_outputs"]``) and the model takes them as ``tower_outputs=`` instead of running
its tower. Shapes: B slides, N tiles, D tower width, Dk key width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class TowerOutput:
    """What a tower produces for B slides (or one slide: the same shapes without B).

    Cached outputs (read from a tower cache) hold the tokens of the model's select layer (the cache is
    checked against it) and no ``hidden_states``.
    """

    tokens: torch.Tensor
    """[B, N(+1), D] tokens, CLS first when the tower has one; 0 on padded tiles."""
    cls_attention: torch.Tensor | None = None
    """[B, N] CLS→patch attention of the last block (0 on padding), or None."""
    keys: torch.Tensor | None = None
    """[B, N, Dk] last-block patch keys, or None."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """Per-layer tokens, each [B, N(+1), D] (0 = input embeddings), or None."""
    mask: torch.Tensor | None = None
    """[B, N] bool (True = real tile) the tower was given, or None (all real)."""

    def to(self, device, non_blocking: bool = False) -> "TowerOutput":
        """The same outputs on ``device`` (the tensors that are already there are not copied)."""
        def move(t):
            return t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t

        hidden = None if self.hidden_states is None else tuple(move(h) for h in self.hidden_states)
        return replace(self, tokens=move(self.tokens), cls_attention=move(self.cls_attention),
                       keys=move(self.keys), hidden_states=hidden, mask=move(self.mask))

    def zeros_like(self) -> "TowerOutput":
        """All outputs zeroed, same shapes and dtypes (image-reliance checks); the mask is kept."""
        def zero(v):
            if isinstance(v, tuple):
                return tuple(torch.zeros_like(h) for h in v)
            return None if v is None else torch.zeros_like(v)

        return TowerOutput(**{f.name: zero(getattr(self, f.name)) for f in fields(self) if f.name != "mask"},
                           mask=self.mask)
