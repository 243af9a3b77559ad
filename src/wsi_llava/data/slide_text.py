"""Stage-1 data: (slide, report) pairs from manifest records, their dataset and collator.

A pair is a record with a non-empty ``caption`` (question/answer rows carry no report and are not
used); a repeated (slide, report) is kept once. Every pair gets integer keys (slide, group, text)
that define its positives (:mod:`wsi_llava.model.slide_text`): the group is the slide, or in the
``case`` variant the ``case_id`` (rows without one fall back to their slide), and the text key is
the report with case and whitespace folded, so identical reports are positives of each other. Keys
are numbered over the sorted distinct values, so every process of a distributed run agrees on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import WsiLlavaError
from .collate import pad_tiles
from .manifest import Record
from .slides import load_slide

POSITIVE_MODES = ("pair", "case")


class PairError(WsiLlavaError, ValueError):
    """The records cannot be turned into stage-1 pairs (names file and rows)."""


@dataclass(frozen=True)
class SlideTextPair:
    """One slide with one of its reports."""

    record: Record
    """The manifest row (its ``caption`` is the report)."""
    text: str
    """The report text (stripped)."""
    keys: tuple[int, int, int]
    """(slide, group, text) keys; see the module docstring."""


def text_key(text: str) -> str:
    """Case- and whitespace-insensitive form of a report (identical reports → one key)."""
    return " ".join(text.casefold().split())


def build_pairs(records: list[Record], positives: str = "pair") -> tuple[list[SlideTextPair], int]:
    """Records → pairs (caption rows only, each (slide, report) once) and the number of rows without a
    caption that were left out.

    Raises :class:`PairError` when ``positives`` is unknown, or (``case``) when one slide carries two
    different ``case_id`` values.
    """
    if positives not in POSITIVE_MODES:
        raise PairError(f"contrastive_positives must be one of {POSITIVE_MODES}, got {positives!r}")
    kept: list[tuple[Record, str]] = []
    seen: set[tuple[str, str]] = set()
    no_caption = 0
    case_of: dict[str, tuple[str, Record]] = {}
    for r in records:
        text = (r.caption or "").strip()
        if not text:
            no_caption += 1
            continue
        key = (r.slide_id, text_key(text))
        if key in seen:
            continue
        seen.add(key)
        if positives == "case":
            case = r.case_id or r.slide_id
            first = case_of.setdefault(r.slide_id, (case, r))
            if first[0] != case:
                raise PairError(f"{r.where} [case_id]: slide {r.slide_id!r} has case_id {case!r} here but "
                                f"{first[0]!r} at {first[1].where}")
        kept.append((r, text))
    slide_ids = {s: i for i, s in enumerate(sorted({r.slide_id for r, _ in kept}))}
    texts = {t: i for i, t in enumerate(sorted({text_key(t) for _, t in kept}))}
    if positives == "case":
        groups = {g: i for i, g in enumerate(sorted({case_of[r.slide_id][0] for r, _ in kept}))}
        group_of = {s: groups[case_of[s][0]] for s in slide_ids}
    else:
        group_of = dict(slide_ids)
    pairs = [SlideTextPair(r, t, (slide_ids[r.slide_id], group_of[r.slide_id], texts[text_key(t)])) for r, t in kept]
    return pairs, no_caption


class SlideTextDataset(torch.utils.data.Dataset):
    """``pairs[i]`` → dict(features [N, Din], coords [N, 2], input_ids [T], keys [3]).

    Texts are tokenised up front (``token_ids``, one list per pair); slides are read lazily, each call
    opening its H5. Training samples tiles with an RNG seeded by (seed, epoch, index); evaluation
    sampling is deterministic.
    """

    def __init__(self, pairs: list[SlideTextPair], token_ids: list[list[int]], patches_per_wsi: int | None,
                 expected_dim: int | None = None, training: bool = False, seed: int = 0):
        if len(pairs) != len(token_ids):
            raise ValueError(f"{len(pairs)} pairs but {len(token_ids)} tokenised texts")
        self.pairs = list(pairs)
        self.token_ids = token_ids
        self.patches_per_wsi = patches_per_wsi
        self.expected_dim = expected_dim
        self.training = training
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch so training tile samples change between epochs."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.training else None
        slide = load_slide(pair.record.h5_path, self.patches_per_wsi, rng=rng, expected_dim=self.expected_dim)
        return {"features": slide.features, "coords": slide.coords, "input_ids": self.token_ids[i],
                "keys": pair.keys}


@dataclass
class SlideTextCollator:
    """Pads tiles (``tile_mask`` [B, N], True = real) and texts (right, ``attention_mask`` [B, T])."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        feats = [torch.as_tensor(np.ascontiguousarray(it["features"]), dtype=torch.float32) for it in items]
        coords = [torch.as_tensor(np.ascontiguousarray(it["coords"]), dtype=torch.float32) for it in items]
        features, xy, tile_mask = pad_tiles(feats, coords)
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        keys = torch.as_tensor([list(it["keys"]) for it in items], dtype=torch.long)
        return {"features": features, "coords": xy, "tile_mask": tile_mask, "input_ids": ids,
                "attention_mask": mask, "keys": keys}
