"""Torch dataset of (slide, prompt) examples built from manifest records.

Prompts are tokenised once up front (so a prompt longer than ``cutoff_len`` fails before training
starts, naming its row); slides are read lazily in ``__getitem__`` (each call opens its H5, so workers
never share an h5py handle). Training samples tiles with an RNG seeded by (seed, epoch, index):
reproducible, and different every epoch. Evaluation sampling is deterministic.

With a ``tower_cache`` (:class:`~wsi_llava.data.tower_cache.TowerCache`) the same rows are read from the
slide's cache file instead: the item then also holds ``tower_outputs`` (a
:class:`~wsi_llava.data.tower_output.TowerOutput`) and the model skips its tower (every slide's file is
checked when the dataset is built).
"""

from __future__ import annotations

import numpy as np
import torch

from .manifest import ManifestError, Record
from .prompts import Example, PromptBuilder
from .slides import load_slide
from .tower_cache import TowerCache


def require_h5(records: list[Record]) -> None:
    """Refuse rows that have only an ROI image (training reads tile features from H5 files)."""
    image_only = [r for r in records if not r.h5_path and r.image_path]
    if image_only:
        raise ManifestError(
            f"{image_only[0].where} [h5_path]: only an ROI image ({image_only[0].image_path}); training reads tile "
            f"features: run `wsi-llava encode-roi --data MANIFEST --tile-weights W --out DIR` and train on "
            f"DIR/manifest.csv ({len(image_only)} such row(s))")


class SlideQADataset(torch.utils.data.Dataset):
    """``records[i]`` → dict(input_ids, labels, question_mask, features [N, D], coords [N, 2])."""

    def __init__(self, records: list[Record], builder: PromptBuilder, patches_per_wsi: int,
                 expected_dim: int | None = None, training: bool = False, seed: int = 0,
                 tower_cache: TowerCache | None = None):
        self.records = list(records)
        require_h5(self.records)
        self.examples: list[Example] = [builder.build_record(r) for r in self.records]
        self.patches_per_wsi = int(patches_per_wsi)
        self.expected_dim = expected_dim
        self.training = training
        self.seed = int(seed)
        self.epoch = 0
        self.zero_features = False
        self.tower_cache = tower_cache
        if tower_cache is not None:
            tower_cache.check_records(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch so tile sampling changes between epochs."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r, ex = self.records[i], self.examples[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.training else None
        if self.tower_cache is not None:
            return self._cached_item(ex, self.tower_cache.read(r.slide_id, self.patches_per_wsi, rng, r.where))
        slide = load_slide(r.h5_path, self.patches_per_wsi, rng=rng, expected_dim=self.expected_dim)
        features = slide.features
        if self.zero_features:
            features = np.zeros_like(features)
        return {"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                "features": features, "coords": slide.coords}

    def _cached_item(self, ex: Example, cached) -> dict:
        """The item of a :class:`~wsi_llava.data.tower_cache.CachedSlide` (zeroed for the sanity check)."""
        tower = cached.tower_outputs.zeros_like() if self.zero_features else cached.tower_outputs
        return {"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                "features": cached.features, "coords": cached.coords, "tower_outputs": tower}
