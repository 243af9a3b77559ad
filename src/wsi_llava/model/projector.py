"""Projector from tower width D to LM width H: ``mlp2x_gelu`` with a bounded learnable gamma."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """``linear_1`` (D→H) → LayerNorm → GELU → Dropout → ``linear_2`` (H→H) → LayerNorm → × gamma.

    ``gamma = gamma_min + sigmoid(gamma_logit) * (gamma_max - gamma_min)``: the visual tokens' scale is
    learnable but stays inside ``[gamma_min, gamma_max]``. The bounds are part of the saved model config,
    so the same ``gamma_logit`` means the same gamma in every stage that loads it.
    Module names ``linear_1``/``linear_2`` match LLaVA so LLaMA-Factory ``lora_target`` lists keep working.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, gamma_min: float = 1.0,
                 gamma_max: float = 1.0, projector_type: str = "mlp2x_gelu"):
        super().__init__()
        if projector_type != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type {projector_type!r} is not supported; use 'mlp2x_gelu'")
        if gamma_max < gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must be >= gamma_min ({gamma_min})")
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.norm_1 = nn.LayerNorm(out_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.norm_2 = nn.LayerNorm(out_dim)
        self.gamma_logit = nn.Parameter(torch.zeros(()))

    @property
    def gamma(self) -> torch.Tensor:
        """The current scale, a 0-d tensor in ``[gamma_min, gamma_max]``."""
        return self.gamma_min + torch.sigmoid(self.gamma_logit) * (self.gamma_max - self.gamma_min)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, K, D] → [B, K, H]."""
        h = self.dropout(self.act(self.norm_1(self.linear_1(x))))
        return self.norm_2(self.linear_2(h)) * self.gamma
