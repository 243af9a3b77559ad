"""Torch dataset of (slide, prompt) examples built from manifest records.

Prompts are tokenised once up front (so a prompt longer than ``cutoff_len`` fails before training
starts, naming its row); slides are read lazily in ``__getitem__`` (each call opens its H5, so workers
never share an h5py handle). Training samples tiles with an RNG seeded by (seed, epoch, index):
reproducible, and different every epoch. Evaluation sampling is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

from .manifest import Record
from .prompts import Example, PromptBuilder
from .slides import load_slide


class SlideQADataset(torch.utils.data.Dataset):
    """``records[i]`` → dict(input_ids, labels, question_mask, features [N, D], coords [N, 2])."""

    def __init__(self, records: list[Record], builder: PromptBuilder, patches_per_wsi: int,
                 expected_dim: int | None = None, training: bool = False, seed: int = 0):
        self.records = list(records)
        self.examples: list[Example] = [builder.build_record(r) for r in self.records]
        self.patches_per_wsi = int(patches_per_wsi)
        self.expected_dim = expected_dim
        self.training = training
        self.seed = int(seed)
        self.epoch = 0
        self.zero_features = False

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch so tile sampling changes between epochs."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r, ex = self.records[i], self.examples[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.training else None
        slide = load_slide(r.h5_path, self.patches_per_wsi, rng=rng, expected_dim=self.expected_dim)
        features = slide.features
        if self.zero_features:
            features = np.zeros_like(features)
        return {"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                "features": features, "coords": slide.coords}
