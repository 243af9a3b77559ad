"""Batching: pad text and tiles, build masks.

Each item is a dict with ``input_ids`` [T], ``labels`` [T], ``question_mask`` [T] (lists or 1-D
tensors) and ``features`` [N, D], ``coords`` [N, 2] (numpy or tensors). The batch holds
``input_ids``/``labels``/``attention_mask``/``question_mask`` [B, T] and ``features`` [B, N, D],
``coords`` [B, N, 2], ``tile_mask`` [B, N] (True = real tile; padded tiles are zeros and False).
Tower-cache items (``data/tower_cache.py``) also carry ``tower_outputs``, one slide's
:class:`~wsi_llava.data.tower_output.TowerOutput` (tokens [1+N, D], cls_attention [N], keys [N, Dk]);
the batch then holds ``tower_outputs`` batched: tokens [B, 1+N, D], cls_attention [B, N], keys
[B, N, Dk], zero-padded like the tiles (all float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .prompts import IGNORE_INDEX
from .tower_output import TowerOutput


def _pad_1d(seqs: list[torch.Tensor], value, side: str) -> torch.Tensor:
    """Stack 1-D tensors [T_i] into [B, max T] padded with ``value`` on ``side``."""
    t = max(len(s) for s in seqs)
    out = torch.full((len(seqs), t), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = s
        else:
            out[i, t - len(s):] = s
    return out


def pad_tiles(features: list[torch.Tensor], coords: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-slide tiles: features [N_i, D], coords [N_i, 2] → [B, N, D], [B, N, 2], mask [B, N]."""
    n = max(len(f) for f in features)
    feats = _pad_rows(features, n)
    xy = _pad_rows([c.float() for c in coords], n)
    mask = torch.zeros((len(features), n), dtype=torch.bool)
    for i, f in enumerate(features):
        mask[i, : len(f)] = True
    return feats, xy, mask


def _pad_rows(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """Stack [N_i, ...] tensors into [B, n, ...], zero-padded. Only the padding is zeroed: writing
    zeros over a whole batch of slides first (50 MB for 4 × 2,048 × 1,536) cost as much as the copy."""
    out = torch.empty((len(rows), n, *rows[0].shape[1:]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        out[i, len(r):] = 0
    return out


def _tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if dtype is None else t.to(dtype)
    return torch.tensor(x, dtype=dtype)


@dataclass
class SlideCollator:
    """Collate function for ``DataLoader``/HF ``Trainer``; ``padding_side='left'`` for generation."""

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids = [_tensor(it["input_ids"], torch.long) for it in items]
        batch = {
            "input_ids": _pad_1d(ids, self.pad_token_id, self.padding_side),
            "attention_mask": _pad_1d([torch.ones(len(i), dtype=torch.long) for i in ids], 0, self.padding_side),
            "question_mask": _pad_1d([_tensor(it["question_mask"], torch.bool) for it in items], False, self.padding_side),
        }
        if "labels" in items[0]:
            batch["labels"] = _pad_1d([_tensor(it["labels"], torch.long) for it in items], IGNORE_INDEX, self.padding_side)
        feats = [_tensor(it["features"], torch.float32) for it in items]
        batch["features"], batch["coords"], batch["tile_mask"] = pad_tiles(feats, [_tensor(it["coords"]) for it in items])
        cached = ["tower_outputs" in it for it in items]
        if any(cached):
            if not all(cached):
                raise ValueError("a batch mixes cached tower outputs (tower_cache) with raw tile features")
            batch["tower_outputs"] = stack_tower_outputs([it["tower_outputs"] for it in items],
                                                         batch["features"].shape[1])
        return batch


def stack_tower_outputs(outputs: list[TowerOutput], n: int) -> TowerOutput:
    """Per-slide tower outputs (tokens [1+N_i, D], cls_attention [N_i], keys [N_i, Dk]) → one batched
    :class:`TowerOutput` padded to ``n`` tiles: tokens [B, 1+n, D], cls_attention [B, n], keys [B, n, Dk]
    (float32, zeros on padding)."""
    def pad(rows, width):
        return _pad_rows([_tensor(r, torch.float32) for r in rows], width)

    out = TowerOutput(tokens=pad([o.tokens for o in outputs], n + 1))
    if all(o.cls_attention is not None for o in outputs):
        out.cls_attention = pad([o.cls_attention for o in outputs], n)
    if all(o.keys is not None for o in outputs):
        out.keys = pad([o.keys for o in outputs], n)
    return out
