"""Vision towers behind one interface: ``tower(features [B,N,Din], coords [B,N,2], mask [B,N]) -> TowerOutput``.

``vision_mode: none`` — tile features go to the projector as they are (no CLS, no attention).
``vision_mode: wsi`` — the Prov-GigaPath slide encoder (``model/slide_encoder.py``).

:class:`~wsi_llava.data.tower_output.TowerOutput` is the one tower-output type (also what a tower cache
reads); it lives in ``data/`` so the data side can build it without importing the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.tower_output import TowerOutput
from .configuration import SlideEncoderConfig

__all__ = ["IdentityTower", "TowerOutput", "build_tower"]


class IdentityTower(nn.Module):
    """``vision_mode: none``: the tile features themselves are the visual tokens (width = feature width)."""

    has_cls = False

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> TowerOutput:
        """features [B, N, D] → tokens [B, N, D]."""
        if features.shape[-1] != self.width:
            raise ValueError(f"tile features are {features.shape[-1]}-wide but the model expects "
                             f"mm_hidden_size={self.width}")
        return TowerOutput(tokens=features, hidden_states=(features,) if output_hidden_states else None)


def build_tower(vision_mode: str, mm_hidden_size: int, vision_config: SlideEncoderConfig | None) -> nn.Module:
    """A fresh (randomly initialised) tower for ``vision_mode``; weights are loaded afterwards."""
    if vision_mode == "none":
        return IdentityTower(mm_hidden_size)
    if vision_mode == "wsi":
        from .slide_encoder import SlideEncoder

        return SlideEncoder(vision_config)
    raise ValueError(f"vision_mode {vision_mode!r} is not supported; use 'none' or 'wsi'")
